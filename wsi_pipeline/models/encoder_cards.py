"""The registered patch encoders as plain data: one `EncoderCard` per name, importable without torch or timm.

A card says everything a user must know before extracting with an encoder, taken from each model's official
loading code and model card (docs/encoders.md lists the sources): the timm architecture and the constructor
options that make it that model, what the feature vector is, the exact parameter count of the module we build
(checked on the meta device by the tests) next to the published figure and where it is published, the
preprocessing, the magnification
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


_UNITS = {"M": 10**6, "B": 10**9}


@dataclass(frozen=True)
class Published:
    """A parameter count as its source prints it ("632 M", "0.3 B", "11,689,512"), and where it is printed.

    The figure stands for every exact count that rounds to it, so ``agrees`` compares at the published precision:
    "632 M" is 631.5-632.5 million, "1.1 B" 1.05-1.15 billion, "11,689,512" exactly that."""

    figure: str | None  # None: the authors give the architecture, not a count (``source`` says what they give)
    source: str  # URL and who prints it
    includes: int = 0  # parameters the figure counts that our module leaves out (a 1000-class ImageNet classifier)
    matches: bool = True  # False: a nominal size the exact module does not round to (``note`` says why)
    nominal_arch: str | None = None  # the standard timm model (1000 classes) whose size the nominal figure is
    note: str = ""

    def bounds(self) -> tuple[float, float]:
        """The interval of exact counts the figure stands for: half a unit of its last digit either side."""
        if self.figure is None:
            raise ValueError("no published figure")
        number, _, unit = self.figure.replace(",", "").partition(" ")
        scale = _UNITS[unit] if unit else 1
        half = 0.5 * 10 ** -len(number.partition(".")[2]) * scale
        return float(number) * scale - half, float(number) * scale + half

    def agrees(self, count: int) -> bool:
        """Whether ``count`` (our module's exact count) prints as the figure, once ``includes`` is added."""
        low, high = self.bounds()
        return low <= count + self.includes <= high


@dataclass(frozen=True)
class EncoderCard:
    """One encoder, as documented by its authors. ``params`` is the exact count of the module we build (equal to
    the count of the model their loading code builds); ``published`` is the figure printed for it and where
    (docs/encoders.md, "Parameter counts")."""

    name: str
    title: str
    arch: str  # timm model name
    timm_kwargs: MappingProxyType  # constructor options; layer classes by timm/torch name (resolved in zoo.py)
    dim: int
    feature: str  # a FEATURES key
    params: int
    published: Published
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


# Each card's published parameter count and where it is printed (docs/encoders.md, "Parameter counts").
_PUBLISHED = {
    "resnet18": Published(
        "11,689,512", "torchvision, ResNet18_Weights.IMAGENET1K_V1 (num_params, with the 1000-class fc): "
        "https://docs.pytorch.org/vision/stable/models/generated/torchvision.models.resnet18.html", includes=513_000),
    "vit_s16_ssl": Published(
        "22 M", "DeiT-S, the ViT-S/16 of Touvron et al. ICML 2021 (arXiv:2012.12877, Table 1; with the 1000-class "
        "head); lunit's README and paper name the architecture, not a count", includes=385_000),
    "uni": Published("0.3 B", "UNI model card, https://huggingface.co/MahmoodLab/UNI ('ViT-Large (0.3B params)')"),
    "uni2_h": Published(
        None, "no count from the authors: the UNI2-h model card and the UNI README give the architecture "
        "(ViT-H/14-reg8) and its timm options"),
    "conch_v15": Published(
        None, "no count from the authors (the TITAN paper and the model card: a ViT-L/16 at 448 px); the official "
        "module (224-px position grid, CoCa pooler) has 306,109,184: we hold the grid interpolated to 448 px "
        "(+602,112)"),
    "virchow2": Published(
        "632 M", "Virchow2 paper, arXiv:2408.00738 ('a 632 million parameter vision transformer')", matches=False,
        nominal_arch="vit_huge_patch14_224",
        note="632 M is the standard ViT-H/14's size (632,045,800 with a 1000-class head); Virchow2's SwiGLU MLP and "
             "4 registers, as its config and the official loaders build it, count 631.24 M"),
    "hoptimus0": Published(
        "1.1 B", "H-optimus-0 model card, https://huggingface.co/bioptimus/H-optimus-0 ('a 1.1B parameter vision "
        "transformer')"),
    "hoptimus1": Published(
        "1.1 B", "Bioptimus' H-optimus-1 release note ('a 1.1 billion parameter vision transformer'), "
        "https://resources.bioptimus.com/bioptimus-launches-h-optimus-1-a-state-of-the-art-foundation-model-for-"
        "pathology"),
    "gigapath": Published(
        "1.1 B", "not from the authors (their README and paper give the architecture); Filiot et al. 2024, "
        "arXiv:2409.09173: 'GigaPath and H-Optimus-0 (two ViT-g with 1.1B parameters each)'"),
    "phikon_v2": Published(
        None, "no count from the authors (model card and arXiv:2409.09173: a ViT-L trained with DINOv2); the 307 M "
        "of third-party summaries is the ViT paper's nominal ViT-Large, not this module"),
}

_NC_ND = "CC-BY-NC-ND 4.0 (non-commercial, no derivatives)"
CARDS: dict[str, EncoderCard] = {card.name: card for card in (
    EncoderCard(
        name="resnet18", title="ResNet18, ImageNet (torchvision weights)", arch="resnet18", timm_kwargs=_kw(),
        dim=512, feature="avgpool", params=11_176_512, published=_PUBLISHED["resnet18"],
        input_size=224, resize_size=224, interpolation="area", mean=IMAGENET_MEAN, std=IMAGENET_STD,
        magnification=20, patch_px=256, licence="BSD-3-Clause (torchvision)", gated=False,
        source="hf-hub:timm/resnet18.tv_in1k", filename="model.safetensors", classifier_prefix="fc"),
    EncoderCard(
        name="vit_s16_ssl", title="ViT-S/16 DINO on pathology (lunit, Kang et al. CVPR 2023)",
        arch="vit_small_patch16_224", timm_kwargs=_kw(global_pool="token"), dim=384, feature="cls",
        params=21_665_664, published=_PUBLISHED["vit_s16_ssl"],
        input_size=224, resize_size=224, interpolation="area", mean=LUNIT_MEAN, std=LUNIT_STD,
        magnification=20, patch_px=256, licence="lunit terms (see the benchmark-ssl-pathology repository)",
        gated=False, source=LUNIT_VIT_S16_URL, filename="dino_vit_small_patch16_ep200.torch"),
    EncoderCard(
        name="uni", title="UNI (Mahmood Lab, Chen et al. Nat Med 2024)", arch="vit_large_patch16_224",
        timm_kwargs=_kw(img_size=224, patch_size=16, init_values=1e-5), dim=1024, feature="cls",
        params=303_350_784, published=_PUBLISHED["uni"],
        input_size=224, resize_size=224, interpolation="bilinear", mean=IMAGENET_MEAN, std=IMAGENET_STD,
        magnification=20, patch_px=256, licence=_NC_ND, gated=True,
        source="hf-hub:MahmoodLab/UNI", filename="pytorch_model.bin"),
    EncoderCard(
        name="uni2_h", title="UNI2-h (Mahmood Lab, 2025)", arch="vit_giant_patch14_224",
        timm_kwargs=_kw(img_size=224, patch_size=14, depth=24, num_heads=24, init_values=1e-5, embed_dim=1536,
                        mlp_ratio=2.66667 * 2, no_embed_class=True, mlp_layer="SwiGLUPacked", act_layer="SiLU",
                        reg_tokens=8),
        dim=1536, feature="cls", params=681_394_176, published=_PUBLISHED["uni2_h"],
        input_size=224, resize_size=224,
        interpolation="bilinear", mean=IMAGENET_MEAN, std=IMAGENET_STD, magnification=20, patch_px=256,
        licence=_NC_ND, gated=True, source="hf-hub:MahmoodLab/UNI2-h", filename="pytorch_model.bin",
        prefix_tokens=9),
    EncoderCard(
        name="conch_v15", title="CONCH v1.5 vision tower (Mahmood Lab, from TITAN)", arch="vit_large_patch16_224",
        timm_kwargs=_kw(img_size=448, patch_size=16, init_values=1.0, global_pool=""), dim=768,
        feature="attn-pool", params=306_711_296, published=_PUBLISHED["conch_v15"],
        input_size=448, resize_size=448, interpolation="bilinear", mean=IMAGENET_MEAN, std=IMAGENET_STD,
        magnification=20, patch_px=512, licence=_NC_ND, gated=True, source="hf-hub:MahmoodLab/conchv1_5",
        filename="pytorch_model_vision.bin", layout="conch-v1.5", module="conch-v1.5"),
    EncoderCard(
        name="virchow2", title="Virchow2 (Paige, Zimmermann et al. 2024)", arch="vit_huge_patch14_224",
        timm_kwargs=_kw(img_size=224, init_values=1e-5, mlp_ratio=5.3375, reg_tokens=4, global_pool="",
                        mlp_layer="SwiGLUPacked", act_layer="SiLU"),
        dim=2560, feature="cls+mean", params=631_239_424, published=_PUBLISHED["virchow2"],
        input_size=224, resize_size=224,
        interpolation="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD, magnification=20, patch_px=224,
        licence=_NC_ND, gated=True, source="hf-hub:paige-ai/Virchow2", filename="pytorch_model.bin",
        prefix_tokens=5, notes="trained at mixed magnifications (5x-40x); 20x is the common choice"),
    EncoderCard(
        name="hoptimus0", title="H-optimus-0 (Bioptimus)", arch="vit_giant_patch14_reg4_dinov2",
        timm_kwargs=_kw(img_size=224, init_values=1e-5, global_pool="token"), dim=1536, feature="cls",
        params=1_134_774_272, published=_PUBLISHED["hoptimus0"],
        input_size=224, resize_size=224, interpolation="bilinear", mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD,
        magnification=20, patch_px=224, licence="Apache-2.0", gated=False,
        source="hf-hub:bioptimus/H-optimus-0", filename="pytorch_model.bin", prefix_tokens=5),
    EncoderCard(
        name="hoptimus1", title="H-optimus-1 (Bioptimus)", arch="vit_giant_patch14_reg4_dinov2",
        timm_kwargs=_kw(img_size=224, init_values=1e-5, global_pool="token"), dim=1536, feature="cls",
        params=1_134_774_272, published=_PUBLISHED["hoptimus1"],
        input_size=224, resize_size=224, interpolation="bilinear", mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD,
        magnification=20, patch_px=224, licence="non-commercial (Bioptimus terms, see the model card)",
        gated=True, source="hf-hub:bioptimus/H-optimus-1", filename="pytorch_model.bin", prefix_tokens=5),
    EncoderCard(
        name="gigapath", title="Prov-GigaPath tile encoder (Xu et al. Nature 2024)", arch="vit_giant_patch14_dinov2",
        timm_kwargs=_kw(img_size=224, in_chans=3, patch_size=16, embed_dim=1536, depth=40, num_heads=24,
                        init_values=1e-5, mlp_ratio=5.33334),
        dim=1536, feature="cls", params=1_134_953_984, published=_PUBLISHED["gigapath"], input_size=224,
        resize_size=256, interpolation="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD, magnification=20,
        patch_px=256, licence="Apache-2.0 (gated: accept the terms on the hub)", gated=True,
        source="hf-hub:prov-gigapath/prov-gigapath", filename="pytorch_model.bin"),
    EncoderCard(
        name="phikon_v2", title="Phikon-v2 (Owkin, Filiot et al. 2024)", arch="vit_large_patch16_224",
        timm_kwargs=_kw(img_size=224, patch_size=16, init_values=1e-5), dim=1024, feature="cls",
        params=303_350_784, published=_PUBLISHED["phikon_v2"],
        input_size=224, resize_size=224, interpolation="bilinear", mean=IMAGENET_MEAN, std=IMAGENET_STD,
        magnification=20, patch_px=224, licence="non-commercial (Owkin licence, see the model card)", gated=False,
        source="hf-hub:owkin/phikon-v2", filename="model.safetensors", layout="hf-dinov2"),
)}

