"""wsi_pipeline.models.ssm.scan2d: both backends of the 2-D selective scan against a float64 reference written
from the double-sum closed form (no recurrence), gradcheck, agreement with the 1-D scan on 1 x W and H x 1 grids,
and the memory bound of the numba path."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from wsi_pipeline.models.ssm import scan, scan2d

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def reference_scan_2d(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """h[i, j] = sum_{i'<=i, j'<=j} (prod_{m=i'+1..i} Ā[m, j]) (prod_{k=j'+1..j} Ā[i', k]) B̄x[i', j'] as one
    einsum, each product exp(sum of dt*A) from cumulative sums; then y = (<h, C> + D u) * silu(z)."""
    dt = delta if delta_bias is None else delta + delta_bias[:, None, None]
    dt = F.softplus(dt) if delta_softplus else dt
    H, W = u.shape[-2:]
    log_a = dt[..., None] * A[:, None, None, :]  # (b, d, H, W, n)
    bx = (dt * u)[..., None] * B.permute(0, 2, 3, 1)[:, None]
    down, across = log_a.cumsum(2), log_a.cumsum(3)  # sum_{m<=i} log Ā[m, j], sum_{k<=j} log Ā[i, k]
    minus_inf = torch.tensor(float("-inf"), dtype=u.dtype)
    col = torch.where(torch.ones(H, H, dtype=torch.bool).tril()[:, :, None, None],  # [i, i', j, n], i' <= i
                      down[:, :, :, None] - down[:, :, None, :], minus_inf).exp()
    row = torch.where(torch.ones(W, W, dtype=torch.bool).tril()[:, :, None],  # [i', j, j', n], j' <= j
                      across[:, :, :, :, None] - across[:, :, :, None, :], minus_inf).exp()
    h = torch.einsum("bdiIjn,bdIjJn,bdIJn->bdijn", col, row, bx)
    y = torch.einsum("bdijn,bnij->bdij", h, C)
    y = y if D is None else y + D[:, None, None] * u
    return y if z is None else y * F.silu(z)


def make_inputs(b, d, n, H, W, *, with_D, with_z, with_bias, softplus, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    # raw delta around 0 under softplus (one cell above 20 hits the identity branch); positive without
    delta = rnd(b, d, H, W) if softplus else 0.05 + torch.rand(b, d, H, W, generator=g, dtype=dtype)
    if softplus and H * W > 2:
        delta.view(b, d, -1)[..., 1] = 25.0
    return {
        "u": rnd(b, d, H, W),
        "delta": delta,
        "A": -torch.exp(rnd(d, n) * 0.5),
        "B": rnd(b, n, H, W),
        "C": rnd(b, n, H, W),
        "D": rnd(d) if with_D else None,
        "z": rnd(b, d, H, W) if with_z else None,
        "delta_bias": rnd(d) * 0.5 if with_bias else None,
    }


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref|: relative error on the tensor's scale."""
    return ((ours.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


def values_and_grads(fn, inputs, softplus, dtype, seed=1):
    leaves = {k: (v.to(dtype).requires_grad_(True) if v is not None else None) for k, v in inputs.items()}
    y = fn(**leaves, delta_softplus=softplus)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)
    present = [k for k in NAMES if leaves[k] is not None]
    return y, dict(zip(present, torch.autograd.grad(y, [leaves[k] for k in present], dy), strict=True))


def assert_matches_reference(fn, inputs, softplus, tol=1e-5):
    y_ref, g_ref = values_and_grads(reference_scan_2d, inputs, softplus, torch.float64)
    y, g = values_and_grads(fn, inputs, softplus, torch.float32)
    assert y.dtype == torch.float32 and y.shape == inputs["u"].shape
    assert rel_err(y, y_ref) <= tol
    assert g.keys() == g_ref.keys()
    for name in g_ref:
        assert g[name].shape == g_ref[name].shape, name
        assert rel_err(g[name], g_ref[name]) <= tol, name


CASES = [
    # b, d, n, H, W, with_D, with_z, with_bias, softplus
    (1, 3, 4, 1, 1, True, True, True, True),  # one cell
    (2, 5, 4, 5, 7, True, True, True, True),  # odd grid, b = 2, bands of 3 + 2 rows
    (2, 21, 16, 11, 6, True, True, True, True),  # d not a multiple of 16 lanes; bands 4 + 4 + 3
    (1, 16, 16, 1, 13, False, False, False, False),  # 1 x W, bare scan
    (1, 6, 16, 13, 1, False, True, False, False),  # H x 1, gate only
    (2, 4, 3, 9, 4, True, False, True, True),  # no gate, bands 3 + 3 + 3
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}-d{}-n{}-{}x{}-D{:d}z{:d}bias{:d}sp{:d}".format(*c))
def test_numba_scan_matches_reference_fp32(case):
    b, d, n, H, W, with_D, with_z, with_bias, softplus = case
    inputs = make_inputs(b, d, n, H, W, with_D=with_D, with_z=with_z, with_bias=with_bias, softplus=softplus)
    assert_matches_reference(scan2d.selective_scan_2d, inputs, softplus)


@pytest.mark.parametrize("case", [CASES[1], CASES[4]], ids=["5x7-all", "13x1-gate"])
def test_pytorch_path_matches_reference_fp32(case):
    """The checkpointed PyTorch path (CUDA, or no numba), with 2-row bands so that band boundaries are crossed."""
    b, d, n, H, W, with_D, with_z, with_bias, softplus = case
    inputs = make_inputs(b, d, n, H, W, with_D=with_D, with_z=with_z, with_bias=with_bias, softplus=softplus)
    assert_matches_reference(lambda **kw: scan2d._scan2d_torch(**kw, band=2), inputs, softplus)


def test_threads_and_channel_groups_agree_with_pytorch_path():
    """A grid big enough for run_tasks to use 2 threads, 3 channel blocks split into 2 backward groups that each
    own their dB, dC partial sums: the numba path against the PyTorch one (no reference: too big for its einsum)."""
    inputs = make_inputs(1, 40, 16, 41, 41, with_D=True, with_z=True, with_bias=True, softplus=True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        y, g = values_and_grads(scan2d.selective_scan_2d, inputs, True, torch.float32)
        torch.set_num_threads(1)  # the PyTorch path's tiny ops: a second OpenMP thread only spins on a busy box
        y_ref, g_ref = values_and_grads(scan2d._scan2d_torch, inputs, True, torch.float64)
    finally:
        torch.set_num_threads(threads)
    assert rel_err(y, y_ref) <= 1e-5
    for name in g_ref:
        assert rel_err(g[name], g_ref[name]) <= 1e-5, name


def test_without_numba_the_pytorch_path_runs(monkeypatch):
    calls = []
    torch_path = scan2d._scan2d_torch
    monkeypatch.setattr(scan2d.numba_primitives, "AVAILABLE", False)
    monkeypatch.setattr(scan2d, "_scan2d_torch", lambda *a, **kw: calls.append(1) or torch_path(*a, **kw))
    inputs = make_inputs(1, 2, 3, 3, 4, with_D=True, with_z=True, with_bias=True, softplus=True)
    y = scan2d.selective_scan_2d(**inputs, delta_softplus=True)
    assert calls == [1] and rel_err(y, reference_scan_2d(**inputs, delta_softplus=True)) <= 1e-12


@pytest.mark.parametrize("axis", ["row", "column"])
def test_single_row_or_column_is_the_1d_scan(axis):
    """On a 1 x W grid only the horizontal pass acts, on an H x 1 grid only the vertical one: both are the
    1-D selective scan along that line, values and every gradient."""
    inputs = make_inputs(2, 19, 16, 1, 70, with_D=True, with_z=True, with_bias=True, softplus=True)
    if axis == "column":
        inputs = {k: v.transpose(-1, -2).contiguous() if v is not None and v.dim() == 4 else v
                  for k, v in inputs.items()}
    y2, g2 = values_and_grads(scan2d.selective_scan_2d, inputs, True, torch.float32)
    line = {k: v.flatten(2) if v is not None and v.dim() == 4 else v for k, v in inputs.items()}
    y1, g1 = values_and_grads(scan.selective_scan, line, True, torch.float32)
    assert rel_err(y2.flatten(2), y1) <= 1e-6
    for name in g1:
        assert rel_err(g2[name].flatten(2) if g2[name].dim() == 4 else g2[name], g1[name]) <= 1e-6, name


@pytest.mark.parametrize("path", ["numba", "torch"])
def test_gradcheck_float64(path):
    inputs = make_inputs(2, 3, 2, 3, 4, with_D=True, with_z=True, with_bias=True, softplus=True)
    leaves = [inputs[k].requires_grad_(True) for k in NAMES]
    fn = scan2d.selective_scan_2d if path == "numba" else lambda *a, **kw: scan2d._scan2d_torch(*a, **kw, band=2)
    assert torch.autograd.gradcheck(lambda *a: fn(*a, delta_softplus=True), leaves)


def test_no_grad_forward_and_low_precision_dtype():
    inputs = make_inputs(1, 4, 4, 6, 5, with_D=True, with_z=True, with_bias=True, softplus=True)
    ref = reference_scan_2d(**inputs, delta_softplus=True)
    with torch.no_grad():
        y = scan2d.selective_scan_2d(**{k: v.float() for k, v in inputs.items()}, delta_softplus=True)
    assert rel_err(y, ref) <= 1e-5
    y16 = scan2d.selective_scan_2d(**{k: v.bfloat16() for k, v in inputs.items()}, delta_softplus=True)
    assert y16.dtype == torch.bfloat16 and rel_err(y16.float(), ref) < 3e-2


def test_mismatched_shapes_are_a_clear_error():
    inputs = make_inputs(1, 4, 3, 5, 6, with_D=True, with_z=False, with_bias=False, softplus=False)
    inputs["B"] = inputs["B"][..., :5]
    with pytest.raises(ValueError, match=r"B must be \(1, 3, 5, 6\)"):
        scan2d.selective_scan_2d(**inputs)


MEMORY_PROBE = textwrap.dedent(
    """
    import sys, torch
    from wsi_pipeline.models.ssm.scan2d import selective_scan_2d

    def rss_kb(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field))

    def reset_peak():  # VmHWM := VmRSS (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    torch.set_num_threads(2)
    b, d, n, side = 1, 64, 16, int(sys.argv[1])
    def inputs(H, W):
        g = torch.Generator().manual_seed(0)
        shapes = [(b, d, H, W), (b, d, H, W), (d, n), (b, n, H, W), (b, n, H, W), (d,), (b, d, H, W), (d,)]
        t = [torch.randn(*shape, generator=g) for shape in shapes]
        t[2] = -t[2].abs()
        return [x.requires_grad_(True) for x in t]
    def fwd_bwd(args, dy):
        selective_scan_2d(*args, delta_softplus=True).backward(dy)
    fwd_bwd(inputs(10, 10), torch.randn(b, d, 10, 10))  # JIT load / compile outside the measurement
    args, dy = inputs(side, side), torch.randn(b, d, side, side)
    reset_peak()
    base = rss_kb("VmRSS")
    fwd_bwd(args, dy)
    scan_peak = rss_kb("VmHWM") - base
    del args, dy
    reset_peak()
    base = rss_kb("VmRSS")
    states = torch.ones(side, side, d, n)  # control: what a materialised state tensor would add
    control_peak = rss_kb("VmHWM") - base
    print(scan_peak * 1024, control_peak * 1024)
    """
)


@pytest.mark.memory
def test_forward_backward_memory_stays_below_one_grid_of_states():
    """300 x 300 cells, d = 64, n = 16: one (H x W x d x n) fp32 tensor is 369 MB; fwd+bwd must peak below it.
    Measured as the peak RSS increase in a fresh process; the control allocation shows the probe sees a tensor
    of that size."""
    side, d, n = 300, 64, 16
    full_states = side * side * d * n * 4
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(side)], capture_output=True, text=True,
                         check=False)
    if out.returncode != 0 and "clear_refs" in out.stderr:
        pytest.skip("/proc/self/clear_refs unavailable: cannot reset the peak RSS")
    assert out.returncode == 0, out.stderr
    scan_peak, control_peak = map(int, out.stdout.split())
    assert control_peak >= 0.95 * full_states
    assert scan_peak < full_states, f"fwd+bwd peaked at {scan_peak / 1e6:.0f} MB"
