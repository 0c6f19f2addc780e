"""Spliced dictionaries' latents as nodes of the edge graph (pathlens.circuits.layout, "Spliced dictionaries"):
edge attribution against derivatives taken by hand through `model.run` interventions, the sums the split
promises, exact edge patching against a slow fixed-point reference, discovery of a planted latent, bad input,
and the model left as it was.

Tiny llama (2 layers, 4 heads, 2 key-value groups, d_model 32, d_mlp 64) with a TopK transcoder on layer 0's MLP
("L0.tc") and a ReLU SAE on layer 1's MLP output ("L1.sae"), both constructed at random with biases and scales
away from their defaults; tolerances are float32 rounding of these small models (1e-5)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

import pytest
import torch
import transformers

from pathlens import Model
from pathlens.attribution import atp
from pathlens.circuits import EdgePatcher, discover, edge_attribution
from pathlens.circuits.layout import graph_layout, latent_families, valid_mask
from pathlens.errors import PathlensError
from pathlens.features.sae import Dictionary, DictionaryConfig
from pathlens.graph import Graph
from pathlens.interventions import Intervention, Replace
from pathlens.report.circuit_view import circuit_section
from pathlens.sites import Site
from pathlens.tasks.base import Task
from tests.helpers import assert_untouched, padded_task, snapshot, tiny_model

D = 32
TOL = 1e-5


def _dictionary(kind: str, width: int, transcoder: bool, seed: int) -> Dictionary:
    d = Dictionary(DictionaryConfig(kind, D, width, d_out=D if transcoder else None, k=6), seed=seed)  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        d.W_enc.mul_(2.0)
        d.b_enc.normal_(0.0, 0.1, generator=gen)
        d.b_dec.normal_(0.0, 0.1, generator=gen)
        d.s_in.fill_(0.8)
        d.s_out.fill_(1.3)
    return d


@contextmanager
def spliced(model: Model, which: str = "both") -> Iterator[dict[str, Dictionary]]:
    """The transcoder on L0 ("L0.tc") and/or the SAE on L1.mlp_out ("L1.sae") spliced for the block; "all" adds
    a JumpReLU SAE on the residual stream between the layers ("L0.res" on L0.resid_post) and a TopK SAE on layer
    1's attention output ("L1.att")."""
    made = {}
    with ExitStack() as stack:
        if which in ("both", "all", "tc"):
            made["tc"] = _dictionary("topk", 40, True, seed=3)
            stack.enter_context(model.splice(made["tc"], "L0.mlp_in", target="L0.mlp_out", name="tc"))
        if which in ("both", "all", "sae"):
            made["sae"] = _dictionary("relu", 40, False, seed=4)
            stack.enter_context(model.splice(made["sae"], "L1.mlp_out", name="sae"))
        if which in ("all", "res"):
            made["res"] = _dictionary("jumprelu", 48, False, seed=5)
            stack.enter_context(model.splice(made["res"], "L0.resid_post", name="res"))
        if which in ("all", "att"):
            made["att"] = _dictionary("topk", 36, False, seed=6)
            stack.enter_context(model.splice(made["att"], "L1.attn_out", name="att"))
        yield made


@pytest.fixture(scope="module")
def model() -> Model:
    return tiny_model("llama", weight_scale=3.0)


@pytest.fixture(scope="module")
def task() -> Task:
    return padded_task()


# ---- references computed by hand through model.run ---------------------------------------------------------


def _mean_metric(model: Model, task: Task, interventions: list[Intervention]) -> torch.Tensor:
    logits = model.run(task.clean_ids, attention_mask=task.attention_mask, interventions=interventions, grad=True)
    return task.metric(logits.logits, task).mean()


def _derivative(model: Model, task: Task, make: Callable[[torch.Tensor], list[Intervention]]) -> float:
    """d m / d ε at ε = 0 of the clean run under the interventions `make(ε)`."""
    eps = torch.zeros((), requires_grad=True)
    with torch.enable_grad():
        value = _mean_metric(model, task, make(eps))
        (grad,) = torch.autograd.grad(value, eps)
    return float(grad)


def _runs(model: Model, task: Task, sites: list[Site]) -> tuple[dict[Site, torch.Tensor], dict[Site, torch.Tensor]]:
    mask = task.attention_mask
    with torch.no_grad():
        clean = model.run(task.clean_ids, attention_mask=mask, cache=sites).cache
        corrupt = model.run(task.corrupt_ids, attention_mask=mask, cache=sites).cache
    return clean, corrupt


def _norm(model: Model, layer: int) -> torch.nn.Module:
    return model.hf.get_submodule(f"model.layers.{layer}.post_attention_layernorm")


def _latent_input(model: Model, tc: Dictionary, f_clean: torch.Tensor, resid: torch.Tensor, latent: int):  # type: ignore[no-untyped-def]
    """Interventions that give latent `latent` of L0.tc the input `resid` (un-normed), the others their own."""
    own = tc.encode(_norm(model, 0)(resid))[..., latent]
    value = f_clean.clone()
    value[..., latent] = own
    return [Intervention(Site("latent", 0, path="tc"), Replace(value))]


# ---- edge attribution -----------------------------------------------------------------------------------------


def test_eap_latent_edges_equal_the_hand_formula(model: Model, task: Task) -> None:
    """EAP score of an edge = d m/dε with that receiver's input moved by ε·Δsender (1e-5): input / L0 heads →
    transcoder latents (the latent reads its own input through the MLP norm and the dictionary's encoder),
    latents → L1's MLP and the logits, SAE latents → the logits; and the identity that a latent's outgoing edges sum
    to its node AtP."""
    with spliced(model) as made:
        graph = edge_attribution(model, task)
        tc, sae = made["tc"], made["sae"]
        fam = {f.layer: f for f in latent_families(model, task)}
        sites = [Site("resid_pre", 0), Site("head", 0), Site("resid_mid", 0), Site("resid_mid", 1)]
        sites += [Site("latent", 0, path="tc"), Site("latent", 1, path="sae"), Site("resid_post", 1)]
        clean, corrupt = _runs(model, task, sites)
        f0 = clean[Site("latent", 0, path="tc")]
        checked = 0
        for latent in fam[0].nodes[:4].tolist():
            receiver = graph.receivers.index(f"L0.tc.F{latent}")
            senders = {"input": corrupt[Site("resid_pre", 0)] - clean[Site("resid_pre", 0)]}
            senders["L0.H2"] = (corrupt[Site("head", 0)] - clean[Site("head", 0)])[:, :, 2]
            for name, delta in senders.items():
                expected = _derivative(
                    model,
                    task,
                    lambda e, d=delta, i=latent: _latent_input(model, tc, f0, clean[Site("resid_mid", 0)] + e * d, i),
                )
                got = float(graph.scores[graph.senders.index(name), receiver])
                assert abs(got - expected) <= TOL, (name, latent, got, expected)
                checked += 1
            # the latent as a sender, into L1's MLP (an SAE's MLP receiver) and into the logits
            write = (corrupt[Site("latent", 0, path="tc")] - f0)[..., latent, None] * (tc.W_dec[latent] / tc.s_out)
            write = write.detach()
            norm1 = _norm(model, 1)
            expected_mlp = _derivative(
                model,
                task,
                lambda e, w=write, n=norm1: [
                    Intervention(Site("mlp_in", 1), Replace(n(clean[Site("resid_mid", 1)] + e * w)))
                ],
            )
            expected_logits = _derivative(
                model,
                task,
                lambda e, w=write: [Intervention(Site("resid_post", 1), Replace(clean[Site("resid_post", 1)] + e * w))],
            )
            sender = graph.senders.index(f"L0.tc.F{latent}")
            assert abs(float(graph.scores[sender, graph.receivers.index("L1.mlp")]) - expected_mlp) <= TOL
            assert abs(float(graph.scores[sender, -1]) - expected_logits) <= TOL
            checked += 2
        latent = int(fam[1].nodes[0])
        f_sae = clean[Site("latent", 1, path="sae")]
        write = (
            (corrupt[Site("latent", 1, path="sae")] - f_sae)[..., latent, None] * (sae.W_dec[latent] / sae.s_out)
        ).detach()
        expected = _derivative(
            model,
            task,
            lambda e: [Intervention(Site("resid_post", 1), Replace(clean[Site("resid_post", 1)] + e * write))],
        )
        assert abs(float(graph.scores[graph.senders.index(f"L1.sae.F{latent}"), -1]) - expected) <= TOL
        # outgoing edges of a latent sum to its node-level AtP (the latent patched alone, first order)
        names = [f"L0.tc.F{i}" for i in fam[0].nodes[:3].tolist()] + [f"L1.sae.F{latent}"]
        nodes = atp(model, task, sites=names, direction="noise")
        effects = nodes.values - float(nodes.meta["base_metric"])
        sums = graph.node_scores()
        for name, effect in zip(names, effects.tolist(), strict=True):
            assert abs(sums[name] - effect) <= TOL, (name, sums[name], effect)
        assert checked >= 16


def test_edges_into_a_latent_sum_to_its_input_atp(model: Model, task: Task) -> None:
    """Σ over a transcoder latent's incoming edges = d m/dε with its input moved by ε·Δ(resid_mid) (the
    receiver's node AtP), for every node latent and for the error node (moved through the MLP input)."""
    with spliced(model, "tc") as made:
        graph = edge_attribution(model, task)
        fam = latent_families(model, task)[0]
        clean, corrupt = _runs(model, task, [Site("resid_mid", 0), Site("latent", 0, path="tc")])
        moved = corrupt[Site("resid_mid", 0)] - clean[Site("resid_mid", 0)]
        f0 = clean[Site("latent", 0, path="tc")]
        incoming = torch.nan_to_num(graph.scores.double()).sum(dim=0)
        for latent in fam.nodes.tolist():
            expected = _derivative(
                model,
                task,
                lambda e, i=latent: _latent_input(model, made["tc"], f0, clean[Site("resid_mid", 0)] + e * moved, i),
            )
            assert abs(float(incoming[graph.receivers.index(f"L0.tc.F{latent}")]) - expected) <= TOL
        # the error node: the MLP's own call moves, every node latent keeps its clean value
        norm0 = _norm(model, 0)

        def error_input(e: torch.Tensor) -> list[Intervention]:
            x = norm0(clean[Site("resid_mid", 0)] + e * moved)
            f = made["tc"].encode(x)
            f[..., fam.nodes] = f0[..., fam.nodes]
            return [Intervention(Site("mlp_in", 0), Replace(x)), Intervention(Site("latent", 0, path="tc"), Replace(f))]

        expected = _derivative(model, task, error_input)
        assert abs(float(incoming[graph.receivers.index("L0.tc.err")]) - expected) <= TOL


@pytest.mark.parametrize("method", ["eap", "eap-ig", "relp"])
@pytest.mark.parametrize("which", ["tc", "sae"])
def test_latent_rows_and_columns_sum_to_the_mlp(model: Model, task: Task, which: str, method: str) -> None:
    """The family's sender rows + its error row = the MLP's row of the unspliced graph, and (transcoder) its
    receiver columns + the error's = the MLP's column, every other edge unchanged (1e-5), for EAP, EAP-IG and
    RelP; after the block the graph is the unspliced one again, bit for bit."""
    plain = edge_attribution(model, task, method=method, steps=3)  # type: ignore[arg-type]
    with spliced(model, which):
        graph = edge_attribution(model, task, method=method, steps=3)  # type: ignore[arg-type]
    layer, prefix = (0, "L0.tc.") if which == "tc" else (1, "L1.sae.")
    lift_s = [
        plain.senders.index(f"L{layer}.mlp") if s.startswith(prefix) else plain.senders.index(s) for s in graph.senders
    ]
    lift_r = [
        plain.receivers.index(f"L{layer}.mlp") if r.startswith(prefix) else plain.receivers.index(r)
        for r in graph.receivers
    ]
    scores = torch.nan_to_num(graph.scores.double())
    by_sender = torch.zeros(len(plain.senders), len(graph.receivers), dtype=torch.float64)
    by_sender.index_add_(0, torch.tensor(lift_s), scores)
    folded = torch.zeros(len(plain.senders), len(plain.receivers), dtype=torch.float64)
    folded.index_add_(1, torch.tensor(lift_r), by_sender)
    assert (folded - torch.nan_to_num(plain.scores.double())).abs().max().item() <= TOL
    n_latents = sum(s.startswith(prefix + "F") for s in graph.senders)
    assert n_latents > 0 and graph.meta["dictionaries"][prefix[:-1]]["nodes"] == n_latents
    again = edge_attribution(model, task, method=method, steps=3)  # type: ignore[arg-type]
    assert torch.equal(again.scores.nan_to_num(), plain.scores.nan_to_num())


@pytest.mark.parametrize("kind", ["relu", "topk", "batchtopk", "jumprelu"])
def test_each_latent_of_its_own_input_is_the_encoding(kind: str) -> None:
    """`LatentFamily.own_values` (a latent of its own input, batched) = entry i of the dictionary's encoding of
    that input, for every kind (1e-6), and `values` = the node columns of the encoding."""
    from pathlens.circuits.layout import LatentFamily
    from pathlens.hooks import Splice

    d = _dictionary(kind, 40, False, seed=7)
    with torch.no_grad():
        d.threshold.fill_(0.2)
    nodes = torch.tensor([1, 4, 5, 9, 17, 33, 39])
    family = LatentFamily(Splice(d, Site("mlp_out", 0), Site("mlp_out", 0), "sae", 40), nodes)
    x = torch.randn(5, 3, 4, D, generator=torch.Generator().manual_seed(0))
    latents = torch.tensor([0, 3, 6, 2, 3])
    expected = torch.stack([d.encode(x[c])[..., int(nodes[i])] for c, i in enumerate(latents.tolist())])
    assert (family.own_values(x, latents) - expected).abs().max().item() <= 1e-6
    assert bool((expected != 0).any()) and bool((expected == 0).any())
    assert torch.equal(family.values(x[0]), d.encode(x[0])[..., nodes])


def test_a_residual_dictionary_is_a_bottleneck(model: Model, task: Task) -> None:
    """An SAE on L0.resid_post (JumpReLU): no edge skips it; its rows summed = the unspliced rows of everything
    before it (per later receiver), its columns summed = each earlier sender's unspliced edges into everything
    after it; a latent's incoming edge = d m/dε with its input moved (no norm: it reads the stream); its outgoing
    edges sum to its node AtP (1e-5)."""
    plain = edge_attribution(model, task)
    with spliced(model, "res") as made:
        graph = edge_attribution(model, task)
        res = made["res"]
        family = [i for i, s in enumerate(graph.senders) if s.startswith("L0.res.")]
        cut_cols = [j for j, r in enumerate(graph.receivers) if r.startswith("L0.res.")]
        before = [s for s in plain.senders if s == "input" or s.startswith("L0.")]
        after = [r for r in plain.receivers if not r.startswith("L0.")]
        assert torch.isnan(
            graph.scores[[graph.senders.index(s) for s in before]][:, [graph.receivers.index(r) for r in after]]
        ).all()
        s0, s1 = torch.nan_to_num(plain.scores.double()), torch.nan_to_num(graph.scores.double())
        rows_before = [plain.senders.index(s) for s in before]
        for r in after:
            through = s1[family, graph.receivers.index(r)].sum()
            direct = s0[rows_before, plain.receivers.index(r)].sum()
            assert abs(float(through - direct)) <= TOL, r
        cols_after = [plain.receivers.index(r) for r in after]
        for s in before:
            assert (
                abs(float(s1[graph.senders.index(s), cut_cols].sum() - s0[plain.senders.index(s), cols_after].sum()))
                <= TOL
            )
        sites = [Site("head", 0), Site("resid_pre", 1), Site("latent", 0, path="res")]
        clean, corrupt = _runs(model, task, sites)
        stream, f0 = clean[Site("resid_pre", 1)], clean[Site("latent", 0, path="res")]
        delta = (corrupt[Site("head", 0)] - clean[Site("head", 0)])[:, :, 2]
        nodes = [int(r.rsplit("F", 1)[1]) for r in graph.receivers if r.startswith("L0.res.F")]
        for latent in nodes[:4]:

            def moved(e: torch.Tensor, i: int = latent) -> list[Intervention]:
                value = f0.clone()
                value[..., i] = res.encode(stream + e * delta)[..., i]
                return [Intervention(Site("latent", 0, path="res"), Replace(value))]

            got = float(graph.scores[graph.senders.index("L0.H2"), graph.receivers.index(f"L0.res.F{latent}")])
            assert abs(got - _derivative(model, task, moved)) <= TOL
        names = [f"L0.res.F{i}" for i in nodes[:3]]
        effects = atp(model, task, sites=names, direction="noise")
        sums = graph.node_scores()
        for name, value in zip(names, (effects.values - float(effects.meta["base_metric"])).tolist(), strict=True):
            assert abs(sums[name] - value) <= TOL


def test_an_attention_dictionary_splits_the_heads_write(model: Model, task: Task) -> None:
    """A TopK SAE on L1.attn_out: the heads of layer 1 still receive (their q/k/v inputs feed its latents and
    error), its rows summed = the heads' rows of the unspliced graph and every other edge is unchanged (1e-5);
    a latent's outgoing edges sum to its node AtP; a circuit whose layer-1 heads all keep the same edges, lifted,
    patches exactly as without the splice (1e-5)."""
    plain = edge_attribution(model, task)
    plain_patcher = EdgePatcher(model, task)
    full = valid_mask(plain_patcher.layout, 2)
    heads = [plain.senders.index(f"L1.H{h}") for h in range(4)]
    circuits = (torch.rand(3, *full.shape, generator=torch.Generator().manual_seed(4)) < 0.5) & full
    circuits[:, heads] = circuits[:, heads[:1]]
    expected = plain_patcher.per_prompt(circuits)
    with spliced(model, "att"):
        graph = edge_attribution(model, task)
        patcher = EdgePatcher(model, task)
        family = [i for i, s in enumerate(graph.senders) if s.startswith("L1.att.")]
        assert graph.receiver_nodes("L1.H2.q") == [graph.senders[i] for i in family] and len(family) > 1
        s0, s1 = torch.nan_to_num(plain.scores.double()), torch.nan_to_num(graph.scores.double())
        assert graph.receivers == plain.receivers
        assert (s1[family].sum(0) - s0[heads].sum(0)).abs().max().item() <= TOL
        others = [s for s in graph.senders if not s.startswith("L1.att.")]
        rows1, rows0 = [graph.senders.index(s) for s in others], [plain.senders.index(s) for s in others]
        assert (s1[rows1] - s0[rows0]).abs().max().item() <= TOL
        names = [graph.senders[i] for i in family[:2]]
        effects = atp(model, task, sites=names, direction="noise")
        sums = graph.node_scores()
        for name, value in zip(names, (effects.values - float(effects.meta["base_metric"])).tolist(), strict=True):
            assert abs(sums[name] - value) <= TOL
        lift = torch.tensor([heads[0] if s.startswith("L1.att.") else plain.senders.index(s) for s in graph.senders])
        got = patcher.per_prompt(circuits[:, lift] & valid_mask(patcher.layout, 2))
    assert (got - expected).abs().max().item() <= TOL


# ---- exact edge patching --------------------------------------------------------------------------------------


def _sender_values(
    model: Model,
    layout,
    cache,
    tc: Dictionary,
    sae: Dictionary,
    res: Dictionary | None = None,
    att: Dictionary | None = None,
) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    """Each sender's write (N, P, d) in a run, from its cache, computed from the definitions."""
    out = {"input": cache[Site("resid_pre", 0)]}
    for layer in range(model.n_layers):
        for h in range(model.arch.n_heads):
            out[f"L{layer}.H{h}"] = cache[Site("head", layer)][:, :, h]
    families = [(0, tc, "tc", cache[Site("mlp_out", 0)]), (1, sae, "sae", cache[Site("mlp_out", 1)])]
    if res is not None:  # the residual dictionary's error is the rest of the stream it rebuilds
        families.append((0, res, "res", cache[Site("resid_pre", 1)]))
    if att is not None:  # the attention SAE's error is the rest of the attention's output
        families.append((1, att, "att", cache[Site("attn_out", 1)]))
    for layer, d, name, rebuilt in families:
        f = cache[Site("latent", layer, path=name)]
        total = torch.zeros_like(rebuilt)
        for s in layout.senders:
            if s.startswith(f"L{layer}.{name}.F"):
                i = int(s.rsplit("F", 1)[1])
                out[s] = f[..., i, None] * (d.W_dec[i] / d.s_out).detach()
                total = total + out[s]
        out[f"L{layer}.{name}.err"] = rebuilt - total
    return out


def _reference_metric(model: Model, task: Task, kept: torch.Tensor, layout, made) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """Per-prompt metric (N,) of circuit `kept` by fixed-point iteration of whole-model runs: each receiver's input
    is the running residual at its read point minus Σ_{removed (u, v)} (z_u − z_u^src), placed with interventions
    on the q/k/v projection outputs, the MLP inputs, the transcoder's latents and the final residual stream. Each
    iteration takes the running values of the one before; the graph is a DAG of depth ≤ 2·layers + 2."""
    tc, sae, res, att, a = made["tc"], made["sae"], made.get("res"), made.get("att"), model.arch
    sites = [Site("resid_pre", layer) for layer in range(2)] + [Site("resid_mid", layer) for layer in range(2)]
    sites += [Site("head", layer) for layer in range(2)] + [Site("mlp_out", layer) for layer in range(2)]
    sites += [Site("latent", 0, path="tc"), Site("latent", 1, path="sae")]
    sites += [] if res is None else [Site("latent", 0, path="res")]
    sites += [] if att is None else [Site("latent", 1, path="att"), Site("attn_out", 1)]
    mask = task.attention_mask
    with torch.no_grad():
        source = model.run(task.corrupt_ids, attention_mask=mask, cache=sites).cache
        z_src = _sender_values(model, layout, source, tc, sae, res, att)
        valid = valid_mask(layout, 2)
        interventions: list[Intervention] = []
        metrics = []
        for _ in range(8):
            run = model.run(task.clean_ids, attention_mask=mask, cache=sites, interventions=interventions)
            metrics.append(task.metric(run.logits, task))
            z = _sender_values(model, layout, run.cache, tc, sae, res, att)

            def read(receiver: str, resid: torch.Tensor, z: dict[str, torch.Tensor] = z) -> torch.Tensor:
                j = layout.receivers.index(receiver)
                out = resid.clone()
                for i, s in enumerate(layout.senders):
                    if valid[i, j] and not kept[i, j]:
                        out = out - (z[s] - z_src[s])
                return out

            interventions = []
            for layer in range(2):
                attn = model.hf.get_submodule(f"model.layers.{layer}.self_attn")
                norm = model.hf.get_submodule(f"model.layers.{layer}.input_layernorm")
                resid = run.cache[Site("resid_pre", layer)]
                for proj, letter, count in (("q_proj", "H", 4), ("k_proj", "G", 2), ("v_proj", "G", 2)):
                    w = getattr(attn, proj).weight  # (count·d_head, d)
                    parts = []
                    for c in range(count):
                        suffix = proj[0]
                        x = norm(read(f"L{layer}.{letter}{c}.{suffix}", resid))
                        parts.append(x @ w[c * a.d_head : (c + 1) * a.d_head].T)
                    path = f"model.layers.{layer}.self_attn.{proj}"
                    interventions.append(Intervention(Site("module", path=path), Replace(torch.cat(parts, dim=-1))))
                mid = run.cache[Site("resid_mid", layer)]
                if layer == 0:
                    x_err = _norm(model, 0)(read("L0.tc.err", mid))
                    f = tc.encode(x_err)
                    for r in layout.receivers:
                        if r.startswith("L0.tc.F"):
                            i = int(r.rsplit("F", 1)[1])
                            f[..., i] = tc.encode(_norm(model, 0)(read(r, mid)))[..., i]
                    interventions.append(Intervention(Site("mlp_in", 0), Replace(x_err)))
                    interventions.append(Intervention(Site("latent", 0, path="tc"), Replace(f)))
                else:
                    interventions.append(Intervention(Site("mlp_in", 1), Replace(_norm(model, 1)(read("L1.mlp", mid)))))
                if layer == 0 and res is not None:  # the residual dictionary between the layers
                    stream = mid + run.cache[Site("mlp_out", 0)]
                    x_err = read("L0.res.err", stream)
                    f = res.encode(x_err)
                    for r in layout.receivers:
                        if r.startswith("L0.res.F"):
                            i = int(r.rsplit("F", 1)[1])
                            f[..., i] = res.encode(read(r, stream))[..., i]
                    interventions.append(Intervention(Site("latent", 0, path="res"), Replace(f)))
                    error = x_err - res.decode(res.encode(x_err))
                    interventions.append(Intervention(Site("latent_err", 0, path="res"), Replace(error)))
            final = run.cache[Site("resid_mid", 1)] + run.cache[Site("mlp_out", 1)]
            interventions.append(Intervention(Site("resid_post", 1), Replace(read("logits", final))))
    assert (metrics[-1] - metrics[-2]).abs().max().item() <= 1e-6, "the fixed point was not reached"
    return metrics[-1]


@pytest.mark.parametrize("which", ["both", "all"])
def test_edge_patching_equals_the_slow_reference(model: Model, task: Task, which: str) -> None:
    """Random circuits (and single latent edges removed) on the graph with a transcoder and an SAE spliced (and,
    with "all", a residual SAE between the layers): the patcher's per-prompt metric = the fixed-point reference
    (1e-5); the full circuit gives the clean run and the empty one the corrupted run; the model is left untouched."""
    before = snapshot(model)
    with spliced(model, which) as made:
        patcher = EdgePatcher(model, task)
        layout = patcher.layout
        valid = valid_mask(layout, 2)
        gen = torch.Generator().manual_seed(5)
        circuits = [(torch.rand(valid.shape, generator=gen) < p) & valid for p in (0.2, 0.5, 0.9)]
        one = valid.clone()
        tc_sender = next(i for i, s in enumerate(layout.senders) if s.startswith("L0.tc.F"))
        one[tc_sender, -1] = False  # a latent → logits edge
        tc_receiver = next(j for j, r in enumerate(layout.receivers) if r.startswith("L0.tc.F"))
        one[0, tc_receiver] = False  # input → latent
        circuits += [one, valid, torch.zeros_like(valid)]
        got = patcher.per_prompt(torch.stack(circuits))
        for k, kept in enumerate(circuits):
            expected = _reference_metric(model, task, kept, layout, made)
            assert (got[k] - expected.double()).abs().max().item() <= TOL, (k, got[k], expected)
        with torch.no_grad():
            clean = task.metric(model.run(task.clean_ids, attention_mask=task.attention_mask).logits, task)
            corrupt = task.metric(model.run(task.corrupt_ids, attention_mask=task.attention_mask).logits, task)
        assert (got[-2] - clean.double()).abs().max().item() <= TOL
        assert (got[-1] - corrupt.double()).abs().max().item() <= TOL
        assert abs(patcher.source_metric - float(corrupt.mean())) <= TOL
    assert_untouched(model, before)


@pytest.mark.parametrize("family", ["llama", "gpt2", "neox_parallel", "gemma3"])
def test_lifted_circuits_match_the_unspliced_graph(family: str, task: Task) -> None:
    """A circuit of the unspliced graph, lifted (every latent and the error take the MLP's edges), gives the same
    metric with the dictionaries spliced (1e-5): the split is exact edge by edge, on sequential, parallel-block and
    sandwich-norm (Gemma 3) models; edge attribution splits the same way there."""
    model = tiny_model(family, weight_scale=3.0)
    plain = EdgePatcher(model, task)
    full = valid_mask(plain.layout, 2)
    gen = torch.Generator().manual_seed(9)
    circuits = (torch.rand(4, *full.shape, generator=gen) < 0.5) & full
    expected = plain.per_prompt(circuits)
    with spliced(model):
        patcher = EdgePatcher(model, task)
        layout = patcher.layout

        def lift(names: list[str], base: list[str]) -> torch.Tensor:
            return torch.tensor(
                [base.index(n.split(".")[0] + ".mlp") if ".tc." in n or ".sae." in n else base.index(n) for n in names]
            )

        rows, cols = lift(layout.senders, plain.layout.senders), lift(layout.receivers, plain.layout.receivers)
        lifted = circuits[:, rows][:, :, cols] & valid_mask(layout, 2)
        got = patcher.per_prompt(lifted)
        scores = torch.nan_to_num(edge_attribution(model, task).scores.double())
    assert (got - expected).abs().max().item() <= TOL
    by_sender = torch.zeros(len(plain.layout.senders), len(cols), dtype=torch.float64).index_add_(0, rows, scores)
    folded = torch.zeros(len(plain.layout.senders), len(plain.layout.receivers), dtype=torch.float64)
    folded.index_add_(1, cols, by_sender)
    assert (folded - torch.nan_to_num(edge_attribution(model, task).scores.double())).abs().max().item() <= TOL


@pytest.mark.parametrize("family", ["gpt2", "neox_parallel", "gemma3"])
def test_residual_dictionary_endpoints_on_other_architectures(family: str, task: Task) -> None:
    """A residual SAE between the layers (with a transcoder on layer 0) on GPT-2, a parallel-block NeoX and Gemma 3:
    keeping every edge is the clean run, keeping none the corrupted run (1e-5), and the bottleneck's rows summed
    equal everything before it in the unspliced graph (EAP, 1e-5)."""
    model = tiny_model(family, weight_scale=3.0)
    plain = edge_attribution(model, task)
    with ExitStack() as stack:
        stack.enter_context(
            model.splice(_dictionary("topk", 40, True, seed=3), "L0.mlp_in", target="L0.mlp_out", name="tc")
        )
        stack.enter_context(model.splice(_dictionary("jumprelu", 48, False, seed=5), "L0.resid_post", name="res"))
        patcher = EdgePatcher(model, task)
        valid = valid_mask(patcher.layout, 2)
        got = patcher.per_prompt(torch.stack([valid, torch.zeros_like(valid)]))
        graph = edge_attribution(model, task)
    with torch.no_grad():
        for row, ids in ((0, task.clean_ids), (1, task.corrupt_ids)):
            expected = task.metric(model.run(ids, attention_mask=task.attention_mask).logits, task)
            assert (got[row] - expected.double()).abs().max().item() <= TOL
    cut = [i for i, s in enumerate(graph.senders) if s.startswith("L0.res.")]
    before = [plain.senders.index(s) for s in plain.senders if s == "input" or s.startswith("L0.")]
    after = [r for r in plain.receivers if not r.startswith("L0.")]
    through = torch.nan_to_num(graph.scores.double())[cut][:, [graph.receivers.index(r) for r in after]].sum(0)
    direct = torch.nan_to_num(plain.scores.double())[before][:, [plain.receivers.index(r) for r in after]].sum(0)
    assert (through - direct).abs().max().item() <= TOL


# ---- discovery ------------------------------------------------------------------------------------------------


def _relu_gpt2() -> Model:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_layer=2, n_head=4, n_embd=D, vocab_size=64, n_positions=64, activation_function="relu", bos_token_id=0
    )
    return Model(transformers.GPT2LMHeadModel(cfg), name="tiny-gpt2-relu")


def _exact_transcoder(model: Model, layer: int) -> Dictionary:
    """A ReLU transcoder equal to a ReLU MLP: latents = neurons, W_enc = W_fc, W_dec = W_proj, no error."""
    mlp = model.hf.get_submodule(f"transformer.h.{layer}.mlp")
    tc = Dictionary(DictionaryConfig("relu", D, 4 * D, d_out=D))
    with torch.no_grad():
        tc.W_enc.copy_(mlp.c_fc.weight)
        tc.b_enc.copy_(mlp.c_fc.bias)
        tc.W_dec.copy_(mlp.c_proj.weight)
        tc.b_dec.copy_(mlp.c_proj.bias)
    return tc


def test_discover_keeps_the_latent_that_carries_the_answer() -> None:
    """A GPT-2-style model with ReLU MLPs and a transcoder equal to layer 1's MLP; neuron 7 is planted to fire on
    the clean prompts' last token only and to write the answer-minus-wrong unembedding direction. `discover` (EAP-IG)
    returns a circuit holding L1.tc.F7 with edges into and out of it; the model is untouched after."""
    model = _relu_gpt2()
    gen = torch.Generator().manual_seed(2)
    clean = torch.randint(1, 64, (6, 7), generator=gen)
    clean[:, -1] = 5
    corrupt = clean.clone()
    corrupt[:, -1] = 9
    task = Task(
        "planted",
        clean,
        corrupt,
        torch.full((6,), 11),
        torch.full((6,), 12),
        torch.full((6,), 6),
        torch.ones(6, 7, dtype=torch.long),
    )
    mlp_in = {
        k: model.run(ids, cache=["L1.mlp_in"]).cache["L1.mlp_in"][:, -1] for k, ids in (("c", clean), ("x", corrupt))
    }
    direction = mlp_in["c"].mean(0) - mlp_in["x"].mean(0)
    direction = direction / direction.norm()
    unembed = model.hf.lm_head.weight
    with torch.no_grad():
        fc, proj = model.hf.transformer.h[1].mlp.c_fc, model.hf.transformer.h[1].mlp.c_proj
        fc.weight[:, 7] = 8.0 * direction
        fc.bias[7] = -8.0 * float(direction @ (mlp_in["c"].mean(0) + mlp_in["x"].mean(0))) / 2
        proj.weight[7] = 4.0 * (unembed[11] - unembed[12]) / (unembed[11] - unembed[12]).norm()
    before = snapshot(model)
    tc = _exact_transcoder(model, 1)
    with model.splice(tc, "L1.mlp_in", target="L1.mlp_out", name="tc"):
        f = model.run(clean, cache=["L1.tc"]).cache["L1.tc"][:, -1, 7]
        f_corrupt = model.run(corrupt, cache=["L1.tc"]).cache["L1.tc"][:, -1, 7]
        assert bool((f > 0.5).all()) and bool((f_corrupt == 0).all()), "the planted neuron does not separate the runs"
        circuit = discover(model, task, method="eap-ig", target=0.8)
    assert circuit.meta["reached_target"]
    frame = circuit.to_frame()
    kept = frame[frame["in_circuit"]]
    assert (kept["sender"] == "L1.tc.F7").any() and (kept["receiver"] == "L1.tc.F7").any()
    err = circuit.senders.index("L1.tc.err")
    assert torch.nan_to_num(circuit.scores[err]).abs().max() <= 1e-4  # an exact transcoder leaves no error
    assert_untouched(model, before)


# ---- names, files, bad input ----------------------------------------------------------------------------------


def test_latent_names_round_trip_and_render(model: Model, task: Task, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A graph with latent nodes saves and loads with its names and meta (feeds included), its SAE receiver feeds
    the latents, and the HTML circuit view draws the latent nodes."""
    with spliced(model):
        graph = edge_attribution(model, task).prune(top_k=40)
    graph.save(tmp_path / "g")
    back = Graph.load(tmp_path / "g")
    assert back.senders == graph.senders and back.receivers == graph.receivers
    assert torch.equal(back.in_circuit, graph.in_circuit)
    assert back.receiver_nodes("L1.mlp") == [s for s in graph.senders if s.startswith("L1.sae.")]
    html = circuit_section(back)
    drawn = [s for s in back.nodes_in_circuit() if ".tc." in s or ".sae." in s]
    assert drawn and all(f'data-node="{name}"' in html for name in drawn)


def test_unsupported_splices_raise_and_leave_the_model(model: Model, task: Task) -> None:
    """A residual-stream SAE: edge attribution and edge patching raise a PathlensError naming node_circuit and the
    site; the model is untouched after the error, and after a successful call."""
    before = snapshot(model)
    with model.splice(_dictionary("relu", 24, False, seed=1), "L1.resid_post", name="res"):
        for call in (lambda: edge_attribution(model, task), lambda: EdgePatcher(model, task)):
            with pytest.raises(PathlensError, match="node_circuit") as info:
                call()
            assert "L1.res" in str(info.value) and "residual stream" in str(info.value)
    assert_untouched(model, before)
    with spliced(model):
        edge_attribution(model, task, method="eap-ig", steps=2)
        assert graph_layout(model).senders.count("L0.tc.err") == 1
    assert_untouched(model, before)
    assert not model.splices
