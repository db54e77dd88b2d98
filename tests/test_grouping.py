"""LG grouping (GMMAMBA.md §2) and the lazy model registry."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from sklearn.cluster import KMeans

from wsi_pipeline.errors import UserError
from wsi_pipeline.models.mil import list_models
from wsi_pipeline.models.mil.grouping import group_cache_key, groups_from_labels, kmeans_labels, make_groups


def _grid_coords(n: int, seed: int = 0) -> np.ndarray:
    """n distinct patch positions on a 256 px grid, shuffled (h5 order is not raster order)."""
    rng = np.random.default_rng(seed)
    cells = rng.choice(60 * 60, size=n, replace=False)
    return np.stack([cells % 60, cells // 60], axis=1).astype(np.int64) * 256


def _assert_partition(groups: list[np.ndarray], n: int, *, ascending: bool = True) -> None:
    assert all(len(g) > 0 for g in groups)
    if ascending:
        assert all(np.all(np.diff(g) > 0) for g in groups), "indices inside a group must ascend (scan order)"
    np.testing.assert_array_equal(np.sort(np.concatenate(groups)), np.arange(n))


def test_kmeans_matches_sklearn_reference_labels() -> None:
    coords = _grid_coords(700)
    ref = KMeans(n_clusters=10, random_state=0, n_init=1).fit_predict(coords)
    ref_auto = KMeans(n_clusters=10, random_state=0, n_init="auto").fit_predict(coords)
    np.testing.assert_array_equal(ref, ref_auto)  # the released code's n_init='auto' == one k-means++ init
    groups = make_groups(coords)
    assert len(groups) == 10
    for label, g in enumerate(groups):  # groups listed in label order, indices ascending
        np.testing.assert_array_equal(g, np.flatnonzero(ref == label))


def test_kmeans_grouping_is_deterministic_and_spatial() -> None:
    coords = _grid_coords(500, seed=3)
    first, second = make_groups(coords), make_groups(coords.copy())
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))
    # spatial: each group's spread is well below the whole bag's
    spread = [coords[g].std(axis=0).mean() for g in first]
    assert max(spread) < 0.6 * coords.std(axis=0).mean()


@pytest.mark.parametrize("method", ["kmeans", "sequential", "random", "feature_kmeans"])
def test_every_method_partitions_the_bag(method: str) -> None:
    coords = _grid_coords(203)
    features = np.random.default_rng(1).normal(size=(203, 8)).astype(np.float32)
    groups = make_groups(coords, features, method=method, n_groups=10)
    assert len(groups) == 10
    _assert_partition(groups, 203, ascending=method != "random")  # random keeps the permutation's order


def test_sequential_is_array_split_of_h5_order_and_random_is_seeded_equal_split() -> None:
    coords = _grid_coords(23)
    seq = make_groups(coords, method="sequential", n_groups=10)
    assert [g.tolist() for g in seq] == [a.tolist() for a in np.array_split(np.arange(23), 10)]
    rnd0 = make_groups(coords, method="random", n_groups=10, seed=0)
    rnd1 = make_groups(coords, method="random", n_groups=10, seed=1)
    assert sorted(len(g) for g in rnd0) == sorted(len(g) for g in seq)
    assert [g.tolist() for g in rnd0] == [g.tolist() for g in make_groups(coords, method="random", seed=0)]
    assert [g.tolist() for g in rnd0] != [g.tolist() for g in rnd1]


def test_feature_kmeans_clusters_features_not_coords() -> None:
    coords = _grid_coords(60)
    features = np.zeros((60, 4), dtype=np.float32)
    features[::2, 0] = 100.0  # two tight feature clusters, interleaved in h5 order
    groups = make_groups(coords, features, method="feature_kmeans", n_groups=2)
    assert sorted(g.tolist() for g in groups) == [list(range(0, 60, 2)), list(range(1, 60, 2))]
    with pytest.raises(ValueError, match="needs the bag's features"):
        make_groups(coords, None, method="feature_kmeans")


@pytest.mark.parametrize("method", ["kmeans", "sequential", "random", "feature_kmeans"])
@pytest.mark.parametrize("n", [1, 2, 7])
def test_fewer_instances_than_groups(method: str, n: int) -> None:
    coords = _grid_coords(n)
    groups = make_groups(coords, coords.astype(np.float32), method=method, n_groups=10)
    assert len(groups) == n  # G is clipped to N: one instance per group
    _assert_partition(groups, n)


def test_duplicate_coordinates_give_no_empty_groups() -> None:
    coords = np.array([[0, 0]] * 5 + [[512, 512]] * 5 + [[4096, 0]] * 3)
    groups = make_groups(coords, n_groups=10)
    assert len(groups) == 3  # only 3 distinct points
    _assert_partition(groups, 13)
    assert kmeans_labels(np.zeros((4, 2)), 10).tolist() == [0, 0, 0, 0]


def test_groups_from_labels_drops_empty_labels_and_keeps_label_order() -> None:
    groups = groups_from_labels(np.array([3, 0, 3, 0, 5]))
    assert [g.tolist() for g in groups] == [[1, 3], [0, 2], [4]]


def test_cache_key_and_bad_arguments() -> None:
    assert group_cache_key("kmeans", 10) == "kmeans_G10"
    assert group_cache_key("random", 5, seed=3) == "random_G5_s3_unsorted"
    with pytest.raises(ValueError, match="unknown grouping"):
        make_groups(_grid_coords(5), method="hilbert")
    with pytest.raises(ValueError, match="empty bag"):
        make_groups(np.zeros((0, 2)))


def test_registry_lists_models_and_does_not_import_torch() -> None:
    assert list_models() == ["2dmamba", "abmil", "acmil", "clam_sb", "dsmil", "gmmamba", "mambamil", "max", "mean",
                             "transmil"]
    code = "import sys, wsi_pipeline.models.mil as m; m.list_models(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_models_register_themselves_and_list_by_pattern(monkeypatch) -> None:
    from wsi_pipeline.models.mil import create_model, model_options, register_model, registry

    assert list_models("*mamba*") == ["2dmamba", "gmmamba", "mambamil"]
    assert list_models("clam*") == ["clam_sb"]
    for name in list_models():  # importing the module found for a name registers that very name
        assert isinstance(model_options(name), list)
    monkeypatch.setattr(registry, "_BUILDERS", dict(registry._BUILDERS))
    monkeypatch.setattr(registry, "_OPTIONS", dict(registry._OPTIONS))

    @register_model("tiny_elsewhere")
    class Tiny:  # a model registered outside the package (imported by the caller) is listed and built too
        def __init__(self, in_dim: int, n_classes: int, *, width: int = 2) -> None:
            self.width = width

    assert "tiny_elsewhere" in list_models("tiny*")
    assert create_model("tiny_elsewhere", in_dim=4, n_classes=2, width=3).width == 3


def test_unknown_model_name_is_a_clear_error() -> None:
    from wsi_pipeline.models.mil import create_model

    with pytest.raises(UserError, match="unknown model 'gmmambo'; available: 2dmamba, abmil"):
        create_model("gmmambo", in_dim=512, n_classes=2)
