"""`write_index(dir)`: one page that links every result written under a folder, so a study is one page to open.

Results are recognised by their files, in every folder below `dir`:

- a `Scores` or `Graph` pair (`<name>.safetensors` + `<name>.json` whose header names its format): patching
  sweeps, attribution, edge scores and circuits — summarised by kind, method, metric, model, task, dims or edge
  count, and a key figure (the strongest cell; a circuit's faithfulness);
- `report.html` (a circuit report), by its title;
- a circuit study's record (JSON with method, faithfulness and n_edges) and a study's `summary.json`;
- PNG figures (shown as thumbnails) and CSV tables (linked).

Pairs that do not load (a checksum mismatch, a truncated file) are listed with the reason instead of stopping
the page. Every name and value is HTML-escaped; links are relative, so the folder can be moved or shared.
"""

from __future__ import annotations

import html
import json
import os
import re
from dataclasses import dataclass
from numbers import Real
from pathlib import Path
from typing import Any
from urllib.parse import quote

from pathlens.errors import PathlensError
from pathlens.graph import Graph
from pathlens.report.markup import esc, fmt, signed
from pathlens.results import Scores
from pathlens.results.io import write_text

__all__ = ["INDEX_NAME", "IndexEntry", "index_entries", "render_index", "write_index"]

INDEX_NAME = "index.html"
_PAIR_FORMATS = {"pathlens.Scores", "pathlens.Graph"}
_TITLE_RE = re.compile(r"<title>(.*?)</title>", re.IGNORECASE | re.DOTALL)
_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' file: data:"
_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, Arial, sans-serif; margin: 0 auto;
       max-width: 1200px; padding: 0 1.5rem 3rem; color: #222; }
h1 { font-size: 1.5rem; margin: 1.5rem 0 0.3rem; }
h2 { font-size: 1.1rem; margin-top: 1.8rem; border-bottom: 1px solid #ddd; padding-bottom: 0.2rem; }
.caption { color: #555; font-size: 0.9rem; }
table { border-collapse: collapse; font-size: 0.9rem; width: 100%; }
th, td { border: 1px solid #ddd; padding: 0.3rem 0.6rem; text-align: left; vertical-align: top; }
th { background: #f5f5f5; }
td.kind { white-space: nowrap; }
img.thumb { max-height: 90px; max-width: 160px; border: 1px solid #ddd; vertical-align: middle; margin-right: 0.5rem; }
code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
"""


@dataclass(frozen=True)
class IndexEntry:
    """One result on the index page: its file (relative to the indexed folder), kind and summary line."""

    path: Path
    kind: str
    summary: str


def index_entries(directory: Path) -> list[IndexEntry]:
    """Every recognised result under `directory`, folder by folder (sorted), the index page itself left out."""
    entries: list[IndexEntry] = []
    for folder, subfolders, files in os.walk(directory):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        here = Path(folder)
        names = sorted(f for f in files if not f.startswith("."))
        for name in names:
            path = here / name
            relative = path.relative_to(directory)
            if relative == Path(INDEX_NAME):
                continue
            entry = _entry(path, relative, set(names))
            if entry is not None:
                entries.append(entry)
    return entries


def render_index(directory: str | os.PathLike[str]) -> str:
    """The index page of `directory` as an HTML5 document (see the module docstring for what it lists)."""
    root = _folder(directory)
    entries = index_entries(root)
    groups: dict[Path, list[IndexEntry]] = {}
    for entry in entries:
        groups.setdefault(entry.path.parent, []).append(entry)
    sections = []
    for folder, members in groups.items():
        rows = "\n".join(_row(entry) for entry in members)
        heading = "." if folder == Path(".") else folder.as_posix() + "/"
        sections.append(
            f"<section>\n<h2><code>{esc(heading)}</code></h2>\n<table>\n<thead><tr><th>file</th><th>kind</th>"
            f"<th>summary</th></tr></thead>\n<tbody>\n{rows}\n</tbody>\n</table>\n</section>"
        )
    kinds: dict[str, int] = {}
    for entry in entries:
        kinds[entry.kind] = kinds.get(entry.kind, 0) + 1
    counts = ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items())) or "no results found"
    title = f"pathlens results: {root.name or root}"
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{esc(_CSP)}">\n'
        f"<title>{esc(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
        f'<h1>{esc(title)}</h1>\n<p class="caption">{esc(str(root))} · {len(groups)} folders · {esc(counts)}</p>\n'
        + "\n".join(sections)
        + "\n</body>\n</html>\n"
    )


def write_index(directory: str | os.PathLike[str]) -> Path:
    """Write `directory/index.html` (atomically, `pathlens.results.io.write_text`) linking every result under
    `directory`; returns its path."""
    root = _folder(directory)
    return write_text(root / INDEX_NAME, render_index(root))


# ---- recognising results ------------------------------------------------------------------------------


def _folder(directory: str | os.PathLike[str]) -> Path:
    """`directory` as a Path, or a PathlensError naming it when it is not an existing folder."""
    root = Path(os.fspath(directory)).expanduser()
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise PathlensError(f"report: {root} {what}; pass the folder results were written to (e.g. out/).")
    return root


def _entry(path: Path, relative: Path, siblings: set[str]) -> IndexEntry | None:
    """The index entry of one file, or None when it is not a result the index knows."""
    suffix = path.suffix.lower()
    if suffix == ".json":
        return _json_entry(path, relative, siblings)
    if suffix == ".png":
        return IndexEntry(relative, "figure", "PNG image")
    if suffix == ".csv":
        return IndexEntry(relative, "table", "CSV table")
    if suffix == ".html":
        return IndexEntry(relative, "report", _page_title(path))
    return None


def _page_title(path: Path) -> str:
    """An HTML page's title (the first 64 kB are enough), or its name."""
    with path.open(encoding="utf-8", errors="replace") as handle:
        match = _TITLE_RE.search(handle.read(65536))
    return html.unescape(match[1].strip()) if match else path.name


def _json_entry(path: Path, relative: Path, siblings: set[str]) -> IndexEntry | None:
    """A Scores / Graph pair (read through its loader), a circuit study's record, or a study's summary."""
    try:
        header = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return IndexEntry(relative, "unreadable", f"not readable JSON: {err}")
    if not isinstance(header, dict):
        return None
    if header.get("format") in _PAIR_FORMATS and f"{path.stem}.safetensors" in siblings:
        stem = path.with_suffix("")
        try:
            result = Scores.load(stem) if header["format"] == "pathlens.Scores" else Graph.load(stem)
        except (PathlensError, OSError, ValueError) as err:
            return IndexEntry(relative.with_suffix(".safetensors"), "unreadable", str(err))
        summary = _scores_line(result) if isinstance(result, Scores) else _graph_line(result)
        kind = "scores" if isinstance(result, Scores) else "circuit" if result.kept is not None else "edge scores"
        return IndexEntry(relative.with_suffix(".safetensors"), kind, summary)
    if {"method", "faithfulness", "n_edges"} <= header.keys():
        return IndexEntry(relative, "circuit record", _record_line(header))
    if path.name == "summary.json" and "model" in header:
        figures = [f"{k} {fmt(v)}" for k, v in header.items() if isinstance(v, Real | str) and k not in ("model",)]
        return IndexEntry(relative, "study summary", " · ".join([f"model {header['model']}", *figures[:8]]))
    return None


def _provenance(meta: dict[str, Any]) -> list[str]:
    return [f"{key} {meta[key]}" for key in ("model", "task") if key in meta]


def _scores_line(scores: Scores) -> str:
    """Method, metric, model, task, dims × shape, and the strongest cell (as an effect against the base run
    when the sweep recorded one, as `write_sweep` ranks it)."""
    dims = " × ".join(f"{d} {n}" for d, n in zip(scores.dims, scores.shape, strict=True))
    parts = [scores.method, f"metric {scores.metric}", *_provenance(scores.meta), dims]
    base = scores.meta.get("base_metric")
    ranked = scores.with_values(scores.values - float(base)) if isinstance(base, Real) else scores
    if scores.values.numel():
        top = ranked.top(1).to_dict("records")[0]
        where = ", ".join(f"{d}={top[d]}" for d in scores.dims)
        label = "effect (patched − base run)" if isinstance(base, Real) else "value"
        parts.append(f"strongest cell {where}: {label} {signed(float(top['value']))}")
    return " · ".join(parts)


def _graph_line(graph: Graph) -> str:
    """Method, metric, model, task, edges kept of edges, faithfulness and the strongest kept edge."""
    parts = [graph.method, f"metric {graph.metric}", *_provenance(graph.meta)]
    parts.append(
        f"{graph.n_edges} of {graph.edges_total} edges" if graph.kept is not None else f"{graph.edges_total} edges"
    )
    if isinstance(graph.meta.get("faithfulness"), Real):
        parts.append(f"faithfulness {graph.meta['faithfulness']:.3f}")
    frame = graph.to_frame()
    kept = frame[frame["in_circuit"]]
    if len(kept):
        best = kept.iloc[0]
        parts.append(f"strongest edge {best['sender']} → {best['receiver']} {signed(float(best['score']))}")
    return " · ".join(parts)


def _record_line(record: dict[str, Any]) -> str:
    """A circuit study's record: method, model, task, size, faithfulness (and CPR / CMD when recorded)."""
    parts = [str(record["method"]), *(f"{k} {record[k]}" for k in ("metric", "model", "task") if k in record)]
    parts.append(f"{record['n_edges']} of {record.get('edges_total', '?')} edges")
    parts += [
        f"{key} {fmt(record[key])}" for key in ("faithfulness", "cpr", "cmd") if isinstance(record.get(key), Real)
    ]
    return " · ".join(parts)


def _row(entry: IndexEntry) -> str:
    """A table row: the linked file (with a thumbnail for figures), its kind and summary."""
    href = esc(quote(entry.path.as_posix()))
    thumb = f'<img class="thumb" src="{href}" alt="">' if entry.kind == "figure" else ""
    link = f'{thumb}<a href="{href}"><code>{esc(entry.path.name)}</code></a>'
    return f'<tr><td>{link}</td><td class="kind">{esc(entry.kind)}</td><td>{esc(entry.summary)}</td></tr>'
