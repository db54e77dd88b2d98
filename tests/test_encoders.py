"""Encoder registry: dims/constants, weight files, the lunit layout, caches, offline errors, determinism.

No network is used: every test that could reach it runs with ``urlopen``/``hf_hub_download`` replaced by
functions that fail, and with empty torch/HF caches under tmp_path.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import huggingface_hub
import pytest
import timm
import torch
from huggingface_hub import constants as hf_constants
from safetensors.torch import save_file
from torch import Tensor

from wsi_pipeline.errors import UserError
from wsi_pipeline.models import encoders as enc
from wsi_pipeline.models.encoders import WeightsFormatError, WeightsUnavailableError, create_encoder

LUNIT_FILE = "dino_vit_small_patch16_ep200.torch"


def _lunit_release_keys() -> set[str]:
    """Key names of lunit's release file, written out: a flat timm VisionTransformer state dict (no prefix,
    no head), as lunit's README loads it strictly into ``VisionTransformer(..., num_classes=0)``."""
    params = ["norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"]
    keys = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"}
    keys |= {"norm.weight", "norm.bias"}
    keys |= {f"blocks.{i}.{p}.{t}" for i in range(12) for p in params for t in ("weight", "bias")}
    return keys


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _images(size: int = 224, n: int = 2) -> Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def vit_source() -> torch.nn.Module:
    """A random ViT-S/16 built with timm directly (not through the registry), standing in for lunit's."""
    torch.manual_seed(123)
    return timm.create_model("vit_small_patch16_224", num_classes=0).eval()


@pytest.fixture(scope="module")
def vit_out(vit_source: torch.nn.Module) -> Tensor:
    with torch.inference_mode():
        return vit_source(_images())


@pytest.fixture
def lunit_release(vit_source: torch.nn.Module) -> dict[str, Tensor]:
    state = dict(vit_source.state_dict())
    assert set(state) == _lunit_release_keys()  # timm still names the ViT the way lunit's file does
    return state


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[str]:
    """Empty caches and a dead network; returns the URLs that something tried to open."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    attempts: list[str] = []

    def refuse(url, *args, **kwargs):
        attempts.append(getattr(url, "full_url", url))
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    return attempts


@pytest.mark.parametrize(
    ("name", "dim", "mean", "std"),
    [
        ("resnet18", 512, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ("vit_s16_ssl", 384, (0.70322989, 0.53606487, 0.66096631), (0.21716536, 0.26081574, 0.20723464)),
    ],
)
def test_registered_encoders_dims_and_constants(name: str, dim: int, mean: tuple, std: tuple) -> None:
    encoder = create_encoder(name, weights="random")
    assert encoder.dim == dim
    assert encoder.preprocess == enc.Preprocess(224, mean, std)
    assert encoder(_images()).shape == (2, dim)
    assert not encoder.module.training
    assert name in enc.list_encoders()


def test_timm_encoder_takes_dim_and_preprocess_from_timm() -> None:
    encoder = create_encoder("timm:resnet10t", weights="random")
    assert encoder.dim == timm.create_model("resnet10t", num_classes=0).num_features == 512
    assert encoder.preprocess == enc.Preprocess(176, enc.IMAGENET_MEAN, enc.IMAGENET_STD)  # its train size
    assert encoder.spec.weights_source == "hf-hub:timm/resnet10t.c3_in1k"
    assert encoder(_images(176)).shape == (2, 512)


def test_unknown_encoder_name() -> None:
    with pytest.raises(UserError, match="resnet18"):
        enc.get_spec("resnet19")


def test_weights_from_file_match_in_memory_model(tmp_path: Path) -> None:
    source = create_encoder("resnet18", weights="random", seed=1)
    path = tmp_path / "r18.pth"
    torch.save(source.module.state_dict(), path)
    loaded = create_encoder("resnet18", weights=path)  # built with seed 0: only the file can make it equal
    x = _images()
    torch.testing.assert_close(loaded(x), source(x), rtol=0, atol=1e-6)
    assert not torch.allclose(create_encoder("resnet18", weights="random")(x), source(x))
    assert loaded.weights_sha256 == _sha256(path)


def test_training_checkpoint_is_unwrapped_and_classifier_dropped(tmp_path: Path) -> None:
    torch.manual_seed(5)
    full = timm.create_model("resnet18", num_classes=1000).eval()  # with 'fc.*' keys
    state = {f"module.{k}": v for k, v in full.state_dict().items()}
    path = tmp_path / "ckpt.pth"
    torch.save({"epoch": 3, "state_dict": state}, path)
    loaded = create_encoder("resnet18", weights=str(path))
    full.reset_classifier(0)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(_images()), full(_images()), rtol=0, atol=1e-6)


def test_lunit_release_layout_loads_exactly(tmp_path: Path, lunit_release: dict, vit_out: Tensor) -> None:
    path = tmp_path / LUNIT_FILE
    torch.save(lunit_release, path)
    loaded = create_encoder("vit_s16_ssl", weights=path)
    torch.testing.assert_close(loaded(_images()), vit_out, rtol=0, atol=1e-6)
    assert loaded.weights_sha256 == _sha256(path)


def test_dino_teacher_checkpoint_maps_keys(tmp_path: Path, lunit_release: dict, vit_out: Tensor) -> None:
    teacher = {f"backbone.{k}": v for k, v in lunit_release.items()}
    teacher["head.mlp.0.weight"] = torch.zeros(2048, 384)  # DINO projection head: not part of the backbone
    teacher["head.last_layer.weight_g"] = torch.ones(65536, 1)
    path = tmp_path / "checkpoint.pth"
    torch.save({"teacher": teacher, "epoch": 199}, path)
    loaded = create_encoder("vit_s16_ssl", weights=path)
    torch.testing.assert_close(loaded(_images()), vit_out, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (lambda sd: sd.pop("blocks.11.mlp.fc2.bias"), "missing [blocks.11.mlp.fc2.bias]"),
        (lambda sd: sd.__setitem__("blocks.12.norm1.weight", torch.ones(384)), "unexpected [blocks.12.norm1"),
        (lambda sd: sd.__setitem__("pos_embed", torch.zeros(1, 5, 384)), "wrong shape [pos_embed]"),
    ],
)
def test_mismatched_checkpoint_fails_naming_keys(lunit_release: dict, edit, named: str) -> None:
    edit(lunit_release)
    module = enc.get_spec("vit_s16_ssl").builder()
    with pytest.raises(WeightsFormatError) as info:
        enc.load_weights(module, lunit_release, classifier_prefix="head")
    assert named in str(info.value)


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pth"
    torch.save({"args": argparse.Namespace(lr=1.0), "model": {}}, path)
    with pytest.raises(WeightsFormatError, match="plain tensors"):
        create_encoder("timm:resnet10t", weights=path)


def test_missing_weights_file(tmp_path: Path) -> None:
    with pytest.raises(WeightsUnavailableError, match="not found"):
        create_encoder("timm:resnet10t", weights=tmp_path / "nope.pth")


@pytest.mark.parametrize("offline_env", [True, False])
@pytest.mark.parametrize(
    ("name", "source"), [("vit_s16_ssl", enc.LUNIT_VIT_S16_URL), ("resnet18", "timm/resnet18.tv_in1k")]
)
def test_unreachable_pretrained_raises_clear_error(
    monkeypatch: pytest.MonkeyPatch, no_network: list[str], offline_env: bool, name: str, source: str
) -> None:
    if offline_env:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsUnavailableError) as info:
        create_encoder(name)
    message = str(info.value)
    assert source in message and "--weights PATH" in message and "--weights random" in message
    assert "\n" not in message
    assert isinstance(info.value, UserError)  # the CLI prints it as one line, exit code 2
    assert len(no_network) == (0 if offline_env else 1)  # one quick attempt; offline: not even that


def test_lunit_weights_in_torch_hub_cache_load_offline(
    no_network: list[str], tmp_path: Path, lunit_release: dict, vit_out: Tensor
) -> None:
    cached = tmp_path / "torch" / "hub" / "checkpoints" / LUNIT_FILE
    cached.parent.mkdir(parents=True)
    torch.save(lunit_release, cached)
    loaded = create_encoder("vit_s16_ssl")
    torch.testing.assert_close(loaded(_images()), vit_out, rtol=0, atol=1e-6)
    assert loaded.weights_sha256 == _sha256(cached)
    assert no_network == []


def test_timm_weights_in_hf_cache_load_offline(no_network: list[str], tmp_path: Path) -> None:
    repo = tmp_path / "hf" / "models--timm--resnet18.tv_in1k"
    revision = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    (repo / "snapshots" / revision).mkdir(parents=True)
    torch.manual_seed(9)
    source = timm.create_model("resnet18", num_classes=1000).eval()  # hub files hold the classifier too
    weights = repo / "snapshots" / revision / "model.safetensors"
    save_file(source.state_dict(), weights)
    loaded = create_encoder("resnet18")
    source.reset_classifier(0)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(_images()), source(_images()), rtol=0, atol=1e-6)
    assert loaded.weights_sha256 == _sha256(weights)
    assert no_network == []


def test_random_is_deterministic_and_leaves_global_rng_alone() -> None:
    rng_before = torch.get_rng_state()
    first, second = create_encoder("resnet18", weights="random"), create_encoder("resnet18", weights="random")
    assert torch.equal(torch.get_rng_state(), rng_before)
    x = _images()
    assert torch.equal(first(x), second(x))
    assert first.weights_sha256 == second.weights_sha256 == "random:0"
    assert not torch.allclose(create_encoder("resnet18", weights="random", seed=1)(x), first(x))


def test_forward_normalises_uint8_and_checks_size() -> None:
    encoder = create_encoder("timm:resnet10t", weights="random")
    pixels = torch.randint(0, 256, (2, 3, 176, 176), dtype=torch.uint8)
    mean = torch.tensor(enc.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(enc.IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(encoder(pixels), encoder((pixels / 255.0 - mean) / std))
    with pytest.raises(ValueError, match="176"):
        encoder(_images(224))


def test_import_does_not_load_timm() -> None:
    code = "import sys, wsi_pipeline.models.encoders; assert 'timm' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_timm_dim_is_the_width_the_model_outputs() -> None:
    """MobileNetV3's `num_features` (288) is not its output width (1024, after its head conv)."""
    encoder = create_encoder("timm:mobilenetv3_small_050", "random")
    features = encoder(torch.zeros(2, 3, encoder.preprocess.input_size, encoder.preprocess.input_size,
                                   dtype=torch.uint8))
    assert features.shape == (2, encoder.dim) == (2, 1024)
