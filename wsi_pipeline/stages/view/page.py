"""The `wsip view` page: OpenSeadragon over the slide's Deep Zoom tiles, the attention layer and the patch boxes.

Tile sources are inline DZI descriptions (not `.dzi` files fetched by XHR, which browsers refuse from file://),
and OpenSeadragon draws on a 2-D canvas (its WebGL drawer cannot take images from file:// pages). The page keeps
its viewer in `window.wsipViewer` (for the browser test and for anyone scripting it in the console).
"""

from __future__ import annotations

import json
from html import escape
from typing import Any

_DZI = "http://schemas.microsoft.com/deepzoom/2008"

_CSS = """
html,body{margin:0;height:100%;font:13px system-ui,sans-serif;background:#111;color:#eee}
header{display:flex;flex-wrap:wrap;gap:18px;align-items:center;padding:6px 12px;background:#1d2b3a}
header b{font-size:15px}label{cursor:pointer}#viewer{position:absolute;top:42px;bottom:0;left:0;right:0}
.legend{display:inline-block;width:120px;height:10px;vertical-align:middle;
background:linear-gradient(90deg,#00008f,#0000ff,#00ffff,#ffff00,#ff0000,#800000)}
#patches{pointer-events:none}#patches path{fill:none;stroke:#ffd400;stroke-width:1;vector-effect:non-scaling-stroke}
#patches.off path{display:none}
"""

_SCRIPT = """
const cfg = JSON.parse(document.getElementById("wsip-config").textContent);
const dzi = (url, fmt, size) => ({Image: {xmlns: cfg.xmlns, Url: url, Format: fmt, Overlap: "1",
  TileSize: String(cfg.tileSize), Size: {Width: String(size[0]), Height: String(size[1])}}});
const viewer = OpenSeadragon({
  id: "viewer", prefixUrl: "openseadragon/images/", drawer: "canvas", showNavigator: true,
  maxZoomPixelRatio: 4, crossOriginPolicy: false,
  tileSources: [
    {tileSource: dzi("slide_files/", "jpeg", cfg.slideSize)},
    {tileSource: dzi("attention_files/", "png", cfg.overlaySize), opacity: 0.55, compositeOperation: "multiply"},
  ],
});
window.wsipViewer = viewer;
const boxes = document.getElementById("patches");
viewer.addHandler("open", () => {
  const slide = viewer.world.getItemAt(0);
  const full = slide.imageToViewportRectangle(0, 0, slide.source.dimensions.x, slide.source.dimensions.y);
  viewer.addOverlay({element: boxes, location: full});
});
const opacity = document.getElementById("opacity");
const showAttention = document.getElementById("show-attention");
const setAttention = () => viewer.world.getItemAt(1).setOpacity(showAttention.checked ? Number(opacity.value) : 0);
showAttention.addEventListener("change", setAttention);
opacity.addEventListener("input", setAttention);
// OpenSeadragon owns the overlay element's own style: hide its content instead
document.getElementById("show-patches").addEventListener("change",
  (e) => boxes.classList.toggle("off", !e.target.checked));
"""


def viewer_page(*, slide_id: str, run: str, record: dict[str, Any], slide_size: tuple[int, int],
                overlay_size: tuple[int, int], level0: tuple[int, int], boxes: str, tile_size: int) -> str:
    """`slide_size`: the deepest tiled level's size; `level0`: the slide's, in which `boxes` is drawn."""
    config = {"xmlns": _DZI, "tileSize": tile_size, "slideSize": list(slide_size), "overlaySize": list(overlay_size)}
    probs = " · ".join(f"{escape(str(c))} {float(p):.2f}" for c, p in record.get("probabilities", {}).items())
    w, h = level0
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>{escape(slide_id)}: wsip view</title><style>{_CSS}</style></head><body>
<header><b>{escape(slide_id)}</b><span>run {escape(run)}: <b>{escape(str(record.get("predicted", "?")))}</b>
({probs}), {int(record.get("n_patches", 0))} patches</span>
<label><input type="checkbox" id="show-attention" checked> attention</label>
<input type="range" id="opacity" min="0.1" max="1" step="0.05" value="0.55" title="attention opacity">
<span>low <span class="legend"></span> high</span>
<label><input type="checkbox" id="show-patches" checked> patches</label></header>
<div id="viewer"></div>
<svg id="patches" viewBox="0 0 {w} {h}" preserveAspectRatio="none" xmlns="http://www.w3.org/2000/svg">
<path d="{boxes}"/></svg>
<script id="wsip-config" type="application/json">{_json_for_script(config)}</script>
<script src="openseadragon/openseadragon.min.js"></script>
<script>{_SCRIPT}</script></body></html>
"""


def _json_for_script(data: Any) -> str:
    """JSON safe inside a <script> element (no `</` can close it early)."""
    return json.dumps(data).replace("</", "<\\/")
