"""`verify --out-dir`: one grid per file, named so files of one name never collide, and an `index.html`
contact sheet of them all, which opens offline from the folder (relative links, nothing fetched) and sorts
by verdict or name with a few lines of inline script.
"""

from __future__ import annotations

import os
from html import escape
from pathlib import Path
from typing import Any
from urllib.parse import quote

from adapterzoo.formats.io.atomic import atomic_output

INDEX = "index.html"
STYLE = """
body { font: 14px sans-serif; margin: 1em; }
.card { border: 1px solid #ccc; border-left: 6px solid #2a2; margin: 0 0 1em; padding: .5em 1em; }
.card[data-verdict=fail] { border-left-color: #c22; }
.verdict { font-weight: bold; text-transform: uppercase; }
img { max-width: 100%; display: block; margin: .5em 0; }
td, th { padding: 0 .8em 0 0; text-align: left; }
"""
SCRIPT = """
function sortCards(key) {
  const cards = document.getElementById("cards");
  [...cards.children].sort((a, b) => a.dataset[key].localeCompare(b.dataset[key])
                                     || a.dataset.name.localeCompare(b.dataset.name))
    .forEach(card => cards.appendChild(card));
}
"""


def grid_file(out_dir: Path, file: Path, sha256: str) -> Path:
    """DIR/<stem>-<sha256[:10]>.png: two files of one name (from different folders) keep their own grid."""
    return Path(out_dir) / f"{Path(file).stem}-{sha256[:10]}.png"


def _number(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _card(result: dict[str, Any], out_dir: Path) -> str:
    name = Path(result["file"]).name
    parts = [f'<div class="card" data-verdict="{escape(result["verdict"])}" data-name="{escape(name.lower())}">',
             f'<div><span class="verdict">{escape(result["verdict"])}</span> '
             f'<b title="{escape(result["file"])}">{escape(name)}</b> '
             f'({escape(" / ".join(str(result[k]) for k in ("kind", "base", "format") if result.get(k)))})</div>']
    if result.get("checkpoint"):
        parts.append(f'<div>on {escape(Path(result["checkpoint"]).name)}</div>')
    if result.get("reasons"):
        parts.append("<ul>" + "".join(f"<li>{escape(r)}</li>" for r in result["reasons"]) + "</ul>")
    coverage = result.get("coverage")
    if coverage:
        parts.append(f'<div>coverage: {coverage["keys_matched"]}/{coverage["keys_total"]} keys, '
                     f'{coverage["modules_hit"]}/{coverage["modules_total"]} modules ran</div>')
    if result.get("effects"):
        rows = "".join(f'<tr><td>{e["multiplier"]:g}</td><td>{_number(e["mean_abs_pixel_change"], ".3f")}</td>'
                       f'<td>{_number(e["noise_pred_rel_change"], ".2%")}</td></tr>' for e in result["effects"])
        parts.append("<table><tr><th>multiplier</th><th>pixel change /255</th><th>noise prediction change</th>"
                     f"</tr>{rows}</table>")
    if result.get("grid"):
        link = quote(Path(os.path.relpath(result["grid"], out_dir)).as_posix())
        parts.append(f'<a href="{escape(link)}"><img src="{escape(link)}" alt="grid of {escape(name)}"></a>')
    return "\n".join(parts) + "\n</div>"


def write_contact_sheet(out_dir: Path, results: list[dict[str, Any]], summary: str) -> Path:
    """DIR/index.html over `results` (the objects `verify --json` prints), written atomically."""
    out_dir = Path(out_dir)
    page = "\n".join([
        "<!doctype html>", '<html><head><meta charset="utf-8"><title>adapterzoo verify</title>',
        f"<style>{STYLE}</style><script>{SCRIPT}</script></head><body>",
        f"<h1>adapterzoo verify</h1><p>{escape(summary)}</p>",
        '<p>sort by <button onclick="sortCards(\'verdict\')">verdict</button> '
        '<button onclick="sortCards(\'name\')">name</button></p>',
        '<div id="cards">', *(_card(r, out_dir) for r in results), "</div></body></html>", ""])
    path = out_dir / INDEX
    with atomic_output(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path
