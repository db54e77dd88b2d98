"""`preset: released` in the published configuration (D = 512, C = 2) against recorded outputs (docs/gmmamba.md §14).

`tests/data/gmmamba_released_d512.pt` holds what the code computed when the file was recorded (commit 8f0e792)
for one small bag through the model of `examples/esca.yaml` (`preset: released, n_groups: 10, mask_ratio: 0.2`,
no input projection at D = 512): the exact digest of the initial parameters, the eval logits and attention,
and one training step's loss and a sketch of every parameter's gradient (its sum, absolute sum and dot product
with a fixed random vector: small to store, and any change to a gradient moves it). Outputs are compared to
float rounding (the numba kernels may round differently on another CPU); the parameters exactly.

The second test is the acceptance path of the paper's config: `wsip train --cfg examples/esca.yaml` on generated
512-d features records `standardize: false` (raw features, as the published pipeline) and trains exactly the
recorded model. Regenerate only on purpose: `WSIP_WRITE_GOLDEN=1 pytest tests/test_gmmamba_released_d512.py`.
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml
from support import golden

from wsi_pipeline.models.mil import create_model
from wsi_pipeline.stages.train import TrainParams, train
from wsi_pipeline.stages.train.folds import ModelSpec

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "data" / "gmmamba_released_d512.pt"
ESCA = REPO / "examples" / "esca.yaml"
N, D = 96, 512


def _bag(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-negative 512-d features (as ResNet18's after ReLU + pooling) on a 12 x 8 grid of 256 px patches."""
    rng = np.random.default_rng(seed)
    features = rng.gamma(1.0, 0.5, size=(N, D)).astype(np.float32)
    coords = np.stack(np.divmod(np.arange(N), 12), 1)[:, ::-1].astype(np.int64) * 256
    return torch.from_numpy(features), torch.from_numpy(coords.copy())


def _outputs(model: torch.nn.Module) -> dict[str, object]:
    return golden.record(model, *_bag())


def _esca_model_options() -> dict[str, object]:
    return {k: v for k, v in yaml.safe_load(ESCA.read_text())["model"].items() if k != "name"}


def _recorded() -> dict[str, object]:
    if os.environ.get("WSIP_WRITE_GOLDEN"):
        torch.manual_seed(0)
        model = create_model("gmmamba", in_dim=D, n_classes=2, batch_groups=False, **_esca_model_options())
        torch.save(_outputs(model), GOLDEN)
    return torch.load(GOLDEN)


def _assert_matches_recording(got: dict[str, object]) -> None:
    golden.assert_matches(got, _recorded())


@pytest.mark.parametrize("batch_groups", [False, True])
def test_released_d512_matches_the_recording(batch_groups: bool, one_torch_thread: None) -> None:
    torch.manual_seed(0)
    model = create_model("gmmamba", in_dim=D, n_classes=2, batch_groups=batch_groups, **_esca_model_options())
    assert sum(p.numel() for p in model.parameters()) == 5_867_012  # docs/gmmamba.md §10
    assert isinstance(model.proj, torch.nn.Identity)  # D = 512: no input projection, as released
    _assert_matches_recording(_outputs(model))


def test_esca_config_trains_the_recorded_model_on_raw_features(tmp_path: Path, one_torch_thread: None) -> None:
    """`wsip train --cfg esca.yaml` (paths and budget shortened, one epoch): config.yaml says standardize: false, the
    checkpoints hold no standardisation, and the model it builds gives the recorded first-step outputs."""
    h5_dir = tmp_path / "features" / "h5_files"
    h5_dir.mkdir(parents=True)
    rows = ["slide_id,label"]
    for i in range(8):
        features, coords = _bag(seed=i + 1)
        with h5py.File(h5_dir / f"s{i}.h5", "w") as f:
            f["features"], f["coords"] = features.numpy()[:40], coords.numpy()[:40]
        rows.append(f"s{i},{'SCC' if i % 2 else 'EAC'}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    cfg = yaml.safe_load(ESCA.read_text())
    cfg["data"].update(features=str(tmp_path / "features"), labels=str(tmp_path / "labels.csv"))
    cfg["splits"].update(folds=2, val_fraction=0.34)
    cfg["optim"].update(epochs=1)
    cfg.update(out=str(tmp_path / "ws"), device="cpu")
    (tmp_path / "esca.yaml").write_text(yaml.safe_dump(cfg))
    run = train(TrainParams(config=tmp_path / "esca.yaml")).run_dir  # what `wsip train --cfg` calls
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["data"]["standardize"] is False
    meta = torch.load(run / "fold_0" / "last.pt", weights_only=True)["meta"]["model"]
    assert meta["standardize"] is False
    assert not any(key.startswith("model.") for key in torch.load(run / "fold_0" / "last.pt")["model_state"])
    spec = ModelSpec(resolved["model"]["name"], {k: v for k, v in resolved["model"].items() if k != "name"},
                     D, tuple(resolved["data"]["classes"]), resolved["data"]["standardize"])
    torch.manual_seed(0)
    _assert_matches_recording(_outputs(spec.build()))
