"""Patch encoders: a small timm-style registry (one `EncoderSpec` per encoder, one `create_encoder`).

Each spec is built from its torch-free card (`models/encoder_cards.py`) and carries what its weights were
trained with (resize, crop, mean/std) and what it outputs (dim, how the feature is formed), so the extract stage
never guesses (`spec.py`, `zoo.py`, `towers.py` for CONCH v1.5's pooler). Weights come offline first and load
strictly from each author's key layout (`weights.py`, `layouts.py`). Each `Encoder` records the sha256 of the
weights it actually loaded, because features from different weights must never be mixed.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from wsi_pipeline.digests import file_sha256
from wsi_pipeline.models.encoder_cards import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    LUNIT_MEAN,
    LUNIT_STD,
    LUNIT_VIT_S16_URL,
)
from wsi_pipeline.models.encoders.errors import EncoderError, WeightsFormatError, WeightsUnavailableError
from wsi_pipeline.models.encoders.spec import Encoder, EncoderSpec, Preprocess, ResolvedWeights
from wsi_pipeline.models.encoders.weights import expected_keys, load_weights, pretrained_path, read_state_dict
from wsi_pipeline.models.encoders.zoo import build_card, get_spec, list_encoders

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "LUNIT_MEAN", "LUNIT_STD", "LUNIT_VIT_S16_URL", "Encoder", "EncoderError",
    "EncoderSpec", "Preprocess", "ResolvedWeights", "WeightsFormatError", "WeightsUnavailableError", "build_card",
    "build_encoder", "create_encoder", "get_spec", "list_encoders", "load_weights", "resolve_weights",
]


def create_encoder(
    name: str, weights: str | os.PathLike = "pretrained", *, device: str | torch.device = "cpu", seed: int = 0
) -> Encoder:
    """Build encoder ``name`` with ``weights``: "pretrained" (the weights folder, else the source's cache, else
    downloaded: `weights.pretrained_path`), "random", or a file path.

    The module is always built under ``seed`` (without touching the global RNG), so ``random`` gives the
    same features in every run; its ``weights_sha256`` is the marker ``random:<seed>``.
    """
    return build_encoder(resolve_weights(name, weights, seed=seed), device=device)


def resolve_weights(name: str, weights: str | os.PathLike = "pretrained", *, seed: int = 0) -> ResolvedWeights:
    """The weights `create_encoder` would load and their identity, without building the module: what the extract
    stage needs to name a feature set and tell whether its features are current (no timm import, no weights
    read but the file's hash)."""
    spec = get_spec(name)
    if str(weights) == "random":
        return ResolvedWeights(spec, None, f"random:{seed}", seed)
    if str(weights) == "pretrained":
        path = pretrained_path(spec)  # before building: fail fast, no wasted init
    else:
        path = Path(weights)
        if not path.is_file():
            raise WeightsUnavailableError(f"--weights {path}: file not found (pass a state dict file, pretrained "
                                          "or random)")
    return ResolvedWeights(spec, path, file_sha256(path), seed)


def build_encoder(weights: ResolvedWeights, *, device: str | torch.device = "cpu") -> Encoder:
    """The eval-mode module holding the resolved weights (a random init under their seed), on ``device``."""
    if weights.path is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(weights.seed)
            module = weights.spec.builder()
    else:
        module = _load_file(weights.spec, weights.path)
    device = torch.device(device)
    module = module.to(device).eval().requires_grad_(False)
    return Encoder(module=module, spec=weights.spec, weights_sha256=weights.sha256, device=device)


def _load_file(spec: EncoderSpec, path: Path) -> torch.nn.Module:
    """The spec's module holding the file's weights. The file is read first (a wrong file fails before any
    model is built) and the module is built on the meta device and takes the file's tensors as they are:
    no random init to throw away (half a minute for a 1 B-parameter ViT on a CPU) and no second copy."""
    state = read_state_dict(path)
    with torch.device("meta"):
        module = spec.builder()
    try:
        load_weights(module, state, classifier_prefix=spec.classifier_prefix, layout=spec.layout, assign=True)
    except WeightsFormatError as exc:
        if str(path) in str(exc):
            raise
        raise WeightsFormatError(f"{path}: not weights of encoder {spec.name} ({exc}); it expects "
                                 f"{expected_keys(module)}; pass its weights, or the --encoder they were made "
                                 "for") from None
    if any(t.is_meta for t in module.buffers()):  # non-persistent buffers are not in any file: build them
        module = spec.builder()
        load_weights(module, state, classifier_prefix=spec.classifier_prefix, layout=spec.layout)
    return module.float()  # fp16/bf16 files: the encoder computes in fp32 (autocast decides the rest)
