"""Units in the types (after STAMP): a level-0 pixel cannot silently flow where a micron is expected.

These are `NewType`s: free at run time, but type checkers and readers see which unit a number carries.
"""

from __future__ import annotations

from typing import NewType

Microns = NewType("Microns", float)
"""A physical length in µm."""

SquareMicrons = NewType("SquareMicrons", float)
"""A physical area in µm² (tissue-area thresholds are in these, so they mean the same at every scan)."""

MPP = NewType("MPP", float)
"""Microns per pixel at some resolution (0.25 ≈ 40x, 0.5 ≈ 20x, 1.0 ≈ 10x)."""

Level0Px = NewType("Level0Px", int)
"""A length or coordinate in pixels of the slide's full-resolution level 0."""

LevelPx = NewType("LevelPx", int)
"""A length or coordinate in pixels of some pyramid level (always say which)."""


def mpp_for_magnification(magnification: float) -> MPP:
    """The field's convention: 10x ↔ 1.0 µm/px, so 20x → 0.5 and 40x → 0.25."""
    if magnification <= 0:
        raise ValueError(f"magnification must be positive, got {magnification}")
    return MPP(10.0 / magnification)


def magnification_for_mpp(mpp: float) -> float:
    """Inverse of :func:`mpp_for_magnification`."""
    return 10.0 / mpp
