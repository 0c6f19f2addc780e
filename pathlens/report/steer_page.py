"""`render_steer_page` / `write_steer_page`: one self-contained HTML page for a steering study (`pathlens steer`).

The page shows, from the record `pathlens.steering.sweep.steer_study` writes (steer.json): where the vector came
from (model, site, method, contrast data, date), the dose–response table and PNG, before/after generations, the
cost figures (perplexity, KL, entropy on held-out text) and — when the study explained the vector — the heads,
MLPs, edges and pathways it acts through. The page opens offline (the PNG is inlined) and runs no script (its
Content-Security-Policy forbids any). Every piece of text from the model, the prompts or the record goes through
`esc`, so generated text such as `<script>` shows as text.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pathlens.report.markup import esc, fmt, html_table, signed
from pathlens.results.io import write_text

__all__ = ["render_steer_page", "write_steer_page"]

_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, Arial, sans-serif; margin: 0 auto;
       max-width: 1100px; padding: 0 1.5rem 3rem; color: #222; background: #fff; }
h1 { font-size: 1.6rem; margin: 1.5rem 0 0.5rem; }
h2 { font-size: 1.25rem; margin-top: 2.2rem; border-bottom: 1px solid #ddd; padding-bottom: 0.25rem; }
.caption { color: #555; font-size: 0.9rem; margin: 0.2rem 0 0.6rem; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 0.9rem; margin: 0.4rem 0; }
th, td { border: 1px solid #ddd; padding: 0.25rem 0.6rem; text-align: left; vertical-align: top; }
th { background: #f5f5f5; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.gen { white-space: pre-wrap; font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
img { max-width: 100%; }
"""

_DOSE_COLUMNS = ("scale", "vader_mean", "vader_shift", "ppl", "ppl_increase", "kl", "entropy", "n")
_SIGNED = ("vader_mean", "vader_shift", "ppl_increase")


def _provenance(record: Mapping[str, Any]) -> str:
    vectors: Mapping[str, Any] = record.get("vectors") or {}
    first: Mapping[str, Any] = next(iter(vectors.values()), {})
    meta: Mapping[str, Any] = first.get("meta") or {}
    fields = {
        "model": record.get("model"),
        "concept": record.get("concept"),
        "method": record.get("method"),
        "site": record.get("site"),
        "contrast data": meta.get("data"),
        "read at": meta.get("read_at"),
        "pairs": f"{meta.get('n_positive')} positive / {meta.get('n_negative')} negative",
        "date": meta.get("date"),
        "vector file": record.get("vector"),
    }
    rows = [[(esc(k), False), (esc(fmt(v)), False)] for k, v in fields.items() if v is not None]
    return html_table(["", "value"], rows)


def _dose_table(rows: Sequence[Mapping[str, Any]]) -> str:
    cells = []
    for row in rows:
        out = []
        for c in _DOSE_COLUMNS:
            value = row.get(c)
            text = signed(value) if c in _SIGNED and isinstance(value, float) else fmt(value)
            out.append((esc(text), True))
        cells.append(out)
    return html_table(list(_DOSE_COLUMNS), cells)


def _generated(text: Any) -> str:
    return f'<span class="gen">{esc(text)}</span>'


def _examples(examples: Sequence[Mapping[str, Any]]) -> str:
    if not examples:
        return '<p class="caption">No generations recorded.</p>'
    columns = [k for k in examples[0] if k != "prompt"]
    rows = [
        [
            (esc(ex.get("prompt", "")), False),
            *((f'<span class="gen">{esc(ex.get(c, ""))}</span>', False) for c in columns),
        ]
        for ex in examples
    ]
    return html_table(["prompt", *columns], rows)


def _cost(rows: Sequence[Mapping[str, Any]], budget: Any) -> str:
    if not rows:
        return ""
    base = rows[0].get("ppl_base") or next((r["ppl"] for r in rows if r.get("scale") == 0.0), None)
    limit = float(budget or 0.25)
    within = [r for r in rows if isinstance(r.get("ppl_increase"), float) and r["ppl_increase"] <= limit]
    text = (
        f"Unsteered perplexity on held-out neutral text: {fmt(base)}. Cost is measured with the vector added at every "
        f"position of that text: perplexity (and its increase), KL(unsteered ‖ steered) and entropy of next-token "
        f"distributions. {len(within)} of {len(rows)} scales stay within a {fmt(100 * limit)}% "
        "perplexity increase."
    )
    return f'<p class="caption">{esc(text)}</p>'


def _explanation(found: Mapping[str, Any] | None) -> str:
    if not found:
        return '<p class="caption">Not computed for this study.</p>'
    if "skipped" in found:
        return f'<p class="caption">Not computed: {esc(found["skipped"])}</p>'
    intro = (
        f"Concept metric: {found.get('metric')} at each prompt's last token, over {found.get('n_prompts')} neutral "
        f"prompts: {fmt(found.get('unsteered_metric'))} unsteered, {fmt(found.get('steered_metric'))} steered "
        f"(scale {fmt(found.get('scale'))}). Each score estimates the change of the unsteered run's metric when "
        f"that component's steered output is patched in ({found.get('method')})."
    )
    parts = [f'<p class="caption">{esc(intro)}</p>']
    paths = found.get("paths", [])
    parts.append("<h3>Pathways (strongest first; score = product of |edge score|)</h3>")
    parts.append(
        html_table(
            ["#", "path", "score"],
            [
                [(str(i + 1), True), (esc(" → ".join(p["nodes"])), False), (esc(fmt(p["score"])), True)]
                for i, p in enumerate(paths)
            ],
        )
    )
    for title, key in (("Heads", "top_heads"), ("MLPs", "top_mlps")):
        items = found.get(key, [])
        if items:
            parts.append(f"<h3>{esc(title)} by |effect|</h3>")
            parts.append(
                html_table(
                    ["component", "effect"],
                    [[(esc(x["node"]), False), (esc(signed(x["effect"])), True)] for x in items],
                )
            )
    for title, key in (("The vector's own edges", "vector_edges"), ("Strongest edges", "top_edges")):
        items = found.get(key, [])
        if items:
            parts.append(f"<h3>{esc(title)}</h3>")
            parts.append(
                html_table(
                    ["sender", "receiver", "score"],
                    [
                        [(esc(e["sender"]), False), (esc(e["receiver"]), False), (esc(signed(e["score"])), True)]
                        for e in items
                    ],
                )
            )
    return "\n".join(parts)


def render_steer_page(record: Mapping[str, Any], png: bytes | None = None, title: str | None = None) -> str:
    """The HTML page of a steering study record (steer.json) with the dose–response PNG bytes inlined."""
    heading = (
        title or f"Steering {record.get('concept', '')} with {record.get('method', '')} on {record.get('model', '')}"
    )
    rows = list(record.get("rows", []))
    picture = (
        f'<img alt="dose-response" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'
        if png
        else '<p class="caption">No PNG.</p>'
    )
    sampling = "sampled" if record.get("do_sample") else "greedy"
    dose_caption = (
        f"{record.get('prompts')} neutral prompts × {record.get('max_new_tokens')} new tokens ({sampling}, seed "
        f"{record.get('seed')}); VADER compound of the completions, shift against the unsteered rows "
        f"({fmt(record.get('unsteered_vader_mean'))}); scale is a fraction of the site's typical norm."
    )
    body = f"""<h1>{esc(heading)}</h1>
<h2>Provenance</h2>
{_provenance(record)}
<h2>Dose–response</h2>
<p class="caption">{esc(dose_caption)}</p>
{_dose_table(rows)}
{picture}
<h2>Before and after</h2>
{_examples(record.get("examples", []))}
<h2>Cost</h2>
{_cost(rows, record.get("ppl_budget"))}
<h2>Why it works</h2>
{_explanation(record.get("explanation"))}"""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{esc(_CSP)}">
<title>{esc(heading)}</title>
<style>{_STYLE}</style></head>
<body>
{body}
</body></html>
"""


def write_steer_page(folder: str | os.PathLike[str], record: Mapping[str, Any] | None = None) -> Path:
    """Write `steer.html` into `folder` from its steer.json (or `record`) and dose_response.png; returns the path."""
    import json

    base = Path(os.fspath(folder))
    data = record if record is not None else json.loads((base / "steer.json").read_text(encoding="utf-8"))
    png_path = base / "dose_response.png"
    png = png_path.read_bytes() if png_path.exists() else None
    return write_text(base / "steer.html", render_steer_page(data, png))
