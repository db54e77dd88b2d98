"""Which implementation a scan op (`scan.selective_scan`, `scan.causal_conv1d`) runs on a device: the rule
itself, torch-free, so `wsip doctor` reports exactly what `scan.py` does without importing torch.

On CUDA the upstream kernel (mamba-ssm, causal-conv1d) when it loads; on CPU our numba kernels when numba
imports; otherwise the PyTorch implementation. `WSIP_SCAN=torch|cuda` forces one side.
"""

from __future__ import annotations

import os

from wsi_pipeline.errors import ConfigError

CUDA_HINT = "install it on a CUDA machine with: pip install 'wsi-pipeline[cuda]'"
# op -> (module, function, distribution) of its upstream CUDA kernel
CUDA_OPS = {
    "selective_scan": ("mamba_ssm.ops.selective_scan_interface", "selective_scan_fn", "mamba-ssm"),
    "causal_conv1d": ("causal_conv1d", "causal_conv1d_fn", "causal-conv1d"),
}
CUDA, NUMBA, TORCH = "cuda", "numba", "torch"


class ScanBackendError(ConfigError, RuntimeError):
    """`WSIP_SCAN` names no backend, or one that cannot run here: a setting the user fixes (one line, exit 2)."""


def forced() -> str:
    """`WSIP_SCAN`: "" (automatic), "torch" or "cuda"; anything else is an error, never silently ignored."""
    value = os.environ.get("WSIP_SCAN", "").strip().lower()
    if value not in ("", TORCH, CUDA):
        raise ScanBackendError(f"WSIP_SCAN={value!r} is not one of 'torch', 'cuda' (or unset for automatic)")
    return value


def plan(op: str, device_type: str, *, cuda_op: bool, numba: bool, why: str = "") -> str:
    """CUDA (the upstream kernel), NUMBA or TORCH for `op` on a `device_type` ("cpu", "cuda", ...) tensor.

    `cuda_op`: the upstream kernel loads (`why` says why not); `numba`: our CPU kernels are available.
    Raises ScanBackendError where `WSIP_SCAN=cuda` cannot be honoured.
    """
    choice = forced()
    if choice == TORCH:
        return TORCH
    if choice == CUDA:
        module, attr, _ = CUDA_OPS[op]
        if not cuda_op:
            raise ScanBackendError(f"WSIP_SCAN=cuda but {module}.{attr} is unavailable ({why}); {CUDA_HINT}")
        if device_type != "cuda":
            raise ScanBackendError(f"WSIP_SCAN=cuda but the tensors are on {device_type}, not on a CUDA device")
    if device_type == "cuda" and cuda_op:
        return CUDA
    return NUMBA if device_type == "cpu" and numba else TORCH
