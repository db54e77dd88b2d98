"""Patient-level splits (docs/gmmamba.md §9): k-fold or Monte-Carlo, or a user's own splits file.

Splitting is by patient, never by slide, so two slides of one patient can never sit on both sides of a
test boundary. As in GMMamba's split script: each patient takes the label of its first slide (file
order); `StratifiedKFold(folds, shuffle=True, random_state=seed)` picks each fold's test patients and
`StratifiedShuffleSplit(n_splits=1, test_size=val_fraction, random_state=seed)` picks val among the rest;
patients map back to all their slides. Monte-Carlo splits (the paper's BRCA / lung protocol: five random
65:10:25 splits) are `repeats` independent stratified train/val/test draws, see
:func:`make_monte_carlo_splits`. The on-disk format is `fold,split,slide_id` (split: train|val|test); for
Monte-Carlo splits "fold" is the repeat index.
"""

from __future__ import annotations

import csv
import logging
import math
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedKFold, StratifiedShuffleSplit

from wsi_pipeline.errors import ConfigError, name_some
from wsi_pipeline.workspace.csv_text import decoded_lines
from wsi_pipeline.workspace.files import atomic_write

PARTS = ("train", "val", "test")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SplitRow:
    fold: int
    split: str  # train | val | test
    slide_id: str


@dataclass(frozen=True)
class Splits:
    rows: tuple[SplitRow, ...]

    @property
    def folds(self) -> list[int]:
        return sorted({r.fold for r in self.rows})

    def ids(self, fold: int, split: str) -> list[str]:
        return [r.slide_id for r in self.rows if r.fold == fold and r.split == split]


def make_splits(
    slides: Sequence[tuple[str, str, str]],
    *,
    folds: int,
    val_fraction: float,
    seed: int,
    source: str = "splits",
) -> Splits:
    """Split (slide_id, label, case_id) triples into `folds` patient-level train/val/test folds.

    `source` (the config file) prefixes error messages.
    """
    slides_of, labels = _patients(slides)
    _check_enough_patients(labels, folds=folds, source=source)

    rows: list[SplitRow] = []
    outer = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for fold, (rest, test) in enumerate(outer.split(np.zeros(len(labels)), labels)):
        inner = StratifiedShuffleSplit(n_splits=1, test_size=val_fraction, random_state=seed)
        try:
            train_pos, val_pos = next(inner.split(np.zeros(len(rest)), labels[rest]))
        except ValueError as e:  # too few patients for a val set holding every class
            raise ConfigError(
                f"{source}: splits fold {fold}: {e} (adjust splits.val_fraction or splits.folds)"
            ) from None
        rows += _rows(fold, {"train": rest[train_pos], "val": rest[val_pos], "test": test}, slides_of)
    return Splits(tuple(rows))


def make_monte_carlo_splits(
    slides: Sequence[tuple[str, str, str]],
    *,
    fractions: tuple[float, float, float],
    repeats: int,
    seed: int,
    source: str = "splits",
) -> Splits:
    """`repeats` independent patient-level, stratified train/val/test splits; "fold" k is repeat k.

    `fractions` (train, val, test) of the patients become patient counts by largest-remainder rounding, so
    each partition is within one patient of its request and the three add up to the cohort. Per repeat,
    `StratifiedShuffleSplit` draws the test patients (one generator, `random_state=seed`, across repeats)
    and a second one (`random_state=seed`) draws val among the rest, both with those exact counts, so each
    class keeps its share to within a patient. Every val and test set must hold every class (else AUC is
    undefined): a cohort too small for that is a ConfigError naming the fix.
    """
    slides_of, labels = _patients(slides)
    n_train, n_val, n_test = counts = patient_counts(len(labels), fractions)
    if min(counts) == 0:
        raise ConfigError(f"{source}: splits train/val/test {fractions} of {len(labels)} patients gives "
                          f"{n_train}/{n_val}/{n_test} patients; every partition needs one (raise the small "
                          "fraction or add data)")
    outer = StratifiedShuffleSplit(n_splits=repeats, test_size=n_test, train_size=n_train + n_val, random_state=seed)
    inner = StratifiedShuffleSplit(n_splits=1, test_size=n_val, train_size=n_train, random_state=seed)
    rows: list[SplitRow] = []
    draws = _stratified_draws(outer, labels, source=source)
    for repeat, (rest, test) in enumerate(draws):
        ((train_pos, val_pos),) = _stratified_draws(inner, labels[rest], source=source)
        parts = {"train": rest[train_pos], "val": rest[val_pos], "test": test}
        _check_every_class(parts, labels, repeat=repeat, source=source)
        rows += _rows(repeat, parts, slides_of)
    return Splits(tuple(rows))


def patient_counts(n: int, fractions: Sequence[float]) -> list[int]:
    """`fractions` (summing to 1) of `n` patients as whole counts summing to `n`, each within one of its
    exact share: floors first, then the leftover patients to the largest remainders."""
    exact = [f * n for f in fractions]
    counts = [math.floor(x + 1e-9) for x in exact]  # 1e-9: 0.29 * 100 is 28.999999999999996
    by_remainder = sorted(range(len(exact)), key=lambda i: counts[i] - exact[i])
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    return counts


def read_splits(path: Path, *, known: Mapping[str, str]) -> Splits:
    """A user's `fold,split,slide_id` CSV, checked against the cohort (`known`: slide_id -> case_id).

    Slides of the cohort that a fold does not list simply do not take part in that fold (official
    splits often leave some out). A patient split across partitions is allowed (the user decided) but
    logged as a warning.
    """
    splits = parse_splits_csv(path)
    unknown = sorted({r.slide_id for r in splits.rows} - set(known))
    if unknown:
        raise ConfigError(
            f"{path}: {len(unknown)} slide(s) not in the labels CSV: {name_some(unknown)} "
            "(fix the splits file or the labels CSV)"
        )
    validate_splits(splits, source=path)
    _warn_patient_leaks(splits, known)
    return splits


def parse_splits_csv(path: Path) -> Splits:
    """The rows of a `fold,split,slide_id` CSV, format-checked only."""
    if not path.is_file():
        raise ConfigError(f"{path}: splits file not found (fix splits.file)")
    reader = csv.DictReader(decoded_lines(path))
    reader.fieldnames = [c.strip() for c in reader.fieldnames or []]
    if not {"fold", "split", "slide_id"} <= set(reader.fieldnames):
        raise ConfigError(f"{path}: needs columns fold,split,slide_id (found: {', '.join(reader.fieldnames)})")
    return Splits(
        tuple(
            _parse_row(path, reader.line_num, *((r.get(k) or "").strip() for k in ("fold", "split", "slide_id")))
            for r in reader
            if any(v.strip() for v in r.values() if isinstance(v, str))
        )
    )


def validate_splits(splits: Splits, *, source: Path | str) -> None:
    """Every fold has train, val and test slides, and no slide sits in two partitions of a fold."""
    if not splits.rows:
        raise ConfigError(f"{source}: no splits listed (add rows fold,split,slide_id)")
    for fold in splits.folds:
        seen = Counter(r.slide_id for r in splits.rows if r.fold == fold)
        twice = [sid for sid, n in seen.items() if n > 1]
        if twice:
            raise ConfigError(f"{source}: fold {fold} lists slide(s) in two splits: {name_some(twice)} (keep one)")
        empty = [part for part in PARTS if not splits.ids(fold, part)]
        if empty:
            raise ConfigError(f"{source}: fold {fold} has no {'/'.join(empty)} slides (every fold needs all three)")


def write_splits(splits: Splits, path: Path) -> None:
    with atomic_write(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["fold", "split", "slide_id"])
        writer.writerows((r.fold, r.split, r.slide_id) for r in splits.rows)


def _patients(slides: Sequence[tuple[str, str, str]]) -> tuple[dict[str, list[str]], np.ndarray]:
    """Each patient's slides, in first-appearance order (as the original script's groupby), and each
    patient's label: that of its first slide."""
    slides_of: dict[str, list[str]] = defaultdict(list)
    label_of: dict[str, str] = {}
    for slide_id, label, case_id in slides:
        slides_of[case_id].append(slide_id)
        label_of.setdefault(case_id, label)
    return dict(slides_of), np.array([label_of[p] for p in slides_of])


def _rows(fold: int, parts: Mapping[str, np.ndarray], slides_of: Mapping[str, list[str]]) -> list[SplitRow]:
    """Patient positions per partition -> rows for all their slides, in patient order."""
    patients = list(slides_of)
    return [
        SplitRow(fold, split, slide_id)
        for split, index in parts.items()
        for i in sorted(index)
        for slide_id in slides_of[patients[i]]
    ]


def _stratified_draws(
    splitter: StratifiedShuffleSplit, labels: np.ndarray, *, source: str
) -> list[tuple[np.ndarray, np.ndarray]]:
    try:
        return list(splitter.split(np.zeros(len(labels)), labels))
    except ValueError as e:  # e.g. a class with a single patient, or fewer val patients than classes
        raise ConfigError(f"{source}: Monte-Carlo splits: {e} (adjust splits.train/val/test or add data)") from None


def _check_every_class(parts: Mapping[str, np.ndarray], labels: np.ndarray, *, repeat: int, source: str) -> None:
    classes = set(labels.tolist())
    for split in ("val", "test"):
        missing = sorted(classes - set(labels[parts[split]].tolist()))
        if missing:
            raise ConfigError(
                f"{source}: Monte-Carlo repeat {repeat}: {split} has no patient of class(es) {missing} "
                f"({len(parts[split])} {split} patients; raise splits.{split} or add data)"
            )


def _check_enough_patients(labels: np.ndarray, *, folds: int, source: str) -> None:
    """StratifiedKFold only warns on tiny classes; a test fold without a class breaks AUC, so refuse."""
    scarce = {label: n for label, n in sorted(Counter(labels.tolist()).items()) if n < folds}
    if scarce:
        raise ConfigError(
            f"{source}: too few patients for {folds}-fold splits: class(es) {list(scarce)} have "
            f"{list(scarce.values())} patient(s) (need >= {folds} each; lower splits.folds or add data)"
        )


def _parse_row(path: Path, line: int, fold: str, split: str, slide_id: str) -> SplitRow:
    if split not in PARTS or not slide_id or not fold.lstrip("-").isdigit():
        raise ConfigError(
            f"{path}: line {line} ({fold},{split},{slide_id}) is not <int fold>,<train|val|test>,<slide_id>"
        )
    return SplitRow(int(fold), split, slide_id)


def _warn_patient_leaks(splits: Splits, case_of: Mapping[str, str]) -> None:
    for fold in splits.folds:
        parts_of: dict[str, set[str]] = defaultdict(set)
        for r in splits.rows:
            if r.fold == fold:
                parts_of[case_of[r.slide_id]].add(r.split)
        leaked = sorted(case for case, parts in parts_of.items() if len(parts) > 1)
        if leaked:
            log.warning("splits fold %d: patient(s) %s have slides in more than one split", fold, name_some(leaked))
