"""Text to collect activations from, tokenized into fixed-length context windows.

A `Corpus` is a named, re-readable source of documents with its provenance (source and licence):

- `default_corpus()`: the offline default, which needs no network. It is the **World English Bible** (with the
  Deuterocanon; 2020 stable text, SWORD module `engWEB2015eb`) as Debian's package **`sword-text-web`** installs
  it under /usr/share/sword (`apt-get install sword-text-web`; `make install` does it). Licence: **public
  domain** (the package's copyright file: "The World English Bible is in the Public Domain"; the name "World
  English Bible" is a trademark of eBible.org, so a changed text must not carry that name — pathlens only strips
  the markup, footnotes and headings). It is modern English prose: 4.9 million characters in 1,400 chapters,
  about 1.19M tokens with SmolLM2's tokenizer. Each chapter is one document. The SWORD "zText" files are read
  directly (zlib blocks of OSIS markup), so no SWORD library is needed; `$SWORD_PATH` is searched first.
- `text_files(path)`: local `.txt` files (one document each) and `.jsonl` files (one document per line, its
  `"text"` field), a file or a folder searched recursively.
- `hf_dataset(name)`: a Hugging Face `datasets` dataset, streamed (never downloaded whole), shuffled in a seeded
  buffer; needs the hub (or its local cache).
- `texts([...])`: documents in memory.
- `corpus(spec)`: the command-line form — "default", a path, or "hf:NAME[/CONFIG][@SPLIT]".

`windows(corpus, tokenizer, context=128, n_tokens=..., seed=0)` tokenizes documents (without special tokens),
joins them with the tokenizer's end-of-sequence token, cuts the stream into windows and shuffles the windows with
the seed. BOS handling follows the tokenizer: a tokenizer that adds a beginning-of-sequence token itself (Gemma's)
gets it at the start of every window, one that does not (SmolLM2's) gets none; `bos=True/False` overrides. Local
documents are shuffled with the seed before tokenizing, so a token budget smaller than the corpus still samples
all of it; the same corpus, tokenizer, context, budget and seed always give the same windows.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import struct
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pathlens.errors import PathlensError

__all__ = [
    "Corpus",
    "Windows",
    "corpus",
    "default_corpus",
    "hf_dataset",
    "parse_token_count",
    "text_files",
    "texts",
    "windows",
]

WEB_MODULE = "engWEB2015eb"
WEB_PACKAGE = "sword-text-web"
_SWORD_ROOTS = ("/usr/share/sword", "/usr/local/share/sword")
_HF_SHUFFLE_BUFFER = 10_000
_TOKENIZE_CHARS = 1_000_000  # documents are tokenized in pieces of about this many characters


@dataclass(frozen=True)
class Corpus:
    """A named source of documents. `documents(seed)` yields them (in a seeded order where the source allows);
    `source` and `licence` say where the text comes from and under which terms."""

    name: str
    documents: Callable[[int], Iterator[str]] = field(repr=False)
    source: str
    licence: str

    def describe(self) -> dict[str, str]:
        """Name, source and licence, as recorded in an activation store's manifest."""
        return {"name": self.name, "source": self.source, "licence": self.licence}


@dataclass(frozen=True, eq=False)
class Windows:
    """Token windows (n, context) cut from a corpus: every row is one forward's input.

    bos: whether each window starts with the tokenizer's BOS token (position 0 then holds no text).
    corpus: the corpus's description; settings: context, seed, token budget and BOS policy that made them."""

    ids: Tensor
    bos: bool
    corpus: dict[str, str]
    settings: dict[str, Any]

    @property
    def context(self) -> int:
        return int(self.ids.shape[1])

    @property
    def n_tokens(self) -> int:
        return int(self.ids.numel())

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def digest(self) -> str:
        """SHA-256 of the token ids (their int64 bytes and shape): two window sets are the same iff this is."""
        ids = self.ids.to(torch.int64).contiguous()
        digest = hashlib.sha256(f"{tuple(ids.shape)};".encode())
        digest.update(ids.numpy().tobytes())
        return digest.hexdigest()

    @classmethod
    def of_ids(cls, ids: Tensor, bos: bool = False, name: str = "token ids") -> "Windows":
        """Windows from token ids you made yourself, (n, context) integers; `bos`: whether each starts with BOS."""
        if not isinstance(ids, Tensor) or ids.ndim != 2 or ids.is_floating_point() or ids.numel() == 0:
            shape = tuple(ids.shape) if isinstance(ids, Tensor) else type(ids).__name__
            raise PathlensError(f"token windows must be a non-empty integer tensor (n, context), got {shape}.")
        return cls(ids=ids.long(), bos=bos, corpus={"name": name, "source": "given", "licence": "user's"}, settings={})

    def describe(self) -> dict[str, Any]:
        """Everything that identifies these windows, as recorded in an activation store's manifest."""
        return {
            **self.corpus,
            **self.settings,
            "bos": self.bos,
            "n_windows": len(self),
            "ids_sha256": self.digest(),
        }


# ---- sources ----------------------------------------------------------------------------------------------


def default_corpus() -> Corpus:
    """The World English Bible from Debian's `sword-text-web` (public domain; see the module docstring)."""
    folder = _web_folder()
    return Corpus(
        name="world-english-bible",
        documents=lambda seed: _shuffled(_web_chapters(str(folder)), seed),
        source=f"World English Bible (2020 stable text, SWORD module {WEB_MODULE}) from the Debian package "
        f"{WEB_PACKAGE}, read from {folder}",
        licence="public domain (eBible.org; 'World English Bible' is a trademark: markup, notes and headings "
        "are stripped, the text is unchanged)",
    )


def text_files(path: str | os.PathLike[str]) -> Corpus:
    """Local text: a `.txt` file (one document), a `.jsonl` file (one document per line, field "text") or a folder
    of them (searched recursively, in sorted order)."""
    root = Path(os.fspath(path)).expanduser()
    if not root.exists():
        raise PathlensError(f"corpus path {root} does not exist; pass a .txt/.jsonl file or a folder of them.")
    files = sorted(p for p in root.rglob("*") if p.suffix in (".txt", ".jsonl")) if root.is_dir() else [root]
    if not files:
        raise PathlensError(f"corpus folder {root} holds no .txt or .jsonl files; add some or pass another folder.")

    def documents(seed: int) -> Iterator[str]:
        docs: list[str] = []
        for file in files:
            docs.extend(_file_documents(file))
        return _shuffled(docs, seed)

    return Corpus(name=f"files:{root}", documents=documents, source=f"local text files under {root}", licence="user's")


def texts(documents: Sequence[str], name: str = "texts") -> Corpus:
    """Documents given in memory."""
    if isinstance(documents, str):
        raise PathlensError("texts(...) takes a list of documents, not one string; wrap it: texts([text]).")
    docs = [str(d) for d in documents]
    return Corpus(name=name, documents=lambda seed: _shuffled(docs, seed), source="in memory", licence="user's")


def hf_dataset(
    name: str, config: str | None = None, split: str = "train", column: str = "text", **load_kwargs: Any
) -> Corpus:
    """A Hugging Face `datasets` dataset, streamed and shuffled in a seeded buffer of 10,000 documents.
    `load_kwargs` go to `datasets.load_dataset` (e.g. `data_files=` for the packaged "json"/"text" builders)."""

    def documents(seed: int) -> Iterator[str]:
        try:
            import datasets  # type: ignore[import-untyped]  # no stubs
        except ImportError as err:
            raise PathlensError(
                f"the Hugging Face dataset {name!r} needs the `datasets` package: pip install 'pathlens[datasets]'."
            ) from err
        try:
            stream = datasets.load_dataset(name, config, split=split, streaming=True, **load_kwargs)
            stream = stream.shuffle(seed=seed, buffer_size=_HF_SHUFFLE_BUFFER)
            for row in stream:
                if column not in row:
                    raise PathlensError(
                        f"dataset {name!r} has no column {column!r} (it has {sorted(row)}); pass column=..."
                    )
                yield str(row[column])
        except PathlensError:
            raise
        except Exception as err:  # datasets raises many types (connection, missing config/split, ...)
            raise PathlensError(
                f"could not stream the Hugging Face dataset {name!r} (config {config!r}, split {split!r}): {err}. "
                "It needs the hub or a local cache of it; offline, use the default corpus or local text files."
            ) from err

    return Corpus(
        name=f"hf:{name}" + (f"/{config}" if config else "") + f"@{split}",
        documents=documents,
        source=f"Hugging Face dataset {name} (config {config}, split {split}, column {column}), streamed",
        licence="see the dataset's card",
    )


def corpus(spec: str | os.PathLike[str] | Corpus | None = None) -> Corpus:
    """A corpus from its command-line form: None or "default" (the offline default), an existing path (local text
    files), or "hf:NAME[/CONFIG][@SPLIT]" (a streamed Hugging Face dataset)."""
    if isinstance(spec, Corpus):
        return spec
    if spec is not None and not isinstance(spec, (str, os.PathLike)):
        raise PathlensError(
            f"corpus must be 'default', a path, 'hf:NAME' or a Corpus, got {type(spec).__name__}; pass token ids as "
            "Windows.of_ids(ids)."
        )
    if spec is None or str(spec) == "default":
        return default_corpus()
    text = str(spec)
    if text.startswith("hf:"):
        rest, _, split = text[3:].partition("@")
        name, _, config = rest.partition("/") if rest.count("/") >= 2 else (rest, "", "")
        if not name:
            raise PathlensError(
                f"corpus {text!r}: give a dataset name after 'hf:' (e.g. hf:wikitext/wikitext-2-raw-v1)."
            )
        return hf_dataset(name, config or None, split or "train")
    if Path(text).expanduser().exists():
        return text_files(text)
    raise PathlensError(
        f"corpus {text!r} is neither 'default', an existing file or folder, nor 'hf:NAME[/CONFIG][@SPLIT]'."
    )


# ---- windows ------------------------------------------------------------------------------------------------


def windows(
    source: Corpus | str | None,
    tokenizer: Any,
    context: int = 128,
    n_tokens: int | None = None,
    seed: int = 0,
    bos: bool | None = None,
) -> Windows:
    """Cut `source` into windows of `context` tokens: ceil(n_tokens / context) of them (None: as many as the corpus
    holds), in a seeded random order. `bos` None follows the tokenizer (see the module docstring)."""
    if tokenizer is None:
        raise PathlensError("windows: the model has no tokenizer; tokenize the corpus yourself and pass token ids.")
    src = corpus(source)
    if isinstance(context, bool) or not isinstance(context, int) or context < 2:
        raise PathlensError(f"windows: context={context!r}; give an integer of at least 2 tokens.")
    if n_tokens is not None and (isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 1):
        raise PathlensError(f"windows: n_tokens={n_tokens!r}; give a positive integer or None (the whole corpus).")
    use_bos = adds_bos(tokenizer) if bos is None else bool(bos)
    bos_id = tokenizer.bos_token_id
    if use_bos and bos_id is None:
        raise PathlensError("windows: bos=True but the tokenizer has no BOS token; pass bos=False.")
    body = context - int(use_bos)
    wanted = None if n_tokens is None else math.ceil(n_tokens / context)
    rows = _token_rows(src, tokenizer, body, wanted, seed)
    if not len(rows):
        raise PathlensError(
            f"corpus {src.name!r} gave fewer than {body} tokens, not one window of context {context}: it is empty "
            "or too short; pass a larger corpus or a smaller context."
        )
    ids = rows  # (n, body)
    if use_bos:
        ids = torch.cat([torch.full((len(rows), 1), int(bos_id)), ids], dim=1)  # (n, context)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))
    settings = {"context": context, "seed": seed, "n_tokens_asked": n_tokens, "bos_policy": _policy(bos)}
    return Windows(ids=ids[order], bos=use_bos, corpus=src.describe(), settings=settings)


def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts its BOS token in front of a text by itself (Gemma's does, SmolLM2's does not)."""
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos_id is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == bos_id and tokenizer("a", add_special_tokens=False)["input_ids"][:1] != [bos_id]


def parse_token_count(text: str | int) -> int:
    """'1M' → 1,000,000; '250k' → 250,000; '4096' → 4096 (for --tokens)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGbB]?)\s*", str(text))
    if not match:
        raise PathlensError(f"token count {text!r}: give a number such as 4096, 250k or 1M.")
    scale = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9}[match.group(2).lower()]
    value = int(round(float(match.group(1)) * scale))
    if value < 1:
        raise PathlensError(f"token count {text!r} is less than one token.")
    return value


def _policy(bos: bool | None) -> str:
    return "tokenizer" if bos is None else ("always" if bos else "never")


def _token_rows(src: Corpus, tokenizer: Any, body: int, wanted: int | None, seed: int) -> Tensor:
    """Rows (n, body) of token ids from the corpus's documents joined by EOS, stopping after `wanted` rows. Full
    rows are kept as int64 tensors (8 bytes a token), only the unfinished row as a list."""
    eos = getattr(tokenizer, "eos_token_id", None)
    parts: list[Tensor] = []
    count = 0
    pending: list[int] = []
    for doc in src.documents(seed):
        for piece in _pieces(doc):
            pending.extend(tokenizer(piece, add_special_tokens=False)["input_ids"])
        if eos is not None and pending:
            pending.append(int(eos))
        full = len(pending) // body
        if full:
            parts.append(torch.tensor(pending[: full * body], dtype=torch.int64).view(full, body))
            pending = pending[full * body :]
            count += full
        if wanted is not None and count >= wanted:
            break
    rows = torch.cat(parts) if parts else torch.empty((0, body), dtype=torch.int64)
    return rows if wanted is None else rows[:wanted]


def _pieces(doc: str) -> Iterator[str]:
    """A document in pieces of about `_TOKENIZE_CHARS` characters, cut at line ends (a tokenizer's cost grows with
    the length of what it is given at once)."""
    start = 0
    while start < len(doc):
        end = min(len(doc), start + _TOKENIZE_CHARS)
        if end < len(doc):
            cut = doc.rfind("\n", start, end)
            end = cut + 1 if cut > start else end
        yield doc[start:end]
        start = end


def _shuffled(docs: Iterable[str], seed: int) -> Iterator[str]:
    items = list(docs)
    random.Random(seed).shuffle(items)
    return iter(items)


def _file_documents(file: Path) -> list[str]:
    text = file.read_text(encoding="utf-8")
    if file.suffix != ".jsonl":
        return [text] if text.strip() else []
    docs = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise PathlensError(
                f"{file}, line {number}: not JSON ({err}); a .jsonl corpus has one object per line."
            ) from err
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise PathlensError(f'{file}, line {number}: needs a "text" string field.')
        docs.append(record["text"])
    return docs


# ---- the World English Bible from its SWORD module ----------------------------------------------------------


def _web_folder() -> Path:
    roots = [*(p for p in os.environ.get("SWORD_PATH", "").split(os.pathsep) if p), *_SWORD_ROOTS]
    for root in roots:
        for name in (WEB_MODULE, WEB_MODULE.lower()):
            folder = Path(root) / "modules" / "texts" / "ztext" / name
            if (folder / "ot.bzz").is_file():
                return folder
    raise PathlensError(
        f"the offline default corpus (the World English Bible) comes from the Debian package {WEB_PACKAGE}, which "
        f"is not installed (looked in {', '.join(roots)}): run `apt-get install {WEB_PACKAGE}` (make install does), "
        "or pass local text files (a path) or a Hugging Face dataset (hf:NAME)."
    )


@lru_cache(maxsize=2)
def _web_chapters(folder: str) -> tuple[str, ...]:
    """The chapters of the module as plain text, in canonical order."""
    markup = "".join(_ztext_blocks(Path(folder), testament) for testament in ("ot", "nt"))
    chapters = re.split(r"(?=<chapter\b[^>]*\bsID=)", markup)
    return tuple(text for text in (_plain(c) for c in chapters) if len(text) > 1)


def _ztext_blocks(folder: Path, testament: str) -> str:
    """All text of one testament: the .bzs index holds (offset, size, uncompressed size) per zlib block of .bzz."""
    index = (folder / f"{testament}.bzs").read_bytes()
    data = (folder / f"{testament}.bzz").read_bytes()
    out = []
    for offset, size, _ in struct.iter_unpack("<III", index[: len(index) // 12 * 12]):
        out.append(zlib.decompress(data[offset : offset + size]).decode("utf-8"))
    return "".join(out)


def _plain(markup: str) -> str:
    """OSIS markup → plain text: footnotes and headings dropped, paragraph ends kept as line breaks."""
    text = re.sub(r"<note\b.*?</note>", " ", markup, flags=re.S)
    text = re.sub(r"<title\b.*?</title>", "\n", text, flags=re.S)
    text = re.sub(r"<(?:div|lg|l)\b[^>]*\beID=[^>]*/>", "\n", text)
    text = re.sub(r"<[^>]+>", "", text)
    text = re.sub(r"[ \t]+", " ", text)
    text = re.sub(r" ([,.;:!?’”)])", r"\1", text)
    return re.sub(r"\s*\n\s*", "\n", text).strip()
