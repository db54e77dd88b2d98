"""Checkpoint key layouts → our modules, one explicit function per layout (`encoder_cards.LAYOUTS` says each in words).

Every weights file an author publishes names its keys its own way: timm state dicts (UNI, Virchow2, H-optimus,
Prov-GigaPath), a transformers Dinov2Model (Phikon-v2), CONCH v1.5's trunk + pooler. Mapping them here keeps the
modules plain timm (no copied model code) and lets `weights.load_weights` load every file strictly.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from wsi_pipeline.models.encoders.errors import WeightsFormatError

StateDict = Mapping[str, torch.Tensor]
# Where training scripts nest the state dict inside a checkpoint (DINO keeps the eval model under 'teacher').
CONTAINER_KEYS = ("state_dict", "model", "teacher", "module")
# Wrappers added by DDP ('module.') and by DINO's MultiCropWrapper ('backbone.'); never part of timm names.
_WRAPPER_PREFIXES = ("module.", "backbone.")


def timm_keys(state_dict: StateDict, *, classifier_prefix: str) -> dict[str, torch.Tensor]:
    """Wrapper prefixes stripped, classifier keys dropped (the encoder has no classifier).

    The lunit release, UNI, Virchow2, H-optimus and Prov-GigaPath files are flat timm state dicts already; raw
    DINO/DDP checkpoints wrap the same names in ``module.``/``backbone.`` and add a projection head.
    """
    mapped: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        new_key = key
        for prefix in _WRAPPER_PREFIXES:
            new_key = new_key.removeprefix(prefix)
        if new_key == classifier_prefix or new_key.startswith(classifier_prefix + "."):
            continue
        if new_key in mapped:
            raise WeightsFormatError(f"checkpoint key {key!r} collides with another key as {new_key!r}")
        mapped[new_key] = value
    return mapped


_DINOV2_RENAMES = (  # transformers Dinov2Model name -> timm VisionTransformer name
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.layer_scale(\d)\.lambda1$", r"blocks.\1.ls\2.gamma"),
    (r"^encoder\.layer\.(\d+)\.(norm1|norm2|mlp\.fc1|mlp\.fc2)\.", r"blocks.\1.\2."),
    (r"^layernorm\.", "norm."),
)
_QKV = re.compile(r"^encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)$")


def dinov2_keys(state_dict: StateDict) -> dict[str, torch.Tensor]:
    """transformers Dinov2Model → timm ViT: renames, and q/k/v concatenated in that order into ``qkv`` (timm
    splits its fused projection the same way). ``embeddings.mask_token`` is for masked training only."""
    mapped: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        key = key.removeprefix("dinov2.")  # Dinov2 inside a task head model
        if key == "embeddings.mask_token":
            continue
        if match := _QKV.match(key):
            qkv.setdefault((match[1], match[3]), {})[match[2]] = value
            continue
        new_key = key
        for pattern, repl in _DINOV2_RENAMES:
            new_key, n = re.subn(pattern, repl, new_key)
            if n:
                break
        mapped[new_key] = value
    for (block, kind), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise WeightsFormatError(f"block {block}: attention {kind} has only {sorted(parts)} of query/key/value")
        mapped[f"blocks.{block}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]])
    return mapped


def conch_v15_keys(state_dict: StateDict, module: nn.Module) -> dict[str, torch.Tensor]:
    """CONCH v1.5's file holds the trunk's position grid at 224 px (14×14 + CLS); the official loader resamples
    a grid of another size to 14×14 (bilinear, timm) and, at every forward, interpolates it to the input's grid
    DINO-style (bicubic, ``scale_factor=(n + 0.1) / 14``). Our trunk is built at 448 px, so the same two steps
    run once here and the features are the official ones."""
    mapped = dict(state_dict)
    key = "trunk.pos_embed"
    if key not in mapped:
        return mapped
    from timm.layers import resample_abs_pos_embed

    pos, dim = mapped[key], mapped[key].shape[-1]
    grid = int(math.isqrt(pos.shape[1] - 1))
    if grid * grid + 1 != pos.shape[1]:
        return mapped  # not a square grid + CLS: load_weights reports the shape
    if grid != 14:
        pos = resample_abs_pos_embed(pos, new_size=[14, 14], num_prefix_tokens=1, interpolation="bilinear",
                                     antialias=False)
    target = int(math.isqrt(module.trunk.pos_embed.shape[1] - 1))
    patch = pos[:, 1:].reshape(1, 14, 14, dim).permute(0, 3, 1, 2).float()
    scale = (target + 0.1) / 14
    patch = F.interpolate(patch, scale_factor=(scale, scale), mode="bicubic")
    patch = patch.permute(0, 2, 3, 1).reshape(1, -1, dim).to(pos.dtype)
    mapped[key] = torch.cat([pos[:, :1], patch], dim=1)
    return mapped


def to_module_keys(state_dict: StateDict, layout: str, module: nn.Module, *,
                   classifier_prefix: str) -> dict[str, torch.Tensor]:
    """A checkpoint in ``layout`` with its keys (and tensors, where the layout needs it) in ``module``'s names."""
    flat = timm_keys(state_dict, classifier_prefix=classifier_prefix)
    if layout == "hf-dinov2":
        return dinov2_keys(flat)
    if layout == "conch-v1.5":
        return conch_v15_keys(flat, module)
    return flat
