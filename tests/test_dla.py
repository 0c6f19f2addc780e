"""Direct logit attribution: a complete decomposition of the final residual stream adds up to the logit difference."""

from __future__ import annotations

import pytest
import torch

from pathlens.diagnostics.dla import frozen_final_norm, head_logit_attribution, logit_direction
from pathlens.tasks.base import Task
from tests.helpers import VOCAB, tiny_model, token_batch


def token_task(n: int = 3) -> Task:
    ids = token_batch(n=n, p=8)
    return Task(
        name="tokens",
        clean_ids=ids,
        corrupt_ids=token_batch(n=n, p=8, seed=5),
        answer_ids=torch.arange(n) + 1,
        wrong_ids=torch.arange(n) + 10,
        answer_pos=torch.full((n,), 7),
        attention_mask=torch.ones_like(ids),
    )


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3", "gemma2", "neox_parallel", "attn_only", "olmo_generic"])
def test_components_add_up_to_logit_difference(family: str) -> None:
    model = tiny_model(family)
    task = token_task()
    a = model.arch
    last = f"L{a.n_layers - 1}.resid_post"
    run = model.run(
        task.clean_ids,
        cache=[last, "L0.resid_pre"]
        + [f"L{i}.{k}" for i in range(a.n_layers) for k in ("attn_out", "mlp_out") if a.mlp or k == "attn_out"],
    )
    rows, at = torch.arange(task.n), task.answer_pos
    norm = frozen_final_norm(model, run.cache[last][rows, at])
    direction = logit_direction(model, task)
    parts = [run.cache["L0.resid_pre"]] + [run.cache[k] for k in run.cache if k.kind in ("attn_out", "mlp_out")]
    total = sum(p[rows, at] for p in parts)
    torch.testing.assert_close(total, run.cache[last][rows, at], atol=1e-5, rtol=0)
    ld = task.score(run.logits).double()
    final = model.hf.get_submodule(a.final_norm)
    bias = direction @ final(torch.zeros(1, a.d_model))[0].double()
    logits = (norm(total) * direction).sum(-1) + bias
    cap = getattr(model.hf.config, "final_logit_softcapping", None)
    if cap:
        w_u = model.hf.get_submodule(a.unembed).weight.double()
        full = norm(total) @ w_u.T + final(torch.zeros(1, a.d_model))[0].double() @ w_u.T
        full = torch.tanh(full / cap) * cap
        logits = full[rows, task.answer_ids] - full[rows, task.wrong_ids]
    torch.testing.assert_close(logits, ld, atol=1e-4, rtol=1e-5)


def test_head_attribution_scores_shape_and_sum() -> None:
    model = tiny_model("llama")
    task = token_task()
    scores = head_logit_attribution(model, task)
    assert scores.dims == ("layer", "head") and scores.values.shape == (2, 4)
    run = model.run(task.clean_ids, cache=["L0.head", "L1.head", "L1.resid_post"])
    rows, at = torch.arange(task.n), task.answer_pos
    norm = frozen_final_norm(model, run.cache["L1.resid_post"][rows, at])
    direction = logit_direction(model, task)
    manual = torch.tensor(
        [
            [float((norm(run.cache[f"L{layer}.head"][rows, at, h]) * direction).sum(-1).mean()) for h in range(4)]
            for layer in range(2)
        ]
    )
    torch.testing.assert_close(scores.values, manual.float(), atol=1e-5, rtol=1e-5)
    assert VOCAB > int(task.wrong_ids.max())
