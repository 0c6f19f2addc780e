"""Attribution over prompt chunks (`pathlens.attribution.chunked`, `pathlens.circuits.edge_attribution_work`).

References: one chunk of every prompt (the unchunked run: equal within 1e-6, float sums in another order), the
slow per-prompt loop (the method on each prompt alone, averaged by hand), the local run for Ray (bit for bit, one
torch thread here and in every worker, on the local cluster of `tests.test_distributed`'s fixtures), and the
measured peak (`TensorPeak`) for `max_memory`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch

import pathlens
from pathlens.attribution import atp, atp_star, integrated_gradients, relp
from pathlens.circuits.edge_attribution import edge_attribution
from pathlens.circuits.edge_attribution_work import edge_attribution_over_chunks
from pathlens.distributed import RayExecutor
from pathlens.interventions import Add, Intervention, Replace
from pathlens.memory import TensorPeak
from pathlens.model import Model
from pathlens.patching.budget import first_order_cost
from pathlens.patching.executor import ChunkWork
from pathlens.results import Scores
from pathlens.sites import Site
from pathlens.tasks.base import Task
from tests.helpers import assert_untouched, snapshot, tiny_model, token_batch

P = 9
N = 7
CHUNK_TOKENS = 2 * P  # two prompts per chunk: 4 chunks of 7 prompts, the last one shorter

Estimator = Callable[..., Scores]
METHODS: list[tuple[str, Estimator, dict[str, Any]]] = [
    ("atp", atp, {}),
    ("relp", relp, {"sites": "resid_pre"}),
    ("atp*-qk", atp_star, {"sites": "k", "positions": "each"}),
    ("atp*-graddrop", atp_star, {"grad_drop": True}),
    ("ig", integrated_gradients, {"steps": 2, "sites": "mlp_out"}),
]


def two_prompts(name: str, options: dict[str, Any]) -> int:
    """`max_batch_tokens` that holds two prompts (integrated gradients: with all their steps)."""
    return CHUNK_TOKENS * int(options.get("steps", 1)) if name == "ig" else CHUNK_TOKENS


def chunk_task(n: int = N, p: int = P) -> Task:
    """`n` prompt pairs of `p` tokens, right-padded to four different lengths, scored at each last real token."""
    clean, corrupt = token_batch(n=n, p=p), token_batch(n=n, p=p, seed=7)
    lengths = torch.tensor([p, p - 2, p - 1, p - 3] * n)[:n]
    mask = (torch.arange(p)[None, :] < lengths[:, None]).long()
    clean, corrupt = clean * mask, corrupt * mask
    return Task("chunks", clean, corrupt, torch.arange(n) % 5 + 1, torch.arange(n) % 5 + 6, lengths - 1, mask)


@pytest.mark.parametrize(("name", "estimate", "options"), METHODS, ids=[m[0] for m in METHODS])
def test_chunked_estimates_equal_one_chunk_and_the_per_prompt_loop(
    name: str, estimate: Estimator, options: dict[str, Any]
) -> None:
    model, task = tiny_model("llama", weight_scale=4.0), chunk_task()
    before = snapshot(model)
    one = estimate(model, task, **options)
    chunked = estimate(model, task, max_batch_tokens=two_prompts(name, options), **options)
    assert chunked.meta["prompts_per_chunk"] == 2 and "prompts_per_chunk" not in one.meta
    torch.testing.assert_close(chunked.values, one.values, rtol=1e-6, atol=1e-6)
    assert chunked.meta["base_metric"] == pytest.approx(one.meta["base_metric"], rel=1e-6, abs=1e-6)
    per_prompt = [estimate(model, task.rows([i]), **options) for i in range(task.n)]
    by_hand = torch.stack([s.values.double() for s in per_prompt]).mean(dim=0)
    torch.testing.assert_close(chunked.values.double(), by_hand, rtol=1e-5, atol=1e-5)
    base = sum(s.meta["base_metric"] for s in per_prompt) / task.n
    assert chunked.meta["base_metric"] == pytest.approx(base, rel=1e-5, abs=1e-5)
    assert_untouched(model, before)


@pytest.mark.parametrize(("family", "method"), [("llama", "eap-ig"), ("gpt2", "relp"), ("gemma3", "eap")])
def test_edge_attribution_over_chunks_equals_one_run(family: str, method: str) -> None:
    """Chunks of whole prompts against the engine's own run of every prompt: the same edges (NaN where there is
    none), scores within 1e-6 of the largest (each chunk's means are float32)."""
    model, task = tiny_model(family, weight_scale=4.0), chunk_task()
    before = snapshot(model)
    one = edge_attribution(model, task, method, steps=3)  # type: ignore[arg-type]
    tokens = (3 if method == "eap-ig" else 1) * CHUNK_TOKENS  # two prompts with every step
    chunked = edge_attribution_over_chunks(model, task, method, steps=3, max_batch_tokens=tokens)  # type: ignore[arg-type]
    assert chunked.meta["prompts_per_chunk"] == 2 and chunked.meta["n_prompts"] == task.n
    assert chunked.senders == one.senders and chunked.receivers == one.receivers
    assert torch.equal(chunked.valid, one.valid)
    scale = float(one.scores[one.valid].abs().max())
    torch.testing.assert_close(chunked.scores, one.scores, rtol=0, atol=1e-6 * scale, equal_nan=True)
    assert chunked.meta["base_metric"] == pytest.approx(one.meta["base_metric"], rel=1e-6, abs=1e-6)
    assert_untouched(model, before)


def test_clean_interventions_are_cut_to_each_chunk() -> None:
    """A per-prompt Replace source and a vector Add on the clean side: chunked AtP and edge attribution equal the
    unchunked runs; an intervention selecting rows cannot be chunked."""
    model, task = tiny_model("gpt2", weight_scale=4.0), chunk_task()
    d = model.arch.d_model
    source = torch.randn(task.n, P, d, generator=torch.Generator().manual_seed(3))  # (N, P, d_model)
    sides = [Intervention("L0.resid_post", Replace(source)), Intervention("L1.resid_pre", Add(torch.ones(d), 0.5))]
    options: dict[str, Any] = {"sites": "resid_pre", "direction": "denoise", "clean_interventions": sides}
    one = atp(model, task, **options)
    chunked = atp(model, task, max_batch_tokens=CHUNK_TOKENS, **options)
    torch.testing.assert_close(chunked.values, one.values, rtol=1e-6, atol=1e-6)
    graph = edge_attribution(model, task, "eap", direction="denoise", clean_interventions=sides)
    over = edge_attribution_over_chunks(
        model, task, "eap", direction="denoise", clean_interventions=sides, max_batch_tokens=CHUNK_TOKENS
    )
    assert over.senders == graph.senders  # the interventions' own senders included
    scale = float(graph.scores[graph.valid].abs().max())
    torch.testing.assert_close(over.scores, graph.scores, rtol=0, atol=1e-6 * scale, equal_nan=True)
    with pytest.raises(pathlens.PathlensError, match=r"selects rows \[0, 1\].*rows=None"):
        atp(
            model,
            task,
            max_batch_tokens=CHUNK_TOKENS,
            clean_interventions=[Intervention("L0.mlp_out", Add(torch.ones(d), 1.0), rows=[0, 1])],
        )


def _first_order_families(model: Model, name: str) -> tuple[set[Site], int, int]:
    """(families cached, variants scored, QK-fixed layers) of the budget tests' estimates, by hand."""
    layers, heads, groups = model.n_layers, model.arch.n_heads, model.arch.n_kv_heads
    if name == "atp":
        return {Site("head", layer) for layer in range(layers)}, layers * heads, 0
    if name == "relp":
        return {Site("resid_pre", layer) for layer in range(layers)}, layers, 0
    qk = {Site(kind, layer) for layer in range(layers) for kind in ("attn_pattern", "q", "k")}
    return qk, layers * groups * P, layers


BUDGET_CASES = [("llama", "atp"), ("gpt2", "atp"), ("llama", "relp"), ("gpt2", "atp*-qk")]


@pytest.mark.parametrize(("family", "name"), BUDGET_CASES)
def test_the_measured_peak_stays_under_the_budget(family: str, name: str) -> None:
    """Under 1, 2.5 and 6 times the least budget (`first_order_cost`): measured peak ≤ budget (and ≥ a quarter of
    it at the least, so the estimate is not idly loose), more prompts per chunk as the budget grows, scores
    bit-equal to the same chunks given as tokens and within 1e-6 of one chunk."""
    estimate, options = next((m[1], m[2]) for m in METHODS if m[0] == name)
    model, task = tiny_model(family, weight_scale=4.0), chunk_task(n=12)
    families, variants, qk_layers = _first_order_families(model, name)
    cost = first_order_cost(model, P, families, variants, qk_layers)
    one = estimate(model, task, **options)
    before = snapshot(model)
    sizes = []
    for factor in (1.0, 2.5, 6.0):
        budget = int(cost.least * factor)
        with TensorPeak() as peak:
            scores = estimate(model, task, max_memory=budget, **options)
        assert 0 < peak.peak <= budget, (factor, peak.peak, budget)
        if factor == 1.0:
            assert peak.peak >= budget / 4, (peak.peak, budget)
        sizes.append(scores.meta["prompts_per_chunk"])
        assert scores.meta["max_memory"] == budget
        by_hand = estimate(model, task, max_batch_tokens=sizes[-1] * P, **options)
        assert torch.equal(scores.values, by_hand.values)
        torch.testing.assert_close(scores.values, one.values, rtol=1e-6, atol=1e-6)
    assert sizes == sorted(sizes) and sizes[0] == 1 and sizes[-1] > 2
    assert_untouched(model, before)


@pytest.mark.parametrize(("name", "estimate", "options"), METHODS, ids=[m[0] for m in METHODS])
def test_budget_and_option_errors(name: str, estimate: Estimator, options: dict[str, Any]) -> None:
    model, task = tiny_model("llama"), chunk_task()
    before = snapshot(model)
    engine = "integrated gradients" if name == "ig" else "attribution patching"
    small = rf"max_memory=[0-9.]+ MB is too small for one row of {engine}: it needs at least [0-9.]+ MB"
    with pytest.raises(pathlens.PathlensError, match=small):
        estimate(model, task, max_memory="10KB", **options)
    with pytest.raises(pathlens.PathlensError, match="not both"):
        estimate(model, task, max_memory="1GB", max_batch_tokens=100, **options)
    with pytest.raises(pathlens.PathlensError, match="max_memory='lots'"):
        estimate(model, task, max_memory="lots", **options)
    with pytest.raises(pathlens.PathlensError, match="max_batch_tokens=0 must be at least 1"):
        estimate(model, task, max_batch_tokens=0, **options)
    with pytest.raises(pathlens.PathlensError, match="executor='spark'"):
        estimate(model, task, executor="spark", **options)
    assert_untouched(model, before)
    with pytest.raises(pathlens.PathlensError, match="too small for one row of edge attribution: it needs at least"):
        edge_attribution_over_chunks(model, task, max_memory="10KB")
    with pytest.raises(pathlens.PathlensError, match="not both"):
        edge_attribution_over_chunks(model, task, max_memory="1GB", max_batch_tokens=100)


def test_without_ray_the_error_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    model, task = tiny_model("gpt2"), chunk_task()
    with pytest.raises(pathlens.PathlensError, match="cannot reach the Ray cluster at address='ray://127.0.0.1:1'"):
        atp(model, task, executor=RayExecutor(address="ray://127.0.0.1:1", model="x"))
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(pathlens.PathlensError, match=r"pip install 'pathlens\[ray\]'"):
        atp(model, task, max_batch_tokens=CHUNK_TOKENS, executor="ray")


# ---- on a local Ray cluster ---------------------------------------------------------------------------------

ray = pytest.importorskip("ray")
from tests.test_distributed import cluster, executor, folder, slow_logit_diff  # noqa: E402, F401  (shared fixtures)


@pytest.mark.parametrize(("name", "estimate", "options"), METHODS, ids=[m[0] for m in METHODS])
def test_ray_estimates_equal_local_ones_bit_for_bit(
    folder: Any,  # noqa: F811
    executor: RayExecutor,  # noqa: F811
    name: str,
    estimate: Estimator,
    options: dict[str, Any],
) -> None:
    model, task = pathlens.load(folder), chunk_task()
    before = snapshot(model)
    local = estimate(model, task, max_batch_tokens=two_prompts(name, options), **options)
    remote = estimate(model, task, max_batch_tokens=two_prompts(name, options), executor=executor, **options)
    assert local.meta["prompts_per_chunk"] == 2  # 4 chunks
    assert torch.equal(remote.values, local.values)
    assert remote.meta == local.meta
    assert_untouched(model, before)


def test_ray_edge_attribution_equals_the_local_chunks_bit_for_bit(folder: Any, executor: RayExecutor) -> None:  # noqa: F811
    """`edge_attribution(executor=...)` (the entry point, wired to `edge_attribution_over_chunks`): Ray against
    "local", the same chunks in this process."""
    model, task = pathlens.load(folder), chunk_task()
    for method in ("eap", "eap-ig"):
        tokens = (2 if method == "eap-ig" else 1) * CHUNK_TOKENS  # two prompts with every step
        options: dict[str, Any] = {"steps": 2, "max_batch_tokens": tokens}
        local = edge_attribution(model, task, method, executor="local", **options)  # type: ignore[arg-type]
        remote = edge_attribution(model, task, method, executor=executor, **options)  # type: ignore[arg-type]
        assert local.meta["prompts_per_chunk"] == 2
        assert torch.equal(remote.scores.isnan(), local.scores.isnan())
        assert torch.equal(remote.scores.nan_to_num(), local.scores.nan_to_num())
        assert remote.meta == local.meta


class KillingFirst:
    """An executor that runs `inner` and kills one of its actors when the first chunk comes back."""

    def __init__(self, inner: RayExecutor):
        self.inner, self.victims, self.seen = inner, [], []  # type: ignore[var-annotated]

    def run(
        self,
        model: Model,
        work: ChunkWork,
        fingerprint: str,
        todo: Sequence[int],
        done: Callable[[int, torch.Tensor], None],
    ) -> None:
        def first_kills(index: int, values: torch.Tensor) -> None:
            if not self.seen:
                self.victims.append(self.inner.actors[0])
                ray.kill(self.victims[0])  # it holds queued chunks: in_flight=2, each chunk sleeps in the metric
            self.seen.append(index)
            done(index, values)

        self.inner.run(model, work, fingerprint, todo, first_kills)


def test_a_worker_killed_mid_run_gives_identical_scores(
    folder: Any,  # noqa: F811
    executor: RayExecutor,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, task = pathlens.load(folder), chunk_task(n=12)
    options: dict[str, Any] = {"metric": slow_logit_diff, "max_batch_tokens": P}  # 12 chunks of one prompt
    local = atp(model, task, **options)
    failed: list[int] = []
    replace = RayExecutor._replace

    def count_failures(self: RayExecutor, *args: Any) -> None:
        failed.append(1)
        replace(self, *args)

    monkeypatch.setattr(RayExecutor, "_replace", count_failures)
    killing = KillingFirst(executor)
    remote = atp(model, task, executor=killing, **options)
    assert torch.equal(remote.values, local.values)
    assert failed == [1]  # the victim's queued chunks came back failed and ran elsewhere
    assert sorted(killing.seen) == list(range(12))  # every chunk recorded once
    assert killing.victims[0] not in executor.actors and len(executor.actors) == 2


def test_a_worker_with_other_weights_is_refused(folder: Any, cluster: None) -> None:  # noqa: F811
    other, task = tiny_model("llama", seed=1, weight_scale=4.0), chunk_task()
    with RayExecutor(workers=1, model=str(folder)) as wrong:
        with pytest.raises(pathlens.PathlensError, match="other base-run logits"):
            atp(other, task, max_batch_tokens=CHUNK_TOKENS, executor=wrong)
        with pytest.raises(pathlens.PathlensError, match="other base-run logits"):
            edge_attribution_over_chunks(other, task, max_batch_tokens=CHUNK_TOKENS, executor=wrong)
