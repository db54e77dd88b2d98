"""Patch encoders: a small timm-style registry (one ``EncoderSpec`` per encoder, one ``create_encoder``).

Each spec carries what its weights were trained with (input size, mean/std) and what it outputs (dim, how
the feature is taken), so the extract stage never guesses. Each ``Encoder`` records the sha256 of the
weights it actually loaded, because features from different weights must never be mixed. Pretrained
weights come from the usual caches (Hugging Face hub cache for timm weights, ``torch.hub``'s
``checkpoints/`` for URLs); when they cannot be had we raise ``WeightsUnavailableError`` instead of
silently running a random network. timm is imported inside functions only: importing it costs ~3.6 s.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import shutil
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from wsi_pipeline.errors import UserError

Triple = tuple[float, float, float]
StateDict = Mapping[str, torch.Tensor]

IMAGENET_MEAN: Triple = (0.485, 0.456, 0.406)
IMAGENET_STD: Triple = (0.229, 0.224, 0.225)
LUNIT_MEAN: Triple = (0.70322989, 0.53606487, 0.66096631)
LUNIT_STD: Triple = (0.21716536, 0.26081574, 0.20723464)
LUNIT_VIT_S16_URL = (
    "https://github.com/lunit-io/benchmark-ssl-pathology/releases/download/pretrained-weights/"
    "dino_vit_small_patch16_ep200.torch"
)
NETWORK_TIMEOUT_S = 10.0
_HF_FILENAMES = ("model.safetensors", "pytorch_model.bin")
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


@dataclass(frozen=True)
class Preprocess:
    """What the extract stage must do to patches before ``Encoder.forward``: resize to ``input_size``
    (square), scale to [0, 1], normalise with ``mean``/``std``."""

    input_size: int
    mean: Triple
    std: Triple

    def normalize(self, batch_uint8: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 -> normalised float32, with the constants these weights were trained with."""
        mean = torch.tensor(self.mean, device=batch_uint8.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=batch_uint8.device).view(1, 3, 1, 1)
        return (batch_uint8.float() / 255.0 - mean) / std


@dataclass(frozen=True)
class EncoderSpec:
    """Everything needed to build an encoder and feed it; the weights themselves are fetched separately."""

    name: str
    builder: Callable[[], nn.Module]  # builds the bare timm module (random init, no classifier)
    weights_source: str | None  # "hf-hub:<repo id>" or an http(s) URL; None: no pretrained weights
    dim: int
    features: str  # how the feature vector is taken, for the record: "avgpool", "cls", "timm-default"
    classifier_prefix: str  # classifier keys in checkpoints, dropped: the encoder has no classifier
    input_size: int = 224
    mean: Triple = IMAGENET_MEAN
    std: Triple = IMAGENET_STD

    @property
    def preprocess(self) -> Preprocess:
        return Preprocess(self.input_size, self.mean, self.std)


@dataclass(frozen=True, eq=False)
class Encoder:
    """An eval-mode encoder with its spec and the identity (sha256) of the weights it holds."""

    module: nn.Module
    spec: EncoderSpec
    weights_sha256: str
    device: torch.device

    @property
    def dim(self) -> int:
        return self.spec.dim

    @property
    def preprocess(self) -> Preprocess:
        return self.spec.preprocess

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, dim) features, S = ``preprocess.input_size``.

        Float input must already be normalised (the extract stage does it, fused with its resize); uint8
        input is normalised here. The size is checked because a wrong size runs fine on a CNN but
        silently gives features that do not match the weights' training scale.
        """
        size = self.spec.input_size
        if batch.ndim != 4 or tuple(batch.shape[1:]) != (3, size, size):
            raise ValueError(f"{self.spec.name} expects (B, 3, {size}, {size}), got {tuple(batch.shape)}")
        batch = batch.to(self.device, non_blocking=True)
        if batch.dtype == torch.uint8:
            batch = self.preprocess.normalize(batch)
        elif not batch.is_floating_point():
            raise TypeError(f"expected a uint8 or float batch, got {batch.dtype}")
        with torch.inference_mode():
            return self.module(batch)

    __call__ = forward


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
        weights_source="hf-hub:timm/resnet18.tv_in1k",  # torchvision's ImageNet weights, as timm hosts them
        dim=512,
        features="avgpool",
        classifier_prefix="fc",
    ),
    "vit_s16_ssl": EncoderSpec(
        name="vit_s16_ssl",
        builder=_build_vit_s16,
        weights_source=LUNIT_VIT_S16_URL,
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

    with torch.device("meta"):
        probe = build()
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
        dim=probe.num_features,
        features="timm-default",
        classifier_prefix=cfg.get("classifier") or "head",
        input_size=height,
        mean=tuple(data_cfg["mean"]),
        std=tuple(data_cfg["std"]),
    )


def get_spec(name: str) -> EncoderSpec:
    if name.startswith("timm:"):
        return _timm_spec(name)
    if name not in _REGISTRY:
        raise ValueError(f"unknown encoder {name!r}; known: {', '.join(list_encoders())}, or timm:<name>")
    return _REGISTRY[name]


def create_encoder(
    name: str, weights: str | os.PathLike = "pretrained", *, device: str | torch.device = "cpu", seed: int = 0
) -> Encoder:
    """Build encoder ``name`` with ``weights``: "pretrained" (hub/URL, cached), "random", or a file path.

    The module is always built under ``seed`` (without touching the global RNG), so ``random`` gives the
    same features in every run; its ``weights_sha256`` is the marker ``random:<seed>``.
    """
    spec = get_spec(name)
    path = None
    if str(weights) == "pretrained":
        path = _fetch_pretrained(spec)  # before building: fail fast, without a wasted model init
    elif str(weights) != "random":
        path = Path(weights)
        if not path.is_file():
            raise WeightsUnavailableError(f"weights file not found: {path}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = spec.builder()
    if path is None:
        sha256 = f"random:{seed}"
    else:
        load_weights(module, _read_state_dict(path), classifier_prefix=spec.classifier_prefix)
        sha256 = _sha256(path)
    device = torch.device(device)
    module = module.to(device).eval().requires_grad_(False)
    return Encoder(module=module, spec=spec, weights_sha256=sha256, device=device)


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


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors or torch file, unwrapped from a training checkpoint if need be.

    ``weights_only=True``: a checkpoint is data, loading one must not run arbitrary pickled code.
    """
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise WeightsFormatError(
            f"cannot read {path} as plain tensors ({str(err).splitlines()[0]}); "
            "save just its state dict with torch.save(state_dict, path)"
        ) from err
    while isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((k for k in _CONTAINER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            found = _preview(sorted(map(str, obj)))
            raise WeightsFormatError(f"{path}: no state dict found among keys {found}")
        obj = obj[inner]
    if not isinstance(obj, Mapping):
        raise WeightsFormatError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return dict(obj)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch_pretrained(spec: EncoderSpec) -> Path:
    """Local path of the spec's pretrained weights, from cache or downloaded; any failure becomes one
    ``WeightsUnavailableError`` naming the source and the ``--weights`` alternatives."""
    source = spec.weights_source
    try:
        if source is None:
            raise FileNotFoundError("no pretrained weights are published for it")
        if source.startswith("hf-hub:"):
            return _fetch_hf(source.removeprefix("hf-hub:"))
        return _fetch_url(source)
    except OSError as err:
        raise WeightsUnavailableError(
            f"cannot get pretrained weights for encoder {spec.name!r} from {source} "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'no details'}); "
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
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import RemoteEntryNotFoundError

    for filename in _HF_FILENAMES:
        cached = try_to_load_from_cache(repo_id, filename)
        if isinstance(cached, str):
            return Path(cached)
    _raise_if_offline()
    _probe(constants.ENDPOINT)
    for filename in _HF_FILENAMES:
        try:
            return Path(hf_hub_download(repo_id, filename, etag_timeout=NETWORK_TIMEOUT_S))
        except RemoteEntryNotFoundError:
            continue
    raise FileNotFoundError(f"none of {', '.join(_HF_FILENAMES)} in hub repo {repo_id}")


def _fetch_url(url: str) -> Path:
    """URL weights in ``torch.hub``'s cache (``<TORCH_HOME>/hub/checkpoints/<file name>``, the file
    ``torch.hub.load_state_dict_from_url`` would use), downloaded with a timeout and renamed atomically."""
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
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
