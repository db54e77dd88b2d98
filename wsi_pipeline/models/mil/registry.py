"""MIL model registry: `create_model(name, in_dim, n_classes, **options)` in the style of timm.

A model registers itself with `@register_model("name")` on its class, as in timm; `list_models("*mamba*")`
lists names matching a pattern. The CLI must start without importing torch, so the names are read from the
decorators in this package's source files (parsed, not imported: no table to keep in step) and a model's
module is imported only when that model is created, which runs its decorator. A model registered from
elsewhere (imported by the caller) is listed as well. A model's keyword-only constructor parameters are its
options, so an unknown name or option is a one-line `UnknownNameError` listing what exists.

The contract every registered model keeps (the trainer and predictor rely on it)::

    logits, attn = model(features, coords, groups=None)   # (1, C), (N,) or None
    model.make_groups(features_np, coords_np)              # list[np.ndarray] | None
    model.group_cache_key                                  # str | None, e.g. "kmeans_G10"

and optionally ``model.cohort_options(coords_per_slide) -> dict``: options the model fixes from the training
cohort's coords (2dmamba's grid extent); the trainer adds them to the model's options before any fold, so the
checkpoints record them and `wsip predict` rebuilds the same model.

Optional: a model whose paper trains it with more than the bag cross-entropy (ACMIL, CLAM, DSMIL) defines ::

    model.training_loss(logits, target) -> Tensor         # scalar; target: (1,) long class index

The trainer calls it (through :func:`bag_loss`) right after the train-mode forward of the same bag, with
that forward's logits. Anything else the loss needs (branch logits, attention, instance scores) the forward
stored in `model._forward_state`, only in train mode; :func:`pop_forward_state` reads and clears it. The
value REPLACES cross-entropy, so it contains the bag term itself (or its substitute, e.g. DSMIL's BCE). A
model without the method is trained with ``F.cross_entropy(logits, target)``: existing models need no change.
See docs/baselines.md.
"""

from __future__ import annotations

import fnmatch
import functools
import importlib
import inspect
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from wsi_pipeline.errors import UnknownNameError

_BUILDERS: dict[str, Callable[..., Any]] = {}
_DECORATOR = re.compile(r"""^@register_model\(\s*["']([^"']+)["']""", re.MULTILINE)
M = TypeVar("M", bound=Callable[..., Any])


def register_model(name: str, **fixed: Any) -> Callable[[M], M]:
    """Register model class `cls(in_dim, n_classes, *, **options)` under `name`; `fixed` options are
    bound for this name (e.g. `mode="mean"`) and are not user options."""

    def decorator(cls: M) -> M:
        _BUILDERS[name] = (lambda **kw: cls(**kw, **fixed)) if fixed else cls
        _OPTIONS[name] = [p for p in _keyword_options(cls) if p not in fixed]
        return cls

    return decorator


_OPTIONS: dict[str, list[str]] = {}


def _keyword_options(cls: Callable[..., Any]) -> list[str]:
    params = inspect.signature(cls).parameters.values()
    return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]


@functools.cache
def _model_modules() -> dict[str, str]:
    """name -> the module of this package whose `@register_model("name", ...)` line registers it, read from the
    sources (not imported) so that listing models imports no torch."""
    modules = {}
    for path in sorted(Path(__file__).parent.glob("*.py")):
        for name in _DECORATOR.findall(path.read_text()):
            modules[name] = f"{__package__}.{path.stem}"
    return modules


def list_models(pattern: str = "*") -> list[str]:
    """Names accepted by :func:`create_model` that match the shell-style `pattern` (e.g. "*mamba*"), sorted."""
    return sorted(fnmatch.filter(set(_model_modules()) | set(_BUILDERS), pattern))


def _load(name: str) -> None:
    if name in _BUILDERS:
        return
    if name not in _model_modules():
        raise UnknownNameError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    importlib.import_module(_model_modules()[name])


def model_options(name: str) -> list[str]:
    """The options model `name` accepts (its keyword-only constructor parameters)."""
    _load(name)
    return list(_OPTIONS[name])


def create_model(name: str, in_dim: int, n_classes: int, **options: Any) -> Any:
    """Build MIL model `name` for `in_dim`-d instance features and `n_classes` classes.

    `options` are the model's keyword options (e.g. `mask_ratio=0.1` for GMMamba); an unknown one is an
    `UnknownNameError` naming the allowed ones, never silently ignored.
    """
    _load(name)
    unknown = sorted(set(options) - set(_OPTIONS[name]))
    if unknown:
        raise UnknownNameError(f"model {name!r} has no option(s) {', '.join(unknown)}; its options: "
                               f"{', '.join(_OPTIONS[name]) or 'none'}")
    return _BUILDERS[name](in_dim=in_dim, n_classes=n_classes, **options)


def bag_loss(model: Any, logits: Any, target: Any) -> Any:
    """The loss the trainer minimises for one bag: `model.training_loss` when defined, else cross-entropy."""
    custom = getattr(model, "training_loss", None)
    if custom is not None:
        return custom(logits, target)
    import torch.nn.functional as F  # lazy: the CLI imports this module without torch

    return F.cross_entropy(logits, target)


def pop_forward_state(model: Any) -> Any:
    """What the model's last train-mode forward stored in `model._forward_state` for its `training_loss`;
    cleared on reading, so the autograd graph it holds lives no longer than one step."""
    state = getattr(model, "_forward_state", None)
    if state is None:
        raise RuntimeError(f"{type(model).__name__}.training_loss needs the train-mode forward of the same bag "
                           "first (eval-mode forwards keep nothing)")
    model._forward_state = None
    return state


class GrouplessMixin:
    """Default half of the contract for models that need no instance groups (all baselines)."""

    group_cache_key: str | None = None

    def make_groups(self, features: Any, coords: Any) -> None:
        """Baselines see the bag as one set: no groups to compute or cache."""
        return None


def check_choice(option: str, value: object, choices: Any) -> None:
    """A wrong name for a model option is one line naming the option and its choices (a Literal or a tuple)."""
    allowed = getattr(choices, "__args__", choices)
    if value not in allowed:
        raise UnknownNameError(f"unknown {option} {value!r}; choose one of {', '.join(map(str, allowed))}")
