"""The patch stage's tissue outline as QuPath GeoJSON: valid per RFC 7946, in level-0 px, and it round-trips through
`--masks` to the same tissue and the same patches."""

from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import pytest
from geojson_spec import spec_errors

from wsi_pipeline.stages.inputs import SlideSource
from wsi_pipeline.stages.patch import PatchParams, patch
from wsi_pipeline.testing.synthetic import write_aperio_slide
from wsi_pipeline.workspace.coords_store import read_coords
from wsi_pipeline.workspace.geojson import closed_ring, tile_features

SIZE = 2400  # px at 0.5 µm/px: 1.2 mm square


@pytest.fixture(scope="module")
def donut_slide(tmp_path_factory):
    """Stained tissue in a disc with a glass hole and a tissue island inside the hole: a polygon with a hole,
    plus a region that a reader painting in the wrong order would erase."""
    rng = np.random.default_rng(0)
    image = np.clip(rng.normal((200, 150, 190), 12, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    r = np.hypot(yy - SIZE / 2, xx - SIZE / 2)
    image[(r > 1100) | ((r > 320) & (r < 560))] = 242
    return write_aperio_slide(tmp_path_factory.mktemp("donut") / "donut.svs", image, mpp=0.5, app_mag=20)


def rasterise(features: list, scale: float = 1 / 8) -> np.ndarray:
    """Paint the polygons in order (outer 1, holes 0), at 1/8 of level 0."""
    mask = np.zeros((int(SIZE * scale) + 1,) * 2, np.uint8)
    for feature in features:
        for j, ring in enumerate(feature["geometry"]["coordinates"]):
            cv2.fillPoly(mask, [np.round(np.asarray(ring) * scale).astype(np.int32)], 0 if j else 1)
    return mask


@pytest.mark.e2e
def test_tissue_outline_is_valid_geojson_with_the_hole_and_the_island(tmp_path, donut_slide):
    result = patch([SlideSource(donut_slide)], out=tmp_path)
    data = json.loads(result.patch_set.mask("donut").read_text())
    assert spec_errors(data, SIZE, SIZE) == []
    rings = [f["geometry"]["coordinates"] for f in data["features"]]
    assert sorted(len(r) for r in rings) == [1, 2]  # the island, then the disc with its hole
    assert len(rings[0]) == 2, "the larger region comes first, so the island is painted after the hole"
    assert {f["properties"]["objectType"] for f in data["features"]} == {"annotation"}
    assert {f["properties"]["classification"]["name"] for f in data["features"]} == {"Tissue"}
    mask = rasterise(data["features"])
    yy, xx = np.mgrid[:mask.shape[0], :mask.shape[1]] * 8
    r = np.hypot(yy - SIZE / 2, xx - SIZE / 2)
    truth = (r <= 1100) & ((r <= 320) | (r >= 560))
    assert (mask.astype(bool) == truth).mean() > 0.97


@pytest.mark.e2e
def test_outline_fed_back_through_masks_gives_the_same_tissue_and_patches(tmp_path, donut_slide):
    first = patch([SlideSource(donut_slide)], out=tmp_path / "a")
    masks = tmp_path / "masks"
    masks.mkdir()
    shutil.copy(first.patch_set.mask("donut"), masks / "donut.geojson")
    second = patch([SlideSource(donut_slide)], PatchParams(masks=masks), out=tmp_path / "b")
    assert second.outcomes[0].status == "done"
    coords_a, _ = read_coords(first.patch_set.coords("donut"))
    coords_b, _ = read_coords(second.patch_set.coords("donut"))
    assert len(coords_a) > 20 and np.array_equal(coords_a, coords_b)
    outline_a = json.loads(first.patch_set.mask("donut").read_text())["features"]
    outline_b = json.loads(second.patch_set.mask("donut").read_text())["features"]
    assert outline_a == outline_b  # the very same polygons, vertex for vertex


@pytest.mark.e2e
def test_a_missing_outline_is_made_again_without_force(tmp_path, donut_slide):
    source = [SlideSource(donut_slide)]
    first = patch(source, out=tmp_path)
    outline = first.patch_set.mask("donut")
    kept = outline.read_text()
    assert patch(source, out=tmp_path).outcomes[0].status == "cached"
    outline.unlink()
    assert patch(source, out=tmp_path).outcomes[0].status == "done" and outline.read_text() == kept


def test_rings_are_closed_oriented_and_degenerate_ones_dropped():
    clockwise = np.array([[0, 0], [0, 10], [10, 10], [10, 0]])
    outer = closed_ring(clockwise, outer=True)
    hole = closed_ring(clockwise, outer=False)
    assert outer[0] == outer[-1] and len(outer) == 5
    assert spec_errors({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": [outer, hole]}}]},
        10, 10) == []
    assert closed_ring(np.array([[0, 0], [5, 5], [10, 10]]), outer=True) is None  # collinear: no area
    assert closed_ring(np.array([[0, 0], [0, 0], [4, 0]]), outer=True) is None


def test_tiles_carry_measurements_and_class():
    tiles = tile_features(np.array([[0, 0], [512, 256]]), 256, measurements={"attention": np.array([0.25, 0.75])},
                          classification="tumour")
    assert spec_errors({"type": "FeatureCollection", "features": tiles}, 1024, 1024) == []
    assert [t["properties"]["measurements"]["attention"] for t in tiles] == [0.25, 0.75]
    assert tiles[1]["geometry"]["coordinates"][0][2] == [768, 512]
    assert {t["properties"]["objectType"] for t in tiles} == {"tile"}
    assert {t["properties"]["classification"]["name"] for t in tiles} == {"tumour"}
