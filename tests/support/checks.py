"""Whether a workspace is whole, and whether it equals another: what the fault tests assert after a kill, a
full disk or a concurrent run (docs/reliability.md).

`workspace_problems(root)`: every file opens and parses (h5, pt, strict JSON, CSV, YAML, npz, images), no
temp file, lock or partial store is left behind, and each manifest agrees with the files it describes.
`differences(reference, root)`: the same files with the same content — arrays and tensors bit for bit, text
byte for byte once each workspace's own folder is written `<ws>`, manifests row for row without their timing
columns. Both return a list of one-line problems (empty: all is well).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import yaml

from wsi_pipeline.workspace.files import TMP_MARK
from wsi_pipeline.workspace.layout import MANIFEST, FoldDir, Layout
from wsi_pipeline.workspace.manifest import DONE, read_manifest

TIMING_COLUMNS = {"seconds", "segment_s", "grid_s", "write_s", "patches_per_s"}
MANIFEST_LOCK = Path(MANIFEST).with_suffix(".lock").name  # update_manifest's flock sidecar


def workspace_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def workspace_problems(root: Path, *, stopped: bool = False) -> list[str]:
    """Leftovers, unparsable files and manifests that disagree with their files (see module docstring).

    `stopped`: the workspace of a run that stopped on an error, where an unfinished slide's partial feature
    store is its resume point rather than a leftover.
    """
    layouts = (Layout(root), Layout(root).prediction_slides())
    locks = {lock for layout in layouts for lock in _locks(layout)}
    partials = {p for layout in layouts for s in layout.feature_sets() for p in s.partial_dir.rglob("*")}
    problems = []
    for path in workspace_files(root):
        rel = path.relative_to(root)
        if TMP_MARK in path.name:
            problems.append(f"{rel}: temp file left behind")
        elif path in locks:
            problems.append(f"{rel}: lock left behind")
        elif path in partials:
            if not stopped:
                problems.append(f"{rel}: partial feature store left behind")
        elif path.name == MANIFEST_LOCK:
            continue  # the manifest's flock sidecar: empty by design
        elif (reader := _READERS.get(path.suffix)) is None:
            problems.append(f"{rel}: unexpected file")
        else:
            try:
                reader(path)
            except Exception as exc:  # any failure to parse is the finding
                problems.append(f"{rel}: does not parse ({type(exc).__name__}: {str(exc).splitlines()[0]})")
    return problems + [p for layout in layouts for p in _manifest_problems(layout, root)]


def _locks(layout: Layout) -> list[Path]:
    """Every lock file a stage or run of `layout` may leave (slide locks, run locks)."""
    outputs = [*layout.patch_sets(), *layout.feature_sets()]
    return [*(lock for o in outputs for lock in o.locks.glob("*.lock")), *(run.lock for run in layout.runs())]


def differences(reference: Path, root: Path, *, home: Path | None = None) -> list[str]:
    """How `root` differs from `reference` (file set and contents), each one's folder written `<ws>`: the
    folder holding the workspace, or `home` for `root` when it was made elsewhere and copied here."""
    ref_files = {p.relative_to(reference) for p in workspace_files(reference)}
    files = {p.relative_to(root) for p in workspace_files(root)}
    problems = [f"{rel}: missing" for rel in sorted(ref_files - files)]
    problems += [f"{rel}: not in the reference" for rel in sorted(files - ref_files)]
    for rel in sorted(ref_files & files):
        compare = _same_manifest if rel.name == MANIFEST else _COMPARE.get(rel.suffix, _same_bytes)
        if not compare(_Side(reference / rel, reference.parent), _Side(root / rel, home or root.parent)):
            problems.append(f"{rel}: differs from the reference")
    return problems


# ------------------------------------------------------------------------------------------- parsing


def _strict_json(path: Path) -> Any:
    def refuse(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def _read_h5(path: Path) -> dict[str, Any]:
    with h5py.File(path, "r") as f:
        data: dict[str, Any] = {"attrs": _attrs(f.attrs)}
        f.visititems(lambda name, obj: data.update({name: (obj[()], _attrs(obj.attrs))})
                     if isinstance(obj, h5py.Dataset) else None)
    return data


def _attrs(attrs: Any) -> dict[str, Any]:
    return {k: np.asarray(v).tolist() for k, v in attrs.items()}


def _read_pt(path: Path) -> Any:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def _read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if rows and any(len(r) != len(rows[0]) for r in rows):
        raise ValueError("rows with another number of columns than the header")
    return rows


def _read_image(path: Path) -> np.ndarray:
    import cv2

    image = cv2.imread(str(path))
    if image is None:
        raise ValueError("not a readable image")
    return image


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def _read_key(path: Path) -> str:
    if not path.read_text().strip():
        raise ValueError("empty cache key")
    return path.read_text()


_READERS: dict[str, Callable[[Path], Any]] = {
    ".h5": _read_h5, ".pt": _read_pt, ".json": _strict_json, ".csv": _read_csv, ".yaml": lambda p: yaml.safe_load(
        p.read_text()), ".md": Path.read_text, ".npz": _read_npz, ".jpg": _read_image, ".png": _read_image,
    ".key": _read_key, ".geojson": _strict_json, ".html": Path.read_text,
}


# ---------------------------------------------------------------------------------------- manifests


def _manifest_problems(layout: Layout, root: Path) -> list[str]:
    problems = []
    for patch_set in layout.patch_sets():
        outputs = {p.stem: p for p in patch_set.coords_dir.glob("*.h5")}
        problems += _agree(patch_set.manifest, outputs, lambda p: len(_read_h5(p)["coords"][0]), root)
    for feature_set in layout.feature_sets():
        for folder, count in ((feature_set.h5_dir, lambda p: len(_read_h5(p)["features"][0])),
                              (feature_set.pt_dir, lambda p: len(_read_pt(p)))):
            if folder.is_dir():
                outputs = {p.stem: p for p in folder.iterdir() if p.suffix in (".h5", ".pt")}
                problems += _agree(feature_set.manifest, outputs, count, root)
    for run in layout.runs():
        finished = [f for f in map(FoldDir, run.dir.glob("fold_*")) if f.metrics.is_file()]
        problems += [f"{f.dir.relative_to(root)}: metrics.json without best.pt or preds.csv" for f in finished
                     if not (f.best.is_file() and f.preds.is_file())]
        if run.summary.is_file() and len(_read_csv(run.summary)) != len(finished) + 3:  # header, mean, std
            problems.append(f"{run.summary.relative_to(root)}: rows disagree with the finished folds")
    return problems


def _agree(manifest: Path, outputs: dict[str, Path], count: Callable[[Path], int], root: Path) -> list[str]:
    """`done` rows ↔ output files, and each row's n_patches ↔ its file."""
    rows = {r["slide_id"]: r for r in read_manifest(manifest) if r["status"] == DONE}
    where = manifest.relative_to(root)
    problems = [f"{where}: {sid} is done but has no output" for sid in sorted(set(rows) - set(outputs))]
    problems += [f"{where}: {sid} has an output but no done row" for sid in sorted(set(outputs) - set(rows))]
    for sid in sorted(set(rows) & set(outputs)):
        try:
            n = count(outputs[sid])
        except Exception:  # reported by the parsing pass
            continue
        if str(n) != rows[sid]["n_patches"]:
            problems.append(f"{where}: {sid} n_patches {rows[sid]['n_patches']} but its file has {n}")
    return problems


# ---------------------------------------------------------------------------------------- comparing


class _Side:
    """One file of a comparison and the folder its workspace lives in (written `<ws>` when comparing)."""

    def __init__(self, path: Path, home: Path) -> None:
        self.path, self.home = path, str(home)

    def norm(self, value: Any) -> Any:
        """`value` with the home folder written `<ws>` (strings inside containers too)."""
        if isinstance(value, str):
            return value.replace(self.home, "<ws>")
        if isinstance(value, dict):
            return {k: self.norm(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.norm(v) for v in value]
        return value


def _same_bytes(a: _Side, b: _Side) -> bool:
    return a.path.read_bytes() == b.path.read_bytes()


def _same_text(a: _Side, b: _Side) -> bool:
    return a.norm(a.path.read_text()) == b.norm(b.path.read_text())


def _same_h5(a: _Side, b: _Side) -> bool:
    return _equal(a.norm(_read_h5(a.path)), b.norm(_read_h5(b.path)))


def _same_pt(a: _Side, b: _Side) -> bool:
    return _equal(a.norm(_read_pt(a.path)), b.norm(_read_pt(b.path)))


def _same_manifest(a: _Side, b: _Side) -> bool:
    def rows(side: _Side) -> list[dict[str, Any]]:
        return [side.norm({k: v for k, v in r.items() if k not in TIMING_COLUMNS}) for r in read_manifest(side.path)]

    return rows(a) == rows(b)


def _equal(x: Any, y: Any) -> bool:
    """Deep equality; arrays and tensors bit for bit (dtype, shape and bytes)."""
    import torch

    if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
        return (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.dtype == y.dtype
                and x.shape == y.shape and _bytes(x) == _bytes(y))
    if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
        x, y = np.asarray(x), np.asarray(y)
        return x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()
    if isinstance(x, dict) and isinstance(y, dict):
        return x.keys() == y.keys() and all(_equal(x[k], y[k]) for k in x)
    if isinstance(x, list | tuple) and isinstance(y, list | tuple):
        return len(x) == len(y) and all(_equal(i, j) for i, j in zip(x, y, strict=True))
    if isinstance(x, float) and isinstance(y, float) and np.isnan(x) and np.isnan(y):
        return True
    return x == y


def _bytes(tensor: Any) -> bytes:
    import torch

    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


_COMPARE = {".h5": _same_h5, ".pt": _same_pt, ".json": _same_text, ".yaml": _same_text, ".md": _same_text,
            ".csv": _same_text}
