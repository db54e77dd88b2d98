"""The training config: defaults, path resolution, and one clear ConfigError line per problem."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from wsi_pipeline.errors import ConfigError, UserError
from wsi_pipeline.stages.train import TrainParams, train
from wsi_pipeline.stages.train.config import OptimConfig, config_to_dict, load_config
from wsi_pipeline.stages.train.labels import load_labelled_slides, read_labels

SLIDES = [("TCGA-A1-0001-01Z", "SCC", "TCGA-A1-0001"), ("TCGA-A1-0001-02Z", "SCC", "TCGA-A1-0001")] + [
    (f"TCGA-B{i}-000{i}-01Z", "EAC" if i % 2 else "SCC", "") for i in range(2, 8)
]


def write_h5(path: Path, n: int = 6, dim: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f["features"] = np.zeros((n, dim), np.float32)
        f["coords"] = np.zeros((n, 2), np.int64)


@pytest.fixture
def project(tmp_path) -> Path:
    """A valid project folder: features/h5_files/*.h5, labels.csv, cfg.yaml (relative paths)."""
    for slide_id, _, _ in SLIDES:
        write_h5(tmp_path / "features" / "h5_files" / f"{slide_id}.h5")
    rows = "".join(f"{sid},{label},{case}\n" for sid, label, case in SLIDES)
    (tmp_path / "labels.csv").write_text("slide_id,label,case_id\n" + rows)
    write_cfg(tmp_path, {})
    return tmp_path


def write_cfg(folder: Path, changes: dict, *, drop: tuple[str, ...] = ()) -> Path:
    cfg = {
        "name": "t",
        "data": {"features": "features", "labels": "labels.csv"},
        "splits": {"folds": 2},
        "model": {"name": "mean", "hidden_dim": 4},
    }
    for key, value in changes.items():
        section, _, field = key.partition(".")
        if field:
            cfg.setdefault(section, {})[field] = value
        else:
            cfg[section] = value
    for key in drop:
        cfg.pop(key)
    path = folder / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def check(path: Path) -> None:
    """Everything `train` validates before its first epoch."""
    load_labelled_slides(load_config(path))


def test_defaults_are_gmmamba_and_paths_resolve_from_the_yaml(project, monkeypatch, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("cwd")
    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv("WSIP_OUT", raising=False)
    cfg = load_config(project / "cfg.yaml")
    assert cfg.optim.model_dump() == {
        "lr": 1e-4, "weight_decay": 1e-5, "epochs": 100, "select_after": 5, "patience": 20, "min_epochs": 50,
    }  # fmt: skip
    assert (cfg.splits.folds, cfg.splits.val_fraction, cfg.splits.seed) == (2, 0.2, 42)
    assert (cfg.seed, cfg.device) == (2021, "auto")
    assert cfg.data.features == project / "features"  # relative to the YAML, not the working directory
    assert cfg.data.labels == project / "labels.csv"
    assert cfg.out == elsewhere / "wsip_out"  # `out` left out: ./wsip_out of the working directory
    assert cfg.run.dir == elsewhere / "wsip_out" / "runs" / "t"
    assert cfg.model.options == {"hidden_dim": 4}
    cohort = load_labelled_slides(cfg)
    assert cohort.classes == ("EAC", "SCC") and cohort.in_dim == 8
    assert cohort.slides[1].case_id == "TCGA-A1-0001" and cohort.slides[2].case_id == SLIDES[2][0]


def test_out_from_env_and_round_trip(project, monkeypatch):
    monkeypatch.setenv("WSIP_OUT", str(project / "ws"))
    cfg = load_config(project / "cfg.yaml")
    assert cfg.out == project / "ws"
    assert config_to_dict(cfg)["model"] == {"name": "mean", "hidden_dim": 4}
    (project / "again.yaml").write_text(yaml.safe_dump(config_to_dict(cfg)))
    assert config_to_dict(load_config(project / "again.yaml")) == config_to_dict(cfg)


def test_classes_order_is_kept(project):
    cfg = load_config(write_cfg(project, {"data.classes": ["SCC", "EAC"]}))
    assert load_labelled_slides(cfg).classes == ("SCC", "EAC")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"optim.lrr": 0.1}, r"cfg.yaml: unknown key 'optim.lrr' \(allowed here: lr, weight_decay, epochs, "
                             r"select_after, patience, min_epochs\)"),
        ({"epochs": 3}, r"unknown key 'epochs' \(allowed here: name, data, splits, model, optim, seed, device, out\)"),
        ({"data.feature": "x"}, r"unknown key 'data.feature' \(allowed here: features, labels, classes, standardize\)"),
        ({"optim.lr": "fast"}, r"cfg.yaml: 'optim.lr': Input should be a valid number"),
        ({"splits.val_fraction": 1.5}, r"'splits.val_fraction': Input should be less than 1"),
        ({"device": "gpu"}, r"'device': Value error, must be auto, cpu, cuda or cuda:<index>"),
        ({"name": "a/b"}, r"'name': Value error, must be a plain folder name"),
        ({"model": {"name": "gmamba"}},
         r"'model.name': Value error, unknown model; available: 2dmamba, abmil, acmil, clam_sb"),
    ],
)  # fmt: skip
def test_schema_errors(project, changes, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(write_cfg(project, changes))
    assert "\n" not in str(err.value)


def test_splits_modes_fill_their_own_defaults(project):
    kfold = config_to_dict(load_config(project / "cfg.yaml"))["splits"]
    assert kfold == {"mode": "kfold", "folds": 2, "val_fraction": 0.2, "seed": 42, "file": None}
    cfg = load_config(write_cfg(project, {"splits": {"mode": "monte_carlo"}}))
    assert (cfg.splits.train, cfg.splits.val, cfg.splits.test, cfg.splits.repeats) == (0.65, 0.10, 0.25, 5)
    assert config_to_dict(cfg)["splits"] == {
        "mode": "monte_carlo", "train": 0.65, "val": 0.1, "test": 0.25, "repeats": 5, "seed": 42, "file": None,
    }  # fmt: skip


@pytest.mark.parametrize(
    ("splits", "message"),
    [
        ({"mode": "monte_carlo", "train": 0.7}, r"cfg.yaml: 'splits': Value error, train \+ val \+ test must sum to 1, "
                                                r"got 0.7 \+ 0.1 \+ 0.25 = 1.05$"),
        ({"mode": "monte_carlo", "folds": 5}, r"'splits': Value error, key\(s\) folds belong to splits.mode kfold, not "
                                              r"monte_carlo \(remove them, or set splits.mode: kfold\)$"),
        ({"train": 0.6, "val": 0.2, "test": 0.2}, r"key\(s\) train, val, test belong to splits.mode monte_carlo, "
                                                  r"not kfold \(remove them, or set splits.mode: monte_carlo\)$"),
        ({"mode": "bootstrap"}, r"'splits.mode': Input should be 'kfold' or 'monte_carlo'"),
        ({"mode": "monte_carlo", "repeats": 0}, r"'splits.repeats': Input should be greater than or equal to 1"),
    ],
)  # fmt: skip
def test_splits_mode_errors(project, splits, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(write_cfg(project, {"splits": splits}))
    assert "\n" not in str(err.value)


def test_missing_key(project):
    with pytest.raises(ConfigError, match=r"cfg.yaml: missing required key 'model'"):
        load_config(write_cfg(project, {}, drop=("model",)))


def test_malformed_yaml(project):
    (project / "cfg.yaml").write_text("name: t\ndata: [features\n")
    with pytest.raises(ConfigError, match=r"cfg.yaml: malformed YAML at line \d+, column \d+: .*fix the syntax"):
        load_config(project / "cfg.yaml")
    (project / "cfg.yaml").write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match=r"cfg.yaml: expected a mapping of keys"):
        load_config(project / "cfg.yaml")


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match=r"nope.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_missing_labels_file(project):
    with pytest.raises(ConfigError, match=r"labels2.csv: labels CSV not found \(fix data.labels"):
        check(write_cfg(project, {"data.labels": "labels2.csv"}))


def test_missing_features_folder(project):
    with pytest.raises(ConfigError, match=r"feats: no h5_files/ folder and no .h5 files here; data.features must"):
        check(write_cfg(project, {"data.features": "feats"}))
    with pytest.raises(ConfigError, match=r"h5_files: no h5_files/ folder here.*\(point data.features at its parent\)"):
        check(write_cfg(project, {"data.features": "features/h5_files"}))


def test_labels_csv_problems(project):
    (project / "labels.csv").write_text("slide,label\nx,A\n")
    with pytest.raises(ConfigError, match=r"labels.csv: missing column\(s\) slide_id \(need slide_id,label"):
        check(project / "cfg.yaml")
    (project / "labels.csv").write_text(f"slide_id,label\n{SLIDES[0][0]},A\n{SLIDES[0][0]},B\n")
    with pytest.raises(ConfigError, match=r"labels.csv: slide_id listed twice: TCGA-A1-0001-01Z"):
        check(project / "cfg.yaml")
    (project / "labels.csv").write_text(f"slide_id,label\n{SLIDES[0][0]},A\n{SLIDES[1][0]},\n")
    with pytest.raises(ConfigError, match=r"labels.csv: empty slide_id or label on line\(s\) 3"):
        check(project / "cfg.yaml")


def test_labels_not_in_classes(project):
    with pytest.raises(
        ConfigError, match=r"labels.csv: label\(s\) EAC not in data.classes \['SCC', 'ADC'\] \(add them"
    ):
        check(write_cfg(project, {"data.classes": ["SCC", "ADC"]}))


def test_slides_without_features(project):
    for slide_id, _, _ in SLIDES[:7]:
        (project / "features" / "h5_files" / f"{slide_id}.h5").unlink()
    with pytest.raises(
        ConfigError,
        match=r"labels.csv: 7 slide\(s\) have no features in .*h5_files: TCGA-A1-0001-01Z, TCGA-A1-0001-02Z, "
        r"TCGA-B2-0002-01Z, TCGA-B3-0003-01Z, TCGA-B4-0004-01Z \.\.\. and 2 more \(run `wsip extract`",
    ):
        check(project / "cfg.yaml")


def test_feature_dim_mismatch(project):
    write_h5(project / "features" / "h5_files" / f"{SLIDES[3][0]}.h5", dim=16)
    with pytest.raises(
        ConfigError, match=rf"{SLIDES[3][0]}.h5: feature dim 16 but slide {SLIDES[0][0]} has 8; all slides must"
    ):
        check(project / "cfg.yaml")


def test_bad_h5(project):
    (project / "features" / "h5_files" / f"{SLIDES[2][0]}.h5").write_bytes(b"not hdf5")
    with pytest.raises(ConfigError, match=rf"{SLIDES[2][0]}.h5: unreadable h5 .*re-run `wsip extract`"):
        check(project / "cfg.yaml")


def test_bad_model_options(project):
    with pytest.raises(
        ConfigError, match=r"cfg.yaml: model 'mean' rejected its options \(hidden_dim, n_heads\): .*n_heads.*"
        r"\(fix the keys under `model:`\)"
    ):  # fmt: skip
        check(write_cfg(project, {"model": {"name": "mean", "hidden_dim": 4, "n_heads": 2}}))


def test_splits_file_with_unknown_slides(project):
    (project / "splits.csv").write_text(
        "fold,split,slide_id\n0,train,TCGA-XX\n0,val,TCGA-YY\n0,test,TCGA-A1-0001-01Z\n"
    )
    with pytest.raises(ConfigError, match=r"splits.csv: 2 slide\(s\) not in the labels CSV: TCGA-XX, TCGA-YY"):
        train(TrainParams(write_cfg(project, {"splits": {"file": "splits.csv"}})))


def test_config_errors_come_before_any_training(project):
    write_h5(project / "features" / "h5_files" / f"{SLIDES[3][0]}.h5", dim=16)
    cfg = write_cfg(project, {"out": "ws"})
    with pytest.raises(ConfigError) as err:
        train(TrainParams(cfg))
    assert isinstance(err.value, ValueError) and isinstance(err.value, UserError)
    assert not (project / "ws").exists()


def test_unavailable_cuda_is_a_config_error(project, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"device 'cuda:0' requested but torch sees no CUDA GPU"):
        train(TrainParams(write_cfg(project, {"out": "ws"}), device="cuda:0"))


def test_shipped_esca_example():
    examples = Path(__file__).resolve().parents[1] / "examples"
    cfg = load_config(examples / "esca.yaml")
    assert cfg.model.name == "gmmamba" and cfg.data.classes == ["EAC", "SCC"]
    assert cfg.data.features == examples / "wsip_out" / "features" / "20x_256px_0px" / "resnet18"
    assert cfg.optim.model_dump() == OptimConfig().model_dump()  # the GMMamba defaults, spelled out
    rows = read_labels(examples / "esca_labels.example.csv")
    cases = Counter(case for _, _, case in rows)
    assert max(cases.values()) == 2 and {label for _, label, _ in rows} == {"EAC", "SCC"}


@pytest.mark.parametrize(
    ("model", "standardize", "expected"),
    [
        ({"name": "gmmamba", "preset": "released"}, None, False),  # the paper's model reads raw features
        ({"name": "gmmamba"}, None, True),  # recommended, the default preset
        ({"name": "gmmamba", "preset": "recommended"}, None, True),
        ({"name": "abmil"}, None, True),
        ({"name": "gmmamba", "preset": "released"}, True, True),  # set: overrides the preset
        ({"name": "gmmamba"}, False, False),
    ],
)
def test_standardize_defaults_to_the_presets(project, model, standardize, expected):
    changes = {"model": model} if standardize is None else {"model": model, "data.standardize": standardize}
    cfg = load_config(write_cfg(project, changes))
    assert cfg.data.standardize is expected
    assert config_to_dict(cfg)["data"]["standardize"] is expected  # what the run's config.yaml records


def test_paper_configs_read_raw_features():
    examples = Path(__file__).resolve().parents[1] / "examples"
    for name in ("esca.yaml", "brca.yaml"):
        cfg = load_config(examples / name)
        assert cfg.model.options["preset"] == "released" and cfg.data.standardize is False, name


def test_shipped_brca_example_makes_idc_positive():
    examples = Path(__file__).resolve().parents[1] / "examples"
    cfg = load_config(examples / "brca.yaml")
    rows = read_labels(examples / "brca_labels.example.csv")
    labels = {label for _, label, _ in rows}
    assert labels == {"IDC", "ILC"} and set(cfg.data.classes) == labels
    assert cfg.data.classes[1] == "IDC"  # the positive class of binary F1 / precision / recall
    assert sorted(labels)[1] == "ILC"  # what leaving `classes` out would have made positive
    s = cfg.splits
    assert (s.mode, s.train, s.val, s.test, s.repeats) == ("monte_carlo", 0.65, 0.10, 0.25, 5)
    assert max(Counter(case for _, _, case in rows).values()) == 2  # one patient with two slides
