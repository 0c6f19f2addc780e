"""Bad inputs to runs, sessions, interventions and tasks: each is a clear PathlensError that names the offending
input, and the model is bit-identical afterwards. The first group were silent wrong results before."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from pathlens import Intervention, PathlensError, Task
from pathlens.interventions import Ablate, Add, Project, Replace, Scale
from pathlens.patching import patch
from tests.helpers import assert_untouched, padded_task, snapshot, tiny_model, token_batch

D = 32  # tiny models' d_model


def test_boolean_rows_are_a_mask_not_indices() -> None:
    """rows=tensor([False, False, True]) patches row 2 only (it used to patch rows 0 and 1)."""
    model = tiny_model("gpt2")
    ids = token_batch()
    mask_rows = model.run(
        ids, interventions=[Intervention("L0.resid_post", Scale(0.0), rows=torch.tensor([0, 0, 1]).bool())]
    )
    index_rows = model.run(ids, interventions=[Intervention("L0.resid_post", Scale(0.0), rows=[2])])
    torch.testing.assert_close(mask_rows.logits, index_rows.logits, atol=0, rtol=0)


def test_boolean_positions_are_a_mask() -> None:
    model = tiny_model("llama")
    ids = token_batch()
    mask = torch.zeros(ids.shape[1], dtype=torch.bool)
    mask[[2, 5]] = True
    by_mask = model.run(ids, interventions=[Intervention("L0.resid_post", Scale(0.0), positions=mask)])
    by_index = model.run(ids, interventions=[Intervention("L0.resid_post", Scale(0.0), positions=[2, 5])])
    torch.testing.assert_close(by_mask.logits, by_index.logits, atol=0, rtol=0)


def test_nan_in_a_source_is_rejected_naming_the_site() -> None:
    """A NaN source used to make the whole row NaN, including positions before the patched one."""
    model = tiny_model("gpt2")
    before = snapshot(model)
    source = torch.zeros(3, 9, D)
    source[0, 4, 1] = float("nan")
    with pytest.raises(PathlensError, match=r"L0\.resid_post.*NaN"):
        model.run(token_batch(), interventions=[Intervention("L0.resid_post", Replace(source), positions=[4])])
    assert_untouched(model, before)
    allowed = model.run(
        token_batch(),
        interventions=[Intervention("L0.resid_post", Replace(source), positions=[4], allow_nonfinite=True)],
    )
    assert torch.isnan(allowed.logits[0, 4:]).all()  # opted in: the NaN is applied


def test_answer_on_padding_is_rejected() -> None:
    """An answer_pos on a padding token used to be scored silently."""
    task = padded_task()
    bad_pos = task.answer_pos.clone()
    row = int((task.attention_mask.sum(1) < task.seq_len).nonzero()[0, 0])
    bad_pos[row] = task.seq_len - 1
    with pytest.raises(PathlensError, match=rf"row {row} scores position {task.seq_len - 1}.*padding"):
        Task("t", task.clean_ids, task.corrupt_ids, task.answer_ids, task.wrong_ids, bad_pos, task.attention_mask)


def test_answer_equal_to_wrong_answer_is_rejected() -> None:
    """The logit difference of such a row is always 0."""
    task = padded_task()
    wrong = task.wrong_ids.clone()
    wrong[1] = task.answer_ids[1]
    with pytest.raises(PathlensError, match=rf"row 1 .*same answer and wrong answer \(token {int(wrong[1])}\)"):
        Task("t", task.clean_ids, task.corrupt_ids, task.answer_ids, wrong, task.answer_pos, task.attention_mask)


def test_attention_mask_of_another_length_is_rejected() -> None:
    model = tiny_model("gpt2")
    with pytest.raises(PathlensError, match=r"attention_mask has shape \(3, 8\) but the token ids have \(3, 9\)"):
        model.run(token_batch(), attention_mask=torch.ones(3, 8, dtype=torch.long))


CASES: dict[str, tuple[Callable[[Any], object], str]] = {
    "float positions": (
        lambda m: m.run(token_batch(), interventions=[Intervention("L0.resid_post", Scale(0.0), positions=[6.9])]),
        r"positions.*integers.*6\.9",
    ),
    "float rows": (
        lambda m: m.run(token_batch(), interventions=[Intervention("L0.resid_post", Scale(0.0), rows=[0.5])]),
        r"rows.*integers",
    ),
    "boolean mask of the wrong length": (
        lambda m: m.run(
            token_batch(), interventions=[Intervention("L0.resid_post", Scale(0.0), rows=torch.tensor([True, False]))]
        ),
        r"rows.*boolean mask.*\(3\)",
    ),
    "token id beyond the vocabulary": (
        lambda m: m.run(torch.tensor([[1, 2, 64]])),
        r"row 0, position 2 holds id 64.*vocabulary \(0\.\.63\)",
    ),
    "negative token id": (lambda m: m.run(torch.tensor([[1, -2, 3]])), r"position 1 holds id -2"),
    "float token ids": (lambda m: m.run(torch.ones(2, 3)), r"integer tensor"),
    "mask with values other than 0/1": (
        lambda m: m.run(torch.tensor([[1, 2, 3]]), attention_mask=torch.tensor([[1, 2, 1]])),
        r"attention_mask must hold only 0",
    ),
    "source of the wrong width": (
        lambda m: m.run(token_batch(), interventions=[Intervention("L0.resid_post", Replace(torch.zeros(3, 9, 8)))]),
        r"Replace on L0\.resid_post: its source has shape \(3, 9, 8\).*cell of the site is \(32,\)",
    ),
    "vector of the wrong width": (
        lambda m: m.run(token_batch(), interventions=[Intervention("L1.mlp_out", Add(torch.ones(5)))]),
        r"Add on L1\.mlp_out: its vector has shape \(5,\).*\(32,\)",
    ),
    "reference of the wrong width": (
        lambda m: m.run(
            token_batch(), interventions=[Intervention("L0.attn_out", Ablate("mean", reference=torch.ones(2, 9, 3)))]
        ),
        r"Ablate on L0\.attn_out: its reference has shape \(2, 9, 3\)",
    ),
    "basis of the wrong width": (
        lambda m: m.run(
            token_batch(),
            interventions=[Intervention("L0.resid_pre", Project(torch.eye(8)[:, :2], torch.zeros(3, 9, D)))],
        ),
        r"Project on L0\.resid_pre: its basis has shape \(8, 2\).*last dim is 32",
    ),
    "source of the wrong length": (
        lambda m: m.run(token_batch(), interventions=[Intervention("L0.resid_post", Replace(torch.zeros(3, 5, D)))]),
        r"Replace source: its position axis has size 5, but the run has 9",
    ),
    "inf vector": (
        lambda m: m.run(
            token_batch(), interventions=[Intervention("L0.resid_post", Add(torch.full((D,), float("inf"))))]
        ),
        r"Add on L0\.resid_post: its vector holds 32 NaN/inf",
    ),
    "nan scale": (
        lambda m: m.run(token_batch(), interventions=[Intervention("L0.resid_post", Scale(float("nan")))]),
        r"Scale on L0\.resid_post: its factor is nan",
    ),
    "unknown position policy": (
        lambda m: m.run(token_batch(), interventions=[Intervention("L0.resid_post", Scale(0.0), positions="first")]),
        r"unknown policy 'first'",
    ),
    "position out of range": (
        lambda m: m.run(token_batch(), interventions=[Intervention("L0.resid_post", Scale(0.0), positions=[9])]),
        r"positions of the intervention on L0\.resid_post \[9\] out of range",
    ),
    "task answer outside the vocabulary": (
        lambda m: patch(m, _task_with(answer=70), sites="attn_out", direction="denoise"),
        r"answer_ids row 0 holds token id 70.*vocabulary \(0\.\.63\)",
    ),
    "task prompt outside the vocabulary": (
        lambda m: patch(m, _task_with(prompt_id=99), sites="attn_out", direction="denoise"),
        r"clean_ids row 0 holds token id 99",
    ),
}


def _task_with(answer: int = 5, prompt_id: int = 3) -> Task:
    clean = torch.tensor([[1, 2, prompt_id, 4], [4, 3, 2, 1]])
    return Task.from_ids(clean, clean.flip(1), [answer, 5], [6, 7])


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_named_and_the_model_untouched(case: str) -> None:
    call, message = CASES[case]
    model = tiny_model("gpt2")
    before = snapshot(model)
    with pytest.raises(PathlensError, match=message):
        call(model)
    assert_untouched(model, before)


TASK_CASES: dict[str, tuple[dict[str, Any], str]] = {
    "float ids": ({"clean_ids": torch.ones(2, 4)}, r"clean_ids must hold integers"),
    "negative answer": ({"answer_ids": torch.tensor([-1, 5])}, r"answer_ids holds a negative token id \(-1\) at row 0"),
    "mask values": ({"attention_mask": torch.full((2, 4), 2)}, r"attention_mask must hold only 0"),
}


@pytest.mark.parametrize("case", list(TASK_CASES))
def test_bad_task_fields_are_named(case: str) -> None:
    changes, message = TASK_CASES[case]
    clean = torch.tensor([[1, 2, 3, 4], [4, 3, 2, 1]])
    fields: dict[str, Any] = {
        "name": "t",
        "clean_ids": clean,
        "corrupt_ids": clean.flip(1),
        "answer_ids": torch.tensor([5, 5]),
        "wrong_ids": torch.tensor([6, 7]),
        "answer_pos": torch.tensor([3, 3]),
        "attention_mask": torch.ones(2, 4, dtype=torch.long),
    }
    fields.update(changes)
    if "clean_ids" in changes:
        fields["corrupt_ids"] = changes["clean_ids"]
    with pytest.raises(PathlensError, match=message):
        Task(**fields)
