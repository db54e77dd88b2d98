"""What `wsip encoders` shows: the registered encoders' cards and where their weights are on this machine.

Reads only `models/encoder_cards.py` and `models/pretrained.py` (torch-free, network-free), so it answers in well
under a second.
"""

from __future__ import annotations

from rich.table import Table

from wsi_pipeline.errors import UnknownNameError
from wsi_pipeline.models import pretrained
from wsi_pipeline.models.encoder_cards import CARDS, EncoderCard


def _params(card: EncoderCard) -> str:
    return f"{card.params / 1e9:.2f} B" if card.params >= 1e9 else f"{card.params / 1e6:.0f} M"


def _published(card: EncoderCard) -> str:
    pub = card.published
    figure = f"published: {pub.figure}, " if pub.figure else ""
    return figure + pub.source + (f"; {pub.note}" if pub.note else "")


def _local(card: EncoderCard) -> str:
    local = pretrained.local_weights(card)
    return f"yes ({local[1]}: {local[0]})" if local else "no"


def encoders_table() -> Table:
    """One row per registered encoder."""
    table = Table(title="patch encoders (wsip encoders NAME: full card; any timm:<name> works too)")
    for col in ("name", "dim", "params", "input px", "mag / patch", "licence", "weights here"):
        table.add_column(col, overflow="fold")
    for card in CARDS.values():
        licence = card.licence.split(" (")[0] + (", gated" if card.gated else "")
        table.add_row(card.name, str(card.dim), _params(card), str(card.input_size),
                      f"{card.magnification:g}x / {card.patch_px} px", licence, _local(card))
    return table


def card_table(name: str) -> Table:
    """Everything the card says about ``name``, and how to get its weights onto this machine."""
    card = CARDS.get(name)
    if card is None:
        raise UnknownNameError(f"wsip encoders {name}: unknown encoder; known: {', '.join(CARDS)}")
    resize = (f"resize to {card.resize_size} px, centre crop {card.input_size} px" if card.resize_size !=
              card.input_size else f"resize to {card.input_size} px")
    options = ", ".join(f"{k}={v!r}" for k, v in card.timm_kwargs.items()) or "defaults"
    folder = pretrained.weights_dir() / f"{card.name}.safetensors|.bin|.pth"
    rows = {
        "model": card.title,
        "architecture": f"timm {card.arch} ({options}, num_classes=0)" + (
            " + CoCa attentional pooler + LayerNorm" if card.module == "conch-v1.5" else ""),
        "parameters": f"{card.params:,} ({_published(card)})",
        "output": f"{card.dim}-d: {card.feature_text}",
        "preprocessing": f"{resize} (official: {card.interpolation}; wsip: area), RGB / 255, "
                         f"mean {card.mean}, std {card.std}",
        "trained at": f"{card.magnification:g}x, {card.patch_px} px patches: "
                      f"wsip patch --mag {card.magnification:g} --patch-size {card.patch_px}",
        "licence": card.licence + ("; gated: accept the terms on the hub first" if card.gated else ""),
        "weights source": f"{card.source} ({card.filename})",
        "state-dict layout": card.layout_text,
        "weights here": _local(card),
        "get the weights": (f"`hf download {card.source.removeprefix('hf-hub:')} {card.filename}` (after `hf auth "
                            f"login`), or copy the file to {folder}" if card.source and
                            card.source.startswith("hf-hub:") else f"download {card.source} and copy it to {folder}"),
    }
    if card.notes:
        rows["notes"] = card.notes
    table = Table(title=card.name, show_header=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for key, value in rows.items():
        table.add_row(key, value)
    return table
