"""dlpipe: classic deep-learning models trained, tracked, exported and measured by one pipeline."""

__version__ = "0.1.0"
