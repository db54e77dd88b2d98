"""Encoder weights: where a spec's pretrained file is taken from (offline first), how a file is read, and how it
is loaded strictly into the module.

Resolution order (docs/encoders.md, "Weights"): ``--weights PATH`` > ``$WSIP_WEIGHTS/<encoder>.safetensors|.bin|.pth``
> the source's cache > a download. A local file never costs a hub round trip. Unreachable weights are a
`WeightsUnavailableError` naming the source and where to put the file; a file that is not this encoder's weights
(another architecture, truncated, a Git LFS pointer, an HTML error page) is a `WeightsFormatError` naming the file
and what it should hold — never a silently random or partly loaded network.
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

from wsi_pipeline.errors import one_line
from wsi_pipeline.models import pretrained
from wsi_pipeline.models.encoders.errors import EncoderError, WeightsFormatError, WeightsUnavailableError
from wsi_pipeline.models.encoders.layouts import CONTAINER_KEYS, StateDict, to_module_keys
from wsi_pipeline.models.encoders.spec import EncoderSpec

__all__ = ["EncoderError", "WeightsFormatError", "WeightsUnavailableError", "expected_keys", "load_weights",
           "pretrained_path", "read_state_dict"]

NETWORK_TIMEOUT_S = 10.0
_SNIFF_BYTES = 512


def load_weights(module: nn.Module, state_dict: StateDict, *, classifier_prefix: str, layout: str = "timm",
                 assign: bool = False) -> None:
    """Load after mapping the layout's keys, failing on ANY missing, unexpected or mis-shaped key: a partially
    loaded backbone runs without complaint and produces plausible but wrong features. ``assign``: the module
    takes the tensors themselves (a module built on the meta device)."""
    mapped = to_module_keys(state_dict, layout, module, classifier_prefix=classifier_prefix)
    expected = module.state_dict()
    missing = sorted(expected.keys() - mapped.keys())
    unexpected = sorted(mapped.keys() - expected.keys())
    mis_shaped = sorted(k for k in expected.keys() & mapped.keys() if expected[k].shape != mapped[k].shape)
    if missing or unexpected or mis_shaped:
        raise WeightsFormatError(
            f"weights do not fit {type(module).__name__}: missing {_preview(missing)}, "
            f"unexpected {_preview(unexpected)}, wrong shape {_preview(mis_shaped)}"
        )
    module.load_state_dict(mapped, strict=True, assign=assign)


def expected_keys(module: nn.Module, shown: int = 3) -> str:
    """What a fitting file holds, for error messages: the tensor count and the first few keys with shapes."""
    state = module.state_dict()
    first = ", ".join(f"{k} {tuple(v.shape)}" for k, v in list(state.items())[:shown])
    return f"{len(state)} tensors ({first}, ...)"


def _preview(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return f"[{shown}{', ...' if len(keys) > limit else ''}] ({len(keys)})"


def _sniff(path: Path) -> None:
    """Files that are certainly not weights, named as what they are: a download that went wrong leaves an empty
    file, a Git LFS pointer (cloned without `git lfs`) or the HTML of a login/error page."""
    with path.open("rb") as f:
        head = f.read(_SNIFF_BYTES)
    what = None
    if not head:
        what = "an empty file"
    elif head.startswith(b"version https://git-lfs"):
        what = "a Git LFS pointer, not the weights (fetch them with `git lfs pull` or the hub's download link)"
    elif head.lstrip()[:15].lower().startswith((b"<!doctype html", b"<html", b"<?xml", b"<head")):
        what = "an HTML page (a login or error page saved instead of the weights; gated models need an accepted " \
               "licence and a token)"
    if what:
        raise WeightsFormatError(f"{path}: {what}")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors or torch file, unwrapped from a training checkpoint if need be.

    ``weights_only=True``: a checkpoint is data, loading one must not run arbitrary pickled code.
    """
    _sniff(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except Exception as err:  # safetensors raises its own error types
            raise WeightsFormatError(f"{path}: not a readable .safetensors file, truncated? ({one_line(err)})"
                                     ) from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises many types for files that are not checkpoints (KeyError, ...)
        raise WeightsFormatError(
            f"cannot read {path} as plain tensors, truncated or not a checkpoint ({one_line(err)}); "
            "save just its state dict with torch.save(state_dict, path), or pass a .safetensors file"
        ) from None
    while isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((k for k in CONTAINER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            found = _preview(sorted(map(str, obj)))
            raise WeightsFormatError(f"{path}: no state dict found among keys {found}")
        obj = obj[inner]
    if not isinstance(obj, Mapping):
        raise WeightsFormatError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return dict(obj)


def folder_name(spec: EncoderSpec) -> str:
    """The file stem in the weights folder: the encoder name (`timm:x` → `timm-x`)."""
    return spec.name.replace(":", "-").replace("/", "-")


def pretrained_path(spec: EncoderSpec) -> Path:
    """The local file of the spec's pretrained weights: the weights folder, else the source's cache (no network
    either way), else downloaded into the cache. Any failure is one `WeightsUnavailableError` saying where a
    copied file would be found."""
    local = pretrained.folder_weights(folder_name(spec))
    if local is not None:
        return local
    card, source = spec.card, spec.weights_source
    try:
        if source is None:
            raise FileNotFoundError("no pretrained weights are published for it")
        if source.startswith("hf-hub:"):
            filenames = pretrained.hub_filenames(card) if card else pretrained.HF_FILENAMES
            return _fetch_hf(source.removeprefix("hf-hub:"), filenames)
        return _fetch_url(source)
    except Exception as err:  # OSError, and huggingface_hub's HTTP/gated errors: all mean "not obtainable"
        folder = pretrained.weights_dir() / f"{folder_name(spec)}.safetensors|.bin|.pth"
        gated = f" (gated: accept the licence on {card.hub_url} and log in with `hf auth login`)" if (
            card and card.gated) else ""
        raise WeightsUnavailableError(
            f"cannot get pretrained weights for encoder {spec.name!r} from {source}{gated} "
            f"({type(err).__name__}: {one_line(err)}); put the file at {folder} or pass --weights PATH, "
            "or use --weights random for a smoke test"
        ) from None


def _raise_if_offline() -> None:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
        raise ConnectionError("offline mode (HF_HUB_OFFLINE is set) and the weights are not on this machine")


def _probe(url: str) -> None:
    """Fail within ``NETWORK_TIMEOUT_S`` if ``url``'s host is unreachable: huggingface_hub retries a dead
    host for ~25 s. Any HTTP answer, even an error status, means reachable; env proxies are used."""
    with contextlib.suppress(urllib.error.HTTPError):
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=NETWORK_TIMEOUT_S).close()


def _fetch_hf(repo_id: str, filenames: tuple[str, ...]) -> Path:
    """Weights from the Hugging Face hub cache (no network when cached), else downloaded into it."""
    cached = pretrained.hf_cached_file(repo_id, filenames)
    if cached is not None:
        return cached
    _raise_if_offline()
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import RemoteEntryNotFoundError

    _probe(constants.ENDPOINT)
    for filename in filenames:
        try:
            return Path(huggingface_hub.hf_hub_download(repo_id, filename, etag_timeout=NETWORK_TIMEOUT_S))
        except RemoteEntryNotFoundError:
            continue
    raise FileNotFoundError(f"none of {', '.join(filenames)} in hub repo {repo_id}")


def _fetch_url(url: str) -> Path:
    """URL weights in ``torch.hub``'s cache (``<TORCH_HOME>/hub/checkpoints/<file name>``, the file
    ``torch.hub.load_state_dict_from_url`` would use), downloaded with a timeout and renamed atomically."""
    cached = pretrained.url_cache_path(url)
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
