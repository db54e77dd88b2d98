"""The `2dmamba` model: released parameter count, layers against a slow hand-written reference, the grid of cells
(crop vs released, placement, per-patch attention), learning a clustered signal, and `wsip train` (k-fold, resume).
`wsip predict` with 2dmamba is in test_pipeline.py, on that module's extracted cohort."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from sklearn.metrics import roc_auc_score
from test_train import write_cfg

from wsi_pipeline.errors import ConfigError, UserError
from wsi_pipeline.models.mil import create_model
from wsi_pipeline.models.mil.cellgrid import MAX_CELLS, cohort_extent, grid_frame, grid_step, place_cells
from wsi_pipeline.stages.train import TrainParams, train

pytestmark = pytest.mark.usefixtures("one_torch_thread")
STEP = 512  # level-0 px per patch in the generated cohorts


def small(seed: int = 0, **options) -> torch.nn.Module:
    """The released model (unless `preset` says otherwise), narrow."""
    torch.manual_seed(seed)
    options = {"preset": "released", **options}
    return create_model("2dmamba", in_dim=6, n_classes=3, d_model=8, d_state=4, **options).eval()


def lattice(cells: list[tuple[int, int]], step: int = STEP) -> torch.Tensor:
    """Level-0 (x, y) coords of patches at (row, col) cells."""
    return torch.tensor([[c * step, r * step] for r, c in cells])


def test_parameter_count_equals_the_released_model():
    """Counted from MambaMIL_2D + mamba_simple (d_model 128, expand 2 -> d_inner 256, d_state 16, d_conv 4,
    dt_rank ceil(128/16) = 8, one layer, no positional embedding), for C = 2:

        _fc1 Linear(D, 128)              128 D + 128
        pad_token                        128
        RMSNorm(128)                     128
        in_proj 128 -> 512, no bias      65,536
        conv1d depthwise 256 x 4 + bias  1,024 + 256
        x_proj 256 -> 8 + 2*16, no bias  10,240
        dt_proj 8 -> 256 + bias          2,048 + 256
        A_log 256 x 16, D 256            4,096 + 256
        out_proj 256 -> 128, no bias     32,768
        LayerNorm(128)                   256
        attention 128 -> 128 -> 1        16,512 + 129
        classifier 128 -> 2              258
                                         = 128 D + 134,019: D = 512 -> 199,555; D = 1024 -> 265,091
    (the same totals as instantiating the released module on CPU).
    """
    for in_dim, expected in ((512, 199_555), (1024, 265_091)):
        model = create_model("2dmamba", in_dim=in_dim, n_classes=2, preset="released")
        assert sum(p.numel() for p in model.parameters()) == expected == 128 * in_dim + 134_019


def test_layers_and_init_are_the_released_ones():
    model = create_model("2dmamba", in_dim=512, n_classes=2, preset="released")
    block = model.mambas[0]
    assert len(model.mambas) == 1 and isinstance(model.norms[0], torch.nn.RMSNorm) and model.norms[0].eps == 1e-5
    assert block.in_proj.weight.shape == (512, 128) and block.out_proj.weight.shape == (128, 256)
    assert block.ssm.conv1d.weight.shape == (256, 1, 4) and block.ssm.x_proj.weight.shape == (40, 256)
    assert isinstance(model.embed[1], torch.nn.GELU) and model.embed[2].p == 0.25
    assert torch.equal(block.ssm.dt_proj.bias, torch.zeros(256))  # Xavier re-init reaches dt_proj: bias 0
    assert torch.equal(block.ssm.A_log, torch.log(torch.arange(1.0, 17.0)).expand(256, 16))
    assert torch.equal(block.ssm.D, torch.ones(256)) and torch.equal(model.norm.weight, torch.ones(128))
    assert model.pad_token.requires_grad and model.pad_token.min() >= 0 and model.pad_token.max() < 1
    frozen = create_model("2dmamba", in_dim=512, n_classes=2, pad_token="zero", preset="released")
    assert not frozen.pad_token.requires_grad and torch.equal(frozen.pad_token, torch.zeros(128))


def reference_forward(model, features, coords, *, crop: bool, extent=None):
    """The model's layers re-done by hand in float64, a cell at a time: the 2-D scan as its two recurrences.

    Returns (logits (C,), attention over every cell (H*W,), the cell of each patch).
    """
    p = {k: v.detach().double() for k, v in model.state_dict().items()}
    rows, cols = coords[:, 1] // STEP, coords[:, 0] // STEP
    if crop:
        rows, cols = rows - rows.min(), cols - cols.min()
    height, width = int(rows.max()) + 1, int(cols.max()) + 1
    if extent is not None:
        height, width = max(height, extent[0]), max(width, extent[1])
    cell = rows * width + cols
    h = p["pad_token"].repeat(height * width, 1)
    h[cell] = F.gelu(features.double() @ p["embed.0.weight"].T + p["embed.0.bias"])

    r = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5) * p["norms.0.weight"]
    x, z = (r @ p["mambas.0.in_proj.weight"].T).chunk(2, dim=-1)  # (L, d_inner) each
    w, b = p["mambas.0.ssm.conv1d.weight"][:, 0], p["mambas.0.ssm.conv1d.bias"]  # causal, raster order
    u = F.silu(torch.stack([b + sum(w[:, k] * x[t - 3 + k] for k in range(4) if t - 3 + k >= 0)
                            for t in range(len(x))]))
    n = p["mambas.0.ssm.A_log"].shape[1]
    dt, B, C = (u @ p["mambas.0.ssm.x_proj.weight"].T).split([p["mambas.0.ssm.dt_proj.weight"].shape[1], n, n], -1)
    delta = F.softplus(dt @ p["mambas.0.ssm.dt_proj.weight"].T + p["mambas.0.ssm.dt_proj.bias"])
    A = -torch.exp(p["mambas.0.ssm.A_log"])
    below = torch.zeros(width, *A.shape, dtype=torch.float64)  # vertical states of the row above
    y = torch.zeros_like(u)
    for i in range(height):
        left = torch.zeros_like(A)  # horizontal state
        for j in range(width):
            c = i * width + j
            decay = torch.exp(delta[c][:, None] * A)
            left = decay * left + (delta[c] * u[c])[:, None] * B[c][None]
            below[j] = decay * below[j] + left
            y[c] = below[j] @ C[c] + p["mambas.0.ssm.D"] * u[c]
    h = h + (y * F.silu(z)) @ p["mambas.0.out_proj.weight"].T

    h = F.layer_norm(h, h.shape[-1:], p["norm.weight"], p["norm.bias"])
    scores = torch.tanh(h @ p["attention.net.0.weight"].T + p["attention.net.0.bias"]) @ p["attention.net.2.weight"].T
    alpha = torch.softmax(scores[:, 0] + p["attention.net.2.bias"], dim=0)
    return (alpha @ h) @ p["classifier.weight"].T + p["classifier.bias"], alpha, cell


@pytest.mark.parametrize("grid, extent", [("released", (6, 7)), ("released", None), ("crop", None)])
def test_forward_equals_the_slow_reference_and_attention_maps_to_patch_cells(grid, extent):
    """Patches with empty cells around them (and, released, pad rows/columns before and after them)."""
    model = small(grid=grid, grid_size=extent).double()
    with torch.no_grad():
        model.mambas[0].ssm.dt_proj.bias.normal_()  # exercise the dt bias the re-init zeroed
    coords = lattice([(1, 2), (1, 3), (2, 2), (3, 5), (4, 3)]) + 128  # off-origin patches of a 512-px grid
    features = torch.randn(5, 6, dtype=torch.float64)
    logits, attention = model(features, coords)
    want_logits, alpha, cell = reference_forward(model, features, coords, crop=grid == "crop", extent=extent)
    torch.testing.assert_close(logits[0], want_logits, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(attention, alpha[cell], rtol=1e-9, atol=1e-12)
    pads = torch.ones(len(alpha), dtype=torch.bool).index_fill(0, cell, False)
    assert pads.sum() >= 4 and attention.sum() < 1  # the pad cells' share is not shown on any patch
    torch.testing.assert_close(attention.sum() + alpha[pads].sum(), torch.tensor(1.0, dtype=torch.float64))


def test_cells_are_read_from_the_patch_step():
    coords = np.array([[1024, 512], [1536, 512], [2048, 1024], [1024, 2048]])
    rows, cols = place_cells(coords)
    assert grid_step(coords) == 512 and rows.tolist() == [1, 1, 2, 4] and cols.tolist() == [2, 3, 4, 2]
    overlapping = np.array([[0, 0], [384, 0], [768, 384], [1152, 1152]])  # 512-px patches every 384 px
    assert [a.tolist() for a in place_cells(overlapping)] == [[0, 0, 1, 3], [0, 1, 2, 3]]
    assert [a.tolist() for a in place_cells(np.array([[1536, 1024]]))] == [[2], [3]]  # one patch: GCD of x, y
    assert [a.tolist() for a in place_cells(coords, cell_size=256)] == [[2, 2, 4, 8], [4, 6, 8, 4]]


def test_cells_that_do_not_fit_the_coords_are_one_line_errors():
    with pytest.raises(ConfigError, match=r"2 patch\(es\) share a grid cell at a cell size of 1024 .* cell_size"):
        place_cells(np.array([[0, 0], [512, 0], [1024, 0], [1536, 0]]), cell_size=1024)
    off_grid = np.array([[0, 0], [512, 0], [100_037, 80_000]])  # a patch off the 512-px grid: the GCD is 1 px
    with pytest.raises(ConfigError, match="span a 80001 x 100038 grid; these coords are not on one regular grid"):
        place_cells(off_grid)
    assert grid_step(np.array([[0, 0], [512, 0], [512, 81_920]])) == 512 and MAX_CELLS < 80_001 * 100_038
    with pytest.raises(ValueError, match="non-negative"):
        place_cells(np.array([[-512, 0]]))


def test_crop_is_the_bounding_box_and_released_starts_at_the_origin():
    rows, cols = np.array([3, 4, 6]), np.array([5, 2, 2])
    assert grid_frame(rows, cols, crop=True) == ((3, 2), (4, 4))
    assert grid_frame(rows, cols, crop=False) == ((0, 0), (7, 6))
    assert grid_frame(rows, cols, crop=False, extent=(10, 9)) == ((0, 0), (10, 9))
    assert grid_frame(rows, cols, crop=False, extent=(5, 9)) == ((0, 0), (7, 9))  # a slide beyond it: grown
    assert cohort_extent([(rows, cols), (np.array([1]), np.array([8]))]) == (7, 9)


def test_crop_ignores_where_the_tissue_sits_and_released_does_not():
    features = torch.randn(4, 6)
    cells = [(0, 0), (0, 1), (1, 1), (2, 0)]
    crop, released = small(grid="crop"), small(grid="released")
    moved = lattice([(r + 2, c + 3) for r, c in cells])
    torch.testing.assert_close(crop(features, lattice(cells))[0], crop(features, moved)[0])
    assert not torch.allclose(released(features, lattice(cells))[0], released(features, moved)[0], atol=1e-4)
    assert released(features, moved)[1].sum() < released(features, lattice(cells))[1].sum()  # more pad cells


def test_cohort_fixes_the_released_extent_unless_given():
    slides = [lattice([(0, 4), (2, 1)]).numpy(), lattice([(9, 0), (9, 1)], step=256).numpy()]  # a 40x scan
    pinned = {"preset": "released", "instance_path": False, "instance_dim": 0}  # and the resolved preset, always
    assert small().cohort_options(slides) == {**pinned, "grid_size": [10, 5]}
    assert small(grid_size=(9, 9)).cohort_options(slides) == pinned == small(grid="crop").cohort_options(slides)
    assert small().group_cache_key == "cells_step" and small(cell_size=256).group_cache_key == "cells_256px"


def test_every_parameter_learns_and_the_zero_pad_stays_zero():
    model = small().train()
    logits, _ = model(torch.randn(5, 6), lattice([(0, 1), (1, 0), (1, 2), (3, 3), (2, 2)]))
    F.cross_entropy(logits, torch.tensor([1])).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        if name == "attention.net.2.bias":  # softmax is shift-invariant: the scorer's last bias has gradient 0
            assert p.grad.abs().max() < 1e-6  # (exactly 0 on some CPUs, rounding noise on others)
        else:
            assert p.grad.abs().sum() > 0, name
    frozen = small(pad_token="zero").train()
    frozen(torch.randn(2, 6), lattice([(0, 0), (2, 2)]))[0].sum().backward()
    assert frozen.pad_token.grad is None


@pytest.mark.parametrize("instance_dim", [0, 16])
def test_instance_path_adds_its_logits_and_shares_the_attention(instance_dim):
    """`instance_path: true` (docs/mamba2d.md §6): gated attention over the patches, on their 8-d embedding or
    with its own `instance_dim`-wide one of the input features, with its own head, added to the released logits;
    the released parameters are initialised as without it."""
    cells = [(0, 1), (1, 0), (1, 2), (3, 3), (2, 2)]
    features, coords = torch.randn(5, 6), lattice(cells)
    base, with_path = small(), small(instance_path=True, instance_dim=instance_dim)
    for name, p in base.named_parameters():
        assert torch.equal(p, dict(with_path.named_parameters())[name]), name
    logits, attention = with_path(features, coords)
    instance_logits, beta = with_path.instance_path(features if instance_dim else with_path.embed(features))
    base_logits, base_attention = base(features, coords)
    torch.testing.assert_close(logits, base_logits + instance_logits)
    torch.testing.assert_close(attention, (base_attention + beta) / 2)


def test_recommended_preset_adds_the_wide_instance_path_and_pins_itself():
    """The default (`preset: recommended`, docs/mamba2d.md §6) is the released model plus a 512-d instance path;
    the trainer records the resolved preset with the run (`cohort_options`), so a checkpoint rebuilds the same
    model after a preset changes."""
    recommended, released = small(preset="recommended"), small()
    extra = sum(p.numel() for p in recommended.parameters()) - sum(p.numel() for p in released.parameters())
    assert extra == (6 * 512 + 512) + 2 * (512 * 128 + 128) + (128 + 1) + (512 * 3 + 3)
    coords = [lattice([(0, 0), (1, 2)]).numpy()]
    pinned = recommended.cohort_options(coords)
    assert {k: pinned[k] for k in ("preset", "instance_path", "instance_dim")} == {
        "preset": "recommended", "instance_path": True, "instance_dim": 512}
    rebuilt = create_model("2dmamba", in_dim=6, n_classes=3, d_model=8, d_state=4, **pinned)
    rebuilt.load_state_dict(recommended.state_dict())  # strict: the same parameters


def test_bad_options_are_refused():
    for options, message in (({"grid": "bbox"}, "grid must be"), ({"pad_token": "rand"}, "pad_token must be"),
                             ({"grid_size": [3]}, "grid_size must be"), ({"cell_size": 0}, "cell_size must be"),
                             ({"grid": "crop", "grid_size": [4, 4]}, "grid='crop' sizes each slide")):
        with pytest.raises(ValueError, match=message):
            create_model("2dmamba", in_dim=6, n_classes=2, **options)


def spatial_cohort(n: int, seed: int, *, dim: int = 8, side: int = 10, signal: float = 2.0) -> list[tuple]:
    """(features, coords, label) bags: ~80% of a side x side lattice is tissue, placed at a random offset from
    the origin; a positive bag shifts the first half of the features of its patches in one random 3 x 3 block."""
    rng = np.random.default_rng(seed)
    bags = []
    for i in range(n):
        ys, xs = np.nonzero(rng.random((side, side)) < 0.8)
        features = rng.normal(size=(len(xs), dim)).astype(np.float32)
        if i % 2:
            r0, c0 = rng.integers(0, side - 3, size=2)
            features[(ys >= r0) & (ys < r0 + 3) & (xs >= c0) & (xs < c0 + 3), : dim // 2] += signal
        coords = (np.stack([xs, ys], axis=1) + rng.integers(0, 3, size=2)) * STEP
        bags.append((features, coords.astype(np.int64), i % 2))
    return bags


@pytest.mark.slow
def test_learns_a_spatially_clustered_signal():
    """9 of ~80 patches, one 3 x 3 block, carry the label. Without it (signal=0) the same budget gives a test
    AUC of 0.52, so 0.95 means learning (d_model 32: at 16 the small Mambas here learn too slowly to test)."""
    train_bags, test_bags = spatial_cohort(40, seed=0), spatial_cohort(24, seed=1)
    torch.manual_seed(0)
    model = create_model("2dmamba", in_dim=8, n_classes=2, d_model=32, d_state=4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-5)
    for _ in range(8):
        model.train()
        for i in torch.randperm(len(train_bags)).tolist():
            features, coords, label = train_bags[i]
            logits, _ = model(torch.from_numpy(features), torch.from_numpy(coords))
            optimizer.zero_grad()
            F.cross_entropy(logits, torch.tensor([label])).backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        scores = [model(torch.from_numpy(f), torch.from_numpy(c))[0].softmax(-1)[0, 1].item() for f, c, _ in test_bags]
    assert roc_auc_score([label for *_, label in test_bags], scores) >= 0.95


def write_spatial_cohort(root, n_slides: int = 12) -> list[tuple]:
    """`spatial_cohort` as a feature set (h5_files/ + labels.csv) in `root`, the layout `wsip extract` writes."""
    bags = spatial_cohort(n_slides, seed=2, dim=6)
    (root / "features" / "h5_files").mkdir(parents=True)
    for i, (features, coords, _) in enumerate(bags):
        with h5py.File(root / "features" / "h5_files" / f"slide-{i:02d}.h5", "w") as f:
            f["features"], f["coords"] = features, coords
    rows = [f"slide-{i:02d},{'pos' if label else 'neg'}," for i, (*_, label) in enumerate(bags)]
    (root / "labels.csv").write_text("slide_id,label,case_id\n" + "\n".join(rows) + "\n")
    return bags


class StopAt:
    """A progress stand-in that interrupts training once `task` has finished `completed` epochs."""

    def __init__(self, task: str, completed: int) -> None:
        self.task, self.completed = task, completed

    def add_task(self, description, **kwargs):
        return description

    def update(self, task, **kwargs):
        if task == self.task and kwargs.get("completed") == self.completed:
            raise KeyboardInterrupt


@pytest.mark.e2e
def test_wsip_train_runs_kfold_records_the_cohort_grid_and_resumes(tmp_path):
    bags = write_spatial_cohort(tmp_path)
    model = {"name": "2dmamba", "d_model": 8, "d_state": 4}
    optim = {"epochs": 3, "patience": 5}
    reference = train(TrainParams(write_cfg(tmp_path, out="ref", model=model, optim=optim)))
    assert [f.status for f in reference.folds] == ["trained"] * 3
    extent = list(cohort_extent([place_cells(c) for _, c, _ in bags]))
    assert extent[0] > 10 or extent[1] > 10  # slides sit at different offsets: the cohort's extent is their union
    best = torch.load(reference.run_dir / "fold_0" / "best.pt", weights_only=True)
    pinned = {"preset": "recommended", "instance_path": True, "instance_dim": 512}  # the preset as resolved today
    assert best["meta"]["model"]["options"] == {"d_model": 8, "d_state": 4, **pinned, "grid_size": extent}
    assert yaml.safe_load((reference.run_dir / "config.yaml").read_text())["model"] == model  # the config as written
    cached = np.load(reference.run_dir / "groups" / "cells_step" / "slide-03.npz")
    rows_cols = np.split(cached["indices"], cached["offsets"][1:-1])
    assert [a.tolist() for a in rows_cols] == [a.tolist() for a in place_cells(bags[3][1])]

    cfg = write_cfg(tmp_path, out="interrupted", model=model, optim=optim)
    with pytest.raises(KeyboardInterrupt):
        train(TrainParams(cfg), progress=StopAt("fold 1", completed=2))
    run = tmp_path / "interrupted" / "runs" / "run"
    assert (run / "fold_1" / "last.pt").is_file() and not (run / "fold_1" / "metrics.json").exists()
    resumed = train(TrainParams(cfg))
    assert [f.status for f in resumed.folds] == ["done", "trained", "trained"]
    for fold in ("fold_1", "fold_2"):
        for name in ("log.csv", "preds.csv", "metrics.json"):
            assert (run / fold / name).read_bytes() == (reference.run_dir / fold / name).read_bytes(), (fold, name)


def test_coords_off_the_grid_are_one_line_errors_naming_the_slide(tmp_path):
    write_spatial_cohort(tmp_path)
    with h5py.File(tmp_path / "features" / "h5_files" / "slide-04.h5", "a") as f:
        coords = f["coords"][:]
        coords[1] = coords[0] + 100  # inside patch 0's 512-px cell
        f["coords"][...] = coords
    cfg = write_cfg(tmp_path, model={"name": "2dmamba", "cell_size": 512})
    with pytest.raises(UserError, match=r"slide-04\.h5: 2dmamba: 1 patch\(es\) share a grid cell"):
        train(TrainParams(cfg))

