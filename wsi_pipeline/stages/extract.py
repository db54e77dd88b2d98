"""`wsip extract`: patch features for every patched slide, fast and resumable inside a slide.

Per slide: a Dataset over the coords whose DataLoader workers each open their own `Slide` and read at the
level/size recorded in the coords h5 (never recomputed), area-resize to the encoder's input and hand over
uint8 batches in NHWC, which is channels_last as it stands (4× less to move than float, no transpose); the
main process normalises, runs the encoder (autocast on CUDA, channels_last, inference mode) and streams rows
into a chunked partial zarr, so reading overlaps compute and a killed run resumes from its last complete
chunk. See docs/design.md §7.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from wsi_pipeline.device import resolve_device
from wsi_pipeline.digests import code_digest, params_hash
from wsi_pipeline.errors import InputError, UserError
from wsi_pipeline.models.encoders import Encoder, Preprocess, ResolvedWeights, build_encoder, get_spec, resolve_weights
from wsi_pipeline.slide import Slide
from wsi_pipeline.stages import runner
from wsi_pipeline.stages.runner import SlideOutcome
from wsi_pipeline.workspace.coords_store import coords_attrs, read_coords
from wsi_pipeline.workspace.feature_store import PartialFeatures, features_are_current, write_features
from wsi_pipeline.workspace.files import remove_stale_temps, storage_errors, write_json_if_changed
from wsi_pipeline.workspace.layout import FeatureSet, Layout, PatchSet
from wsi_pipeline.workspace.manifest import DONE, read_manifest
from wsi_pipeline.workspace.shards import parse_shard, take_shard

MANIFEST_COLUMNS = ("slide_id", "slide_path", "status", "n_patches", "dim", "seconds", "patches_per_s", "error")
_CODE = code_digest(__file__)  # the encoders' own code is covered by the weights' sha256 and the spec
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# How a run goes, not what it makes: left out of the feature set's params.json (which records the precision
# resolved), so rerunning a cached set with other ones writes nothing (docs/reliability.md).
_RUN_KNOBS = ("batch_size", "workers", "device")


@dataclass(frozen=True)
class ExtractParams:
    encoder: str = "resnet18"
    weights: str = "pretrained"  # "pretrained" | "random" | a file path
    batch_size: int = 32
    workers: int = 1  # DataLoader reader processes; 0 reads in the main process
    device: str = "auto"  # auto | cpu | cuda | cuda:i
    precision: str = "auto"  # auto (fp32 on CPU, bf16/fp16 autocast on CUDA) | fp32 | fp16 | bf16
    formats: tuple[str, ...] = ("h5", "pt")
    patches: str | None = None  # patch config folder name; automatic when the workspace has one
    chunk_rows: int = 1024  # resume granularity

    def validate(self) -> None:
        """Each bad value is a one-line error naming its flag, before any slide is touched."""
        bad = set(self.formats) - {"h5", "pt"}
        if bad or not self.formats:
            raise InputError(f"--format {','.join(self.formats)}: choose h5, pt or h5,pt")
        if self.batch_size < 1:
            raise InputError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.workers < 0:
            raise InputError(f"--workers must be 0 (main process) or more, got {self.workers}")
        if self.chunk_rows < 1:
            raise InputError(f"chunk_rows must be at least 1, got {self.chunk_rows}")
        if self.precision not in ("auto", *PRECISIONS):
            raise InputError(f"--precision {self.precision!r}: choose auto, fp32, fp16 or bf16")


@dataclass(frozen=True)
class SlideJob:
    slide_id: str
    path: Path  # the slide (absolute, as the patch manifest records it)
    coords_path: Path


class PatchDataset(Dataset):
    """Patches of one slide as uint8 (S, S, 3) tensors, resized/cropped as the encoder's preprocessing says
    (a batch of them, permuted to (B, 3, S, S), is channels_last without a copy); each worker opens its own
    slide handle."""

    def __init__(self, slide_path: Path, coords: np.ndarray, level: int, read_size: int, pre: Preprocess):
        self.slide_path, self.coords, self.level = slide_path, coords, level
        self.read_size, self.pre = read_size, pre
        self._slide: Slide | None = None

    def __len__(self) -> int:
        return len(self.coords)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor]:
        if self._slide is None:  # opened lazily, so every worker process has its own OpenSlide handle
            self._slide = Slide(self.slide_path)
        x, y = self.coords[index]
        rgb = self._slide.read_region((int(x), int(y)), self.level, (self.read_size, self.read_size))
        return index, torch.from_numpy(self.pre.resize_crop(rgb))


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """None means plain fp32. On CPU, fp32 unless asked (exact features); on CUDA, bf16 where supported."""
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None if precision == "fp32" else PRECISIONS[precision]


def precision_name(precision: str, device: torch.device) -> str:
    """The precision actually used (`auto` resolved): part of the cache key, so auto and fp32 on a CPU
    share their features."""
    dtype = autocast_dtype(precision, device)
    return "fp32" if dtype is None else next(k for k, v in PRECISIONS.items() if v == dtype)


def feature_set_name(encoder: str, weights: str, sha: str) -> str:
    """`resnet18` for its pretrained weights; other weights get their own folder, never mixed."""
    base = encoder.replace(":", "-").replace("/", "-")
    if weights == "pretrained":
        return base
    return f"{base}_random" if sha.startswith("random") else f"{base}_{sha[:8]}"


def extract_slide(job: SlideJob, *, encoder: StageEncoder, params: ExtractParams, feature_set: FeatureSet, force: bool,
                  on_patches: Callable[[str, int, int], None] | None = None) -> SlideOutcome:
    """Encode one slide's patches; resumes from `.partial/<slide_id>.zarr` when interrupted."""
    coords, cattrs = read_coords(job.coords_path)
    pre = encoder.preprocess
    key = _cache_key(encoder, params, cattrs)
    h5_path, pt_path = _output_paths(job.slide_id, params, feature_set)
    if not force and features_are_current(h5_path, pt_path, key):
        shutil.rmtree(feature_set.partial(job.slide_id), ignore_errors=True)  # a run killed before removing it
        return SlideOutcome(job.slide_id, runner.CACHED, {"n_patches": len(coords), "dim": encoder.dim})
    if len(coords) == 0:
        raise UserError(f"{job.coords_path}: no patches; nothing to encode")
    partial_path = feature_set.partial(job.slide_id)
    if force:
        shutil.rmtree(partial_path, ignore_errors=True)  # --force: no resume from old chunks either
    store = PartialFeatures(partial_path, len(coords), encoder.dim, params.chunk_rows, key)
    todo = [c for c in range(store.n_chunks) if c not in store.done_chunks()]
    start, n_new = time.perf_counter(), sum(len(store.chunk_rows_range(c)) for c in todo)
    dataset = PatchDataset(job.path, coords, int(cattrs["read_level"]), int(cattrs["read_size"]), pre)
    _encode_chunks(dataset, store, todo, encoder, params,
                   lambda done: on_patches and on_patches(job.slide_id, done, n_new))
    seconds = time.perf_counter() - start
    attrs = {**cattrs, "coords_cache_key": cattrs.get("cache_key"), "encoder": params.encoder,
             "weights_sha256": encoder.weights_sha256, "input_size": pre.input_size,
             "resize_size": pre.resize_size or pre.input_size, "feature": encoder.spec.features, "mean": list(pre.mean),
             "std": list(pre.std), "cache_key": key,
             "precision": precision_name(params.precision, encoder.device)}
    write_features(h5_path, pt_path, store.read_all(), coords, attrs)
    store.remove()
    row = {"n_patches": len(coords), "dim": encoder.dim, "patches_per_s": f"{n_new / max(seconds, 1e-9):.1f}"}
    return SlideOutcome(job.slide_id, runner.DONE, row)


class StageEncoder:
    """The encoder as the stage runs it: its identity (weights' sha256, preprocessing, dim) at once, its module
    only when a slide has patches to encode, so a cohort whose features are all current (a cached `wsip
    predict`) neither imports timm nor reads the weights. The module runs in channels_last (~1.4× faster
    convolutions on CPU and GPU); the benchmark times this very object."""

    def __init__(self, weights: ResolvedWeights, device: torch.device) -> None:
        self.weights, self.device = weights, device
        self.spec, self.weights_sha256 = weights.spec, weights.sha256
        self.dim, self.preprocess = weights.spec.dim, weights.spec.preprocess
        self._encoder: Encoder | None = None

    def load(self) -> Encoder:
        """The module on the device, built once (a wrong weights file fails here)."""
        if self._encoder is None:
            self._encoder = build_encoder(self.weights, device=self.device)
            self._encoder.module.to(memory_format=torch.channels_last)
        return self._encoder


def load_encoder(params: ExtractParams, device: torch.device) -> StageEncoder:
    """The stage's encoder for `params`: weights found and hashed now, the module built on first use."""
    return StageEncoder(resolve_weights(params.encoder, params.weights), device)


def is_current(job: SlideJob, *, encoder: StageEncoder, params: ExtractParams, feature_set: FeatureSet) -> bool:
    """Whether the slide's finished features match its current coords and this encoder (attrs only: cheap)."""
    cattrs = coords_attrs(job.coords_path)
    return cattrs is not None and features_are_current(*_output_paths(job.slide_id, params, feature_set),
                                                       _cache_key(encoder, params, cattrs))


def _output_paths(slide_id: str, params: ExtractParams, feature_set: FeatureSet) -> tuple[Path | None, Path | None]:
    """(h5, pt) of a slide, None for a format not asked for."""
    return (feature_set.h5(slide_id) if "h5" in params.formats else None,
            feature_set.pt(slide_id) if "pt" in params.formats else None)


def _encode_chunks(dataset: PatchDataset, store: PartialFeatures, chunks: Sequence[int], encoder: StageEncoder,
                   params: ExtractParams, report: Callable[[int], Any]) -> None:
    """Run the loader over the pending chunks' rows; write each chunk as soon as its rows are all in.

    The forward pass never waits on output: a batch's features come back to the host one batch later (on CUDA
    an asynchronous copy into pinned memory, so the GPU is already busy with the next batch), and chunk writes
    run on a writer thread. Reading and resizing run in the loader's workers (docs/encoders.md, "Memory and
    speed").
    """
    rows = [i for c in chunks for i in store.chunk_rows_range(c)]
    if not rows:
        return
    device, module = encoder.device, encoder.load()
    loader = DataLoader(dataset, batch_size=params.batch_size, sampler=rows, num_workers=params.workers,
                        pin_memory=device.type == "cuda", prefetch_factor=4 if params.workers else None)
    dtype = autocast_dtype(params.precision, device)
    collect = _ChunkCollector(store, chunks)
    lagged: tuple[torch.Tensor, torch.Tensor, Any] | None = None
    done = 0
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    with torch.inference_mode(), autocast, ThreadPoolExecutor(max_workers=1) as writer:
        for index, batch in loader:
            feats = module(batch.permute(0, 3, 1, 2).to(device, non_blocking=True)).float()  # it normalises
            if lagged is not None:
                collect(*lagged, writer)
            lagged = (index, *_to_host(feats))
            done += len(index)
            report(done)
        if lagged is not None:
            collect(*lagged, writer)
        collect.finish()


def _to_host(feats: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """Start the copy of a batch's features to the host; the event (CUDA) says when it has landed."""
    if feats.device.type != "cuda":
        return feats, None
    host = torch.empty(feats.shape, dtype=feats.dtype, pin_memory=True)
    host.copy_(feats, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


class _ChunkCollector:
    """Rows in, whole chunks out to the writer thread; `finish` waits for the writes and re-raises their errors."""

    def __init__(self, store: PartialFeatures, chunks: Sequence[int]):
        self.store, self.pending = store, {c: {} for c in chunks}
        self.writes: list[Future] = []

    def __call__(self, index: torch.Tensor, host: torch.Tensor, event: Any, writer: ThreadPoolExecutor) -> None:
        if event is not None:
            event.synchronize()
        store = self.store
        for i, f in zip(index.tolist(), host.numpy(), strict=True):
            chunk = i // store.chunk_rows
            self.pending[chunk][i] = f
            if len(self.pending[chunk]) == len(store.chunk_rows_range(chunk)):
                block = self.pending.pop(chunk)
                rows = np.stack([block[r] for r in store.chunk_rows_range(chunk)])
                self.writes.append(writer.submit(store.write_chunk, chunk, rows))

    def finish(self) -> None:
        for write in self.writes:
            write.result()


def _cache_key(encoder: StageEncoder, params: ExtractParams, coords_attrs: dict[str, Any]) -> str:
    """Same coords + encoder + weights + transform + precision (+ our code) → reuse."""
    pre = encoder.preprocess
    return params_hash({"coords": coords_attrs.get("cache_key"), "slide": coords_attrs.get("slide_fingerprint"),
                        "encoder": params.encoder, "weights": encoder.weights_sha256, "size": pre.input_size,
                        "resize": pre.resize_size,
                        "mean": pre.mean, "std": pre.std, "precision": precision_name(params.precision, encoder.device),
                        "code": _CODE})


def slide_jobs(patch_set: PatchSet) -> list[SlideJob]:
    """Every slide the patch stage finished (manifest `done`), with its coords file."""
    rows = [r for r in read_manifest(patch_set.manifest) if r.get("status") == DONE]
    return [SlideJob(r["slide_id"], Path(r["slide_path"]), patch_set.coords(r["slide_id"])) for r in rows]


@dataclass
class ExtractResult:
    feature_set: FeatureSet
    outcomes: list[SlideOutcome]

    @property
    def out_dir(self) -> Path:
        return self.feature_set.dir


def extract(params: ExtractParams = ExtractParams(), *, out: str | Path | Layout | None = None,
            shard: str | None = None, force: bool = False, slide_ids: Sequence[str] | None = None,
            wait: bool = False, on_done: Callable[[SlideOutcome], None] | None = None,
            on_patches: Callable[[str, int, int], None] | None = None) -> ExtractResult:
    """Encode every patched slide into `<out>/features/<patch config>/<feature set>/`.

    Callable from Python exactly as `wsip extract`; `slide_ids` restricts the run and `wait` waits for slides
    another process holds (both used by `wsip predict`).
    The feature set's `params.json` records the extract params that make the features (precision resolved),
    the weights' sha256 and the patch params, so the set describes itself wherever the workspace is moved.
    A feature set whose slides are all current writes nothing (works on a read-only workspace).
    """
    params.validate()
    get_spec(params.encoder)  # an unknown encoder name is reported before anything else
    layout = out if isinstance(out, Layout) else Layout.at(out)
    patch_set = layout.pick_patch_set(params.patches)
    device = resolve_device(params.device)
    encoder = load_encoder(params, device)
    feature_set = layout.feature_set(patch_set.name, feature_set_name(params.encoder, params.weights,
                                                                      encoder.weights_sha256))
    jobs = slide_jobs(patch_set)
    if slide_ids is not None:
        jobs = [j for j in jobs if j.slide_id in set(slide_ids)]
    jobs = take_shard(jobs, parse_shard(shard), key=lambda j: j.slide_id)
    current = partial(is_current, encoder=encoder, params=params, feature_set=feature_set)
    if force or not all(current(j) for j in jobs):
        encoder.load()  # a wrong weights file fails here, before anything is written
    with storage_errors(layout.root):
        feature_set.dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(*feature_set.output_dirs(), *layout.staging_dirs())
        write_json_if_changed(feature_set.params, {
            **{k: v for k, v in asdict(params).items() if k not in _RUN_KNOBS},
            "precision": precision_name(params.precision, device), "weights_sha256": encoder.weights_sha256,
            "dim": encoder.dim, "patch_config": patch_set.name,
            "patch_params": json.loads(patch_set.params.read_text())})
        job = partial(extract_slide, encoder=encoder, params=params, feature_set=feature_set, force=force,
                      on_patches=on_patches)
        outcomes = runner.run_cohort(job, jobs, slide_id=lambda j: j.slide_id, outputs=feature_set,
                                     columns=MANIFEST_COLUMNS, is_current=lambda j: not force and current(j),
                                     wait=wait, on_done=on_done)
    return ExtractResult(feature_set, outcomes)
