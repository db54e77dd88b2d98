"""The registered patch encoders as plain data: one `EncoderCard` per name, importable without torch or timm.

A card says everything a user must know before extracting with an encoder, taken from each model's official
loading code and model card (docs/encoders.md lists the sources): the timm architecture and the constructor
options that make it that model, what the feature vector is, the exact parameter count of the module we build
(checked on the meta device by the tests) next to the published figure, the preprocessing, the magnification
and patch size it was trained at, the licence, and where the weights come from and how their keys are laid out.
`wsip encoders` reads only this module, so it answers without importing torch; `models/encoders/zoo.py`
builds the modules from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

Triple = tuple[float, float, float]

IMAGENET_MEAN: Triple = (0.485, 0.456, 0.406)
IMAGENET_STD: Triple = (0.229, 0.224, 0.225)
LUNIT_MEAN: Triple = (0.70322989, 0.53606487, 0.66096631)
LUNIT_STD: Triple = (0.21716536, 0.26081574, 0.20723464)
HOPTIMUS_MEAN: Triple = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD: Triple = (0.211883, 0.230117, 0.177517)
LUNIT_VIT_S16_URL = (
    "https://github.com/lunit-io/benchmark-ssl-pathology/releases/download/pretrained-weights/"
    "dino_vit_small_patch16_ep200.torch"
)

# How the feature vector is formed from the network's output.
FEATURES = {
    "avgpool": "global average pool of the last feature map",
    "cls": "CLS token after the final norm",
    "cls+mean": "CLS token ⊕ mean of the patch tokens (registers excluded), after the final norm",
    "attn-pool": "attentional pooler over all tokens, then LayerNorm (the CoCa contrastive head)",
}
# How a weights file names its keys (`models/encoders/layouts.py` maps each onto our module).
LAYOUTS = {
    "timm": "a flat timm state dict (module./backbone. wrappers and the classifier are dropped)",
    "hf-dinov2": "a transformers Dinov2Model (embeddings.*, encoder.layer.<i>.attention.attention.query|key|value.*, "
                 "layernorm.*): q/k/v are concatenated into timm's qkv, mask_token dropped",
    "conch-v1.5": "trunk.* (timm ViT-L/16 with LayerScale gamma), attn_pool_contrast.*, ln_contrast.*; "
                  "trunk.pos_embed is the 224-px grid, interpolated to 448 px exactly as the official loader does",
}


@dataclass(frozen=True)
class EncoderCard:
    """One encoder, as documented by its authors. ``params`` is the exact count of the module we build (equal to
    the count of the model their loading code builds); ``published_m`` (millions) is the figure they publish,
    where they publish one, with ``published_source``."""

    name: str
    title: str
    arch: str  # timm model name
    timm_kwargs: MappingProxyType  # constructor options; layer classes by timm/torch name (resolved in zoo.py)
    dim: int
    feature: str  # a FEATURES key
    params: int
    published_m: float | None  # None: the authors give the architecture, not a count
    published_source: str
    input_size: int
    resize_size: int  # the patch is resized to this, then centre-cropped to input_size
    interpolation: str  # what the official transform uses (we resize with area interpolation: docs/encoders.md)
    mean: Triple
    std: Triple
    magnification: float
    patch_px: int  # patch side at `magnification` the authors extract with
    licence: str
    gated: bool
    source: str | None  # "hf-hub:<repo id>" or a URL
    filename: str | None  # the weights file in the hub repo
    layout: str = "timm"  # a LAYOUTS key
    module: str = "timm"  # "timm": the timm model itself; "conch-v1.5": trunk + attentional pooler
    classifier_prefix: str = "head"
    prefix_tokens: int = 1  # CLS + register tokens: what "cls+mean" leaves out of the mean
    notes: str = ""

    @property
    def feature_text(self) -> str:
        return FEATURES[self.feature]

    @property
    def layout_text(self) -> str:
        return LAYOUTS[self.layout]

    @property
    def hub_url(self) -> str | None:
        if self.source and self.source.startswith("hf-hub:"):
            return "https://huggingface.co/" + self.source.removeprefix("hf-hub:")
        return self.source


def _kw(**kwargs: Any) -> MappingProxyType:
    return MappingProxyType(kwargs)


_NC_ND = "CC-BY-NC-ND 4.0 (non-commercial, no derivatives)"
CARDS: dict[str, EncoderCard] = {card.name: card for card in (
    EncoderCard(
        name="resnet18", title="ResNet18, ImageNet (torchvision weights)", arch="resnet18", timm_kwargs=_kw(),
        dim=512, feature="avgpool", params=11_176_512, published_m=11.18,
        published_source="torchvision model docs: 11,689,512 with the 1000-class fc (513,000), so 11.18M without it",
        input_size=224, resize_size=224, interpolation="area", mean=IMAGENET_MEAN, std=IMAGENET_STD,
        magnification=20, patch_px=256, licence="BSD-3-Clause (torchvision)", gated=False,
        source="hf-hub:timm/resnet18.tv_in1k", filename="model.safetensors", classifier_prefix="fc"),
    EncoderCard(
        name="vit_s16_ssl", title="ViT-S/16 DINO on pathology (lunit, Kang et al. CVPR 2023)",
        arch="vit_small_patch16_224", timm_kwargs=_kw(global_pool="token"), dim=384, feature="cls",
        params=21_665_664, published_m=22.0, published_source="ViT-S/16 (22M, the DeiT-S size lunit's paper uses)",
        input_size=224, resize_size=224, interpolation="area", mean=LUNIT_MEAN, std=LUNIT_STD,
        magnification=20, patch_px=256, licence="lunit terms (see the benchmark-ssl-pathology repository)",
        gated=False, source=LUNIT_VIT_S16_URL, filename="dino_vit_small_patch16_ep200.torch"),
    EncoderCard(
        name="uni", title="UNI (Mahmood Lab, Chen et al. Nat Med 2024)", arch="vit_large_patch16_224",
        timm_kwargs=_kw(img_size=224, patch_size=16, init_values=1e-5), dim=1024, feature="cls",
        params=303_350_784, published_m=None,
        published_source="the UNI README gives the architecture (ViT-l/16) and its timm options, not a count",
        input_size=224, resize_size=224, interpolation="bilinear", mean=IMAGENET_MEAN, std=IMAGENET_STD,
        magnification=20, patch_px=256, licence=_NC_ND, gated=True,
        source="hf-hub:MahmoodLab/UNI", filename="pytorch_model.bin"),
    EncoderCard(
        name="uni2_h", title="UNI2-h (Mahmood Lab, 2025)", arch="vit_giant_patch14_224",
        timm_kwargs=_kw(img_size=224, patch_size=14, depth=24, num_heads=24, init_values=1e-5, embed_dim=1536,
                        mlp_ratio=2.66667 * 2, no_embed_class=True, mlp_layer="SwiGLUPacked", act_layer="SiLU",
                        reg_tokens=8),
        dim=1536, feature="cls", params=681_394_176, published_m=None,
        published_source="the UNI README gives the architecture (ViT-h/14-reg8) and its timm options, not a count",
        input_size=224, resize_size=224,
        interpolation="bilinear", mean=IMAGENET_MEAN, std=IMAGENET_STD, magnification=20, patch_px=256,
        licence=_NC_ND, gated=True, source="hf-hub:MahmoodLab/UNI2-h", filename="pytorch_model.bin",
        prefix_tokens=9),
    EncoderCard(
        name="conch_v15", title="CONCH v1.5 vision tower (Mahmood Lab, from TITAN)", arch="vit_large_patch16_224",
        timm_kwargs=_kw(img_size=448, patch_size=16, init_values=1.0, global_pool=""), dim=768,
        feature="attn-pool", params=306_711_296, published_m=None,
        published_source="no count published; the official module (ViT-L/16 trunk, 224-px position grid, CoCa "
                         "pooler) has 306,109,184: we hold the grid interpolated to 448 px (+602,112)",
        input_size=448, resize_size=448, interpolation="bilinear", mean=IMAGENET_MEAN, std=IMAGENET_STD,
        magnification=20, patch_px=512, licence=_NC_ND, gated=True, source="hf-hub:MahmoodLab/conchv1_5",
        filename="pytorch_model_vision.bin", layout="conch-v1.5", module="conch-v1.5"),
    EncoderCard(
        name="virchow2", title="Virchow2 (Paige, Zimmermann et al. 2024)", arch="vit_huge_patch14_224",
        timm_kwargs=_kw(img_size=224, init_values=1e-5, mlp_ratio=5.3375, reg_tokens=4, global_pool="",
                        mlp_layer="SwiGLUPacked", act_layer="SiLU"),
        dim=2560, feature="cls+mean", params=631_239_424, published_m=632.0,
        published_source="Virchow2 paper, arXiv:2408.00738 (632M)", input_size=224, resize_size=224,
        interpolation="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD, magnification=20, patch_px=224,
        licence=_NC_ND, gated=True, source="hf-hub:paige-ai/Virchow2", filename="pytorch_model.bin",
        prefix_tokens=5, notes="trained at mixed magnifications (5x-40x); 20x is the common choice"),
    EncoderCard(
        name="hoptimus0", title="H-optimus-0 (Bioptimus)", arch="vit_giant_patch14_reg4_dinov2",
        timm_kwargs=_kw(img_size=224, init_values=1e-5, global_pool="token"), dim=1536, feature="cls",
        params=1_134_774_272, published_m=None,
        published_source="the H-optimus-0 README gives the architecture (g/14, 4 registers, 40 blocks, 24 heads, "
                         "dim 1536), not a count",
        input_size=224, resize_size=224, interpolation="bilinear", mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD,
        magnification=20, patch_px=224, licence="Apache-2.0", gated=False,
        source="hf-hub:bioptimus/H-optimus-0", filename="pytorch_model.bin", prefix_tokens=5),
    EncoderCard(
        name="hoptimus1", title="H-optimus-1 (Bioptimus)", arch="vit_giant_patch14_reg4_dinov2",
        timm_kwargs=_kw(img_size=224, init_values=1e-5, global_pool="token"), dim=1536, feature="cls",
        params=1_134_774_272, published_m=None,
        published_source="same architecture as H-optimus-0 (its official loader builds it identically)",
        input_size=224, resize_size=224, interpolation="bilinear", mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD,
        magnification=20, patch_px=224, licence="non-commercial (Bioptimus terms, see the model card)",
        gated=True, source="hf-hub:bioptimus/H-optimus-1", filename="pytorch_model.bin", prefix_tokens=5),
    EncoderCard(
        name="gigapath", title="Prov-GigaPath tile encoder (Xu et al. Nature 2024)", arch="vit_giant_patch14_dinov2",
        timm_kwargs=_kw(img_size=224, in_chans=3, patch_size=16, embed_dim=1536, depth=40, num_heads=24,
                        init_values=1e-5, mlp_ratio=5.33334),
        dim=1536, feature="cls", params=1_134_953_984, published_m=1130.0,
        published_source="Prov-GigaPath paper (Nature 630, 2024), tile encoder ~1.13 B as summarised by third "
                         "parties", input_size=224,
        resize_size=256, interpolation="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD, magnification=20,
        patch_px=256, licence="Apache-2.0 (gated: accept the terms on the hub)", gated=True,
        source="hf-hub:prov-gigapath/prov-gigapath", filename="pytorch_model.bin"),
    EncoderCard(
        name="phikon_v2", title="Phikon-v2 (Owkin, Filiot et al. 2024)", arch="vit_large_patch16_224",
        timm_kwargs=_kw(img_size=224, patch_size=16, init_values=1e-5), dim=1024, feature="cls",
        params=303_350_784, published_m=None,
        published_source="the Phikon-v2 paper describes a ViT-L/16 trained with DINOv2; no exact count read",
        input_size=224, resize_size=224, interpolation="bilinear", mean=IMAGENET_MEAN, std=IMAGENET_STD,
        magnification=20, patch_px=224, licence="non-commercial (Owkin licence, see the model card)", gated=False,
        source="hf-hub:owkin/phikon-v2", filename="model.safetensors", layout="hf-dinov2"),
)}

