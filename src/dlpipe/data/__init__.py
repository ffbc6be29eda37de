"""Datasets: sources and integrity (images, stocks), file formats, and Lightning data modules."""
