"""Slide-level MIL models (GMMamba and baselines) behind one ``create_model``.

Importing this package must stay cheap (no torch): model modules are imported on first use.
``encoders.py`` is the separate patch-encoder registry.
"""

from wsi_pipeline.models.registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model"]
