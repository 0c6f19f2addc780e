"""One HTML page per trained dictionary: its evaluation card, the latent density histogram, and the
top-activating contexts of a selection of latents with every token shaded by the latent's activation.

The page is self-contained and opens offline: the histogram is a PNG (also written beside the page as
`density.png`) embedded as a data URI, styles are inline, there is no script, and the Content-Security-Policy
forbids loading anything. Every token and every label is HTML-escaped (`pathlens.report.markup.esc`), so a
token such as `<script>` shows as text.
"""

from __future__ import annotations

import base64
import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pathlens.features.contexts import LatentContext
from pathlens.features.evaluate import EvaluationCard
from pathlens.report.markup import esc, fmt, html_table
from pathlens.results.io import write_bytes, write_text

__all__ = ["density_png", "render_dictionary_page", "write_dictionary_page"]

_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, Arial, sans-serif; margin: 0 auto;
       max-width: 1100px; padding: 0 1.5rem 3rem; color: #222; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.2rem; border-bottom: 1px solid #ddd; margin-top: 2rem; }
h3 { font-size: 1rem; margin: 1.2rem 0 0.3rem; }
.caption { color: #555; font-size: 0.9rem; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 0.9rem; }
th, td { border: 1px solid #ddd; padding: 0.2rem 0.6rem; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.context { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 0.85rem; white-space: pre-wrap;
           margin: 0.15rem 0; }
.context span.peak { outline: 1px solid #b00; }
"""
_CARD_ROWS = (
    ("site", "site encoded"),
    ("target", "site rebuilt"),
    ("kind", "kind"),
    ("width", "latents"),
    ("tokens", "held-out tokens"),
    ("l0", "L0 (active latents per token)"),
    ("fve", "fraction of variance explained"),
    ("mse", "mean squared error per token"),
    ("ce_clean", "CE loss, model"),
    ("ce_spliced", "CE loss, site replaced by the reconstruction"),
    ("ce_zero", "CE loss, site zero-ablated"),
    ("ce_recovered", "CE loss recovered"),
    ("kl", "KL(model || reconstruction), nats per token"),
    ("dead_fraction", "dead latents (never fire)"),
    ("dense_fraction", "dense latents (fire on > 10% of tokens)"),
)


def density_png(card: EvaluationCard) -> bytes:
    """The histogram of log10 firing frequencies of the live latents (dead ones counted in the title), as PNG."""
    freq = card.frequencies.double().numpy()
    live = freq[freq > 0]
    fig = Figure(figsize=(6.0, 3.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if live.size:
        ax.hist(np.log10(live), bins=50, color="#4472c4")
    ax.set_xlabel("log10 firing frequency")
    ax.set_ylabel("latents")
    ax.set_title(f"{card.name}: {live.size} live, {freq.size - live.size} dead of {freq.size}")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _card_table(card: EvaluationCard) -> str:
    values = card.as_dict()
    return html_table(
        ["", "value"],
        [[(esc(label), False), (esc(fmt(values[key])), not isinstance(values[key], str))] for key, label in _CARD_ROWS],
    )


def _shade(activation: float, peak: float) -> str:
    """A background colour for a token: white at 0, strong orange at the latent's largest activation shown."""
    strength = 0.0 if peak <= 0 else max(0.0, min(1.0, activation / peak))
    alpha = round(0.85 * math.sqrt(strength), 3)
    return f"rgba(255, 140, 0, {alpha})"


def _context_html(context: LatentContext, peak: float) -> str:
    spans = []
    for i, (token, act) in enumerate(zip(context.tokens, context.activations, strict=True)):
        cls = ' class="peak"' if i == context.peak else ""
        spans.append(f'<span{cls} style="background: {_shade(act, peak)}" title="{esc(fmt(act))}">{esc(token)}</span>')
    return f'<div class="context">{"".join(spans)}</div>'


def _latents_section(contexts: Mapping[int, Sequence[LatentContext]], card: EvaluationCard) -> str:
    parts = []
    for latent, items in contexts.items():
        freq = float(card.frequencies[latent]) if latent < card.frequencies.numel() else float("nan")
        peak = max((c.value for c in items), default=0.0)
        caption = f"fires on {fmt(100 * freq)}% of tokens; max {fmt(peak)}"
        head = f'<h3>F{latent} <span class="caption">{esc(caption)}</span></h3>'
        body = "\n".join(_context_html(c, peak) for c in items) or '<p class="caption">no positive activation</p>'
        parts.append(head + "\n" + body)
    return "\n".join(parts)


def render_dictionary_page(
    card: EvaluationCard,
    contexts: Mapping[int, Sequence[LatentContext]],
    title: str | None = None,
    meta: Mapping[str, Any] | None = None,
    density: bytes | None = None,
) -> str:
    """The page as an HTML5 document: card, density histogram (`density` PNG bytes; computed if not given),
    the contexts of each latent in `contexts` and the dictionary's provenance `meta`."""
    png = density if density is not None else density_png(card)
    image = f'<img alt="latent density histogram" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'
    provenance = ""
    if meta:
        provenance = html_table(["", ""], [[(esc(k), False), (esc(fmt(v)), False)] for k, v in meta.items()])
    name = title or f"Dictionary {card.name}"
    sections = [
        ("Evaluation card", _card_table(card)),
        ("Latent density", image),
        (
            f"Top-activating contexts ({len(contexts)} latents)",
            '<p class="caption">Each token is shaded by the latent\'s activation on it; the outlined token is the '
            "peak.</p>\n" + _latents_section(contexts, card),
        ),
    ]
    if provenance:
        sections.append(("Provenance", provenance))
    body = "\n".join(f"<section>\n<h2>{esc(h)}</h2>\n{c}\n</section>" for h, c in sections)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{esc(_CSP)}">\n'
        f"<title>{esc(name)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
        f"<h1>{esc(name)}</h1>\n{body}\n</body>\n</html>\n"
    )


def write_dictionary_page(
    folder: str | os.PathLike[str],
    card: EvaluationCard,
    contexts: Mapping[int, Sequence[LatentContext]],
    title: str | None = None,
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Write `index.html` and `density.png` into `folder` (atomically); returns the page's path."""
    out = Path(os.fspath(folder)).expanduser()
    png = density_png(card)
    write_bytes(out / "density.png", png)
    return write_text(out / "index.html", render_dictionary_page(card, contexts, title, meta, png))
