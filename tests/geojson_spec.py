"""The GeoJSON rules (RFC 7946 §3) a QuPath export must keep, checked on the parsed file."""

from __future__ import annotations

from typing import Any


def ring_area(ring: list[list[float]]) -> float:
    """Shoelace area of a closed ring: > 0 counter-clockwise."""
    return 0.5 * sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(ring[:-1], ring[1:], strict=True))


def spec_errors(data: Any, width: int, height: int) -> list[str]:
    """Every violation found: FeatureCollection of Features, Polygons of closed, non-degenerate rings with the
    right orientation, positions as numbers inside the slide (level-0 px)."""
    if not isinstance(data, dict) or data.get("type") != "FeatureCollection" or not isinstance(data.get("features"),
                                                                                                list):
        return ["not a FeatureCollection with a features list"]
    errors = []
    for i, feature in enumerate(data["features"]):
        geometry = feature.get("geometry") or {}
        if feature.get("type") != "Feature" or geometry.get("type") != "Polygon" or "properties" not in feature:
            errors.append(f"feature {i}: not a Feature with a Polygon geometry and properties")
            continue
        for j, ring in enumerate(geometry["coordinates"]):
            where = f"feature {i} ring {j}"
            if len(ring) < 4 or ring[0] != ring[-1]:
                errors.append(f"{where}: not closed or fewer than 4 positions")
                continue
            if not all(len(p) == 2 and all(isinstance(v, int | float) for v in p) for p in ring):
                errors.append(f"{where}: positions are not [x, y] numbers")
                continue
            if not all(0 <= x <= width and 0 <= y <= height for x, y in ring):
                errors.append(f"{where}: positions outside the slide {width}x{height}")
            area = ring_area(ring)
            if (j == 0 and area <= 0) or (j > 0 and area >= 0):
                errors.append(f"{where}: {'outer' if j == 0 else 'hole'} ring wrongly oriented (area {area})")
    return errors
