"""Where an encoder's weights are on this machine, without torch and without the network.

Resolution order (docs/encoders.md, "Weights"): ``--weights PATH`` > the per-user weights folder ``$WSIP_WEIGHTS``
(default ``~/.cache/wsip/weights``) holding ``<encoder>.safetensors|.bin|.pth`` > the cache of the encoder's
source (Hugging Face sources, ``hf-hub:<repo id>``, in the hub cache ``$HF_HUB_CACHE``; URL sources in torch.hub's
checkpoint folder, ``<TORCH_HOME>/hub/checkpoints/<file name>``) > a download. Torch-free, so `wsip encoders` and
`wsip doctor` can say where weights are without importing torch.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from urllib.parse import urlparse

from wsi_pipeline.models.encoder_cards import LUNIT_VIT_S16_URL, EncoderCard

__all__ = ["HF_FILENAMES", "LUNIT_VIT_S16_URL", "WEIGHTS_ENV", "WEIGHT_SUFFIXES", "cached_weights", "folder_weights",
           "hub_filenames",
           "hf_cached_file", "hf_hub_cache", "local_weights", "torch_hub_dir", "url_cache_path", "weights_dir"]

HF_FILENAMES = ("model.safetensors", "pytorch_model.bin")
WEIGHTS_ENV = "WSIP_WEIGHTS"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth")


def weights_dir() -> Path:
    """The per-user weights folder: copy it to an offline cluster and point ``$WSIP_WEIGHTS`` at it."""
    return Path(os.environ.get(WEIGHTS_ENV) or "~/.cache/wsip/weights").expanduser()


def folder_weights(name: str) -> Path | None:
    """``<weights folder>/<name>.safetensors|.bin|.pth``, the first that exists."""
    folder = weights_dir()
    return next((folder / f"{name}{s}" for s in WEIGHT_SUFFIXES if (folder / f"{name}{s}").is_file()), None)


def hf_hub_cache() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def torch_hub_dir() -> Path:
    """`torch.hub.get_dir()`. Asked of torch when it is already imported (it honours `torch.hub.set_dir`), else
    torch's documented rule: `$TORCH_HOME/hub`, `$TORCH_HOME` defaulting to `$XDG_CACHE_HOME/torch`, that
    to `~/.cache/torch`."""
    if "torch" in sys.modules:
        return Path(sys.modules["torch"].hub.get_dir())
    cache = os.environ.get("XDG_CACHE_HOME", "~/.cache")
    return Path(os.environ.get("TORCH_HOME", os.path.join(cache, "torch"))).expanduser() / "hub"


def url_cache_path(url: str) -> Path:
    """Where a URL's weights are (or will be) cached: torch.hub's checkpoint folder, by file name."""
    return torch_hub_dir() / "checkpoints" / Path(urlparse(url).path).name


def hf_cached_file(repo_id: str, filenames: tuple[str, ...] = HF_FILENAMES) -> Path | None:
    """The hub repo's weights file already in the local cache (its `main` revision), or None; no network.

    Reads the cache's documented layout, `models--<org>--<name>/refs/main` → `snapshots/<commit>/<file>`, as
    `huggingface_hub.try_to_load_from_cache` does, without importing its download machinery (half a second).
    """
    repo = hf_hub_cache() / f"models--{repo_id.replace('/', '--')}"
    ref = repo / "refs" / "main"
    if not ref.is_file():
        return None
    snapshot = repo / "snapshots" / ref.read_text().strip()
    return next((snapshot / name for name in filenames if (snapshot / name).is_file()), None)


def hub_filenames(card: EncoderCard) -> tuple[str, ...]:
    """The card's own file first, then the generic names timm/transformers use."""
    return tuple(dict.fromkeys([*([card.filename] if card.filename else []), *HF_FILENAMES]))


def cached_weights(card: EncoderCard) -> Path | None:
    """The card's weights in its source's cache, else None; never downloads."""
    if card.source is None:
        return None
    if card.source.startswith("hf-hub:"):
        return hf_cached_file(card.source.removeprefix("hf-hub:"), hub_filenames(card))
    path = url_cache_path(card.source)
    return path if path.is_file() else None


def local_weights(card: EncoderCard) -> tuple[Path, str] | None:
    """(file, where) of the weights this machine already has for ``card``: the weights folder first, then the
    source's cache; None when only a download would get them."""
    path = folder_weights(card.name)
    if path is not None:
        return path, f"${WEIGHTS_ENV}" if os.environ.get(WEIGHTS_ENV) else "weights folder"
    path = cached_weights(card)
    if path is not None:
        return path, "hub cache" if card.source and card.source.startswith("hf-hub:") else "torch hub cache"
    return None
