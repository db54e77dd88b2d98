"""The training config: a YAML file validated by pydantic, one error type, one-line messages.

A config names *what* to train (features, labels, model) and *how* (splits, optimiser, seed); the data
checks that need the files themselves (labels vs classes, missing h5, feature dims, model options) live
in :mod:`wsi_pipeline.stages.train.labels` and raise the same :class:`ConfigError`, so `train()` can refuse a bad
config before any epoch runs.

Paths: relative paths written in the YAML resolve against the YAML file's folder (so a config travels
with its project); `out` left out of the YAML is `$WSIP_OUT` or `./wsip_out` relative to the working
directory, like every other stage. Every path is absolute after loading.

Defaults follow GMMamba's released code (docs/gmmamba.md §8): AdamW lr 1e-4, weight decay 1e-5, up to 100
epochs, model selection on val F1+AUC only after epoch 5, early stop when 20 epochs passed without a new
best *and* the epoch is past 50; patient-level 5-fold splits with a 20% inner val, split seed 42 (or
`splits.mode: monte_carlo`, default 5 repeats of 65/10/25, the paper's BRCA / lung protocol). The
original never seeds training (its `seed_torch(2021)` helper is never called); we seed everything with
`seed`, default 2021, the value that helper would have used.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from wsi_pipeline.errors import ConfigError, one_line
from wsi_pipeline.models.mil import list_models
from wsi_pipeline.workspace.layout import Layout, RunDir, workspace_root

SEED_MAX = 2**32 - 1  # numpy's and scikit-learn's seeds are 32-bit
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def _resolve_path(value: Path, info: ValidationInfo) -> Path:
    """Relative to the YAML's folder when loaded from a file, else to the working directory."""
    base = (info.context or {}).get("base_dir") or Path.cwd()
    value = value.expanduser()
    return value if value.is_absolute() else Path(base).absolute() / value


ResolvedPath = Annotated[Path, AfterValidator(_resolve_path)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True, allow_inf_nan=False)


class DataConfig(_Strict):
    features: ResolvedPath = Field(description="feature folder: wsip/CLAM (h5_files/<slide_id>.h5), TRIDENT or STAMP "
                                   "(<slide_id>.h5)")
    labels: ResolvedPath = Field(description="CSV with columns slide_id,label[,case_id]")
    classes: list[str] | None = Field(
        default=None, description="class order (index = model output); default: sorted unique labels"
    )
    standardize: bool | None = Field(
        default=None, description="z-score each feature dimension with the fold's training instances; "
        "default: the model preset's (off for gmmamba preset: released, on otherwise)"
    )


_MODE_DEFAULTS: dict[str, dict[str, float]] = {
    "kfold": {"folds": 5, "val_fraction": 0.2},
    "monte_carlo": {"train": 0.65, "val": 0.10, "test": 0.25, "repeats": 5},
}


class SplitsConfig(_Strict):
    """Patient-level splits: `kfold` (the default, GMMamba's script) or `monte_carlo` (repeated random
    train/val/test splits, the paper's BRCA / lung protocol). Each mode's keys are refused in the other
    mode, so a config never carries a setting that silently does nothing; unset ones take the defaults
    above (filled in after validation, so the resolved config.yaml shows them)."""

    mode: Literal["kfold", "monte_carlo"] = "kfold"
    folds: int | None = Field(default=None, ge=2, description="kfold: number of folds (5)")
    val_fraction: float | None = Field(
        default=None, gt=0.0, lt=1.0, description="kfold: share of the non-test patients for val (0.2)"
    )
    train: float | None = Field(default=None, gt=0.0, lt=1.0, description="monte_carlo: share of patients (0.65)")
    val: float | None = Field(default=None, gt=0.0, lt=1.0, description="monte_carlo: share of patients (0.10)")
    test: float | None = Field(default=None, gt=0.0, lt=1.0, description="monte_carlo: share of patients (0.25)")
    repeats: int | None = Field(default=None, ge=1, description="monte_carlo: number of random splits (5)")
    seed: int = Field(default=42, ge=0, le=SEED_MAX)
    file: ResolvedPath | None = Field(default=None, description="splits CSV fold,split,slide_id; overrides")

    @model_validator(mode="after")
    def _fields_of_the_mode(self) -> SplitsConfig:
        other = next(mode for mode in _MODE_DEFAULTS if mode != self.mode)
        foreign = [key for key in _MODE_DEFAULTS[other] if getattr(self, key) is not None]
        if foreign:
            raise ValueError(f"key(s) {', '.join(foreign)} belong to splits.mode {other}, not {self.mode} "
                             f"(remove them, or set splits.mode: {other})")
        for key, default in _MODE_DEFAULTS[self.mode].items():
            if getattr(self, key) is None:
                setattr(self, key, default)
        if self.mode == "monte_carlo" and abs(self.train + self.val + self.test - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must sum to 1, got {self.train} + {self.val} + {self.test} = "
                             f"{self.train + self.val + self.test:g}")
        return self


class ModelConfig(BaseModel):
    """`name` plus that model's own options, passed as keywords to `create_model`.

    The one place where unknown keys are allowed: they are the model's options, checked by building the
    model once (see `labels.check_model`), so a typo still fails before training.
    """

    model_config = ConfigDict(extra="allow")

    name: str

    @field_validator("name")
    @classmethod
    def _known_model(cls, value: str) -> str:
        if value not in list_models():
            raise ValueError(f"unknown model; available: {', '.join(list_models())}")
        return value

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class OptimConfig(_Strict):
    lr: float = Field(default=1e-4, gt=0)
    weight_decay: float = Field(default=1e-5, ge=0)
    epochs: int = Field(default=100, ge=1)
    select_after: int = Field(default=5, ge=-1, description="select on val only for epoch > this (0-based)")
    patience: int = Field(default=20, ge=1)
    min_epochs: int = Field(default=50, ge=0, description="early stop only for epoch > this (0-based)")


class TrainConfig(_Strict):
    name: str = Field(description="run name; outputs go to <out>/runs/<name>/")
    data: DataConfig
    splits: SplitsConfig = Field(default_factory=SplitsConfig)
    model: ModelConfig
    optim: OptimConfig = Field(default_factory=OptimConfig)
    seed: int = Field(default=2021, ge=0, le=SEED_MAX, description="seeds python/numpy/torch for training")
    device: str = "auto"
    out: ResolvedPath = Field(default_factory=workspace_root)
    _source: str = PrivateAttr(default="<config>")

    @field_validator("name")
    @classmethod
    def _simple_name(cls, value: str) -> str:
        if not _RUN_NAME.match(value):
            raise ValueError("must be a plain folder name (letters, digits, '.', '_', '-')")
        return value

    @field_validator("out")
    @classmethod
    def _a_folder(cls, value: Path) -> Path:
        if value.exists() and not value.is_dir():
            raise ValueError(f"{value} is a file, not a folder; point `out:` at a workspace folder")
        return value

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not _DEVICE.match(value):
            raise ValueError("must be auto, cpu, cuda or cuda:<index>")
        return value

    @model_validator(mode="after")
    def _preset_standardize(self) -> TrainConfig:
        """Left out, `data.standardize` is the model preset's; filled in so the resolved config.yaml shows it."""
        if self.data.standardize is None:
            from wsi_pipeline.models.mil.standardize import preset_standardize  # torch: only once training

            self.data.standardize = preset_standardize(self.model.name, self.model.options)
        return self

    @property
    def source(self) -> str:
        """Where this config came from (the YAML path), for error messages."""
        return self._source

    @property
    def run(self) -> RunDir:
        return Layout(self.out).run(self.name)


def load_config(path: str | Path) -> TrainConfig:
    """Read and validate a YAML training config; any problem is a one-line :class:`ConfigError`."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found (check the --cfg path)") from None
    except (UnicodeDecodeError, IsADirectoryError) as e:
        raise ConfigError(f"{path}: not a UTF-8 text YAML file ({one_line(e)}); save the config as UTF-8 text"
                          ) from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        problem = getattr(e, "problem", None) or e
        raise ConfigError(f"{path}: malformed YAML{at}: {problem} (fix the syntax)") from None
    if not isinstance(raw, dict):
        kind = type(raw).__name__
        raise ConfigError(f"{path}: expected a mapping of keys (name, data, model, ...), got {kind}")
    return config_from_dict(raw, base_dir=path.parent, source=str(path))


def config_from_dict(
    raw: dict[str, Any], *, base_dir: str | Path | None = None, source: str = "<config>"
) -> TrainConfig:
    """Validate a config mapping; relative paths resolve against `base_dir` (default: working directory).

    `source` only labels error messages (the YAML path when loading a file).
    """
    try:
        cfg = TrainConfig.model_validate(raw, context={"base_dir": base_dir})
    except ValidationError as e:
        raise ConfigError(f"{source}: {_describe(e)}") from None
    cfg._source = source
    return cfg


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The resolved config as plain YAML-able data (absolute paths, defaults filled in)."""
    data = cfg.model_dump(mode="json")
    data["splits"] = {k: v for k, v in data["splits"].items() if v is not None or k == "file"}  # the mode's keys
    data["model"] = {"name": cfg.model.name, **cfg.model.options}
    return data


def dump_config(cfg: TrainConfig) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def _describe(error: ValidationError) -> str:
    """All of pydantic's errors on one line; unknown keys name the allowed ones."""
    parts = []
    for err in error.errors():
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            allowed = ", ".join(_fields_at(err["loc"][:-1]))
            parts.append(f"unknown key '{loc}' (allowed here: {allowed})")
        elif err["type"] == "missing":
            parts.append(f"missing required key '{loc}'")
        elif isinstance(err.get("input"), dict):  # a check across a section's keys: the message says it all
            parts.append(f"'{loc}': {err['msg']}")
        else:
            parts.append(f"'{loc}': {err['msg']} (got {err.get('input')!r})")
    return "; ".join(parts)


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = TrainConfig
    for key in loc:
        annotation = model.model_fields[str(key)].annotation
        model = next(t for t in (annotation, *getattr(annotation, "__args__", ())) if _is_model(t))
    return list(model.model_fields)


def _is_model(t: Any) -> bool:
    return isinstance(t, type) and issubclass(t, BaseModel)
