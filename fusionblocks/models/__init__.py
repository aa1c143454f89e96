"""Model assemblies: HiFuse and HEMF (:class:`FusionNet` configurations), HATR, and the registry.

Build models with :func:`create_model` (``list_models()`` names them); the model modules are imported on
first use of the registry.
"""
from .fusionnet import FusionNet
from .registry import create_model, list_models, register_model

__all__ = ["FusionNet", "create_model", "list_models", "register_model"]
