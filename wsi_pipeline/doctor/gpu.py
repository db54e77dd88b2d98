"""`wsip doctor --gpu`: the GPU path against our CPU code on the same inputs, each check as pass/fail with its
largest difference (docs/doctor.md). Under a minute on any CUDA GPU.

1. scan: `scan.selective_scan` and `scan.causal_conv1d` on CUDA tensors (mamba-ssm's / causal-conv1d's
   kernels when they load, else our PyTorch code) vs on CPU tensors (our numba kernels): outputs and the
   gradients of every input.
2. GMMamba: one forward/backward of the same small model and bag on CUDA vs CPU: logits, attention and the
   gradients of the input and of every parameter.
3. extraction: a generated slide patched once, then encoded on CUDA and on CPU (resnet18, random weights,
   fp32; torch's default TF32 convolutions on CUDA): the features.

Differences are relative: max |cuda − cpu| / max |cpu| over each tensor, the worst tensor reported.
"""

from __future__ import annotations

import copy
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch

from wsi_pipeline.doctor.environment import FAIL, OK, WARN, Finding, torch_cuda_build
from wsi_pipeline.errors import one_line

SECTION = "gpu self-check"
# fp32 throughout; the extraction's TF32 convolutions (10-bit mantissa) need the looser bound
TOLERANCE = {"scan": 1e-3, "gmmamba": 1e-3, "extraction": 2e-2}
Tensors = Mapping[str, torch.Tensor]


def gpu_report() -> list[Finding]:
    """The three checks on the current CUDA device, or one finding saying there is none (status FAIL: the
    check that was asked for could not run)."""
    if not torch.cuda.is_available():
        return [Finding(SECTION, "cuda", f"no CUDA GPU: torch {torch.__version__} (CUDA build "
                        f"{torch_cuda_build() or 'none'}) sees none; nothing to check", FAIL)]
    device = torch.device("cuda")
    found = [Finding(SECTION, "device", f"{device}: {torch.cuda.get_device_name(device)}")]
    found += _kernel_load_findings()
    for name, check in (("selective scan", scan_check), ("causal conv", conv_check),
                        ("GMMamba fwd/bwd", gmmamba_check), ("extraction", extraction_check)):
        found.append(timed(name, lambda check=check: check(device)))
    return found


def relative_max_diff(got: Tensors, ref: Tensors) -> tuple[str, float]:
    """The worst-agreeing tensor's name and its max |got − ref| / max |ref| (inf on a shape mismatch or a
    non-finite value). `got` may live on another device; both are compared in float64 on the CPU."""
    diffs = {}
    for key, r in ref.items():
        g = got[key].detach().to("cpu", torch.float64)
        r = r.detach().to("cpu", torch.float64)
        if g.shape != r.shape or not (torch.isfinite(g).all() and torch.isfinite(r).all()):
            return key, float("inf")
        diffs[key] = float((g - r).abs().max()) / max(float(r.abs().max()), 1e-12) if r.numel() else 0.0
    worst = max(diffs, key=diffs.__getitem__)
    return worst, diffs[worst]


def comparison(name: str, got: Tensors, ref: Tensors, tolerance: float, note: str = "") -> Finding:
    """pass/fail of one check, with the largest relative difference and where it is."""
    worst, diff = relative_max_diff(got, ref)
    passed = diff <= tolerance
    text = f"{'pass' if passed else 'FAIL'}: max rel. diff {diff:.1e} in {worst} (tolerance {tolerance:.0e})"
    return Finding(SECTION, name, f"{text}{'; ' + note if note else ''}", OK if passed else FAIL)


def timed(name: str, check: Callable[[], Finding]) -> Finding:
    """Run one check; its time goes into the finding, and any exception becomes a failed finding."""
    start = time.perf_counter()
    try:
        finding = check()
    except Exception as exc:  # a crashing kernel or extraction is exactly what this check reports
        return Finding(SECTION, name, f"FAIL: {type(exc).__name__}: {one_line(exc)}", FAIL)
    return Finding(SECTION, name, f"{finding.value} [{time.perf_counter() - start:.1f} s]", finding.status)


def _kernel_load_findings() -> list[Finding]:
    """An installed upstream kernel that does not load (ABI or CUDA mismatch) silently leaves the GPU on our
    PyTorch code: say so."""
    from wsi_pipeline.doctor.environment import version
    from wsi_pipeline.models.ssm import backend
    from wsi_pipeline.models.ssm.scan import cuda_kernel_error

    found = []
    for op, (_, _, dist) in backend.CUDA_OPS.items():
        if version(dist) is not None:
            why = cuda_kernel_error(op)
            found.append(Finding(SECTION, dist, f"installed but does not load ({why})" if why else "loads",
                                 WARN if why else OK))
    return found


def _backend_note(op: str, device: torch.device) -> str:
    from wsi_pipeline.models.ssm.scan import implementation

    return f"{device} runs {implementation(op, torch.empty(0, device=device))[0]}"


def run_with_grads(fn: Callable[..., torch.Tensor], inputs: Tensors, upstream: torch.Tensor, **kwargs: object
                   ) -> dict[str, torch.Tensor]:
    """fn(**inputs, **kwargs), then its backward with `upstream`: the output and every input's gradient."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items()}
    out = fn(**leaves, **kwargs)
    out.backward(upstream.to(out.device))
    return {"out": out.detach(), **{f"d{k}": v.grad for k, v in leaves.items()}}


def scan_inputs(seed: int = 0, b: int = 2, d: int = 64, length: int = 512, n: int = 16) -> dict[str, torch.Tensor]:
    """mamba-ssm's `selective_scan_fn` arguments at Mamba's usual scales (A < 0, dt ≈ softplus(0.5·N))."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    return {"u": randn(b, d, length), "delta": 0.5 * randn(b, d, length), "A": -torch.exp(0.5 * randn(d, n)),
            "B": randn(b, n, length), "C": randn(b, n, length), "D": randn(d), "z": randn(b, d, length),
            "delta_bias": 0.5 * randn(d)}


def scan_check(device: torch.device) -> Finding:
    from wsi_pipeline.models.ssm.scan import selective_scan

    inputs = scan_inputs()
    upstream = torch.randn(inputs["u"].shape, generator=torch.Generator().manual_seed(1))
    ref = run_with_grads(selective_scan, inputs, upstream, delta_softplus=True)
    got = run_with_grads(selective_scan, {k: v.to(device) for k, v in inputs.items()}, upstream,
                         delta_softplus=True)
    return comparison("selective scan", got, ref, TOLERANCE["scan"], _backend_note("selective_scan", device))


def conv_check(device: torch.device) -> Finding:
    from wsi_pipeline.models.ssm.scan import causal_conv1d

    g = torch.Generator().manual_seed(2)
    inputs = {"x": torch.randn(2, 64, 512, generator=g), "weight": torch.randn(64, 4, generator=g),
              "bias": torch.randn(64, generator=g)}
    upstream = torch.randn(2, 64, 512, generator=g)
    ref = run_with_grads(causal_conv1d, inputs, upstream, activation="silu")
    got = run_with_grads(causal_conv1d, {k: v.to(device) for k, v in inputs.items()}, upstream, activation="silu")
    return comparison("causal conv", got, ref, TOLERANCE["scan"], _backend_note("causal_conv1d", device))


def gmmamba_run(model: torch.nn.Module, features: torch.Tensor, coords: torch.Tensor, groups: list[np.ndarray],
                weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """One forward/backward of a loss touching logits and attention: outputs and all gradients."""
    device = next(model.parameters()).device
    model.zero_grad(set_to_none=True)
    x = features.detach().to(device, copy=True).requires_grad_(True)  # a fresh leaf on every run
    logits, attn = model(x, coords.to(device), groups)
    (logits.sum() + (attn * weight.to(device)).sum()).backward()
    grads = {f"d_{k}": p.grad for k, p in model.named_parameters() if p.grad is not None}
    return {"logits": logits.detach(), "attention": attn.detach(), "d_features": x.grad, **grads}


def gmmamba_check(device: torch.device) -> Finding:
    """Eval mode (no dropout) and no masking: the hard top-k of IMM would turn a 1e-6 near-tie between devices
    into a different bag, which says nothing about the kernels."""
    from wsi_pipeline.models.mil.gmmamba import GMMamba

    g = torch.Generator().manual_seed(3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = GMMamba(64, 2, d_model=64, n_groups=4, mask_ratio=0.0, min_one_masked=False).eval()
    features = torch.randn(400, 64, generator=g)
    coords = torch.randint(0, 40_000, (400, 2), generator=g)
    weight = torch.randn(400, generator=g)
    groups = model.make_groups(None, coords.numpy())
    ref = gmmamba_run(model, features, coords, groups, weight)
    got = gmmamba_run(copy.deepcopy(model).to(device), features, coords, groups, weight)
    return comparison("GMMamba fwd/bwd", got, ref, TOLERANCE["gmmamba"], _backend_note("selective_scan", device))


def extraction_check(device: torch.device) -> Finding:
    """Patch a generated H&E slide (a PNG, read by the plain-image backend, so no test extra is needed), then
    extract it on the CPU and on `device` into one workspace (`force`: the second run must not reuse the first)."""
    import cv2

    from wsi_pipeline.stages.extract import ExtractParams, extract
    from wsi_pipeline.stages.inputs import SlideSource
    from wsi_pipeline.stages.patch import patch
    from wsi_pipeline.testing.synthetic import he_tissue
    from wsi_pipeline.workspace.peer_features import read_bag

    with tempfile.TemporaryDirectory(prefix="wsip-doctor-") as tmp:
        image, _ = he_tissue((1024, 1536), seed=0)
        path = Path(tmp) / "doctor.png"
        cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        workspace = Path(tmp) / "ws"
        patch([SlideSource(path, mpp=0.5)], out=workspace)
        features = {}
        for dev in ("cpu", str(device)):
            params = ExtractParams(encoder="resnet18", weights="random", device=dev, precision="fp32", workers=0,
                                   formats=("h5",))
            result = extract(params, out=workspace, force=True)
            features[dev] = torch.from_numpy(read_bag(result.feature_set.h5("doctor"))[0])
    n = len(features["cpu"])
    return comparison("extraction", {"features": features[str(device)]}, {"features": features["cpu"]},
                      TOLERANCE["extraction"], f"{n} patches, resnet18 random weights, fp32")
