"""Where the registered encoders' pretrained weights come from and where they sit on disk once downloaded.

Torch-free (the encoder package imports torch), so `wsip doctor` can tell whether they are present without
importing torch or touching the network. Hugging Face sources (`hf-hub:<repo id>`) live in the hub cache
(`$HF_HUB_CACHE`, default `~/.cache/huggingface/hub`); URL sources in torch.hub's checkpoint folder
(`<TORCH_HOME>/hub/checkpoints/<file name>`, the file `torch.hub.load_state_dict_from_url` would use).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from urllib.parse import urlparse

LUNIT_VIT_S16_URL = (
    "https://github.com/lunit-io/benchmark-ssl-pathology/releases/download/pretrained-weights/"
    "dino_vit_small_patch16_ep200.torch"
)
# registered encoder -> its pretrained weights ("hf-hub:<repo id>" or a URL); zoo.py builds its specs from these
PRETRAINED_SOURCES = {
    "resnet18": "hf-hub:timm/resnet18.tv_in1k",  # torchvision's ImageNet weights, as timm hosts them
    "vit_s16_ssl": LUNIT_VIT_S16_URL,
}
HF_FILENAMES = ("model.safetensors", "pytorch_model.bin")


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


def hf_cached_file(repo_id: str) -> Path | None:
    """The hub repo's weights file already in the local cache (its `main` revision), or None; no network.

    Reads the cache's documented layout, `models--<org>--<name>/refs/main` → `snapshots/<commit>/<file>`, as
    `huggingface_hub.try_to_load_from_cache` does, without importing its download machinery (half a second).
    """
    repo = hf_hub_cache() / f"models--{repo_id.replace('/', '--')}"
    ref = repo / "refs" / "main"
    if not ref.is_file():
        return None
    snapshot = repo / "snapshots" / ref.read_text().strip()
    return next((snapshot / name for name in HF_FILENAMES if (snapshot / name).is_file()), None)


def cached_weights(source: str) -> Path | None:
    """The local file of a weights source when it is already cached, else None; never downloads."""
    if source.startswith("hf-hub:"):
        return hf_cached_file(source.removeprefix("hf-hub:"))
    path = url_cache_path(source)
    return path if path.is_file() else None
