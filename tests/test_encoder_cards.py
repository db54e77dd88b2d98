"""The registered foundation-model encoders, without their real weights.

Every card is built on the meta device and its parameter count checked against the card and the published
figure; a reduced-depth copy (the `depth` constructor option, nothing else changed) loads a file written here in
the official key layout — built as the official loading code builds the model — strictly through our loader and
gives the official features; each preprocessing turns a fixed image into the expected normalised tensor; wrong
files are one line naming the file.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from conftest import SHALLOW_DEPTH as DEPTH
from safetensors.torch import save_file
from timm.layers import SwiGLUPacked
from torch import nn
from torch.nn import functional as F  # noqa: N812

from wsi_pipeline.errors import UserError
from wsi_pipeline.models.encoder_cards import (
    CARDS,
    HOPTIMUS_MEAN,
    HOPTIMUS_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Published,
)
from wsi_pipeline.models.encoders import WeightsFormatError, create_encoder, zoo

# How each model's official loading code builds it (timm name + the options it passes).
OFFICIAL = {
    "uni": ("vit_large_patch16_224", {"img_size": 224, "patch_size": 16, "init_values": 1e-5,
                                      "dynamic_img_size": True}),
    "uni2_h": ("vit_giant_patch14_224", {
        "img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5, "embed_dim": 1536,
        "mlp_ratio": 2.66667 * 2, "no_embed_class": True, "mlp_layer": SwiGLUPacked, "act_layer": nn.SiLU,
        "reg_tokens": 8, "dynamic_img_size": True}),
    "virchow2": ("vit_huge_patch14_224", {
        "img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375, "reg_tokens": 4, "global_pool": "",
        "dynamic_img_size": True, "mlp_layer": SwiGLUPacked, "act_layer": nn.SiLU}),
    "hoptimus0": ("vit_giant_patch14_reg4_dinov2", {"img_size": 224, "global_pool": "token", "init_values": 1e-5,
                                                    "dynamic_img_size": False}),
    "hoptimus1": ("vit_giant_patch14_reg4_dinov2", {"img_size": 224, "global_pool": "token", "init_values": 1e-5,
                                                    "dynamic_img_size": False}),
    "gigapath": ("vit_giant_patch14_dinov2", {
        "img_size": 224, "in_chans": 3, "patch_size": 16, "embed_dim": 1536, "depth": 40, "num_heads": 24,
        "init_values": 1e-5, "mlp_ratio": 5.33334}),
}


def _official(name: str, seed: int = 3) -> nn.Module:
    arch, kwargs = OFFICIAL[name]
    torch.manual_seed(seed)
    return timm.create_model(arch, pretrained=False, num_classes=0, **{**kwargs, "depth": DEPTH}).eval()


def _images(size: int, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(11))


@pytest.mark.parametrize("name", list(CARDS))
def test_parameter_count_is_the_official_and_published_one(name: str) -> None:
    """Exact count on the meta device = the card's = the model the official loading code builds; and the
    published figure at its published precision ("632 M" stands for 631.5-632.5 M). Where the figure is a
    nominal architecture size (Virchow2's 632 M), the count must miss it by less than 0.5 % and the figure must be
    the named standard model's count: the card's explanation is checked, not just stated."""
    card = CARDS[name]
    with torch.device("meta"):
        module = zoo.get_spec(name).builder()
        official = timm.create_model(OFFICIAL[name][0], num_classes=0, **OFFICIAL[name][1]) if name in OFFICIAL \
            else None
    count = sum(p.numel() for p in module.parameters())
    assert count == card.params
    if official is not None:
        assert sum(p.numel() for p in official.parameters()) == count
    published = card.published
    assert published.source
    if published.figure is None:
        return
    assert published.agrees(count) == published.matches, (count, published.figure)
    if not published.matches:
        low, high = published.bounds()
        assert abs(count - (low + high) / 2) < 0.005 * high and published.note
        with torch.device("meta"):
            nominal = timm.create_model(published.nominal_arch, num_classes=1000)
        assert published.agrees(sum(p.numel() for p in nominal.parameters()))


@pytest.mark.parametrize(("figure", "low", "high"), [
    ("632 M", 631_500_000, 632_500_000), ("0.3 B", 250_000_000, 350_000_000),
    ("1.1 B", 1_050_000_000, 1_150_000_000), ("11,689,512", 11_689_511.5, 11_689_512.5),
])
def test_a_published_figure_stands_for_what_rounds_to_it(figure: str, low: float, high: float) -> None:
    published = Published(figure, "test")
    assert published.bounds() == pytest.approx((low, high))
    assert published.agrees(int(low) + 1) and not published.agrees(int(high) + 1)


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_official_timm_layout_loads_strictly_and_gives_the_official_features(
        name: str, shallow, tmp_path: Path) -> None:
    official = _official(name)
    path = tmp_path / CARDS[name].filename
    torch.save(official.state_dict(), path)
    spec = shallow(name)
    encoder = create_encoder(name, weights=path)
    x = _images(224)
    with torch.inference_mode():
        reference = official(x)
    if name == "virchow2":  # its model card: CLS ⊕ mean of the patch tokens (tokens 1-4 are registers)
        reference = torch.cat([reference[:, 0], reference[:, 5:].mean(1)], dim=-1)
    features = encoder(x)
    assert features.shape == (2, spec.dim) == (2, CARDS[name].dim)
    torch.testing.assert_close(features, reference, rtol=0, atol=1e-5)


def _dinov2_state_dict(timm_vit: nn.Module) -> dict[str, torch.Tensor]:
    """A transformers Dinov2Model state dict (Phikon-v2's file) holding the same weights as ``timm_vit``."""
    sd = timm_vit.state_dict()
    out = {"embeddings.cls_token": sd["cls_token"], "embeddings.mask_token": torch.zeros(1, sd["cls_token"].shape[-1]),
           "embeddings.position_embeddings": sd["pos_embed"], "layernorm.weight": sd["norm.weight"],
           "layernorm.bias": sd["norm.bias"]}
    for t in ("weight", "bias"):
        out[f"embeddings.patch_embeddings.projection.{t}"] = sd[f"patch_embed.proj.{t}"]
    for i in range(DEPTH):
        hf, tm = f"encoder.layer.{i}", f"blocks.{i}"
        for t in ("weight", "bias"):
            q, k, v = sd[f"{tm}.attn.qkv.{t}"].chunk(3)
            out |= {f"{hf}.attention.attention.query.{t}": q, f"{hf}.attention.attention.key.{t}": k,
                    f"{hf}.attention.attention.value.{t}": v,
                    f"{hf}.attention.output.dense.{t}": sd[f"{tm}.attn.proj.{t}"]}
            for part in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                out[f"{hf}.{part}.{t}"] = sd[f"{tm}.{part}.{t}"]
        out[f"{hf}.layer_scale1.lambda1"] = sd[f"{tm}.ls1.gamma"]
        out[f"{hf}.layer_scale2.lambda1"] = sd[f"{tm}.ls2.gamma"]
    return out


def test_phikon_v2_transformers_layout(shallow, tmp_path: Path) -> None:
    torch.manual_seed(4)
    reference_vit = timm.create_model("vit_large_patch16_224", num_classes=0, init_values=1e-5, depth=DEPTH).eval()
    with torch.no_grad():  # LayerScale starts at 1e-5: make the blocks matter to the comparison
        for name, p in reference_vit.named_parameters():
            if name.endswith("gamma"):
                p.normal_()
    path = tmp_path / "model.safetensors"
    save_file(_dinov2_state_dict(reference_vit), path)
    shallow("phikon_v2")
    encoder = create_encoder("phikon_v2", weights=path)
    x = _images(224)
    with torch.inference_mode():
        torch.testing.assert_close(encoder(x), reference_vit(x), rtol=0, atol=1e-5)  # last_hidden_state[:, 0]
    assert encoder.dim == 1024


def _coca_pool(tokens: torch.Tensor, sd: dict[str, torch.Tensor], heads: int = 8) -> torch.Tensor:
    """CoCa's attentional pooler written out (LayerNorms, biasless projections, max-subtracted softmax)."""
    p = "attn_pool_contrast."
    x = F.layer_norm(tokens, (tokens.shape[-1],), sd[p + "ln_k.weight"], sd[p + "ln_k.bias"])
    q = F.layer_norm(sd[p + "query"], (768,), sd[p + "ln_q.weight"], sd[p + "ln_q.bias"]) @ sd[p + "to_q.weight"].T
    k, v = (x @ sd[p + "to_kv.weight"].T).chunk(2, dim=-1)
    b = tokens.shape[0]
    q = q.expand(b, -1, -1).reshape(b, 1, heads, 96).transpose(1, 2) * 96 ** -0.5
    k, v = (t.reshape(b, -1, heads, 96).transpose(1, 2) for t in (k, v))
    sim = q @ k.transpose(-1, -2)
    attn = (sim - sim.amax(-1, keepdim=True)).softmax(-1)
    out = (attn @ v).transpose(1, 2).reshape(b, 1, 768) @ sd[p + "to_out.weight"].T
    return F.layer_norm(out[:, 0], (768,), sd["ln_contrast.weight"], sd["ln_contrast.bias"])


def conch_official(seed: int = 5) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A reduced CONCH v1.5 vision tower as its file holds it: the timm trunk at 224 px (``trunk.*``), the pooler
    and the final LayerNorm (random values)."""
    torch.manual_seed(seed)
    trunk = timm.create_model("vit_large_patch16_224", num_classes=0, img_size=224, init_values=1.0,
                              depth=DEPTH).eval()
    sd = {f"trunk.{k}": v for k, v in trunk.state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    for key, shape in {"query": (1, 768), "ln_q.weight": (768,), "ln_q.bias": (768,), "ln_k.weight": (1024,),
                       "ln_k.bias": (1024,), "to_q.weight": (768, 768), "to_kv.weight": (1536, 1024),
                       "to_out.weight": (768, 768)}.items():
        sd[f"attn_pool_contrast.{key}"] = torch.randn(shape, generator=gen) * 0.05 + ("ln_" in key and "weight"
                                                                                         in key)
    sd["ln_contrast.weight"], sd["ln_contrast.bias"] = torch.ones(768) * 1.5, torch.randn(768, generator=gen)
    return trunk, sd


def official_state_dict(name: str) -> dict[str, torch.Tensor]:
    """The reduced model's weights as the official file names them, for every registered encoder."""
    if name in OFFICIAL:
        return _official(name).state_dict()
    if name == "conch_v15":
        return conch_official()[1]
    torch.manual_seed(4)
    if name == "phikon_v2":
        return _dinov2_state_dict(timm.create_model("vit_large_patch16_224", num_classes=0, init_values=1e-5,
                                                    depth=DEPTH))
    if name == "vit_s16_ssl":
        return timm.create_model("vit_small_patch16_224", num_classes=0, depth=DEPTH).state_dict()
    return timm.create_model("resnet18", num_classes=0).state_dict()


def test_conch_v15_official_layout_at_448(shallow, tmp_path: Path) -> None:
    """The file holds a 224-px position grid; at 448 px the official trunk interpolates it DINO-style."""
    trunk, sd = conch_official()
    path = tmp_path / "pytorch_model_vision.bin"
    torch.save(sd, path)
    shallow("conch_v15")
    encoder = create_encoder("conch_v15", weights=path)
    x = _images(448)
    with torch.inference_mode():
        tokens = trunk.patch_embed.proj(x).flatten(2).transpose(1, 2)
        pos = trunk.pos_embed
        grid = F.interpolate(pos[:, 1:].reshape(1, 14, 14, 1024).permute(0, 3, 1, 2),
                             scale_factor=(28.1 / 14, 28.1 / 14), mode="bicubic")
        grid = grid.permute(0, 2, 3, 1).reshape(1, -1, 1024)
        tokens = torch.cat([trunk.cls_token.expand(2, -1, -1), tokens], 1) + torch.cat([pos[:, :1], grid], 1)
        reference = _coca_pool(trunk.norm(trunk.blocks(tokens)), sd)
        features = encoder(x)
    assert features.shape == (2, 768)
    torch.testing.assert_close(features, reference, rtol=0, atol=1e-4)


@pytest.mark.parametrize(("name", "patch", "mean", "std"), [
    ("uni", 256, IMAGENET_MEAN, IMAGENET_STD),
    ("gigapath", 256, IMAGENET_MEAN, IMAGENET_STD),
    ("hoptimus0", 224, HOPTIMUS_MEAN, HOPTIMUS_STD),
    ("conch_v15", 512, IMAGENET_MEAN, IMAGENET_STD),
])
def test_transform_of_a_fixed_image(name: str, patch: int, mean: tuple, std: tuple) -> None:
    """Horizontal ramp image: resize (area) then centre crop then (x/255 - mean)/std, per the model card."""
    card = CARDS[name]
    step = max(1, patch // 256)  # a ramp of 0..255 across the patch (value = column // step)
    ramp = np.tile((np.arange(patch) // step).astype(np.uint8)[None, :, None], (patch, 1, 3))
    pre = zoo.get_spec(name).preprocess
    out = pre.normalize(torch.from_numpy(pre.resize_crop(ramp)).permute(2, 0, 1)[None])
    assert out.shape == (1, 3, card.input_size, card.input_size)
    if name == "gigapath":  # Resize(256) is a no-op on a 256 patch, CenterCrop(224) keeps columns 16..239
        expected_row = np.arange(16, 240, dtype=np.float32)
    elif patch == card.input_size:
        expected_row = np.arange(patch, dtype=np.float32)
    else:  # area resize of a linear ramp by a factor f: the mean of each output pixel's source span
        f = patch / card.input_size
        expected_row = (np.arange(card.input_size) + 0.5) * f - 0.5
    expected_row = expected_row / step - (step - 1) / (2 * step)
    for c in range(3):
        np.testing.assert_allclose(out[0, c, 5].numpy(), (expected_row / 255 - mean[c]) / std[c], atol=0.02)


@pytest.mark.parametrize(("content", "named"), [
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 1234\n", "Git LFS pointer"),
    (b"<!DOCTYPE html><html><body>Access to model MahmoodLab/UNI is restricted</body></html>", "HTML page"),
    (b"", "empty file"),
])
def test_non_weight_files_are_named(tmp_path: Path, content: bytes, named: str) -> None:
    path = tmp_path / "uni.bin"
    path.write_bytes(content)
    with pytest.raises(WeightsFormatError) as info:
        create_encoder("resnet18", weights=path)
    assert named in str(info.value) and str(path) in str(info.value) and "\n" not in str(info.value)


def test_truncated_and_foreign_files(tmp_path: Path, shallow) -> None:
    official = _official("uni")
    good = tmp_path / "uni.safetensors"
    save_file(official.state_dict(), good)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    shallow("uni")
    with pytest.raises(WeightsFormatError, match="truncated"):
        create_encoder("uni", weights=cut)
    foreign = tmp_path / "resnet.pth"
    torch.save(timm.create_model("resnet10t", num_classes=0).state_dict(), foreign)
    with pytest.raises(WeightsFormatError) as info:
        create_encoder("uni", weights=foreign)
    message = str(info.value)
    assert str(foreign) in message and "not weights of encoder uni" in message
    assert "cls_token (1, 1, 1024)" in message and "\n" not in message  # the expected keys and shapes
    assert isinstance(info.value, UserError)


def test_cards_import_without_torch() -> None:
    code = ("import sys, wsi_pipeline.models.encoder_cards, wsi_pipeline.models.pretrained; "
            "assert 'torch' not in sys.modules and 'timm' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
