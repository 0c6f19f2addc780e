"""Corpus and context windows (pathlens.features.corpus): sources, BOS per tokenizer, seeding, bad input.

Reference: a character tokenizer written here, whose windows are checked against the plain concatenation of the
documents (joined by EOS) cut by hand."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from pathlens.errors import PathlensError
from pathlens.features.corpus import (
    Windows,
    adds_bos,
    corpus,
    default_corpus,
    hf_dataset,
    parse_token_count,
    text_files,
    texts,
    windows,
)

ALPHABET = "abcdefghijklmnopqrstuvwxyz .,\n"


class CharTokenizer:
    """One id per character (ids 3..), BOS = 1, EOS = 2; `bos` says whether it adds BOS itself, like Gemma's."""

    bos_token_id = 1
    eos_token_id = 2
    pad_token_id = 0

    def __init__(self, bos: bool) -> None:
        self.bos = bos

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        ids = [3 + ALPHABET.index(c) for c in text]
        return {"input_ids": ([1] if self.bos and add_special_tokens else []) + ids}

    def decode(self, ids: Any) -> str:
        return "".join({1: "<bos>", 2: "<eos>"}.get(int(i), ALPHABET[int(i) - 3] if int(i) >= 3 else "") for i in ids)


DOCS = ["the cat sat on the mat.", "a dog ran far away, then back.", "birds sing\nin the morning."]


def stream_of(docs: list[str]) -> list[int]:
    """The reference token stream of documents in the given order: characters, EOS after each."""
    out: list[int] = []
    for doc in docs:
        out += [3 + ALPHABET.index(c) for c in doc] + [2]
    return out


def test_windows_are_the_document_stream_cut_in_order_then_shuffled() -> None:
    wins = windows(texts(DOCS), CharTokenizer(bos=False), context=8, seed=3)
    assert not wins.bos and wins.context == 8
    # the document order is the seeded shuffle; the stream is those documents joined by EOS, cut in rows of 8
    import random

    order = list(DOCS)
    random.Random(3).shuffle(order)
    stream = stream_of(order)
    rows = [stream[i * 8 : (i + 1) * 8] for i in range(len(stream) // 8)]
    assert sorted(map(tuple, wins.ids.tolist())) == sorted(map(tuple, rows))
    assert len(wins) == len(rows)


def test_bos_follows_the_tokenizer_and_can_be_overridden() -> None:
    with_bos = windows(texts(DOCS), CharTokenizer(bos=True), context=8)
    assert with_bos.bos and bool((with_bos.ids[:, 0] == 1).all())
    assert not bool((with_bos.ids[:, 1:] == 1).any()), "BOS only at position 0"
    without = windows(texts(DOCS), CharTokenizer(bos=False), context=8)
    assert not without.bos and not bool((without.ids == 1).any())
    forced = windows(texts(DOCS), CharTokenizer(bos=False), context=8, bos=True)
    assert forced.bos and bool((forced.ids[:, 0] == 1).all())
    off = windows(texts(DOCS), CharTokenizer(bos=True), context=8, bos=False)
    assert not off.bos and not bool((off.ids == 1).any())


def test_real_tokenizers_bos(smollm2: Any, gemma3: Any) -> None:
    """SmolLM2's tokenizer adds no BOS, Gemma's does: windows follow each."""
    assert not adds_bos(smollm2.tokenizer) and adds_bos(gemma3.tokenizer)
    text = ["The quick brown fox jumps over the lazy dog. " * 20]
    small = windows(texts(text), smollm2.tokenizer, context=16)
    gem = windows(texts(text), gemma3.tokenizer, context=16)
    assert not small.bos and bool((gem.ids[:, 0] == gemma3.tokenizer.bos_token_id).all())
    assert gem.ids.shape[1] == small.ids.shape[1] == 16


def test_seeded_and_capped() -> None:
    tok = CharTokenizer(bos=False)
    a = windows(texts(DOCS), tok, context=4, seed=1)
    assert torch.equal(a.ids, windows(texts(DOCS), tok, context=4, seed=1).ids)
    assert a.digest() == windows(texts(DOCS), tok, context=4, seed=1).digest()
    assert not torch.equal(a.ids, windows(texts(DOCS), tok, context=4, seed=2).ids)
    capped = windows(texts(DOCS), tok, context=4, n_tokens=10, seed=1)
    assert capped.ids.shape == (3, 4)  # ceil(10 / 4) windows
    described = capped.describe()
    assert described["n_windows"] == 3 and described["ids_sha256"] == capped.digest()


def test_text_files_and_jsonl(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text(DOCS[0])
    sub = tmp_path / "more"
    sub.mkdir()
    (sub / "b.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in DOCS[1:]) + "\n")
    (sub / "ignored.csv").write_text("x")
    src = text_files(tmp_path)
    assert sorted(src.documents(0)) == sorted(DOCS)
    assert corpus(str(tmp_path)).name == src.name
    wins = windows(str(tmp_path), CharTokenizer(bos=False), context=8)
    assert wins.n_tokens == len(stream_of(DOCS)) // 8 * 8


def test_hf_dataset_streams_through_datasets(tmp_path: Path) -> None:
    """The real streamed path, through the `datasets` library's packaged json builder (no hub needed)."""
    data = tmp_path / "docs.jsonl"
    data.write_text("\n".join(json.dumps({"text": d}) for d in DOCS) + "\n")
    src = hf_dataset("json", data_files=str(data))
    assert sorted(src.documents(0)) == sorted(DOCS)
    wins = windows(src, CharTokenizer(bos=False), context=8)
    assert wins.n_tokens == len(stream_of(DOCS)) // 8 * 8
    with pytest.raises(PathlensError, match="no column 'body'"):
        list(hf_dataset("json", column="body", data_files=str(data)).documents(0))


def test_hf_dataset_offline_error_names_the_dataset() -> None:
    with pytest.raises(PathlensError, match="nonexistent-org/none"):
        next(hf_dataset("nonexistent-org/none").documents(0))
    assert corpus("hf:wikitext/wikitext-2-raw-v1@validation").name == "hf:wikitext/wikitext-2-raw-v1@validation"


@pytest.mark.skipif(shutil.which("dpkg") is None, reason="needs Debian")
def test_default_corpus_is_over_a_million_smollm2_tokens_of_plain_text(smollm2: Any) -> None:
    try:
        src = default_corpus()
    except PathlensError as err:
        pytest.skip(str(err))
    docs = list(src.documents(0))
    assert len(docs) > 1000 and "public domain" in src.licence
    joined = "".join(docs)
    assert "<" not in joined and "strong:" not in joined and "In the beginning, God created" in joined
    wins = windows(src, smollm2.tokenizer, context=128)
    assert wins.n_tokens >= 1_000_000
    assert corpus("default").name == src.name == corpus(None).name


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (texts([]), "corpus 'texts' gave fewer than 8 tokens"),
        (texts(["", "   "], name="blank"), "corpus 'blank' gave fewer"),
        (texts(["abc"], name="short"), "corpus 'short' gave fewer than 8 tokens"),
    ],
)
def test_empty_corpus_is_named(source: Any, message: str) -> None:
    with pytest.raises(PathlensError, match=message):
        windows(source, CharTokenizer(bos=False), context=8)


def test_bad_inputs(tmp_path: Path) -> None:
    tok = CharTokenizer(bos=False)
    with pytest.raises(PathlensError, match="does not exist"):
        text_files(tmp_path / "missing")
    with pytest.raises(PathlensError, match="holds no .txt or .jsonl"):
        text_files(tmp_path)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(PathlensError, match="line 2: not JSON"):
        list(text_files(tmp_path / "bad.jsonl").documents(0))
    with pytest.raises(PathlensError, match="neither 'default'"):
        corpus("no/such/place")
    with pytest.raises(PathlensError, match="context=1"):
        windows(texts(DOCS), tok, context=1)
    with pytest.raises(PathlensError, match="n_tokens=0"):
        windows(texts(DOCS), tok, context=4, n_tokens=0)
    with pytest.raises(PathlensError, match="no tokenizer"):
        windows(texts(DOCS), None)
    with pytest.raises(PathlensError, match="list of documents"):
        texts("one string")
    with pytest.raises(PathlensError, match="integer tensor"):
        Windows.of_ids(torch.zeros(2, 3))


def test_parse_token_count() -> None:
    assert parse_token_count("1M") == 1_000_000
    assert parse_token_count("250k") == 250_000
    assert parse_token_count("1.5k") == 1500
    assert parse_token_count("4096") == 4096
    with pytest.raises(PathlensError, match="'lots'"):
        parse_token_count("lots")
