"""`wsip doctor` (issue 15): the torch-free environment report, and the GPU self-check's pieces on CPU.

No GPU here: the checks' CUDA runs are never exercised by these tests. What is tested is everything around
them — the comparison and its tolerances (two different CPU scan implementations must pass, a perturbed one
must fail), each check end to end with the CPU standing in for the GPU, and the no-GPU answer.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch
from test_patch import run_cli

from wsi_pipeline.doctor import FAIL, INFO, OK, environment_report
from wsi_pipeline.doctor import gpu as selfcheck
from wsi_pipeline.doctor.environment import torch_cuda_build, version
from wsi_pipeline.models import pretrained
from wsi_pipeline.models.ssm import scan

CPU = torch.device("cpu")


def by_name(findings):
    return {f.name: f for f in findings}


def test_report_is_fast_healthy_and_true_to_the_environment(monkeypatch):
    monkeypatch.delenv("WSIP_SCAN", raising=False)
    start = time.perf_counter()
    findings = environment_report()
    assert time.perf_counter() - start < 2.0
    found = by_name(findings)
    assert all(f.status != FAIL for f in findings), [f for f in findings if f.status == FAIL]
    assert found["torch"].value.startswith(version("torch"))
    assert f"CUDA build {torch.version.cuda or 'none'}" in found["torch"].value
    assert torch_cuda_build() == torch.version.cuda
    import openslide

    assert found["OpenSlide library"].value.startswith(openslide.__library_version__)
    assert found["cpu: selective_scan"].value == found["cpu: causal_conv1d"].value == "numba kernels"
    assert {"resnet18", "vit_s16_ssl"} <= found.keys()


@pytest.mark.parametrize(("value", "expected", "status"), [
    ("torch", "PyTorch", OK),
    ("cuda", "WSIP_SCAN=cuda but", FAIL),
    ("triton", "WSIP_SCAN='triton'", FAIL),
])
def test_scan_backend_follows_wsip_scan(monkeypatch, value, expected, status):
    monkeypatch.setenv("WSIP_SCAN", value)
    finding = by_name(environment_report())["cpu: selective_scan"]
    assert expected in finding.value and finding.status == status


def test_gpus_from_nvidia_smi_get_their_scan_backends(monkeypatch, tmp_path):
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho '0, NVIDIA H200, 143771 MiB, 550.54.15'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("WSIP_SCAN", raising=False)
    found = by_name(environment_report())
    assert found["cuda:0"].value == "NVIDIA H200, 143771 MiB, driver 550.54.15"
    scan_on_gpu = found["cuda: selective_scan"]
    if version("mamba-ssm") is None:
        assert scan_on_gpu.value.startswith("PyTorch") and "wsi-pipeline[cuda]" in scan_on_gpu.value
    else:
        assert scan_on_gpu.value.startswith("mamba-ssm CUDA kernel")


def test_weights_found_in_their_caches_without_network(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("WSIP_WEIGHTS", str(tmp_path / "weights"))
    found = by_name(environment_report())
    assert found["resnet18"].status == found["vit_s16_ssl"].status == INFO
    assert "not on this machine" in found["resnet18"].value
    snapshot = tmp_path / "hf" / "models--timm--resnet18.tv_in1k" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").write_bytes(b"x")
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    lunit = pretrained.url_cache_path(pretrained.LUNIT_VIT_S16_URL)
    lunit.parent.mkdir(parents=True)
    lunit.write_bytes(b"x")
    assert lunit.is_relative_to(tmp_path / "torch" / "hub" / "checkpoints")
    found = by_name(environment_report())
    assert found["resnet18"].value == f"hub cache: {snapshot / 'model.safetensors'}"
    assert found["vit_s16_ssl"].value == f"torch hub cache: {lunit}"
    assert "weights" in found["uni"].value and "uni.safetensors|.bin|.pth" in found["uni"].value
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "uni.bin").write_bytes(b"x")  # the weights folder wins over any cache
    (tmp_path / "weights" / "resnet18.pth").write_bytes(b"x")
    found = by_name(environment_report())
    assert found["uni"].value == f"$WSIP_WEIGHTS: {tmp_path / 'weights' / 'uni.bin'}"
    assert found["resnet18"].value == f"$WSIP_WEIGHTS: {tmp_path / 'weights' / 'resnet18.pth'}"


TORCH_HUB_PROBE = """
import sys
from wsi_pipeline.models.pretrained import torch_hub_dir
from wsi_pipeline.cli import app
before = torch_hub_dir()
app(["doctor"], standalone_mode=False)
print("HEAVY:", sorted(m for m in ("torch", "timm", "numba", "huggingface_hub.file_download") if m in sys.modules))
import torch
print("SAME:", before == __import__("pathlib").Path(torch.hub.get_dir()))
"""


def test_cli_doctor_imports_nothing_heavy_and_knows_torch_hub_dir(tmp_path):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    env.pop("TORCH_HOME", None)
    proc = subprocess.run([sys.executable, "-c", TORCH_HUB_PROBE], capture_output=True, text=True, timeout=120,
                          env=env)
    assert "HEAVY: []" in proc.stdout and "SAME: True" in proc.stdout, proc.stdout + proc.stderr
    assert "OpenSlide library" in proc.stdout and "cpu: selective_scan" in proc.stdout


def test_comparison_passes_two_correct_scans_and_fails_a_perturbed_one():
    inputs = selfcheck.scan_inputs(length=256)
    upstream = torch.randn(inputs["u"].shape, generator=torch.Generator().manual_seed(1))
    numba = selfcheck.run_with_grads(scan.selective_scan, inputs, upstream, delta_softplus=True)
    plain = selfcheck.run_with_grads(scan._scan_torch, inputs, upstream, delta_softplus=True)
    worst, diff = selfcheck.relative_max_diff(plain, numba)
    assert 0 < diff < selfcheck.TOLERANCE["scan"]  # different arithmetic, same function
    assert selfcheck.comparison("scan", plain, numba, selfcheck.TOLERANCE["scan"]).status == OK
    off = {**plain, "dA": plain["dA"] * 1.01}
    failed = selfcheck.comparison("scan", off, numba, selfcheck.TOLERANCE["scan"])
    assert failed.status == FAIL and "in dA" in failed.value and failed.value.startswith("FAIL")
    nan = {**plain, "out": plain["out"].clone().fill_(float("nan"))}
    assert selfcheck.relative_max_diff(nan, numba) == ("out", float("inf"))


def test_a_crashing_check_is_a_failed_finding():
    def crash():
        raise RuntimeError("CUDA error: no kernel image is available\nfor execution")

    finding = selfcheck.timed("selective scan", crash)
    assert finding.status == FAIL and "no kernel image" in finding.value and "\n" not in finding.value


@pytest.mark.parametrize("check", ["scan_check", "conv_check", "gmmamba_check", "extraction_check"])
def test_each_check_runs_end_to_end_with_the_cpu_as_the_device(check, one_torch_thread):
    finding = selfcheck.timed(check, lambda: getattr(selfcheck, check)(CPU))
    assert finding.status == OK and finding.value.startswith("pass: max rel. diff 0.0e+00"), finding.value
    assert "cpu runs" in finding.value or "patches" in finding.value


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_gpu_flag_without_a_gpu_says_so_in_one_line(tmp_path):
    [finding] = selfcheck.gpu_report()
    assert finding.status == FAIL and finding.value.startswith("no CUDA GPU")
    proc = run_cli("doctor", "--gpu")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "no CUDA GPU" in proc.stdout and "1 check(s) failed: cuda" in proc.stderr


def test_gmmamba_runs_get_fresh_leaves(one_torch_thread):
    """Each run's input gradient is its own: a shared leaf would accumulate both runs' gradients into one tensor
    and make any comparison of them pass."""
    import copy

    from wsi_pipeline.models.mil.gmmamba import GMMamba

    torch.manual_seed(0)
    model = GMMamba(16, 2, d_model=16, n_groups=2, mask_ratio=0.0, min_one_masked=False).eval()
    features, coords, weight = torch.randn(40, 16), torch.randint(0, 1000, (40, 2)), torch.randn(40)
    groups = model.make_groups(None, coords.numpy())
    first = selfcheck.gmmamba_run(model, features, coords, groups, weight)
    second = selfcheck.gmmamba_run(copy.deepcopy(model), features, coords, groups, weight)
    assert not features.requires_grad and first["d_features"] is not second["d_features"]
    assert torch.equal(first["d_features"], second["d_features"])
