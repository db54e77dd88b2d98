"""The encoder zoo: one `EncoderSpec` per registered name, and `timm:<name>` for anything timm can build.

timm is imported inside the builders only: importing it costs ~3.6 s.
"""

from __future__ import annotations

import torch
from torch import nn

from wsi_pipeline.errors import UnknownNameError, one_line
from wsi_pipeline.models.encoders.spec import LUNIT_MEAN, LUNIT_STD, EncoderSpec
from wsi_pipeline.models.encoders.weights import EncoderError
from wsi_pipeline.models.pretrained import PRETRAINED_SOURCES


def _build_resnet18() -> nn.Module:
    import timm

    return timm.create_model("resnet18.tv_in1k", pretrained=False, num_classes=0)  # global average pool


def _build_vit_s16() -> nn.Module:
    """The architecture lunit trains: timm ``VisionTransformer(img_size=224, patch_size=16, embed_dim=384,
    num_heads=6, num_classes=0)``, i.e. ``vit_small_patch16_224``; the feature is the final-norm CLS token."""
    import timm

    return timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, global_pool="token")


_REGISTRY: dict[str, EncoderSpec] = {
    "resnet18": EncoderSpec(
        name="resnet18",
        builder=_build_resnet18,
        weights_source=PRETRAINED_SOURCES["resnet18"],
        dim=512,
        features="avgpool",
        classifier_prefix="fc",
    ),
    "vit_s16_ssl": EncoderSpec(
        name="vit_s16_ssl",
        builder=_build_vit_s16,
        weights_source=PRETRAINED_SOURCES["vit_s16_ssl"],
        dim=384,
        features="cls",
        classifier_prefix="head",
        mean=LUNIT_MEAN,
        std=LUNIT_STD,
    ),
}


def list_encoders() -> list[str]:
    """Registered names; any ``timm:<model name>`` is accepted as well."""
    return sorted(_REGISTRY)


def _timm_spec(name: str) -> EncoderSpec:
    """Spec of ``timm:<arch>`` from timm's own pretrained config; the probe model is built on the meta
    device, so reading dim/mean/std costs no memory and no init time."""
    import timm

    arch = name.removeprefix("timm:")

    def build() -> nn.Module:
        return timm.create_model(arch, pretrained=False, num_classes=0)

    try:
        with torch.device("meta"):
            probe = build()
    except RuntimeError as err:  # timm: "Unknown model (...)"
        raise UnknownNameError(f"--encoder {name}: timm has no model {arch!r} ({one_line(err)}); see "
                               "timm.list_models()") from None
    data_cfg = timm.data.resolve_model_data_config(probe)
    _, height, width = data_cfg["input_size"]
    if height != width:
        raise EncoderError(f"{name}: non-square input size {height}x{width} is not supported")
    cfg = probe.pretrained_cfg
    source = f"hf-hub:{cfg['hf_hub_id']}" if cfg.get("hf_hub_id") else cfg.get("url") or None
    return EncoderSpec(
        name=name,
        builder=build,
        weights_source=source,
        dim=_output_dim(probe, height),
        features="timm-default",
        classifier_prefix=cfg.get("classifier") or "head",
        input_size=height,
        mean=tuple(data_cfg["mean"]),
        std=tuple(data_cfg["std"]),
    )


def _output_dim(probe: nn.Module, size: int) -> int:
    """The feature width the model really outputs: a shape-only forward on the meta device. `num_features`
    is not it for every timm model (MobileNetV3's head conv widens 288 → 1024 after it)."""
    with torch.device("meta"), torch.no_grad():
        return int(probe.eval()(torch.empty(1, 3, size, size)).shape[-1])


def get_spec(name: str) -> EncoderSpec:
    if name.startswith("timm:"):
        return _timm_spec(name)
    if name not in _REGISTRY:
        raise UnknownNameError(f"--encoder {name}: unknown encoder; known: {', '.join(list_encoders())}, or "
                               "timm:<any timm model name>")
    return _REGISTRY[name]
