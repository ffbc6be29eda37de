"""Serving exported models over HTTP (`dlpipe serve`) and from files (`dlpipe predict`).

onnxruntime, numpy, Pillow and pandas only: nothing here (or anything it imports) may import torch, so
a serving image needs neither torch nor a GPU build of it. Models come from the MLflow registry (a model
version behind an alias, `models:/dlpipe-<model>@champion`) or from ONNX files; what a request must look
like is read from the graph's own metadata (written by export), through the adapter of the model's task.
"""
