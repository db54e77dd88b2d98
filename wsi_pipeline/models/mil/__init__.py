"""Slide-level MIL models (GMMamba and baselines) behind one `create_model`, as in timm.

One module per model, each registering itself (`@register_model`); `registry.py` finds the names without
importing the modules and imports one only when its model is created, so importing this package costs nothing
(the CLI starts without torch).
"""

from wsi_pipeline.models.mil.registry import bag_loss, create_model, list_models, model_options, register_model

__all__ = ["bag_loss", "create_model", "list_models", "model_options", "register_model"]
