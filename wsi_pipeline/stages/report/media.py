"""Images embedded in the report as data URIs: bounded thumbnails of QC/heatmap images, and SVG plots.

A 1,000-slide cohort must stay a file a browser opens quickly (docs/report.md: under 50 MB), so every picture
is shrunk to `max_side` px and re-encoded as JPEG; the JPEG decoder is asked for a reduced-size decode first
(PIL `draft`), which makes thumbnailing a 1,024 px QC image a few milliseconds.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

from PIL import Image


def data_uri(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def svg_uri(svg: bytes) -> str:
    return data_uri("image/svg+xml", svg)


def thumbnail_uri(path: Path, max_side: int, *, quality: int = 72) -> tuple[str, tuple[int, int]]:
    """(JPEG data URI, (width, height)) of the image at `path`, its longer side at most `max_side` px."""
    with Image.open(path) as image:
        image.draft("RGB", (max_side, max_side))
        image = image.convert("RGB")
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=quality, optimize=True)
        return data_uri("image/jpeg", buffer.getvalue()), image.size
