"""What an encoder is: its spec (architecture, weights source, input size, mean/std, dim) and the loaded
`Encoder` that the extract stage runs. After timm: every pretrained model carries its data config."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from wsi_pipeline.models.encoder_cards import IMAGENET_MEAN, IMAGENET_STD, EncoderCard, Triple


@dataclass(frozen=True)
class Preprocess:
    """What the extract stage must do to patches before ``Encoder.forward``: resize to ``resize_size``, centre-crop
    ``input_size`` (square), scale to [0, 1], normalise with ``mean``/``std``."""

    input_size: int
    mean: Triple
    std: Triple
    resize_size: int | None = None  # None: resize straight to input_size

    def resize_crop(self, rgb: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 → (S, S, 3): area interpolation (the anti-aliased choice for downsampling) to
        ``resize_size``, then the centre ``input_size`` crop, as the official transforms Resize + CenterCrop."""
        size = self.resize_size or self.input_size
        if rgb.shape[:2] != (size, size):
            rgb = cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA)
        top = (size - self.input_size) // 2
        return np.ascontiguousarray(rgb[top:top + self.input_size, top:top + self.input_size])

    def normalize(self, batch_uint8: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 -> normalised float32 in channels_last, with the constants these weights were
        trained with: ``(x / 255 - mean) / std``.

        On the CPU, where the forward pass and this share the cores, it is one table look-up per value (the
        formula evaluated once for each of the 256 values per channel: the same numbers, one pass instead of
        four); on an accelerator the formula itself, in place.
        """
        mean = torch.tensor(self.mean, device=batch_uint8.device)
        std = torch.tensor(self.std, device=batch_uint8.device)
        if batch_uint8.device.type != "cpu":
            return batch_uint8.float().div_(255.0).sub_(mean.view(1, 3, 1, 1)).div_(std.view(1, 3, 1, 1))
        table = (torch.arange(256, dtype=torch.float32).view(256, 1) / 255.0 - mean) / std  # (value, channel)
        nhwc = batch_uint8.permute(0, 2, 3, 1).contiguous()  # free for the extract stage's NHWC batches
        b, h, w, _ = nhwc.shape
        out = cv2.LUT(nhwc.numpy().reshape(b * h, w, 3), table.numpy().reshape(1, 256, 3))
        return torch.from_numpy(out).view(b, h, w, 3).permute(0, 3, 1, 2)


@dataclass(frozen=True)
class EncoderSpec:
    """Everything needed to build an encoder and feed it; the weights themselves are fetched separately."""

    name: str
    builder: Callable[..., nn.Module]  # builds the module (random init, no classifier); kwargs override timm's
    weights_source: str | None  # "hf-hub:<repo id>" or an http(s) URL; None: no pretrained weights
    dim: int
    features: str  # how the feature vector is formed: an `encoder_cards.FEATURES` key, or "timm-default"
    classifier_prefix: str  # classifier keys in checkpoints, dropped: the encoder has no classifier
    input_size: int = 224
    mean: Triple = IMAGENET_MEAN
    std: Triple = IMAGENET_STD
    resize_size: int | None = None
    prefix_tokens: int = 1  # CLS + registers: left out of the patch-token mean of "cls+mean"
    layout: str = "timm"  # how weights files name their keys (`layouts.py`)
    card: EncoderCard | None = None  # the documented facts of a registered encoder

    @property
    def preprocess(self) -> Preprocess:
        return Preprocess(self.input_size, self.mean, self.std, self.resize_size)

    def pool(self, output: torch.Tensor) -> torch.Tensor:
        """The module's output → the feature vector: (B, N, D) tokens become CLS ⊕ mean of the patch tokens
        for "cls+mean" (Virchow2); every other encoder's module outputs its feature already."""
        if self.features != "cls+mean":
            return output
        return torch.cat([output[:, 0], output[:, self.prefix_tokens:].mean(dim=1)], dim=-1)


@dataclass(frozen=True)
class ResolvedWeights:
    """Which weights an encoder gets, and their identity, found before any module is built."""

    spec: EncoderSpec
    path: Path | None  # None: the module's own random init under `seed`
    sha256: str  # the file's sha256, or the marker "random:<seed>"
    seed: int = 0


@dataclass(frozen=True, eq=False)
class Encoder:
    """An eval-mode encoder with its spec and the identity (sha256) of the weights it holds."""

    module: nn.Module
    spec: EncoderSpec
    weights_sha256: str
    device: torch.device

    @property
    def dim(self) -> int:
        return self.spec.dim

    @property
    def preprocess(self) -> Preprocess:
        return self.spec.preprocess

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, dim) features, S = ``preprocess.input_size``.

        Float input must already be normalised; uint8 input (what the extract stage passes) is normalised
        here. The size is checked because a wrong size runs fine on a CNN but
        silently gives features that do not match the weights' training scale.
        """
        size = self.spec.input_size
        if batch.ndim != 4 or tuple(batch.shape[1:]) != (3, size, size):
            raise ValueError(f"{self.spec.name} expects (B, 3, {size}, {size}), got {tuple(batch.shape)}")
        batch = batch.to(self.device, non_blocking=True)
        if batch.dtype == torch.uint8:
            batch = self.preprocess.normalize(batch)
        elif not batch.is_floating_point():
            raise TypeError(f"expected a uint8 or float batch, got {batch.dtype}")
        with torch.inference_mode():
            return self.spec.pool(self.module(batch))

    __call__ = forward
