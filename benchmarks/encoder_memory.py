"""Accelerator memory of one extraction batch per registered encoder, estimated without an accelerator.

Each encoder is built on the meta device (shapes only, no memory, no compute) and run on a meta batch under a
dispatch mode that adds up the bytes of every tensor an operator allocates (views and in-place results share
their input's memory and are not counted) and subtracts them when the tensor is freed; the peak is the
activations' high-water mark. Memory per batch = the weights in fp32 (`wsip extract` keeps them in fp32 and
autocasts; bf16 copies of a layer's weights are transient) + that peak for the batch, with activations in
fp32 or, for bf16, from a bf16 copy of the model. Not counted: the CUDA context (~0.5 GB), the allocator's
cache and fragmentation, cuDNN workspaces. Attention is timm's fused `scaled_dot_product_attention`, whose
score matrix a GPU's flash/memory-efficient kernels never materialise, as here.
Run: `python benchmarks/encoder_memory.py [--batch-size 256] [--encoders uni,resnet18]`.
"""

from __future__ import annotations

import argparse
import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from wsi_pipeline.models.encoders import get_spec, list_encoders


class PeakBytes(TorchDispatchMode):
    """High-water mark of the bytes held by tensors that operators allocate while the mode is active."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        fresh = [r.alias_info is None for r in func._schema.returns]
        outputs = out if isinstance(out, tuple | list) else [out]
        for tensor, new in zip(outputs, fresh, strict=False):
            if new and isinstance(tensor, torch.Tensor):
                size = tensor.untyped_storage().nbytes()
                self.live += size
                weakref.finalize(tensor, self._free, size)
        self.peak = max(self.peak, self.live)
        return out

    def _free(self, size: int) -> None:
        self.live -= size


def activation_peak(name: str, batch: int, dtype: torch.dtype) -> tuple[int, int]:
    """(parameter count, peak activation bytes of one forward at `batch`) on the meta device."""
    spec = get_spec(name)
    with torch.device("meta"):
        module = spec.builder().eval().to(dtype)
        x = torch.empty(batch, 3, spec.input_size, spec.input_size, dtype=dtype)
    n_params = sum(p.numel() for p in module.parameters())
    mode = PeakBytes()
    with torch.inference_mode(), mode:
        out = spec.pool(module(x))
        tree_flatten(out)
    return n_params, mode.peak + x.untyped_storage().nbytes()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--encoders", default=",".join(list_encoders()))
    args = parser.parse_args()
    gib = 1024**3
    print(f"estimated accelerator memory per batch of {args.batch_size} (weights fp32 + activations)")
    print(f"{'encoder':16s} {'params':>8s} {'weights':>10s} {'fp32 batch':>11s} {'bf16 batch':>11s}")
    for name in args.encoders.split(","):
        n_params, fp32 = activation_peak(name, args.batch_size, torch.float32)
        _, bf16 = activation_peak(name, args.batch_size, torch.bfloat16)
        weights = n_params * 4
        print(f"{name:16s} {n_params / 1e6:7.1f}M {weights / gib:6.2f} GiB {(weights + fp32) / gib:7.2f} GiB "
              f"{(weights + bf16) / gib:7.2f} GiB")


if __name__ == "__main__":
    main()
