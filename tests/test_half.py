"""bf16 and fp16 models through every engine, against the same engine on the fp32 model (the reference).

A half-precision model rounds every activation (bf16 keeps 8 bits of mantissa, fp16 11), so its scores differ
from the fp32 model's by the model's own rounding, not by anything the engines add: metrics read fp32 logits
(`tasks.base.answer_logits` upcasts), checkpointed values are float64, scores float32. Stated tolerances, as a
fraction of the largest |fp32 score| of the grid, measured on these tiny models with weights scaled ×4 (large
effects): bf16 ≤ 6 %, fp16 ≤ 1.5 % (largest seen: 4.5 % and 0.3 %); and the scores of each grid correlate with the
fp32 ones at ≥ 0.99 (bf16) / 0.999 (fp16). RelP's LN rule probes each norm (`arch.norms.norm_parts`); in half
precision that probe once read LayerNorm as not centering (10 % errors on GPT-NeoX): these bounds catch it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch

import pathlens
from pathlens import Model
from pathlens.circuits.edge_patching import EdgePatcher
from pathlens.circuits.faithfulness import faithfulness_curve
from pathlens.tasks.base import answer_logits, logit_diff
from tests.helpers import padded_task, tiny_model

TOLERANCE = {torch.bfloat16: 0.06, torch.float16: 0.015}
CORRELATION = {torch.bfloat16: 0.99, torch.float16: 0.999}

ENGINES: dict[str, Callable[[Model, Any], torch.Tensor]] = {
    "patch": lambda m, t: pathlens.patch(m, t, sites="heads", positions="each", progress=False).values,
    "ablate": lambda m, t: pathlens.patch(m, t, sites="mlp_out", ablation="mean", progress=False).values,
    "atp": lambda m, t: pathlens.atp(m, t, sites="heads").values,
    "relp": lambda m, t: pathlens.relp(m, t, sites="heads").values,
    "ig": lambda m, t: pathlens.integrated_gradients(m, t, sites="resid_pre").values,
    "eap": lambda m, t: pathlens.edge_attribution(m, t).scores,
}


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    keep = ~(a.isnan() | b.isnan())
    return float(torch.corrcoef(torch.stack([a[keep].double(), b[keep].double()]))[0, 1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3", "neox_parallel"])
def test_half_precision_engines_track_fp32(family: str, dtype: torch.dtype) -> None:
    full, task = tiny_model(family, weight_scale=4.0), padded_task()
    half = Model(copy.deepcopy(full.hf).to(dtype), name=f"{full.name}-{dtype}")
    reference = {name: engine(full, task) for name, engine in ENGINES.items()}
    graph = pathlens.edge_attribution(full, task)
    curve = {m: faithfulness_curve(EdgePatcher(m, task), graph, sizes=[1, 4, 16, 64]).metric for m in (full, half)}
    reference["edge patching"] = torch.tensor(curve[full])
    for name, expected in reference.items():
        got = torch.tensor(curve[half]) if name == "edge patching" else ENGINES[name](half, task)
        assert got.dtype in (torch.float32, torch.float64), name
        scale = float(expected.nan_to_num().abs().max())
        tol = TOLERANCE[dtype]
        error = float((got.double() - expected.double()).nan_to_num().abs().max())
        assert error <= tol * scale, (name, error, scale)
        if expected.numel() > 4:
            assert correlation(got, expected) >= CORRELATION[dtype], name


def test_metrics_read_half_precision_logits_in_fp32() -> None:
    task = padded_task()
    logits = (torch.randn(task.n, task.seq_len, 64, generator=torch.Generator().manual_seed(0)) * 40).bfloat16()
    final = answer_logits(logits, task)
    assert final.dtype == torch.float32
    rows = torch.arange(task.n)
    by_hand = (
        logits.float()[rows, task.answer_pos, task.answer_ids] - logits.float()[rows, task.answer_pos, task.wrong_ids]
    )
    assert torch.equal(logit_diff(logits, task), by_hand)  # exact: the difference of two bf16 values fits fp32
