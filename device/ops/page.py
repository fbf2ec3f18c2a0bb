"""The page at ``/``: one live preview per camera and the stats table. Self-contained (inline
CSS and script, no external assets: the device may be offline); every name is escaped."""

from __future__ import annotations

import html
from typing import Sequence, Tuple
from urllib.parse import quote

_STYLE = """
body { font: 14px system-ui, sans-serif; margin: 1em; background: #111; color: #ddd; }
h1 { font-size: 1.2em; } h2 { font-size: 1em; margin: .2em 0; }
.cams { display: flex; flex-wrap: wrap; gap: 1em; }
figure { margin: 0; } img.preview { display: block; background: #222; }
table { border-collapse: collapse; margin-top: 1em; }
td, th { border: 1px solid #444; padding: 2px 8px; text-align: left; vertical-align: top; }
#health.ok { color: #6d6; } #health.bad { color: #e66; }
"""

_SCRIPT = """
function cell(value) {
  return (value !== null && typeof value === "object") ? JSON.stringify(value) : String(value);
}
async function refresh() {
  try {
    const health = await fetch("healthz", {cache: "no-store"});
    const status = document.getElementById("health");
    status.textContent = health.ok ? "healthy" : "unhealthy: " + (await health.json()).reason;
    status.className = health.ok ? "ok" : "bad";
    const reply = await fetch("api/stats", {cache: "no-store"});
    const body = document.getElementById("stats");
    if (!reply.ok) { return; }
    const stats = await reply.json();
    body.replaceChildren(...Object.entries(stats).map(([key, value]) => {
      const row = document.createElement("tr");
      const name = document.createElement("th"); name.textContent = key;
      const text = document.createElement("td"); text.textContent = cell(value);
      row.append(name, text); return row;
    }));
  } catch (error) { /* the device restarts: try again at the next tick */ }
}
refresh(); setInterval(refresh, 2000);
"""


def preview_path(key: str, kind: str = "mjpg") -> str:
    return f"preview/{quote(key, safe='')}.{kind}"


def render_page(title: str, cameras: Sequence[Tuple[str, str]]) -> str:
    """``cameras``: (display name, URL key) per source."""
    figures = "\n".join(
        f'<figure><h2>{html.escape(name)}</h2><img class="preview" id="preview-{html.escape(key)}"'
        f' src="{html.escape(preview_path(key))}" alt="{html.escape(name)}">'
        "</figure>"
        for name, key in cameras
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>{_STYLE}</style></head>
<body><h1>{html.escape(title)} <span id="health">…</span></h1>
<div class="cams">{figures}</div>
<table><tbody id="stats"><tr><td>waiting for the first stats message…</td></tr></tbody></table>
<script>{_SCRIPT}</script>
</body></html>
"""
