"""QuPath GeoJSON on disk: tissue annotations and patch tiles in level-0 px, as QuPath imports them.

One Feature per tissue region (a Polygon: its outer ring, then its holes), `objectType: annotation`, class
`Tissue`; one Feature per patch, `objectType: tile`, with `measurements` (e.g. attention) and a class (the
slide's predicted class) so QuPath can colour tiles by either. Rings are closed and oriented as RFC 7946 asks
(outer counter-clockwise, holes clockwise, in the numbers as written). Regions are written largest first, so a
reader that paints polygons in order (`wsip patch --masks`) never erases an island lying in an earlier
region's hole. See docs/report.md. A user's own regions (`wsip patch --masks`, `wsip predict --annotations`)
are read here too, in any GeoJSON shape QuPath exports.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from wsi_pipeline.errors import InputError, UserError, one_line
from wsi_pipeline.workspace.files import write_text_atomic

TISSUE_CLASS = {"name": "Tissue", "color": [0, 160, 0]}
Feature = dict[str, Any]


def signed_area(points: np.ndarray) -> float:
    """Shoelace area of a ring (not closed): > 0 when counter-clockwise in the numbers' own frame."""
    x, y = points[:, 0].astype(np.float64), points[:, 1].astype(np.float64)
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def closed_ring(points: np.ndarray, *, outer: bool) -> list[list[int]] | None:
    """A GeoJSON linear ring (first position repeated last), oriented; None for a degenerate contour."""
    pts = np.asarray(points, np.int64).reshape(-1, 2)
    pts = pts[np.r_[True, np.any(np.diff(pts, axis=0) != 0, axis=1)]]  # no repeated consecutive vertices
    if len(pts) > 1 and (pts[0] == pts[-1]).all():
        pts = pts[:-1]
    area = signed_area(pts) if len(pts) >= 3 else 0.0
    if area == 0:
        return None
    if (area > 0) != outer:
        pts = pts[::-1]
    return [*pts.tolist(), pts[0].tolist()]


def tissue_features(contours: Sequence[np.ndarray], holes: Sequence[np.ndarray],
                    hole_parents: Sequence[int]) -> list[Feature]:
    """One annotation per tissue region, largest first; `hole_parents[i]` is hole i's index into `contours`."""
    regions = []
    for i, contour in enumerate(contours):
        outer = closed_ring(contour, outer=True)
        if outer is None:
            continue
        inner = [r for h, p in zip(holes, hole_parents, strict=True) if p == i and (r := closed_ring(h, outer=False))]
        regions.append((signed_area(np.asarray(outer[:-1])), [outer, *inner]))
    regions.sort(key=lambda r: -r[0])
    return [{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": rings},
             "properties": {"objectType": "annotation", "classification": TISSUE_CLASS, "isLocked": False}}
            for _, rings in regions]


def tile_features(coords: np.ndarray, size: int, *, measurements: Mapping[str, np.ndarray] | None = None,
                  classification: str | None = None) -> list[Feature]:
    """One square tile per patch (top-left `coords`, side `size`, level-0 px), in patch order."""
    base: dict[str, Any] = {"objectType": "tile"}
    if classification is not None:
        base["classification"] = {"name": classification}
    columns = {k: np.asarray(v, np.float64).tolist() for k, v in (measurements or {}).items()}
    features = []
    for i, (x, y) in enumerate(np.asarray(coords, np.int64).tolist()):
        square = [[x, y], [x + size, y], [x + size, y + size], [x, y + size], [x, y]]  # counter-clockwise
        props = {**base, "measurements": {k: v[i] for k, v in columns.items()}} if columns else base
        features.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [square]},
                         "properties": props})
    return features


def write_geojson(path: Path, features: Sequence[Feature]) -> None:
    """A FeatureCollection, compact (tiles run to hundreds of thousands), written atomically."""
    write_text_atomic(path, json.dumps({"type": "FeatureCollection", "features": list(features)},
                                       separators=(",", ":")))


def read_features(path: Path, *, fix: str) -> list[Feature]:
    """The features of a FeatureCollection we wrote; `fix` says how to make the file again."""
    if not path.is_file():
        raise UserError(f"{path}: missing; {fix}")
    try:
        return list(json.loads(path.read_text())["features"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path}: unreadable GeoJSON ({one_line(exc)}); {fix}") from None


def read_geojson(path: Path) -> object:
    """A GeoJSON file's content; an unreadable one is a one-line error."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: unreadable GeoJSON ({exc}); export it again from QuPath") from None


def geojson_rings(data: object) -> list[tuple[list, bool]]:
    """(ring, is_outer) for every Polygon/MultiPolygon in a Feature, FeatureCollection, list or geometry."""
    if isinstance(data, list):
        return [r for item in data for r in geojson_rings(item)]
    if not isinstance(data, dict):
        return []
    if data.get("type") == "FeatureCollection":
        return geojson_rings(data.get("features", []))
    if data.get("type") == "Feature":
        return geojson_rings(data.get("geometry"))
    polygons = {"Polygon": [data.get("coordinates", [])], "MultiPolygon": data.get("coordinates", [])}
    rings = []
    for polygon in polygons.get(data.get("type"), []):
        rings += [(ring, j == 0) for j, ring in enumerate(polygon)]
    return rings


def region_file(folder: Path | None, slide_id: str, suffixes: Sequence[str] = (".geojson", ".json", ".png")
                ) -> Path | None:
    """`<folder>/<slide_id><suffix>` for the first suffix present (a user's tissue mask or annotations), or None."""
    if folder is None:
        return None
    return next((p for p in (folder / f"{slide_id}{suffix}" for suffix in suffixes) if p.is_file()), None)
