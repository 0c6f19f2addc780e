"""The foundation on a real pretrained model: SmolLM2-135M-Instruct (Llama family, 30 layers, 9 heads / 3 KV).

Tolerances: fp32 sums over 576 features reordered (heads vs the fused o_proj) agree to 1e-4 absolute on values
of order 1–100; replacing a site with its own value is exact.
"""

from __future__ import annotations

import torch

from pathlens import Intervention, Model, Replace
from pathlens.tasks import ioi
from tests.helpers import assert_untouched, snapshot


def test_architecture(smollm2: Model) -> None:
    a = smollm2.arch
    assert (a.family, a.n_layers, a.n_heads, a.n_kv_heads, a.d_model, a.d_head) == ("llama", 30, 9, 3, 576, 64)
    assert smollm2.kv_group(4) == 1 and smollm2.query_heads(2) == [6, 7, 8]


def test_ioi_behaviour(smollm2: Model) -> None:
    task = ioi(smollm2.tokenizer, n=48, seed=0)
    ld = task.score(smollm2.run(task.clean_ids, attention_mask=task.attention_mask).logits)
    assert float((ld > 0).float().mean()) >= 0.9
    assert 3.0 < float(ld.mean()) < 8.0


def test_right_padding_changes_no_scored_logit(smollm2: Model) -> None:
    task = ioi(smollm2.tokenizer, n=6, seed=3)
    assert task.attention_mask.sum(1).unique().numel() > 1, "want prompts of different lengths"
    batched = smollm2.run(task.clean_ids, attention_mask=task.attention_mask).logits
    for i in range(task.n):
        length = int(task.attention_mask[i].sum())
        alone = smollm2.run(task.clean_ids[i : i + 1, :length]).logits
        pos = int(task.answer_pos[i])
        torch.testing.assert_close(batched[i, pos], alone[0, pos], atol=1e-4, rtol=1e-4)


def test_identities_and_exact_replace(smollm2: Model) -> None:
    task = ioi(smollm2.tokenizer, n=4, seed=1, templates="BABA")
    ids, mask = task.clean_ids, task.attention_mask
    layer = 12
    sites = [f"L{layer}.{k}" for k in ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "head", "q", "k")]
    before = snapshot(smollm2)
    run = smollm2.run(ids, attention_mask=mask, cache=sites)
    c = run.cache
    torch.testing.assert_close(c[f"L{layer}.head"].sum(2), c[f"L{layer}.attn_out"], atol=1e-4, rtol=0)
    torch.testing.assert_close(
        c[f"L{layer}.resid_pre"] + c[f"L{layer}.attn_out"] + c[f"L{layer}.mlp_out"],
        c[f"L{layer}.resid_post"],
        atol=1e-4,
        rtol=0,
    )
    for site in (f"L{layer}.H3", f"L{layer}.mlp_out", f"L{layer}.G1.k", f"L{layer}.resid_pre"):
        source = (
            c[site] if site in c else c[f"L{layer}.head"][:, :, 3] if site.endswith("H3") else c[f"L{layer}.k"][:, :, 1]
        )
        patched = smollm2.run(ids, attention_mask=mask, interventions=[Intervention(site, Replace(source))])
        assert torch.equal(patched.logits, run.logits), site
    corrupt = smollm2.run(task.corrupt_ids, attention_mask=mask, cache=[f"L{layer}.resid_pre"])
    patched = smollm2.run(
        ids,
        attention_mask=mask,
        interventions=[Intervention(f"L{layer}.resid_pre", Replace(corrupt.cache[f"L{layer}.resid_pre"]))],
    )
    assert torch.equal(patched.logits, corrupt.logits)
    assert_untouched(smollm2, before)


def test_batched_equals_separate(smollm2: Model) -> None:
    task = ioi(smollm2.tokenizer, n=2, seed=2, templates="BABA")
    sites = ["L5.H2", "L20.H7", "L9.mlp_out"]
    src = smollm2.run(task.corrupt_ids, attention_mask=task.attention_mask, cache=sites).cache
    end = int(task.answer_pos[0])
    separate = torch.cat(
        [
            smollm2.run(
                task.clean_ids,
                attention_mask=task.attention_mask,
                interventions=[Intervention(s, Replace(src[s]), positions=[end])],
            ).logits
            for s in sites
        ]
    )
    k = len(sites)
    ivs = [Intervention(s, Replace(src[s]), positions=[end], rows=slice(2 * i, 2 * i + 2)) for i, s in enumerate(sites)]
    batched = smollm2.run(
        task.clean_ids.repeat(k, 1), attention_mask=task.attention_mask.repeat(k, 1), interventions=ivs
    ).logits
    torch.testing.assert_close(batched, separate, atol=1e-4, rtol=0)
