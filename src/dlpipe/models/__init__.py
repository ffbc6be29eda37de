"""Networks: plain `nn.Module`s, one file per family, registered by name (see `registry`).

Importing this package registers every family, so `list_models()` is complete.
"""

# Importing the family modules registers their models.
from dlpipe.models import alexnet, cnn, dcgan, inception, mlp, mobilenet, resnet, rnn, vgg  # noqa: E402,F401,I001
from dlpipe.models.registry import (
    ModelSpec,
    count_trainable_parameters,
    get_model,
    get_spec,
    list_models,
    register_model,
)

__all__ = ["ModelSpec", "count_trainable_parameters", "get_model", "get_spec", "list_models", "register_model"]
