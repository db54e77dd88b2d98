"""One rule for `device` options in every stage: `auto` is CUDA when torch sees a GPU, else CPU."""

from __future__ import annotations

import torch

from wsi_pipeline.errors import UserError


def resolve_device(spec: str, *, error: type[UserError] = UserError) -> torch.device:
    """`auto` | `cpu` | `cuda` | `cuda:i` → a torch device; an unavailable GPU is a user error, not a crash."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise error(f"device '{spec}' requested but torch sees no CUDA GPU (use auto or cpu)")
    return torch.device(spec)
