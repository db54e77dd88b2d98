"""MIL model registry: ``create_model(name, in_dim, n_classes, **opts)`` in the style of timm.

The CLI must start without importing torch, so the registry keeps a plain name -> module table and
imports a model's module only when that model is created; importing the module runs its
``@register_model`` decorators. This module itself imports nothing heavy.

The contract every registered model keeps (the trainer and predictor rely on it)::

    logits, attn = model(features, coords, groups=None)   # (1, C), (N,) or None
    model.make_groups(features_np, coords_np)              # list[np.ndarray] | None
    model.group_cache_key                                  # str | None, e.g. "kmeans_G10"
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

# name -> module that defines (and registers) it. Lazy: nothing here is imported until create_model.
_MODEL_MODULES: dict[str, str] = {
    "gmmamba": "wsi_pipeline.models.gmmamba",
    "abmil": "wsi_pipeline.models.abmil",
    "transmil": "wsi_pipeline.models.transmil",
    "mambamil": "wsi_pipeline.models.mambamil",
    "mean": "wsi_pipeline.models.pooling",
    "max": "wsi_pipeline.models.pooling",
}

_BUILDERS: dict[str, Callable[..., Any]] = {}


def register_model(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a builder ``fn(*, in_dim, n_classes, **opts) -> nn.Module`` under ``name``."""

    def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name not in _MODEL_MODULES:
            raise KeyError(f"model {name!r} is registered but missing from the lazy table in registry.py")
        _BUILDERS[name] = fn
        return fn

    return decorator


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`, sorted."""
    return sorted(_MODEL_MODULES)


def create_model(name: str, in_dim: int, n_classes: int, **opts: Any) -> Any:
    """Build MIL model ``name`` for ``in_dim``-d instance features and ``n_classes`` classes.

    ``opts`` are the model's keyword options (e.g. ``mask_ratio=0.1`` for GMMamba); an unknown option
    raises ``TypeError`` from the model's constructor rather than being silently ignored.
    """
    if name not in _MODEL_MODULES:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    importlib.import_module(_MODEL_MODULES[name])
    return _BUILDERS[name](in_dim=in_dim, n_classes=n_classes, **opts)


class GrouplessMixin:
    """Default half of the contract for models that need no instance groups (all baselines)."""

    group_cache_key: str | None = None

    def make_groups(self, features: Any, coords: Any) -> None:
        """Baselines see the bag as one set: no groups to compute or cache."""
        return None
