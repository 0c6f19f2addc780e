"""The foundation and patching on a second real family: Gemma-3-270M (sandwich norms, 4 heads / 1 KV group,
sliding-window layers, embeddings scaled inside the embedding module).

Tolerances as for SmolLM2: reordered fp32 sums to 1e-4 absolute; replacing a site by its own value is exact;
patching fast paths against the naive loop to 1e-4 (values of order 1–10).
"""

from __future__ import annotations

import torch

import pathlens
from pathlens import Intervention, Model, Replace
from pathlens.tasks import ioi
from tests.helpers import assert_untouched, snapshot


def test_architecture_and_ioi(gemma3: Model) -> None:
    a = gemma3.arch
    assert (a.family, a.n_layers, a.n_heads, a.n_kv_heads, a.d_head) == ("gemma3", 18, 4, 1, 256)
    assert a.attn_out == "post_attention_layernorm"
    task = ioi(gemma3.tokenizer, n=16, seed=0)
    ld = task.score(gemma3.run(task.clean_ids, attention_mask=task.attention_mask).logits)
    assert float((ld > 0).float().mean()) >= 0.8 and float(ld.mean()) > 2.0


def test_sandwich_norm_identities_and_exact_replace(gemma3: Model) -> None:
    task = ioi(gemma3.tokenizer, n=3, seed=1, templates="BABA")
    ids, mask = task.clean_ids, task.attention_mask
    layer = 6
    o_proj = f"module:model.layers.{layer}.self_attn.o_proj"
    sites = [f"L{layer}.{k}" for k in ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "head")]
    before = snapshot(gemma3)
    run = gemma3.run(ids, attention_mask=mask, cache=[*sites, o_proj])
    c = run.cache
    torch.testing.assert_close(c[f"L{layer}.head"].sum(2), c[o_proj], atol=1e-4, rtol=0)
    pre, attn, mlp = c[f"L{layer}.resid_pre"], c[f"L{layer}.attn_out"], c[f"L{layer}.mlp_out"]
    torch.testing.assert_close(pre + attn, c[f"L{layer}.resid_mid"], atol=1e-4, rtol=0)
    torch.testing.assert_close(pre + attn + mlp, c[f"L{layer}.resid_post"], atol=1e-4, rtol=0)
    for site in (f"L{layer}.head", f"L{layer}.mlp_out", f"L{layer}.resid_pre"):
        patched = gemma3.run(ids, attention_mask=mask, interventions=[Intervention(site, Replace(c[site]))])
        assert torch.equal(patched.logits, run.logits), site
    assert_untouched(gemma3, before)


def test_patching_matches_naive_loop(gemma3: Model) -> None:
    task = ioi(gemma3.tokenizer, n=3, seed=2, templates="BABA")
    layers = [16]
    scores = pathlens.patch(gemma3, task, sites="heads", layers=layers, progress=False, direction="denoise")
    clean = gemma3.run(task.clean_ids, attention_mask=task.attention_mask, cache=[f"L{x}.head" for x in layers])
    for cell in scores.to_frame().itertuples():
        source = clean.cache[f"L{cell.layer}.head"][:, :, cell.head]
        site = f"L{cell.layer}.H{cell.head}"
        run = gemma3.run(
            task.corrupt_ids, attention_mask=task.attention_mask, interventions=[Intervention(site, Replace(source))]
        )
        assert abs(cell.value - float(task.score(run.logits).mean())) <= 1e-4, site
