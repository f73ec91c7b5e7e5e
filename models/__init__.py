"""Neural network architectures, chosen by name from a registry (torch only)."""

from models.registry import MODEL_REGISTRY, ModelSpec, build_model, register_model

# Importing the modules registers their builders.
from models import cnn, lenet, resnet, rnn, tabular  # noqa: E402,F401

__all__ = ["MODEL_REGISTRY", "ModelSpec", "build_model", "register_model"]
