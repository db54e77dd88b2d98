"""Encoder weights: how pretrained ones are fetched into their caches (the Hugging Face hub cache, `torch.hub`'s
checkpoint folder for URLs: `models/pretrained.py`), how a checkpoint file is read and how its keys are mapped
onto timm's names.

Unreachable weights are a `WeightsUnavailableError` naming the source and the `--weights` alternatives —
never a silently random network.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from wsi_pipeline.errors import UserError, one_line
from wsi_pipeline.models.pretrained import HF_FILENAMES, hf_cached_file, url_cache_path

StateDict = Mapping[str, torch.Tensor]
NETWORK_TIMEOUT_S = 10.0
# Where training scripts nest the state dict inside a checkpoint (DINO keeps the eval model under 'teacher').
_CONTAINER_KEYS = ("state_dict", "model", "teacher", "module")
# Wrappers added by DDP ('module.') and by DINO's MultiCropWrapper ('backbone.'); never part of timm names.
_WRAPPER_PREFIXES = ("module.", "backbone.")


class EncoderError(UserError):
    """Base of every encoder failure: a user can fix each one (other weights, a file, a name), so the CLI
    reports them as one line like every other ``UserError``."""


class WeightsUnavailableError(EncoderError):
    """The requested weights cannot be obtained (offline, unreachable, missing file)."""


class WeightsFormatError(EncoderError):
    """A weights file was found but does not fit the encoder (unreadable, missing or unexpected keys)."""


def map_checkpoint_keys(state_dict: StateDict, *, classifier_prefix: str) -> dict[str, torch.Tensor]:
    """Checkpoint keys -> timm keys, explicitly.

    The lunit release ``dino_vit_small_patch16_ep200.torch`` is a flat state dict already in timm
    ``VisionTransformer`` names (``cls_token``, ``pos_embed``, ``patch_embed.proj.*``,
    ``blocks.<i>.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*``, ``norm.*``) with no head: lunit's
    README loads it with a strict ``load_state_dict`` into ``VisionTransformer(..., num_classes=0)``. Raw
    DINO/DDP checkpoints wrap the same names in ``module.``/``backbone.`` and add the DINO projection head
    under ``head.``; stripping those prefixes and dropping classifier keys makes them load too.
    """
    mapped: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        new_key = key
        for prefix in _WRAPPER_PREFIXES:
            new_key = new_key.removeprefix(prefix)
        if new_key == classifier_prefix or new_key.startswith(classifier_prefix + "."):
            continue
        if new_key in mapped:
            raise WeightsFormatError(f"checkpoint key {key!r} collides with another key as {new_key!r}")
        mapped[new_key] = value
    return mapped


def load_weights(module: nn.Module, state_dict: StateDict, *, classifier_prefix: str) -> None:
    """Load after mapping keys, failing on ANY missing, unexpected or mis-shaped key: a partially loaded
    backbone runs without complaint and produces plausible but wrong features."""
    mapped = map_checkpoint_keys(state_dict, classifier_prefix=classifier_prefix)
    expected = module.state_dict()
    missing = sorted(expected.keys() - mapped.keys())
    unexpected = sorted(mapped.keys() - expected.keys())
    mis_shaped = sorted(k for k in expected.keys() & mapped.keys() if expected[k].shape != mapped[k].shape)
    if missing or unexpected or mis_shaped:
        raise WeightsFormatError(
            f"weights do not fit {type(module).__name__}: missing {_preview(missing)}, "
            f"unexpected {_preview(unexpected)}, wrong shape {_preview(mis_shaped)}"
        )
    module.load_state_dict(mapped, strict=True)


def _preview(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return f"[{shown}{', ...' if len(keys) > limit else ''}] ({len(keys)})"


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors or torch file, unwrapped from a training checkpoint if need be.

    ``weights_only=True``: a checkpoint is data, loading one must not run arbitrary pickled code.
    """
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except Exception as err:  # safetensors raises its own error types
            raise WeightsFormatError(f"{path}: not a readable .safetensors file ({one_line(err)})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises many types for files that are not checkpoints (KeyError, ...)
        raise WeightsFormatError(
            f"cannot read {path} as plain tensors ({one_line(err)}); "
            "save just its state dict with torch.save(state_dict, path), or pass a .safetensors file"
        ) from None
    while isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((k for k in _CONTAINER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            found = _preview(sorted(map(str, obj)))
            raise WeightsFormatError(f"{path}: no state dict found among keys {found}")
        obj = obj[inner]
    if not isinstance(obj, Mapping):
        raise WeightsFormatError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return dict(obj)


def fetch_pretrained(name: str, source: str | None) -> Path:
    """Local path of the spec's pretrained weights, from cache or downloaded; any failure becomes one
    ``WeightsUnavailableError`` naming the source and the ``--weights`` alternatives."""
    try:
        if source is None:
            raise FileNotFoundError("no pretrained weights are published for it")
        if source.startswith("hf-hub:"):
            return _fetch_hf(source.removeprefix("hf-hub:"))
        return _fetch_url(source)
    except OSError as err:
        raise WeightsUnavailableError(
            f"cannot get pretrained weights for encoder {name!r} from {source} "
            f"({type(err).__name__}: {one_line(err)}); "
            "download them and pass --weights PATH, or use --weights random for a smoke test"
        ) from err


def _raise_if_offline() -> None:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
        raise ConnectionError("offline mode (HF_HUB_OFFLINE is set) and the weights are not cached")


def _probe(url: str) -> None:
    """Fail within ``NETWORK_TIMEOUT_S`` if ``url``'s host is unreachable: huggingface_hub retries a dead
    host for ~25 s. Any HTTP answer, even an error status, means reachable; env proxies are used."""
    with contextlib.suppress(urllib.error.HTTPError):
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=NETWORK_TIMEOUT_S).close()


def _fetch_hf(repo_id: str) -> Path:
    """timm weights from the Hugging Face hub cache (no network when cached), else downloaded into it."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import RemoteEntryNotFoundError

    cached = hf_cached_file(repo_id)
    if cached is not None:
        return cached
    _raise_if_offline()
    _probe(constants.ENDPOINT)
    for filename in HF_FILENAMES:
        try:
            return Path(hf_hub_download(repo_id, filename, etag_timeout=NETWORK_TIMEOUT_S))
        except RemoteEntryNotFoundError:
            continue
    raise FileNotFoundError(f"none of {', '.join(HF_FILENAMES)} in hub repo {repo_id}")


def _fetch_url(url: str) -> Path:
    """URL weights in ``torch.hub``'s cache (``<TORCH_HOME>/hub/checkpoints/<file name>``, the file
    ``torch.hub.load_state_dict_from_url`` would use), downloaded with a timeout and renamed atomically."""
    cached = url_cache_path(url)
    if cached.is_file():
        return cached
    _raise_if_offline()
    cached.parent.mkdir(parents=True, exist_ok=True)
    partial = cached.with_name(f"{cached.name}.{os.getpid()}.partial")
    try:
        with urllib.request.urlopen(url, timeout=NETWORK_TIMEOUT_S) as response, partial.open("wb") as out:
            shutil.copyfileobj(response, out, length=1 << 20)
        os.replace(partial, cached)
    finally:
        partial.unlink(missing_ok=True)
    return cached
