"""The environment half of `wsip doctor`: versions, devices, scan backends and pretrained weights.

Torch-free and network-free, so it answers in well under a second: versions come from package metadata (and
torch's CUDA build from its `version.py`, read as text), GPUs from `nvidia-smi`, each device's scan backend
from the rule `scan.py` itself follows (`models/ssm/backend.py`), weights from the weights folder and caches.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from wsi_pipeline.errors import one_line
from wsi_pipeline.models import pretrained
from wsi_pipeline.models.encoder_cards import CARDS
from wsi_pipeline.models.ssm import backend

OK, INFO, WARN, FAIL = "ok", "info", "warn", "fail"
# distribution -> what it is for; the required ones fail the check when missing, the others are reported
REQUIRED = {"torch": "models, extraction", "torchvision": "timm's image models", "timm": "encoders",
            "numba": "CPU scan kernels", "openslide-python": "slide reading"}
OPTIONAL = {"mamba-ssm": "CUDA selective scan (extra cuda)", "causal-conv1d": "CUDA causal conv (extra cuda)",
            "pydicom": "writes test DICOM WSI (extra dev)", "tiatoolbox": "fallback slide reader"}
_BACKEND_NAMES = {backend.NUMBA: "numba kernels", backend.TORCH: "PyTorch"}


@dataclass(frozen=True)
class Finding:
    """One line of the report; `status` FAIL makes `wsip doctor` exit 1."""

    section: str
    name: str
    value: str
    status: str = OK


def environment_report() -> list[Finding]:
    """Every finding of the torch-free checks, in display order."""
    gpus = nvidia_gpus()
    return [*versions(), *devices(gpus), *scan_backends(["cpu", *(["cuda"] if gpus else [])]), *weights()]


def version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def torch_cuda_build() -> str | None:
    """The CUDA version torch was built with (None: a CPU build, or no torch), from `torch/version.py` read as
    text: importing torch takes seconds."""
    spec = importlib.util.find_spec("torch")
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations or not (Path(locations[0]) / "version.py").is_file():
        return None
    for node in ast.parse((Path(locations[0]) / "version.py").read_text()).body:
        if isinstance(node, ast.AnnAssign | ast.Assign) and node.value is not None:
            targets = [node.target] if isinstance(node, ast.AnnAssign) else node.targets
            if any(isinstance(t, ast.Name) and t.id == "cuda" for t in targets):
                value = ast.literal_eval(node.value)
                return str(value) if value else None
    return None


def versions() -> list[Finding]:
    found = [Finding("versions", "python", f"{platform.python_version()} ({sys.executable})"),
             Finding("versions", "wsi-pipeline", version("wsi-pipeline") or "not installed (run from a checkout)",
                     INFO if version("wsi-pipeline") is None else OK)]
    for dist, purpose in REQUIRED.items():
        v = version(dist)
        if dist == "torch" and v:
            v += f", CUDA build {torch_cuda_build() or 'none (CPU only)'}"
        found.append(Finding("versions", dist, v or f"missing: needed for {purpose}", OK if v else FAIL))
    found.append(_openslide_library())
    for dist, purpose in OPTIONAL.items():
        found.append(Finding("versions", dist, version(dist) or f"not installed ({purpose})", INFO))
    return found


def _openslide_library() -> Finding:
    """The C library OpenSlide loads (openslide-bin, or the system's): DICOM WSI needs 4.0 or later."""
    try:
        import openslide

        lib = openslide.__library_version__
    except Exception as exc:  # a missing or broken shared library raises OSError and friends
        return Finding("versions", "OpenSlide library", f"cannot load ({one_line(exc)}); pip install openslide-bin",
                       FAIL)
    major = int(lib.split(".")[0]) if lib.split(".")[0].isdigit() else 0
    if major < 4:
        return Finding("versions", "OpenSlide library", f"{lib}: DICOM WSI needs 4.0 or later "
                       "(pip install 'openslide-bin>=4')", WARN)
    return Finding("versions", "OpenSlide library", f"{lib} (reads DICOM WSI)")


def nvidia_gpus() -> list[str]:
    """`index, name, memory, driver` of each NVIDIA GPU `nvidia-smi` lists; empty without one (or without
    the tool). CUDA_VISIBLE_DEVICES does not apply here: this is the machine, not what torch will see."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    query = ["--query-gpu=index,name,memory.total,driver_version", "--format=csv,noheader"]
    try:
        out = subprocess.run([exe, *query], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


def devices(gpus: list[str]) -> list[Finding]:
    found = [Finding("devices", "cpu", f"{os.cpu_count()} logical cores, {platform.machine()}")]
    for line in gpus:
        index, name, memory, driver = ([*map(str.strip, line.split(",")), "", "", ""])[:4]
        found.append(Finding("devices", f"cuda:{index}", f"{name}, {memory}, driver {driver}"))
    if not gpus:
        found.append(Finding("devices", "gpu", "none found (no NVIDIA GPU, or nvidia-smi not on PATH)", INFO))
    return found


def scan_backends(device_types: list[str]) -> list[Finding]:
    """What `scan.selective_scan` / `scan.causal_conv1d` run on each device type, by `backend.plan`, taking
    "installed" for "loads" (only `--gpu` imports the CUDA kernels)."""
    found = [Finding("scan", "WSIP_SCAN", os.environ.get("WSIP_SCAN") or "unset (automatic)")]
    numba = version("numba") is not None
    for device in device_types:
        for op, (_, _, dist) in backend.CUDA_OPS.items():
            installed = version(dist) is not None
            try:
                choice = backend.plan(op, device, cuda_op=installed, numba=numba, why=f"{dist} is not installed")
            except (RuntimeError, ValueError) as exc:
                found.append(Finding("scan", f"{device}: {op}", one_line(exc), FAIL))
                continue
            found.append(_backend_finding(op, device, choice, dist, installed, numba))
    return found


def _backend_finding(op: str, device: str, choice: str, dist: str, installed: bool, numba: bool) -> Finding:
    name = f"{device}: {op}"
    if choice == backend.CUDA:
        return Finding("scan", name, f"{dist} CUDA kernel (installed; --gpu checks that it loads)")
    text = _BACKEND_NAMES[choice]
    if device == "cuda":
        why = "WSIP_SCAN=torch" if installed else f"{dist} missing: {backend.CUDA_HINT}"
        return Finding("scan", name, f"{text} ({why})", INFO)
    if device == "cpu" and not numba:
        return Finding("scan", name, f"{text} (numba missing: slower, and the backward holds every state)", WARN)
    return Finding("scan", name, text)


def weights() -> list[Finding]:
    """The weights folder, the two caches and, for each registered encoder, whether its weights are on this
    machine and where (the order `wsip extract` looks in: docs/encoders.md, "Weights")."""
    try:
        found = [Finding("weights", f"weights folder (${pretrained.WEIGHTS_ENV})", str(pretrained.weights_dir())),
                 Finding("weights", "Hugging Face hub cache", str(pretrained.hf_hub_cache())),
                 Finding("weights", "torch hub checkpoints", str(pretrained.torch_hub_dir() / "checkpoints"))]
        for name, card in CARDS.items():
            local = pretrained.local_weights(card)
            found.append(Finding("weights", name, f"{local[1]}: {local[0]}") if local else Finding(
                "weights", name, f"not on this machine: downloaded from {card.source} on first use "
                f"(offline: copy it to {pretrained.weights_dir() / name}.safetensors|.bin|.pth)", INFO))
    except ImportError as exc:  # huggingface_hub comes with timm
        return [Finding("weights", "caches", f"cannot look ({one_line(exc)}); reinstall timm", FAIL)]
    return found
