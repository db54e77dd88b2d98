"""Patient-level stratified k-fold with an inner val split, Monte-Carlo splits, and user splits files."""

from __future__ import annotations

from collections import Counter

import pytest

from wsi_pipeline.errors import ConfigError
from wsi_pipeline.stages.train.splits import make_monte_carlo_splits, make_splits, patient_counts, read_splits
from wsi_pipeline.workspace.run_store import PARTS, SplitRow, Splits, parse_splits_csv, write_splits


def cohort(n_patients: int = 30) -> list[tuple[str, str, str]]:
    """(slide_id, label, case_id); ~40% class B; every third patient has two slides."""
    slides = []
    for p in range(n_patients):
        label = "B" if p % 5 in (0, 3) else "A"
        n_slides = 2 if p % 3 == 0 else 1
        slides += [(f"TCGA-{p:02d}-{s}", label, f"TCGA-{p:02d}") for s in range(n_slides)]
    return slides


def split(slides=None, **kw) -> Splits:
    opts = {"folds": 5, "val_fraction": 0.2, "seed": 42} | kw
    return make_splits(slides or cohort(), **opts)


def test_patient_never_in_two_partitions_of_a_fold():
    slides = cohort()
    case_of = {sid: case for sid, _, case in slides}
    splits = split(slides)
    for fold in splits.folds:
        parts_of = {}
        for part in PARTS:
            for sid in splits.ids(fold, part):
                parts_of.setdefault(case_of[sid], set()).add(part)
        assert all(len(parts) == 1 for parts in parts_of.values())
        assert sum(len(splits.ids(fold, p)) for p in PARTS) == len(slides)  # every slide used once per fold


def test_every_slide_in_exactly_one_test_fold():
    slides = cohort()
    splits = split(slides)
    assert splits.folds == [0, 1, 2, 3, 4]
    tested = Counter(sid for fold in splits.folds for sid in splits.ids(fold, "test"))
    assert set(tested) == {sid for sid, _, _ in slides}
    assert set(tested.values()) == {1}


def test_stratified_by_patient_label():
    slides = cohort(50)
    label_of = {case: label for _, label, case in slides}
    case_of = {sid: case for sid, _, case in slides}
    splits = split(slides)
    for fold in splits.folds:
        for part in ("test", "val"):
            cases = {case_of[s] for s in splits.ids(fold, part)}
            counts = Counter(label_of[c] for c in cases)
            assert set(counts) == {"A", "B"}  # 30 A / 20 B patients: each test fold 6 A / 4 B
            if part == "test":
                assert counts == {"A": 6, "B": 4}


def test_val_fraction_of_remaining_patients():
    slides = cohort(50)
    case_of = {sid: case for sid, _, case in slides}
    splits = split(slides, val_fraction=0.25)
    for fold in splits.folds:
        patients = {part: {case_of[s] for s in splits.ids(fold, part)} for part in PARTS}
        assert [len(patients[part]) for part in PARTS] == [30, 10, 10]  # val = ceil(0.25 * 40)


def test_deterministic_from_seed():
    assert split(seed=7) == split(seed=7)
    assert split(seed=7) != split(seed=8)


def test_patient_takes_label_of_first_slide():
    slides = cohort(20) + [("late-0", "A", "PX"), ("late-1", "B", "PX")]  # PX has mixed labels -> A
    for _ in range(4):
        slides.append((f"b-{_}", "B", f"PB{_}"))
    splits = split(slides, folds=4)
    fold = next(f for f in splits.folds if "late-0" in splits.ids(f, "test"))
    assert "late-1" in splits.ids(fold, "test")


def test_too_few_patients_is_a_clear_error():
    slides = [(f"s{i}", "A", f"p{i}") for i in range(10)] + [("b0", "B", "q0"), ("b1", "B", "q0")]
    with pytest.raises(ConfigError, match=r"too few patients for 5-fold splits: class\(es\) \['B'\] have \[1\]"):
        make_splits(slides, folds=5, val_fraction=0.2, seed=42, source="cfg.yaml")


def test_val_too_small_is_a_clear_error():
    slides = [(f"s{i}", "AB"[i % 2], f"p{i}") for i in range(10)]
    with pytest.raises(ConfigError, match=r"cfg.yaml: splits fold 0: .*splits.val_fraction"):
        make_splits(slides, folds=5, val_fraction=0.05, seed=42, source="cfg.yaml")


def test_write_then_read_round_trip(tmp_path):
    slides = cohort()
    splits = split(slides)
    write_splits(splits, tmp_path / "splits.csv")
    assert parse_splits_csv(tmp_path / "splits.csv") == splits
    known = {sid: case for sid, _, case in slides}
    assert read_splits(tmp_path / "splits.csv", known=known) == splits


def test_user_splits_file_honoured(tmp_path):
    path = tmp_path / "official.csv"
    path.write_text("fold,split,slide_id\n0,train,a\n0,train,b\n0,val,c\n0,test,d\n\n")
    splits = read_splits(path, known={s: s for s in "abcde"})
    assert splits.rows == (SplitRow(0, "train", "a"), SplitRow(0, "train", "b"), SplitRow(0, "val", "c"),
                           SplitRow(0, "test", "d"))  # fmt: skip
    assert splits.ids(0, "test") == ["d"]  # 'e' is simply not part of this fold


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("0,train,a\n0,val,b\n0,test,zz\n", r"official.csv: 1 slide\(s\) not in the labels CSV: zz"),
        ("0,train,a\n0,val,b\n0,test,a\n", r"official.csv: fold 0 lists slide\(s\) in two splits: a"),
        ("0,train,a\n0,test,b\n", r"official.csv: fold 0 has no val slides"),
        ("0,training,a\n", r"official.csv: line 2 \(0,training,a\) is not <int fold>,<train\|val\|test>"),
    ],
)
def test_user_splits_file_errors(tmp_path, body, message):
    path = tmp_path / "official.csv"
    path.write_text("fold,split,slide_id\n" + body)
    with pytest.raises(ConfigError, match=message):
        read_splits(path, known={s: s for s in "abc"})


def test_user_splits_patient_leak_is_warned(tmp_path, caplog):
    path = tmp_path / "official.csv"
    path.write_text("fold,split,slide_id\n0,train,a1\n0,val,b\n0,test,a2\n")
    read_splits(path, known={"a1": "A", "a2": "A", "b": "B"})
    assert "patient(s) A have slides in more than one split" in caplog.text


# ---------------------------------------------------------------- Monte-Carlo splits

PAPER = (0.65, 0.10, 0.25)


def mc_split(slides=None, **kw) -> Splits:
    opts = {"fractions": PAPER, "repeats": 5, "seed": 42} | kw
    return make_monte_carlo_splits(slides or cohort(50), **opts)


def patients_per_part(splits: Splits, slides) -> dict[int, dict[str, set[str]]]:
    case_of = {sid: case for sid, _, case in slides}
    return {f: {p: {case_of[s] for s in splits.ids(f, p)} for p in PARTS} for f in splits.folds}


def test_monte_carlo_no_patient_in_two_partitions_and_every_slide_used():
    slides = cohort(50)
    splits = mc_split(slides)
    assert splits.folds == [0, 1, 2, 3, 4]  # "fold" = repeat index
    for fold, parts in patients_per_part(splits, slides).items():
        assert not (parts["train"] & parts["val"] or parts["train"] & parts["test"] or parts["val"] & parts["test"])
        assert sorted(sid for p in PARTS for sid in splits.ids(fold, p)) == sorted(sid for sid, _, _ in slides)


@pytest.mark.parametrize("n_patients", [20, 41, 45, 97])
@pytest.mark.parametrize("fractions", [PAPER, (0.7, 0.1, 0.2), (0.6, 0.2, 0.2)])
def test_monte_carlo_fractions_within_one_patient(n_patients, fractions):
    slides = cohort(n_patients)
    for parts in patients_per_part(mc_split(slides, fractions=fractions), slides).values():
        for part, fraction in zip(PARTS, fractions, strict=True):
            assert abs(len(parts[part]) - fraction * n_patients) < 1, (part, len(parts[part]))


def test_patient_counts_round_by_largest_remainder():
    assert patient_counts(45, PAPER) == [29, 5, 11]  # exact 29.25 / 4.5 / 11.25: the 0.5 gets the leftover
    assert patient_counts(100, (0.29, 0.31, 0.4)) == [29, 31, 40]  # 0.29 * 100 = 28.999999999999996
    for n in range(3, 200):
        counts = patient_counts(n, PAPER)
        assert sum(counts) == n and all(abs(c - f * n) < 1 for c, f in zip(counts, PAPER, strict=True))


def test_monte_carlo_is_stratified():
    slides = cohort(97)
    label_of = {case: label for _, label, case in slides}
    share = {label: n / 97 for label, n in Counter(label_of.values()).items()}  # ~60 % A, 40 % B
    for parts in patients_per_part(mc_split(slides), slides).values():
        for part in PARTS:
            counts = Counter(label_of[c] for c in parts[part])
            for label, fraction in share.items():
                assert abs(counts[label] - fraction * len(parts[part])) <= 1, (part, label, counts)


def test_monte_carlo_is_deterministic_and_repeats_differ():
    assert mc_split(seed=7) == mc_split(seed=7)
    assert mc_split(seed=7) != mc_split(seed=8)
    splits = mc_split()
    tests = {tuple(splits.ids(f, "test")) for f in splits.folds}
    assert len(tests) == 5  # five different random draws, not a partition into five folds


def test_monte_carlo_keeps_patients_whole_with_multi_slide_patients():
    slides = cohort(30)  # every third patient has two slides
    splits = mc_split(slides, repeats=3)
    case_of = {sid: case for sid, _, case in slides}
    for fold in splits.folds:
        where = {}
        for part in PARTS:
            for sid in splits.ids(fold, part):
                assert where.setdefault(case_of[sid], part) == part


@pytest.mark.parametrize(
    ("slides", "fractions", "message"),
    [
        (cohort(8), (0.8, 0.05, 0.15), r"cfg.yaml: splits train/val/test \(0.8, 0.05, 0.15\) of 8 patients gives "
                                       r"7/0/1 patients; every partition needs one"),
        ([(f"s{i}", "A", f"p{i}") for i in range(12)] + [("b", "B", "q")], PAPER,
         r"cfg.yaml: Monte-Carlo splits: .*least populated class.*\(adjust splits.train/val/test or add data\)"),
        (cohort(12), PAPER, r"cfg.yaml: Monte-Carlo splits: The test_size = 1 should be greater or equal to the "
                            r"number of classes = 2"),
        ([(f"a{i}", "A", f"a{i}") for i in range(45)] + [(f"b{i}", "B", f"b{i}") for i in range(3)], PAPER,
         r"cfg.yaml: Monte-Carlo repeat \d: val has no patient of class\(es\) \['B'\] \(5 val patients; "
         r"raise splits.val or add data\)"),
    ],
)  # fmt: skip
def test_monte_carlo_cohort_too_small_is_a_clear_error(slides, fractions, message):
    with pytest.raises(ConfigError, match=message) as err:
        make_monte_carlo_splits(slides, fractions=fractions, repeats=5, seed=42, source="cfg.yaml")
    assert "\n" not in str(err.value)
