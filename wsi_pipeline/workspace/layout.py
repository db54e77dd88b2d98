"""The workspace tree: the one place where its paths are built and parsed (docs/design.md §2).

```
<root>/
  patches/<patch config>/            coords/<slide_id>.h5, qc/<slide_id>.jpg, masks/<slide_id>.geojson (tissue),
                                     geojson/<slide_id>.geojson (`wsip export geojson`), manifest.csv, params.json
  features/<patch config>/<feature set>/
                                     h5_files/<slide_id>.h5, pt_files/<slide_id>.pt, .partial/<slide_id>.zarr,
                                     manifest.csv, params.json
  runs/<name>/                       config.yaml, features.json, splits.csv, groups/, fold_<k>/, summary.csv,
                                     report.md, evaluation.json + oof_predictions.csv (pooled out-of-fold)
  predictions/<run name>/            <slide_id>.json, <slide_id>_heatmap.png, <slide_id>_attention.h5,
                                     <slide_id>.geojson (`wsip export geojson --run`), viewer/<slide_id>/ (`wsip view`),
                                     predictions.csv + metrics.json (`wsip predict --labels`)
  comparisons/<run a>__vs__<run b>_<on>.json  `wsip compare`
  predictions/_slides/               a workspace of its own for the slides being predicted
  report.html                        `wsip report`
```
Everything inside a workspace is found from its root and names (never from an absolute path recorded in
another file), so a workspace can be copied or moved as a whole; slide paths, which live outside it, are
recorded absolute. New slides given to `wsip predict` are patched and encoded in `predictions/_slides/`,
never beside the training cohort: a slide named like a cohort slide cannot touch the cohort's outputs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from wsi_pipeline.errors import InputError, UserError, name_some
from wsi_pipeline.workspace.slide_id import check_name, check_slide_id

WORKSPACE_ENV = "WSIP_OUT"
DEFAULT_WORKSPACE = "wsip_out"


def workspace_root(out: str | os.PathLike[str] | None = None) -> Path:
    """`--out` if given, else `$WSIP_OUT`, else `./wsip_out`; absolute and resolved.

    Resolved once, here, so every path a stage records is absolute: a workspace used from another folder
    (or by a Slurm job started elsewhere) finds the same files.
    """
    root = Path(out or os.environ.get(WORKSPACE_ENV) or DEFAULT_WORKSPACE).expanduser().resolve()
    if root.exists() and not root.is_dir():
        raise InputError(f"{root}: the workspace (--out, `out:` or $WSIP_OUT) is a file, not a folder; pass a folder")
    return root


MANIFEST, PARAMS = "manifest.csv", "params.json"
SLIDES_FOLDER = "_slides"  # predictions/_slides/: the workspace of slides given to `wsip predict`
H5_FOLDER, PT_FOLDER = "h5_files", "pt_files"
FOLD_PREFIX = "fold_"
VIEWER_PAGE = "index.html"


def _slide_file(folder: Path, slide_id: str, suffix: str) -> Path:
    """`<folder>/<slide_id><suffix>`, refused for any slide id that could name a path outside `folder`
    (docs/reliability.md, "Names")."""
    return folder / f"{check_slide_id(slide_id)}{suffix}"


@dataclass(frozen=True)
class StageOutputs:
    """What every per-slide stage writes beside its outputs: a manifest, its params and lock files."""

    dir: Path

    @property
    def name(self) -> str:
        return self.dir.name

    @property
    def manifest(self) -> Path:
        return self.dir / MANIFEST

    @property
    def params(self) -> Path:
        return self.dir / PARAMS

    @property
    def locks(self) -> Path:
        return self.dir / ".locks"

    def lock(self, slide_id: str) -> Path:
        """The slide's owner lock while a worker writes its outputs."""
        return _slide_file(self.locks, slide_id, ".lock")


@dataclass(frozen=True)
class PatchSet(StageOutputs):
    """One patching config's outputs: `patches/<name>/`."""

    @property
    def coords_dir(self) -> Path:
        return self.dir / "coords"

    @property
    def geojson_dir(self) -> Path:
        return self.dir / "geojson"

    def coords(self, slide_id: str) -> Path:
        return _slide_file(self.coords_dir, slide_id, ".h5")

    def qc(self, slide_id: str) -> Path:
        return _slide_file(self.dir / "qc", slide_id, ".jpg")

    def mask(self, slide_id: str) -> Path:
        """The tissue outline as QuPath GeoJSON: what `--masks` reads back (docs/report.md)."""
        return _slide_file(self.dir / "masks", slide_id, ".geojson")

    def geojson(self, slide_id: str) -> Path:
        """Tissue + patch tiles for QuPath (`wsip export geojson`)."""
        return _slide_file(self.geojson_dir, slide_id, ".geojson")

    def output_dirs(self) -> tuple[Path, ...]:
        return self.coords_dir, self.dir / "qc", self.dir / "masks", self.dir


@dataclass(frozen=True)
class FeatureSet(StageOutputs):
    """One encoder's features of one patching: `features/<patch config>/<name>/`."""

    @property
    def patch_config(self) -> str:
        return self.dir.parent.name

    @property
    def h5_dir(self) -> Path:
        return self.dir / H5_FOLDER

    @property
    def pt_dir(self) -> Path:
        return self.dir / PT_FOLDER

    def h5(self, slide_id: str) -> Path:
        return _slide_file(self.h5_dir, slide_id, ".h5")

    def pt(self, slide_id: str) -> Path:
        return _slide_file(self.pt_dir, slide_id, ".pt")

    @property
    def partial_dir(self) -> Path:
        """Unfinished slides' feature stores (`partial`), each removed once its slide is done."""
        return self.dir / ".partial"

    def partial(self, slide_id: str) -> Path:
        return _slide_file(self.partial_dir, slide_id, ".zarr")

    def output_dirs(self) -> tuple[Path, ...]:
        return self.h5_dir, self.pt_dir, self.dir

    def export_dir(self, tool: str) -> Path:
        """The same features in another tool's layout (`wsip export stamp`): `<feature set>/<tool>/`."""
        return self.dir / tool


@dataclass(frozen=True)
class FoldDir:
    """One fold of a run: `runs/<name>/fold_<k>/`."""

    dir: Path

    @property
    def number(self) -> int:
        return int(self.dir.name.removeprefix(FOLD_PREFIX))

    @property
    def best(self) -> Path:
        return self.dir / "best.pt"

    @property
    def last(self) -> Path:
        return self.dir / "last.pt"

    @property
    def log(self) -> Path:
        return self.dir / "log.csv"

    @property
    def preds(self) -> Path:
        return self.dir / "preds.csv"

    @property
    def val_preds(self) -> Path:
        """Val probabilities at the selected epoch: where the Youden threshold is picked (never on test)."""
        return self.dir / "val_preds.csv"

    @property
    def metrics(self) -> Path:
        """Written last: its presence marks the fold finished."""
        return self.dir / "metrics.json"


@dataclass(frozen=True)
class RunDir:
    """One training run: `runs/<name>/`."""

    dir: Path

    @property
    def name(self) -> str:
        return self.dir.name

    @property
    def config(self) -> Path:
        return self.dir / "config.yaml"

    @property
    def features_record(self) -> Path:
        """The feature set's params (patch + extract) the run trained on: what `wsip predict` replays."""
        return self.dir / "features.json"

    @property
    def splits(self) -> Path:
        return self.dir / "splits.csv"

    @property
    def summary(self) -> Path:
        return self.dir / "summary.csv"

    @property
    def report(self) -> Path:
        return self.dir / "report.md"

    @property
    def evaluation(self) -> Path:
        """Pooled out-of-fold statistics with CIs and the Youden threshold (docs/evaluation.md)."""
        return self.dir / "evaluation.json"

    @property
    def oof_predictions(self) -> Path:
        """Every test slide's probabilities pooled over the folds (`wsip compare --on cv` pairs on them)."""
        return self.dir / "oof_predictions.csv"

    @property
    def lock(self) -> Path:
        return self.dir.parent / f".{self.name}.lock"

    def groups(self, key: str) -> Path:
        return self.dir / "groups" / key

    def group_cache(self, key: str, slide_id: str) -> Path:
        """A slide's cached instance groups for the model's group key (`key`)."""
        return self.groups(key) / f"{slide_id}.npz"

    def output_dirs(self) -> tuple[Path, ...]:
        """Every folder the run writes files into (where a killed writer's temp files can be left)."""
        return self.dir, *sorted(self.dir.glob(f"{FOLD_PREFIX}*")), *sorted(self.dir.glob("groups/*"))

    def fold(self, k: int) -> FoldDir:
        return FoldDir(self.dir / f"{FOLD_PREFIX}{k}")

    def trained_folds(self) -> list[FoldDir]:
        """Folds with a selected model (`best.pt`), in fold order."""
        folds = [FoldDir(p) for p in self.dir.glob(f"{FOLD_PREFIX}*")
                 if p.name.removeprefix(FOLD_PREFIX).isdigit() and FoldDir(p).best.is_file()]
        return sorted(folds, key=lambda f: f.number)


@dataclass(frozen=True)
class PredictionSet:
    """One run's predictions of new slides: `predictions/<run name>/`."""

    dir: Path

    @property
    def run_name(self) -> str:
        return self.dir.name

    def record(self, slide_id: str) -> Path:
        """Probabilities, predicted class, slide path (JSON)."""
        return _slide_file(self.dir, slide_id, ".json")

    def heatmap(self, slide_id: str) -> Path:
        return _slide_file(self.dir, slide_id, "_heatmap.png")

    def attention(self, slide_id: str) -> Path:
        """Per-patch coords and attention (h5), for the viewer and the GeoJSON export."""
        return _slide_file(self.dir, slide_id, "_attention.h5")

    def geojson(self, slide_id: str) -> Path:
        return _slide_file(self.dir, slide_id, ".geojson")

    def viewer(self, slide_id: str) -> Path:
        """A self-contained Deep Zoom viewer folder (`index.html` + tiles)."""
        return _slide_file(self.dir / "viewer", slide_id, "")

    def viewer_page(self, slide_id: str) -> Path:
        """The viewer's page, the file to open."""
        return self.viewer(slide_id) / VIEWER_PAGE

    @property
    def table(self) -> Path:
        """The latest labelled cohort's per-slide probabilities, labels and decisions (`--labels`)."""
        return self.dir / "predictions.csv"

    @property
    def metrics(self) -> Path:
        """The latest labelled cohort's statistics with CIs (`--labels`)."""
        return self.dir / "metrics.json"

    def slide_ids(self) -> list[str]:
        """The slides predicted so far, by name."""
        return sorted(p.stem for p in self.dir.glob("*.json") if p != self.metrics)


@dataclass(frozen=True)
class Layout:
    """A workspace root and everything below it."""

    root: Path

    @classmethod
    def at(cls, out: str | os.PathLike[str] | None = None) -> Layout:
        """`--out`, else `$WSIP_OUT`, else `./wsip_out` (absolute)."""
        return cls(workspace_root(out))

    def _inside(self, *parts: str) -> Path:
        """`root/parts...`, asserted to lie under the root: the guard that keeps every stage-output folder (and so
        every slide file below it, whose names `_slide_file` checks) inside the workspace."""
        path = Path(os.path.normpath(self.root.joinpath(*parts)))
        if not path.is_relative_to(os.path.normpath(self.root)) or path == Path(os.path.normpath(self.root)):
            raise UserError(f"{path}: outside the workspace {self.root}; refusing to write there")
        return path

    # ----------------------------------------------------------------------------------- patches
    def patch_set(self, config: str) -> PatchSet:
        return PatchSet(self._inside("patches", check_name(config, "patch config")))

    def patch_sets(self) -> list[PatchSet]:
        """Patch configs that hold a coords folder, by name."""
        return [PatchSet(p.parent) for p in sorted((self.root / "patches").glob("*/coords")) if p.is_dir()]

    def pick_patch_set(self, name: str | None) -> PatchSet:
        """The named patch config, or the only one in the workspace (`--patches`)."""
        patches = self.root / "patches"
        if name:
            chosen = self.patch_set(name)
            if not chosen.dir.joinpath("coords").is_dir():
                raise UserError(f"{chosen.dir}: no such patch config; run `wsip patch` first or fix --patches")
            return chosen
        sets = self.patch_sets()
        if not sets:
            raise UserError(f"{patches}: no patches yet; run `wsip patch SLIDES...` first (same --out)")
        if len(sets) > 1:
            raise UserError(f"{patches}: several patch configs ({name_some(s.name for s in sets)}); "
                            "pass --patches NAME")
        return sets[0]

    # ---------------------------------------------------------------------------------- features
    def feature_set(self, patch_config: str, name: str) -> FeatureSet:
        return FeatureSet(self._inside("features", check_name(patch_config, "patch config"),
                                       check_name(name, "feature set")))

    def features_dir(self, patch_config: str) -> Path:
        """`features/<patch config>/`: the feature sets made from one patching."""
        return self._inside("features", check_name(patch_config, "patch config"))

    def feature_sets(self) -> list[FeatureSet]:
        return [FeatureSet(p.parent) for p in sorted((self.root / "features").glob(f"*/*/{MANIFEST}"))]

    # -------------------------------------------------------------------------------------- runs
    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    def run(self, name: str) -> RunDir:
        return RunDir(self._inside("runs", check_name(name, "run name")))

    def runs(self) -> list[RunDir]:
        return [RunDir(p) for p in sorted(self.runs_dir.glob("*")) if p.is_dir()]

    # ------------------------------------------------------------------------------- predictions
    @property
    def predictions_dir(self) -> Path:
        return self.root / "predictions"

    def predictions(self, run_name: str) -> PredictionSet:
        return PredictionSet(self._inside("predictions", check_name(run_name, "run name")))

    def prediction_sets(self) -> list[PredictionSet]:
        """Runs' prediction folders (not `_slides`), by run name."""
        folders = sorted(self.predictions_dir.glob("*"))
        return [PredictionSet(p) for p in folders if p.is_dir() and p.name != SLIDES_FOLDER]

    def prediction_slides(self) -> Layout:
        """The workspace in which slides given to `wsip predict` are patched and encoded."""
        return Layout(self.predictions_dir / SLIDES_FOLDER)

    def comparison(self, run_a: str, run_b: str, on: str) -> Path:
        """`wsip compare RUN_A RUN_B --on ON`'s result (JSON)."""
        return self.root / "comparisons" / f"{run_a}__vs__{run_b}_{on}.json"

    def comparisons(self) -> list[Path]:
        return sorted((self.root / "comparisons").glob("*.json"))

    @property
    def report(self) -> Path:
        """`wsip report`'s one HTML file."""
        return self.root / "report.html"

    def staging_dirs(self) -> tuple[Path, ...]:
        """Folders where `wsip view` and `wsip report` stage their outputs (temp folders and files beside the
        target): every stage removes those of dead writers (docs/reliability.md, "Temp files")."""
        return self.root, *sorted(self.predictions_dir.glob("*/viewer"))


def pt_key(pt_path: Path) -> Path:
    """`<slide_id>.key` beside a pt file: the cache key of a pt-only feature set."""
    return pt_path.with_suffix(".key")


def feature_set_at(path: Path) -> tuple[Layout, FeatureSet] | None:
    """Parse a feature-set folder back into its workspace (`<root>/features/<patch config>/<name>`), or None
    when `path` is not laid out that way (features made by another tool)."""
    path = path.resolve()
    if len(path.parents) < 3 or path.parent.parent.name != "features":
        return None
    return Layout(path.parents[2]), FeatureSet(path)
