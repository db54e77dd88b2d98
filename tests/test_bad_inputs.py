"""The bad-input catalogue (docs/reliability.md): one row per bad input, each run through the real `wsip` CLI
beside a finished workspace (patched, extracted, trained). Every row asserts the exit code (2: one `error:`
line; 1: the slide's own failure line and manifest row), no traceback, a message naming the file or option
and the fix, and that the finished outputs are untouched. Adding a case is adding a row to `CASES`.

Placeholders in a row's arguments and expected words: `{ws}` the finished workspace, `{in}` the row's own
folder (its `make` writes the bad input there), `{slides}` the cohort, `{slide}` one cohort slide.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import pickle
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import h5py
import numpy as np
import pytest
import torch
import yaml
from support.checks import TIMING_COLUMNS, workspace_files
from support.launch import can_make_read_only, read_only_workspace
from support.sweep import FEATURES, make_cohort

from wsi_pipeline.stages.extract import ExtractParams, extract
from wsi_pipeline.stages.inputs import resolve_inputs
from wsi_pipeline.stages.patch import patch
from wsi_pipeline.stages.train import TrainParams, train
from wsi_pipeline.workspace.layout import MANIFEST, FeatureSet, Layout
from wsi_pipeline.workspace.manifest import read_manifest

pytestmark = pytest.mark.e2e

# ------------------------------------------------------------------------------------------ bad inputs


def write(name: str, data: bytes | str) -> Callable[[Path, Path], None]:
    def make(folder: Path, cohort: Path) -> None:
        (folder / name).write_bytes(data if isinstance(data, bytes) else data.encode())
    return make


def truncated_slide(folder: Path, cohort: Path) -> None:
    data = (cohort / "slides" / "demo_00.svs").read_bytes()
    (folder / "truncated.svs").write_bytes(data[: len(data) // 3])


def photo(folder: Path, cohort: Path) -> None:
    cv2.imwrite(str(folder / "photo.jpg"), np.random.default_rng(0).integers(0, 255, (600, 800, 3), np.uint8))


def gray16_tiff(folder: Path, cohort: Path) -> None:
    import tifffile

    tifffile.imwrite(folder / "gray16.tif", np.random.default_rng(0).integers(0, 65535, (600, 800), np.uint16))


def empty_folder(folder: Path, cohort: Path) -> None:
    (folder / "empty").mkdir()


def same_id_twice(folder: Path, cohort: Path) -> None:
    for sub in ("a", "b"):
        (folder / sub).mkdir()
        shutil.copy(cohort / "slides" / "demo_00.svs", folder / sub / "demo_00.svs")


def slide_csv(text: str) -> Callable[[Path, Path], None]:
    def make(folder: Path, cohort: Path) -> None:
        (folder / "slides.csv").write_text(text.format(slide=cohort / "slides" / "demo_00.svs"))
    return make


def wrong_architecture(folder: Path, cohort: Path) -> None:
    torch.save(torch.nn.Linear(3, 4).state_dict(), folder / "linear.pt")


def train_config(labels: list[str] | None = None, features: Callable[[Path, Path], Path] | None = None,
                 text: str | None = None, **changes: Any) -> Callable[[Path, Path], None]:
    """`{in}/cfg.yaml`: the finished run's config (a new run name) with `changes` per section, its own labels
    CSV (`labels`: its lines) or features (`features(folder, cohort)` returns the folder), or `text` as the
    whole file."""
    def make(folder: Path, cohort: Path) -> None:
        cfg = yaml.safe_load((cohort.parent / "finished" / "cfg.yaml").read_text())
        cfg.update(name=folder.name, out=str(cohort.parent / "finished" / "ws"))  # a run of its own
        cfg["data"]["features"] = str(cohort.parent / "finished" / FEATURES)
        if labels is not None:
            (folder / "labels.csv").write_text("\n".join(labels) + "\n")
            cfg["data"]["labels"] = str(folder / "labels.csv")
        if features is not None:
            cfg["data"]["features"] = str(features(folder, cohort))
        for key, value in changes.items():
            cfg[key] = {**cfg[key], **value} if isinstance(cfg.get(key), dict) else value
        (folder / "cfg.yaml").write_text(text if text is not None else yaml.safe_dump(cfg))
    return make


def cohort_labels(n: int = 10) -> list[str]:
    """The labels CSV of the first `n` cohort slides."""
    return ["slide_id,label", *(f"demo_{i:02d},{('normal', 'tumour')[i % 2]}" for i in range(n))]


def h5_features(dims: Callable[[int], int] = lambda i: 8, rows: Callable[[int], int] = lambda i: 6,
                poison: float | None = None) -> Callable[[Path, Path], Path]:
    """A feature folder made by another tool: `h5_files/demo_<i>.h5` for the 10 cohort slides."""
    def make(folder: Path, cohort: Path) -> Path:
        (folder / "feats" / "h5_files").mkdir(parents=True)
        rng = np.random.default_rng(0)
        for i in range(10):
            features = rng.normal(size=(rows(i), dims(i))).astype(np.float32)
            if poison is not None and i == 3:
                features[1, 2] = poison
            with h5py.File(folder / "feats" / "h5_files" / f"demo_{i:02d}.h5", "w") as f:
                f["features"], f["coords"] = features, np.zeros((rows(i), 2), np.int64)
        return folder / "feats"
    return make


def torn_partial_store(folder: Path, cohort: Path) -> None:
    """demo_05's features gone and its partial store holding an empty `wsip.json`, as a full disk left it."""
    features = FeatureSet(cohort.parent / "finished" / FEATURES)
    for path in (features.h5("demo_05"), features.pt("demo_05")):
        path.unlink(missing_ok=True)
    features.partial("demo_05").mkdir(parents=True, exist_ok=True)
    (features.partial("demo_05") / "wsip.json").write_text("")


def unfinished_run(folder: Path, cohort: Path) -> None:
    Layout(cohort.parent / "finished" / "ws").run("unfinished").fold(0).dir.mkdir(parents=True, exist_ok=True)


def renamed_slide(name: bytes) -> Callable[[Path, Path], None]:
    """A copy of a cohort slide under the file name `name` (raw bytes: it need not be UTF-8), in `{in}/odd/`."""
    def make(folder: Path, cohort: Path) -> None:
        (folder / "odd").mkdir()
        shutil.copy(cohort / "slides" / "demo_00.svs", os.path.join(bytes(folder / "odd"), name))
    return make


def hostile_features(folder: Path, cohort: Path) -> Path:
    """The audit's features folder (no params.json) with `h5_files/<id>.h5` for the cohort, plus the target
    `{in}/elsewhere/evil.h5` that a `../` slide id would reach from it."""
    feats = h5_features()(folder, cohort)
    (folder / "elsewhere").mkdir()
    shutil.copy(feats / "h5_files" / "demo_00.h5", folder / "elsewhere" / "evil.h5")
    return feats


def huge_declared_h5(folder: Path, cohort: Path) -> Path:
    """demo_00.h5 declaring (2^34, 512) float32 features (32 TiB) in a file of a few KB."""
    feats = h5_features()(folder, cohort)
    with h5py.File(feats / "h5_files" / "demo_00.h5", "w") as f:
        f.create_dataset("features", shape=(2**34, 512), dtype="f4", chunks=(1024, 512))
        f.create_dataset("coords", shape=(2**34, 2), dtype="i8", chunks=(1024, 2))
    return feats


def pickled_run(folder: Path, cohort: Path) -> None:
    """A copy of run `r` in `{in}/run_p` whose fold 0 `best.pt` is a pickle that would run code."""
    shutil.copytree(cohort.parent / "finished" / "ws" / "runs" / "r", folder / "run_p")
    for best in (folder / "run_p").glob("fold_*/best.pt"):
        best.write_bytes(pickle.dumps(Exploit()))


class Exploit:
    def __reduce__(self) -> tuple:
        return (os.system, ("touch exploited",))


def out_is_a_file(folder: Path, cohort: Path) -> None:
    (folder / "afile").write_text("not a folder\n")
    train_config(out=str(folder / "afile"))(folder, cohort)


# ------------------------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Case:
    name: str
    args: tuple[str, ...]
    code: int  # 2: refused, one line; 1: the named slide failed, the others are kept; 0: recovered
    says: tuple[str, ...]  # in the message: the file or option, and the fix
    make: Callable[[Path, Path], Any] | None = None
    read_only: bool = False  # the finished workspace is read-only during the run
    remakes: str = "-"  # outputs a recovering run may add back (a part of their paths); nothing by default


PATCH = ("patch", "--out", "{ws}", "--quiet")
EXTRACT = ("extract", "--weights", "random", "--workers", "0", "--out", "{ws}", "--quiet")
TRAIN = ("train", "--cfg", "{in}/cfg.yaml", "--quiet")
PREDICT = ("predict", "{slide}", "--run", "r", "--out", "{ws}")
CASES = [
    # slides
    Case("empty slide file", (*PATCH, "{in}/empty.svs"), 1, ("empty.svs", "cannot open", "complete"),
         write("empty.svs", b"")),
    Case("random bytes slide", (*PATCH, "{in}/noise.svs"), 1, ("noise.svs", "cannot open", "complete"),
         write("noise.svs", np.random.default_rng(1).bytes(50_000))),
    Case("truncated slide", (*PATCH, "{in}/truncated.svs"), 1, ("truncated.svs", "cannot open", "truncated"),
         truncated_slide),
    Case("a photo (no MPP)", (*PATCH, "{in}/photo.jpg"), 1, ("photo.jpg", "microns-per-pixel", "--mpp"), photo),
    Case("16-bit grayscale TIFF", (*PATCH, "{in}/gray16.tif"), 1, ("gray16.tif", "microns-per-pixel", "--mpp"),
         gray16_tiff),
    Case("empty folder", (*PATCH, "{in}/empty"), 2, ("no slides found", "{in}/empty"), empty_folder),
    Case("missing slide path", (*PATCH, "{in}/nowhere.svs"), 2, ("{in}/nowhere.svs", "check the path")),
    Case("slide CSV without slide_path", (*PATCH, "{in}/slides.csv"), 2, ("slides.csv", "`slide_path` column"),
         slide_csv("path,mpp\n{slide},0.5\n")),
    Case("slide CSV mpp abc", (*PATCH, "{in}/slides.csv"), 2, ("slides.csv:2", "'abc'", "e.g. 0.25"),
         slide_csv("slide_path,mpp\n{slide},abc\n")),
    Case("slide CSV mpp -1", (*PATCH, "{in}/slides.csv"), 2, ("slides.csv:2", "'-1'", "e.g. 0.25"),
         slide_csv("slide_path,mpp\n{slide},-1\n")),
    Case("slide CSV mpp 0", (*PATCH, "{in}/slides.csv"), 2, ("slides.csv:2", "'0'", "e.g. 0.25"),
         slide_csv("slide_path,mpp\n{slide},0\n")),
    Case("duplicate slide ids", (*PATCH, "{in}/a", "{in}/b"), 2, ("demo_00", "{in}/a/demo_00.svs", "rename one"),
         same_id_twice),
    # patch options
    Case("--mag 0", (*PATCH, "{slide}", "--mag", "0"), 2, ("--mag", "positive", "e.g. 20")),
    Case("--mag -5", (*PATCH, "{slide}", "--mag", "-5"), 2, ("--mag", "positive", "e.g. 20")),
    Case("more magnification than scanned", (*PATCH, "{slide}", "--mag", "80"), 1,
         ("demo_00.svs", "80x", "lower --mag or pass --allow-upsample")),
    Case("--patch-size 0", (*PATCH, "{slide}", "--patch-size", "0"), 2, ("--patch-size", "at least 1")),
    Case("--overlap = patch size", (*PATCH, "{slide}", "--overlap", "256"), 2, ("--overlap", "[0, patch size 256)")),
    Case("--shard 3/2", (*PATCH, "{slide}", "--shard", "3/2"), 2, ("--shard", "0 <= i < N")),
    Case("--shard x", (*PATCH, "{slide}", "--shard", "x"), 2, ("--shard", "i/N", "e.g. 0/4")),
    Case("--min-tissue 2", (*PATCH, "{slide}", "--min-tissue", "2"), 2, ("--min-tissue", "[0, 1]")),
    Case("--tissue unknown", (*PATCH, "{slide}", "--tissue", "dark"), 2, ("--tissue dark", "choose auto")),
    Case("--masks missing folder", (*PATCH, "{slide}", "--masks", "{in}/masks"), 2, ("--masks", "no such folder")),
    # extract
    Case("extract with no patches", ("extract", "--weights", "random", "--out", "{in}/empty_ws"), 2,
         ("{in}/empty_ws/patches", "run `wsip patch")),
    Case("unknown encoder", (*EXTRACT, "--encoder", "resnet19"), 2, ("resnet19", "resnet18")),
    Case("unknown timm: encoder", (*EXTRACT, "--encoder", "timm:nonexistent_net"), 2, ("nonexistent_net",)),
    Case("weights file missing", (*EXTRACT, "--weights", "{in}/nowhere.pt"), 2, ("{in}/nowhere.pt", "not found")),
    Case("weights a text file", (*EXTRACT, "--weights", "{in}/weights.txt"), 2, ("{in}/weights.txt", "state dict"),
         write("weights.txt", "these are not weights\n")),
    Case("weights of another architecture", (*EXTRACT, "--weights", "{in}/linear.pt"), 2,
         ("{in}/linear.pt", "do not fit", "weights of encoder resnet18"), wrong_architecture),
    Case("--batch-size 0 --force", (*EXTRACT, "--batch-size", "0", "--force"), 2, ("--batch-size", "at least 1")),
    Case("--precision fp8", (*EXTRACT, "--precision", "fp8"), 2, ("--precision", "choose auto")),
    Case("--format npy", (*EXTRACT, "--format", "npy"), 2, ("--format npy", "choose h5")),
    Case("--patches unknown config", (*EXTRACT, "--patches", "40x_nothing"), 2, ("40x_nothing", "--patches")),
    Case("--precision fp32 after auto on a CPU", (*EXTRACT, "--precision", "fp32"), 0, ("10 cached",)),
    Case("a partial store with an empty wsip.json", EXTRACT, 0, ("demo_05: done", "9 cached"), torn_partial_store,
         remakes="/demo_05."),
    # train
    Case("train config missing", ("train", "--cfg", "{in}/nowhere.yaml"), 2, ("{in}/nowhere.yaml", "--cfg")),
    Case("train YAML syntax error", TRAIN, 2, ("cfg.yaml", "malformed YAML", "fix the syntax"),
         train_config(text="name: [unclosed\n")),
    Case("train unknown key", TRAIN, 2, ("cfg.yaml", "unknown key 'optim.lrr'", "allowed here"),
         train_config(optim={"lrr": 0.1})),
    Case("unknown model", TRAIN, 2, ("cfg.yaml", "model.name", "available"), train_config(model={"name": "gmamba"})),
    Case("unknown model option", TRAIN, 2, ("cfg.yaml", "mask_ratio", "fix the keys under `model:`"),
         train_config(model={"name": "abmil", "mask_ratio": 0.2})),
    Case("unknown model preset", TRAIN, 2, ("cfg.yaml", "preset 'paper'", "released, recommended"),
         train_config(model={"name": "2dmamba", "preset": "paper"})),
    Case("labels CSV without label column", TRAIN, 2, ("labels.csv", "missing column", "label"),
         train_config(labels=["slide_id,class", "demo_00,normal"])),
    Case("labels name a slide without features", TRAIN, 2, ("labels.csv", "ghost", "run `wsip extract`"),
         train_config(labels=[*cohort_labels(), "ghost,tumour"])),
    Case("label not in data.classes", TRAIN, 2, ("labels.csv", "label(s) other", "add them to data.classes"),
         train_config(labels=[*cohort_labels(9), "demo_09,other"], data={"classes": ["normal", "tumour"]})),
    Case("one class only (two declared)", TRAIN, 2, ("labels.csv", "two or more classes"),
         train_config(labels=[line.replace("tumour", "normal") for line in cohort_labels()],
                      data={"classes": ["normal", "tumour"]})),
    Case("fewer patients than folds", TRAIN, 2, ("cfg.yaml", "splits.folds"), train_config(splits={"folds": 20})),
    Case("mixed feature dims", TRAIN, 2, ("demo_01.h5", "feature dim 16", "same encoder"),
         train_config(features=h5_features(dims=lambda i: 8 + 8 * (i % 2)))),
    Case("h5 with 0 rows", TRAIN, 2, ("demo_00.h5", "N>0", "re-run `wsip extract`"),
         train_config(features=h5_features(rows=lambda i: 0 if i == 0 else 6))),
    Case("NaN features", TRAIN, 2, ("demo_03.h5", "NaN/inf", "wsip extract --force"),
         train_config(features=h5_features(poison=float("nan")))),
    Case("inf features", TRAIN, 2, ("demo_03.h5", "NaN/inf", "wsip extract --force"),
         train_config(features=h5_features(poison=float("inf")))),
    Case("features folder without h5_files", TRAIN, 2, ("{in}", "no h5_files/ folder"),
         train_config(data={"features": "."})),
    Case("diverging training (lr 1e30)", TRAIN, 2, ("fold_0", "loss on slide demo_", "lower optim.lr"),
         train_config(optim={"lr": 1e30})),
    # predict
    Case("predict with a missing run", (*PREDICT[:3], "nope", *PREDICT[4:]), 2, ("--run nope", "wsip train")),
    Case("predict with an unfinished run", (*PREDICT[:3], "unfinished", *PREDICT[4:]), 2,
         ("runs/unfinished", "incomplete run", "finish `wsip train`"), unfinished_run),
    Case("predict a fold that was not trained", (*PREDICT, "--fold", "7"), 2, ("fold_7/best.pt", "--fold")),
    Case("predict a slide without MPP", ("predict", "{in}/photo.jpg", "--run", "r", "--out", "{ws}"), 1,
         ("photo.jpg", "microns-per-pixel", "--mpp"), photo),
    Case("predict --annotations missing folder", (*PREDICT, "--annotations", "{in}/regions"), 2,
         ("--annotations", "no such folder")),
    # names that would leave the workspace or cannot name a file (docs/reliability.md, "Names")
    Case("labels slide_id ../../elsewhere/evil", TRAIN, 2, ("labels.csv:11", "path separator"),
         train_config(labels=[*cohort_labels(9), "../../elsewhere/evil,tumour"], features=hostile_features,
                      model={"name": "gmmamba"})),
    Case("labels slide_id /elsewhere/evil2", TRAIN, 2, ("labels.csv:11", "path separator"),
         train_config(labels=[*cohort_labels(9), "/elsewhere/evil2,tumour"], features=hostile_features,
                      model={"name": "gmmamba"})),
    Case("labels slide_id ..", TRAIN, 2, ("labels.csv:11", "starts with '.'"),
         train_config(labels=[*cohort_labels(9), "..,tumour"])),
    Case("view ../../../../x/victim", ("view", "../../../../x/victim", "--run", "r", "--out", "{ws}"), 2,
         ("../../../../x/victim", "path separator")),
    Case("view --run ../x", ("view", "demo_00", "--run", "../x", "--out", "{ws}"), 2, ("run name", "../x")),
    Case("slide file name not UTF-8", (*PATCH, "{in}/odd"), 1, ("caf\\xe9", "not valid UTF-8", "rename the file"),
         renamed_slide(b"caf\xe9.svs")),
    Case("250-character slide name", (*PATCH, "{in}/odd"), 1, ("250 bytes long", "shorten the name"),
         renamed_slide(b"s" * 250 + b".svs")),
    Case("slide name with a newline", (*PATCH, "{in}/odd"), 1, ("control character", "rename the file"),
         renamed_slide(b"a\nb.svs")),
    Case("hidden slide name", (*PATCH, "{in}/odd"), 1, ("starts with '.'", "rename the file"),
         renamed_slide(b".hidden.svs")),
    # numbers checked before any work; finished outputs kept
    Case("--mpp 0", (*PATCH, "{slide}", "--mpp", "0"), 2, ("--mpp 0.0", "plausible", "e.g. 0.25")),
    Case("--mpp nan", (*PATCH, "{slide}", "--mpp", "nan"), 2, ("--mpp nan", "plausible")),
    Case("--mpp -1", (*PATCH, "{slide}", "--mpp", "-1"), 2, ("--mpp -1.0", "plausible")),
    Case("--mpp-override inf", (*PATCH, "{slide}", "--mpp-override", "inf"), 2, ("--mpp-override inf", "plausible")),
    Case("predict --mpp 0", (*PREDICT, "--mpp", "0"), 2, ("--mpp 0.0", "plausible")),
    Case("--mpp 0.25 on slides that record their MPP", (*PATCH, "{slides}", "--mpp", "0.25"), 0, ("10 cached",)),
    Case("--mag inf", (*PATCH, "{slide}", "--mag", "inf"), 2, ("--mag", "positive", "got inf")),
    Case("--mag nan", (*PATCH, "{slide}", "--mag", "nan"), 2, ("--mag", "positive", "got nan")),
    Case("--patch-size 10^9", (*PATCH, "{slide}", "--patch-size", "1000000000"), 2, ("--patch-size", "at most")),
    Case("--min-tissue nan", (*PATCH, "{slide}", "--min-tissue", "nan"), 2, ("--min-tissue", "[0, 1]")),
    Case("patch --workers 0", (*PATCH, "{slide}", "--workers", "0"), 2, ("--workers", "at least 1")),
    Case("train lr .inf", TRAIN, 2, ("cfg.yaml", "optim.lr", "finite"), train_config(optim={"lr": float("inf")})),
    Case("train epochs nan", TRAIN, 2, ("cfg.yaml", "optim.epochs"), train_config(optim={"epochs": float("nan")})),
    # readers
    Case("labels CSV with a BOM (Excel CSV UTF-8)", TRAIN, 0, ("mean ± std",),
         train_config(labels=["\ufeffslide_id,label", *cohort_labels()[1:]])),
    Case("labels CSV not UTF-8", TRAIN, 2, ("labels.csv: line 3", "not UTF-8", "save the CSV as UTF-8"),
         lambda folder, cohort: (train_config(labels=cohort_labels())(folder, cohort),
                                 (folder / "labels.csv").write_bytes(b"slide_id,label\ndemo_00,normal\n"
                                                                     b"demo_01,tum\xf6ur\n"))),
    Case("labels differing only in case", TRAIN, 2, ("labels.csv", "'Tumour' / 'tumour'", "differ only in case"),
         train_config(labels=[*cohort_labels(9), "demo_09,Tumour"])),
    Case("slide CSV with a BOM", (*PATCH, "{in}/slides.csv"), 0, ("1 cached",),
         slide_csv("\ufeffslide_path,mpp\n{slide},\n")),
    Case("slide CSV not UTF-8", (*PATCH, "{in}/slides.csv"), 2, ("slides.csv: line 2", "not UTF-8"),
         write("slides.csv", b"slide_path,mpp\n/x/caf\xe9.svs,\n")),
    Case("config not UTF-8", TRAIN, 2, ("cfg.yaml", "not a UTF-8 text YAML"),
         lambda folder, cohort: (folder / "cfg.yaml").write_bytes(b"name: caf\xe9\n")),
    Case("config out: a file", TRAIN, 2, ("cfg.yaml", "afile is a file", "point `out:` at a workspace folder"),
         out_is_a_file),
    Case("patch --out a file", ("patch", "{slide}", "--out", "{in}/afile", "--quiet"), 2,
         ("{in}/afile", "is a file", "pass a folder"), write("afile", "x\n")),
    Case("features h5 declaring 32 TiB", TRAIN, 2, ("demo_00.h5", "declares shape (17179869184, 512)", "damaged"),
         train_config(features=huge_declared_h5)),
    Case("pickle payload as best.pt", ("predict", "{slide}", "--run", "{in}/run_p", "--out", "{ws}"), 2,
         ("best.pt", "not a wsip checkpoint", "retrain this fold"), pickled_run),
    # a read-only workspace that must be written
    Case("read-only workspace: a new patch config", (*PATCH, "{slides}", "--mag", "10"), 2,
         ("{ws}", "read-only", "--out to a writable folder"), read_only=True),
    Case("read-only workspace: extract --force", (*EXTRACT, "--force"), 2,
         ("{ws}", "read-only", "--out to a writable folder"), read_only=True),
    Case("read-only workspace: a new training run", TRAIN, 2, ("{ws}", "read-only", "--out to a writable folder"),
         train_config(), read_only=True),
    Case("read-only workspace: predict a new slide", (*PREDICT[:1], "{slides}/demo_02.svs", *PREDICT[2:]), 2,
         ("{ws}", "read-only", "--out to a writable folder"), read_only=True),
]


# ------------------------------------------------------------------------------------------- the check


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A cohort and its finished workspace (`finished/ws`: patched, extracted, an ABMIL run `r`)."""
    root = tmp_path_factory.mktemp("catalogue")
    make_cohort(root / "cohort", root / "finished")
    ws = root / "finished" / "ws"
    patch(resolve_inputs([root / "cohort" / "slides"]), out=ws)
    extract(ExtractParams(weights="random", workers=0), out=ws)
    train(TrainParams(root / "finished" / "cfg.yaml"))
    return root


def finished_outputs(ws: Path) -> dict[str, str]:
    """Every folder, and every file's sha256 but locks and partial feature stores (resume points, not outputs);
    manifests count row by row, timings aside: a failed row added for a bad slide is new, a finished slide's
    row stays as it was."""
    partials = {p for s in Layout(ws).feature_sets() for p in (s.partial_dir, *s.partial_dir.rglob("*"))}
    state = {f"{p.relative_to(ws)}/": "folder" for p in ws.rglob("*") if p.is_dir() and p not in partials}
    for path in workspace_files(ws):
        rel = str(path.relative_to(ws))
        if path.name == MANIFEST:
            for row in read_manifest(path):
                state[f"{rel}:{row['slide_id']}"] = str({k: v for k, v in row.items() if k not in TIMING_COLUMNS})
        elif path.suffix != ".lock" and path not in partials:
            state[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return state


def test_the_catalogue_has_every_case_once():
    assert len(CASES) >= 35 and len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_bad_input(case, finished, wsip, tmp_path):
    if case.read_only and not can_make_read_only():
        pytest.skip("root without mount namespaces: nothing makes a folder read-only for root")
    ws = finished / "finished" / "ws"
    fill = {"{ws}": str(ws), "{in}": str(tmp_path), "{slides}": str(finished / "cohort" / "slides"),
            "{slide}": str(finished / "cohort" / "slides" / "demo_00.svs")}

    def filled(text: str) -> str:
        for key, value in fill.items():
            text = text.replace(key, value)
        return text

    if case.make is not None:
        case.make(tmp_path, finished / "cohort")
    before = finished_outputs(ws)
    if case.read_only:
        with read_only_workspace(wsip, ws):
            proc = wsip([filled(a) for a in case.args], tmp_path, COLUMNS="1000")
    else:
        proc = wsip([filled(a) for a in case.args], tmp_path, COLUMNS="1000")
    output = proc.stdout + proc.stderr
    assert proc.returncode == case.code and "Traceback" not in output, output
    if case.code == 2:
        lines = [line for line in output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:"), output
    for words in map(filled, case.says):
        assert words in output, f"{words!r} not in: {output}"
    after = finished_outputs(ws)
    assert {k: after.get(k) for k in before} == before, "finished outputs changed"
    if case.code != 1:  # and nothing new, but the row's own training run or what it remakes
        new = [k for k in set(after) - set(before) if not k.startswith(f"runs/{tmp_path.name}/")]
        assert all(case.remakes in k for k in new), new
    if case.code == 1:  # the failure is recorded, in its slide's manifest row
        rows = [r for m in ws.rglob(MANIFEST) for r in csv.DictReader(m.open()) if r["status"] != "done"]
        assert any(all(filled(w) in r["error"] for w in case.says[1:]) for r in rows), rows


# ------------------------------------------------------------------------- the audit's failures, replayed


def tree_state(folder: Path) -> dict[str, str]:
    """Every folder and file under `folder`, files by content: what must not change outside a workspace."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
            for p in folder.rglob("*")}


def test_two_predicts_of_one_slide_both_succeed_alike(finished, wsip, tmp_path):
    """Two `wsip predict` of the same new slide with the same run at once: one patches and encodes it under
    the shared per-slide locks of `predictions/_slides/`, the other waits and reuses: both exit 0, alike."""
    ws = finished / "finished" / "ws"
    holdout = next((finished / "cohort").rglob("holdout.svs"))
    runs = []
    for i in range(2):
        (tmp_path / str(i)).mkdir()
        runs.append(wsip.start(["predict", str(holdout), "--run", "r", "--out", str(ws)], tmp_path / str(i),
                               COLUMNS="1000"))
    procs = [r.wait() for r in runs]
    for proc in procs:
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    rows = [[line for line in p.stderr.splitlines() if line.lstrip("│ ").startswith("holdout ")] for p in procs]
    assert rows[0] and rows[0] == rows[1], procs
    record = json.loads(Layout(ws).predictions("r").record("holdout").read_text())
    assert record["slide_id"] == "holdout" and abs(sum(record["probabilities"].values()) - 1) < 1e-5


def test_view_of_a_hostile_slide_id_touches_nothing_outside(finished, wsip, tmp_path):
    """The audit's `wsip view "../../../../x/victim" --run r`, with `x/victim/` beside the workspace: refused
    in one line, and the folder outside is left as it was."""
    sandbox = tmp_path / "sandbox"
    shutil.copytree(finished / "finished" / "ws", sandbox / "a" / "ws", symlinks=True)
    (sandbox / "a" / "x" / "victim").mkdir(parents=True)
    (sandbox / "a" / "x" / "victim" / "data.txt").write_text("precious\n")
    ws = sandbox / "a" / "ws"
    hostile = "../../../../x/victim"  # predictions/r/viewer/<id> → a/x/victim
    assert (ws / "predictions" / "r" / "viewer" / hostile).resolve() == (sandbox / "a" / "x" / "victim").resolve()
    outside = {k: v for k, v in tree_state(sandbox).items() if not k.startswith("a/ws")}
    proc = wsip(["view", hostile, "--run", "r", "--out", str(ws)], tmp_path)
    assert proc.returncode == 2 and "path separator" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert {k: v for k, v in tree_state(sandbox).items() if not k.startswith("a/ws")} == outside


def test_train_with_hostile_slide_ids_reads_and_writes_nothing_outside(finished, wsip, tmp_path):
    """The audit's labels CSV naming `../../elsewhere/evil` beside a features folder without params.json, model
    gmmamba (whose group cache wrote `evil.npz` outside): refused in one line; `elsewhere/` as it was."""
    train_config(labels=[*cohort_labels(9), "../../elsewhere/evil,tumour"], features=hostile_features,
                 model={"name": "gmmamba"})(tmp_path, finished / "cohort")
    before = tree_state(tmp_path / "elsewhere")
    proc = wsip(["train", "--cfg", str(tmp_path / "cfg.yaml"), "--quiet"], tmp_path)
    assert proc.returncode == 2 and "path separator" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert tree_state(tmp_path / "elsewhere") == before
