"""`wsip extract` with every registered encoder, offline, from weights files in the official layout.

The weights lie in ``$WSIP_WEIGHTS`` as ``<encoder>.safetensors|.bin`` (random values, official key names);
``HF_HUB_OFFLINE=1`` and a socket guard that refuses (and records) every internet connection prove that nothing
reaches for the network. The ViTs are reduced-depth copies (`shallow`, conftest) except in the one CLI run of
the full ViT-L UNI, marked slow.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import sample_slide
from safetensors.torch import save_file
from test_encoder_cards import official_state_dict
from test_extract import direct_features

from wsi_pipeline.models.encoder_cards import CARDS
from wsi_pipeline.models.encoders import WeightsUnavailableError, create_encoder
from wsi_pipeline.stages.extract import ExtractParams, extract
from wsi_pipeline.stages.inputs import SlideSource
from wsi_pipeline.stages.patch import PatchParams, patch

GUARD = """
import socket, sys
_connect = socket.socket.connect
def _refuse(self, address, *args):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        sys.stderr.write(f"NETWORK ATTEMPT {address}\\n")
        raise OSError("network disabled by the test")
    return _connect(self, address, *args)
socket.socket.connect = _refuse
"""


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """The shared CMU-1 small region patched at 5x, 224 px: a handful of patches."""
    out = tmp_path_factory.mktemp("ws")
    result = patch([SlideSource(sample_slide("CMU-1-Small-Region.svs"))],
                   PatchParams(magnification_x=5, patch_size_px=224), out=out)
    assert [o.status for o in result.outcomes] == ["done"]
    return out


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list:
    """HF_HUB_OFFLINE=1, empty caches, and every internet socket refused; returns the attempts."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("WSIP_WEIGHTS", str(tmp_path / "weights"))
    attempts: list = []
    connect = socket.socket.connect

    def refuse(self, address, *args):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            attempts.append(address)
            raise OSError("network disabled by the test")
        return connect(self, address, *args)  # DataLoader workers pass tensors over Unix sockets

    monkeypatch.setattr(socket.socket, "connect", refuse)
    return attempts


def _write_weights(folder: Path, name: str) -> Path:
    """The official-layout file in the weights folder, as .safetensors or (torch-pickled) .bin."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in official_state_dict(name).items()}
    if CARDS[name].filename and CARDS[name].filename.endswith(".bin"):
        path = folder / f"{name}.bin"
        torch.save(state, path)
    else:
        path = folder / f"{name}.safetensors"
        save_file(state, path)
    return path


@pytest.mark.parametrize("name", list(CARDS))
def test_extract_every_encoder_offline(name: str, workspace: Path, offline: list, shallow, tmp_path: Path) -> None:
    shallow(name)
    weights = _write_weights(tmp_path / "weights", name)
    result = extract(ExtractParams(encoder=name, formats=("h5",), batch_size=8), out=workspace)
    assert [o.status for o in result.outcomes] == ["done"], result.outcomes
    assert result.out_dir.name == name  # pretrained weights: the plain feature-set name
    with h5py.File(result.out_dir / "h5_files" / "CMU-1-Small-Region.h5", "r") as f:
        features, coords, attrs = f["features"][:], f["coords"][:], dict(f.attrs)
    assert features.shape == (len(coords), CARDS[name].dim) and np.isfinite(features).all()
    assert attrs["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert attrs["feature"] == CARDS[name].feature and attrs["input_size"] == CARDS[name].input_size
    rows = [0, len(coords) - 1]
    reference = direct_features(sample_slide("CMU-1-Small-Region.svs"), coords, attrs,
                                create_encoder(name, weights=weights), rows)
    np.testing.assert_allclose(features[rows], reference, atol=1e-4, rtol=1e-4)
    assert offline == []


def test_weights_folder_comes_before_the_cache(offline: list, tmp_path: Path) -> None:
    """A file in the weights folder is used even when the hub cache holds another one; nothing is fetched."""
    folder_file = _write_weights(tmp_path / "weights", "resnet18")
    snapshot = tmp_path / "hf" / "models--timm--resnet18.tv_in1k" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    (snapshot / "model.safetensors").write_bytes(b"not these")
    encoder = create_encoder("resnet18")
    assert encoder.weights_sha256 == hashlib.sha256(folder_file.read_bytes()).hexdigest()
    folder_file.unlink()  # now the cache's (broken) file is the one found, and named
    with pytest.raises(Exception, match="model.safetensors"):
        create_encoder("resnet18")
    assert offline == []


def test_missing_weights_offline_say_where_to_put_them(offline: list, tmp_path: Path) -> None:
    with pytest.raises(WeightsUnavailableError) as info:
        create_encoder("uni")
    message = str(info.value)
    assert "gated: accept the licence on https://huggingface.co/MahmoodLab/UNI" in message
    assert f"put the file at {tmp_path / 'weights' / 'uni.safetensors|.bin|.pth'}" in message
    assert "HF_HUB_OFFLINE" in message and "\n" not in message
    assert offline == []


def _wsip(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    code = GUARD + "from wsi_pipeline.cli import app\napp(sys.argv[1:])\n"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=600)


def test_cli_wrong_weights_file_is_one_line_and_writes_nothing(workspace: Path, tmp_path: Path) -> None:
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "uni.bin").write_text("<!DOCTYPE html><html>Access to model MahmoodLab/UNI is restricted.</html>")
    before = sorted(p for p in workspace.rglob("*"))
    env = {**os.environ, "WSIP_WEIGHTS": str(weights), "HF_HUB_OFFLINE": "1"}
    proc = _wsip(["extract", "--encoder", "uni", "--out", str(workspace), "-q"], env)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and str(weights / "uni.bin") in lines[0] and "HTML page" in lines[0]
    assert sorted(p for p in workspace.rglob("*")) == before
    assert "NETWORK ATTEMPT" not in proc.stderr


@pytest.mark.slow
def test_cli_extract_full_uni_offline(workspace: Path, tmp_path: Path) -> None:
    """The real ViT-L/16 (303 M parameters) from a UNI-layout file, through `wsip extract`, network refused."""
    import timm

    weights = tmp_path / "weights"
    weights.mkdir()
    torch.manual_seed(0)
    uni = timm.create_model("vit_large_patch16_224", num_classes=0, img_size=224, patch_size=16, init_values=1e-5)
    torch.save({k: v.to(torch.bfloat16) for k, v in uni.state_dict().items()}, weights / "uni.bin")  # half the disk
    del uni
    env = {**os.environ, "WSIP_WEIGHTS": str(weights), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    proc = _wsip(["extract", "--encoder", "uni", "--out", str(workspace), "-q", "--batch-size", "8"], env)
    assert proc.returncode == 0, proc.stderr
    assert "NETWORK ATTEMPT" not in proc.stderr
    h5 = next((workspace / "features").glob("*/uni/h5_files/CMU-1-Small-Region.h5"))
    with h5py.File(h5, "r") as f:
        assert f["features"].shape[1] == 1024 and f.attrs["encoder"] == "uni"
