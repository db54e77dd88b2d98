"""The encoder zoo: one `EncoderSpec` per registered card (`models/encoder_cards.py`), and `timm:<name>` for
anything timm can build.

timm is imported inside the builders only: importing it costs ~3.6 s.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import nn

from wsi_pipeline.errors import UnknownNameError, one_line
from wsi_pipeline.models.encoder_cards import CARDS, EncoderCard
from wsi_pipeline.models.encoders.errors import EncoderError
from wsi_pipeline.models.encoders.spec import EncoderSpec


def _layer(name: str) -> Any:
    """Layer classes named in a card's constructor options: timm's layers first, then torch.nn."""
    import timm.layers

    return getattr(timm.layers, name, None) or getattr(nn, name)


def build_card(card: EncoderCard, **overrides: Any) -> nn.Module:
    """The card's module with random weights and no classifier. ``overrides`` replace constructor options
    (the tests build reduced-depth copies this way to load official-layout files quickly)."""
    import timm

    kwargs = {k: _layer(v) if k in ("mlp_layer", "act_layer") else v for k, v in card.timm_kwargs.items()}
    trunk = timm.create_model(card.arch, pretrained=False, num_classes=0, **{**kwargs, **overrides})
    if card.module == "conch-v1.5":
        from wsi_pipeline.models.encoders.towers import ConchVisionTower

        return ConchVisionTower(trunk, dim=card.dim)
    return trunk


def _spec(card: EncoderCard) -> EncoderSpec:
    return EncoderSpec(
        name=card.name, builder=partial(build_card, card), weights_source=card.source, dim=card.dim,
        features=card.feature, classifier_prefix=card.classifier_prefix, input_size=card.input_size,
        mean=card.mean, std=card.std, prefix_tokens=card.prefix_tokens,
        resize_size=card.resize_size if card.resize_size != card.input_size else None,
        layout=card.layout, card=card)


_REGISTRY: dict[str, EncoderSpec] = {name: _spec(card) for name, card in CARDS.items()}


def list_encoders() -> list[str]:
    """Registered names, in the documented order; any ``timm:<model name>`` is accepted as well."""
    return list(_REGISTRY)


def _timm_spec(name: str) -> EncoderSpec:
    """Spec of ``timm:<arch>`` from timm's own pretrained config; the probe model is built on the meta
    device, so reading dim/mean/std costs no memory and no init time."""
    import timm

    arch = name.removeprefix("timm:")

    def build(**overrides: Any) -> nn.Module:
        return timm.create_model(arch, pretrained=False, num_classes=0, **overrides)

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
