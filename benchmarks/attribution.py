"""Gradient-attribution benchmark: pathlens AtP / AtP* / RelP / EAP against a plain-torch floor and TransformerLens.

Four parts, all in one process (peak memory in a spawned one):

- gpt2-nodes: GPT-2-small shape (random init, the model and IOI-shaped task of `patching.py`, from `common.py`).
  The floor is a plain-torch clean forward + corrupt forward + one backward with hooks caching the head outputs
  (z, the input of `attn.c_proj`) and their gradients; "floor all" also caches attn_out, mlp_out and resid_pre.
  Timed against it: pathlens `atp`, `relp` (heads; and all node families in one call) and `atp_star` (heads),
  plus TransformerLens 4.3's node attribution patching.
- gpt2-eap: `edge_attribution(model, task, method="eap")` over all edges against the same floor and against
  TransformerLens 4.3's `attribution_patch(..., EdgeAttributionConfig(granularity="edge"))` on the same weights
  (scores compared edge by edge); pathlens' peak RSS growth.
- smollm2-corr: the embedded SmolLM2 on `ioi(tokenizer, n=8, seed=0)`: exact `pathlens.patch` per family
  (resid_pre, attn_out, mlp_out per position; heads over all positions) as ground truth, and the Pearson
  correlation of AtP, AtP*, RelP (and RelP with the AH rule added) with it (`pathlens.compare`).
- smollm2-topk: `patch(..., sites="heads", top_k=20, prefilter=...)` against the full exact heads sweep.

Run `python benchmarks/attribution.py --json` for one JSON line per row; see benchmarks/README.md.
"""

from __future__ import annotations

import os
import sys

if not __package__:  # run as `python benchmarks/attribution.py`: import the package from the repo root, as -m does
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    import benchmarks  # noqa: F401  (turns tqdm off before torch imports it: see benchmarks/__init__.py)

import argparse
import functools
import math
import time
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

import pathlens
from benchmarks.common import (
    SEED,
    Emitter,
    Runner,
    add_device_argument,
    build_gpt2,
    check_parts,
    check_repeats_and_threads,
    in_fresh_process,
    max_abs_diff,
    mean_logit_diff,
    peak_rss_growth_mb,
    ratio,
    round_robin,
    set_threads,
    synthetic_ioi_task,
    task_on,
    time_once,
    tl_bridge,
    versions,
)
from pathlens.attribution.lrp import DEFAULT_RULES
from pathlens.results import Scores
from pathlens.tasks import Task

PARTS = ("gpt2-nodes", "gpt2-eap", "smollm2-corr", "smollm2-topk")
NODE_FAMILIES = ("heads", "attn_out", "mlp_out", "resid_pre")  # what the "all node families" rows cover
CORR_FAMILIES = ("resid_pre", "attn_out", "mlp_out", "heads")
RELP_AH_RULES = (*DEFAULT_RULES, "AH")
ESTIMATORS: dict[str, Callable[..., Scores]] = {
    "atp": pathlens.atp,
    "atp*": pathlens.atp_star,
    "relp": pathlens.relp,
    "relp+AH": functools.partial(pathlens.relp, rules=RELP_AH_RULES),  # not a default: see the README
}
GPT2 = "gpt2-small-shape"
SMOLLM2 = "smollm2"
TOP_K = 20
TL_EDGE_VARIANT = (
    "transformer_lens.tools.analysis.attribution_patching.attribution_patch(bridge, clean, corrupt, metric_fn, "
    "EdgeAttributionConfig(granularity=...)) on a TransformerBridge built by build_bridge_from_module around a "
    "deep copy of the benchmark's HF GPT-2; called once per prompt pair (its metric_fn sees only the logits of "
    "one pair, and it loops over pairs one at a time internally anyway), scores averaged over the pairs"
)


# ------------------------------------------------------------------------------------------- plain-torch floor


def module_paths(config: Any) -> dict[str, Any]:
    """Blocks, and per block the module whose input is z (all heads' outputs before W_O, concatenated), the
    attention module and the MLP, for GPT-2 and Llama-family HF models (read from the model's config)."""
    if config.model_type == "gpt2":
        return {
            "blocks": "transformer.h",
            "o_proj": "attn.c_proj",
            "attn": "attn",
            "mlp": "mlp",
            "heads": config.n_head,
        }
    if config.model_type == "llama":
        return {
            "blocks": "model.layers",
            "o_proj": "self_attn.o_proj",
            "attn": "self_attn",
            "mlp": "mlp",
            "heads": config.num_attention_heads,
        }
    raise ValueError(f"no module map for model_type {config.model_type!r}")


def per_prompt_logit_diff_sum(logits: Tensor, task: Task) -> Tensor:
    """Σ over prompts of logit(answer) − logit(wrong) at the answer position (its gradient is per prompt)."""
    return mean_logit_diff(logits, task) * task.n


def plain_floor(hf: nn.Module, task: Task, families: tuple[str, ...]) -> dict[str, Tensor]:
    """The floor: clean forward (no grad) + corrupt forward + one backward, in plain torch with module hooks.

    Caches `families` ("heads": the input z of the attention output projection, whose per-head slices times
    W_O[h] are the head outputs; "attn_out", "mlp_out": the attention / MLP module outputs; "resid_pre": the
    block inputs) on both runs and their gradients on the corrupted one, and returns the AtP estimates they
    give (denoising: base = corrupted, source = clean) as effects over the base metric: heads (layer, head)
    summed over positions, the others (layer, pos); batch means. So the floor does all of AtP's arithmetic."""
    task = task_on(task, next(hf.parameters()).device)  # (N, P) ids: a negligible copy next to the passes
    paths = module_paths(hf.config)
    blocks = hf.get_submodule(paths["blocks"])
    n_heads = paths["heads"]
    live: dict[tuple[str, int], Tensor] = {}

    def keep_input(key: tuple[str, int]) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            live[key] = args[0] if args else kwargs["hidden_states"]

        return hook

    def keep_output(key: tuple[str, int]) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            live[key] = out[0] if isinstance(out, tuple) else out

        return hook

    handles = []
    for layer, block in enumerate(blocks.children()):
        if "heads" in families:
            handles.append(
                block.get_submodule(paths["o_proj"]).register_forward_pre_hook(
                    keep_input(("heads", layer)), with_kwargs=True
                )
            )
        if "attn_out" in families:
            handles.append(block.get_submodule(paths["attn"]).register_forward_hook(keep_output(("attn_out", layer))))
        if "mlp_out" in families:
            handles.append(block.get_submodule(paths["mlp"]).register_forward_hook(keep_output(("mlp_out", layer))))
        if "resid_pre" in families:
            handles.append(block.register_forward_pre_hook(keep_input(("resid_pre", layer)), with_kwargs=True))
    try:
        with torch.no_grad():
            hf(task.clean_ids, attention_mask=task.attention_mask)
        clean = dict(live)
        live.clear()
        with torch.enable_grad():
            logits = hf(task.corrupt_ids, attention_mask=task.attention_mask).logits
            keys = list(live)
            grads = torch.autograd.grad(per_prompt_logit_diff_sum(logits, task), [live[k] for k in keys])
    finally:
        for handle in handles:
            handle.remove()
    out: dict[str, list[Tensor]] = {family: [] for family in families}
    for key, grad in zip(keys, grads, strict=True):
        family, _ = key
        product = (clean[key] - live[key].detach()) * grad
        if family == "heads":
            effect = product.unflatten(-1, (n_heads, -1)).sum(dim=(1, 3)).mean(dim=0)  # (head,)
        else:
            effect = product.sum(dim=-1).mean(dim=0)  # (pos,)
        out[family].append(effect)
    return {family: torch.stack(rows) for family, rows in out.items()}


def effects(scores: Scores) -> Tensor:
    """An estimate's (or a patch's) values minus its base metric, float64."""
    return scores.values.double() - float(scores.meta["base_metric"])


def all_node_sites(n_layers: int, n_heads: int) -> list[str]:
    """Every node of the four families as one explicit site list: heads first, then attn_out, mlp_out, resid_pre."""
    heads = [f"L{layer}.H{head}" for layer in range(n_layers) for head in range(n_heads)]
    return heads + [f"L{layer}.{kind}" for kind in NODE_FAMILIES[1:] for layer in range(n_layers)]


def split_all_sites(values: Tensor, n_layers: int, n_heads: int) -> dict[str, Tensor]:
    """(site, pos) effects of `all_node_sites` → per family: heads (layer, head) summed over positions, the
    others (layer, pos)."""
    n_head_sites = n_layers * n_heads
    out = {"heads": values[:n_head_sites].sum(dim=1).view(n_layers, n_heads)}
    for i, kind in enumerate(NODE_FAMILIES[1:]):
        first = n_head_sites + i * n_layers
        out[kind] = values[first : first + n_layers]
    return out


# -------------------------------------------------------------------------------------------------- formatting


def _round(x: float | None, digits: int = 4) -> float | None:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return None
    return round(x, digits)


# ---------------------------------------------------------------------------------------------- TransformerLens


def tl_runner(bridge: Any, task: Task, granularity: str) -> Runner:
    """TL 4.3's attribution_patch at `granularity`, one call per prompt pair; returns the per-pair results."""
    from transformer_lens.tools.analysis.attribution_patching import EdgeAttributionConfig, attribution_patch

    config = EdgeAttributionConfig(granularity=granularity)  # type: ignore[arg-type]
    task = task_on(task, next(bridge.parameters()).device)

    def metric_for(i: int) -> Callable[[Tensor], Tensor]:
        pos, answer, wrong = int(task.answer_pos[i]), int(task.answer_ids[i]), int(task.wrong_ids[i])
        return lambda logits: logits[0, pos, answer] - logits[0, pos, wrong]

    def run() -> list[Any]:
        return [
            attribution_patch(bridge, task.clean_ids[i : i + 1], task.corrupt_ids[i : i + 1], metric_for(i), config)
            for i in range(task.n)
        ]

    return run


def tl_node_grids(results: list[Any], n_layers: int, n_heads: int, seq_len: int) -> dict[str, Tensor]:
    """TL node scores (denoising AtP per node and position), averaged over pairs: heads (layer, head) summed
    over positions, mlp_out (layer, pos)."""
    heads = torch.zeros(n_layers, n_heads, dtype=torch.float64)
    mlp = torch.zeros(n_layers, seq_len, dtype=torch.float64)
    for result in results:
        for node, score in result.node_scores.items():
            if node.kind == "attn_head_out":
                heads[node.layer, node.head] += score
            elif node.kind == "mlp_out":
                mlp[node.layer, node.position] += score
    return {"heads": heads / len(results), "mlp_out": mlp / len(results)}


def _tl_sender(node: Any) -> str:
    if node.kind == "embed":
        return "input"
    if node.kind == "attn_head_out":
        return f"L{node.layer}.H{node.head}"
    return f"L{node.layer}.mlp"


def _tl_receiver(node: Any) -> str:
    if node.kind in ("q_input", "k_input", "v_input"):
        return f"L{node.layer}.H{node.head}.{node.kind[0]}"
    if node.kind == "mlp_in":
        return f"L{node.layer}.mlp"
    return "logits"


def tl_edge_matrix(results: list[Any], senders: list[str], receivers: list[str]) -> tuple[Tensor, Tensor]:
    """TL's per-position edge scores summed over positions and averaged over pairs, as a (sender, receiver)
    matrix in pathlens' naming; and the mask of the pairs TL scored."""
    s_index = {name: i for i, name in enumerate(senders)}
    r_index = {name: j for j, name in enumerate(receivers)}
    scores = torch.zeros(len(senders), len(receivers), dtype=torch.float64)
    seen = torch.zeros(len(senders), len(receivers), dtype=torch.bool)
    for result in results:
        for (writer, reader), score in result.edge_scores.items():
            i, j = s_index[_tl_sender(writer)], r_index[_tl_receiver(reader)]
            scores[i, j] += score
            seen[i, j] = True
    return scores / len(results), seen


# ------------------------------------------------------------------------------------------------- peak memory


def eap_memory_child(threads: int | None, n_prompts: int) -> float:
    """In a fresh process: build the GPT-2 model, task and pathlens Model, then one EAP run's peak RSS growth."""
    set_threads(threads)
    hf = build_gpt2()
    task = gpt2_task(hf, n_prompts)
    model = pathlens.Model(hf)
    return peak_rss_growth_mb(lambda: pathlens.edge_attribution(model, task, method="eap"))


def measure_eap_memory(threads: int | None, n_prompts: int) -> float:
    return in_fresh_process(eap_memory_child, threads, n_prompts)


# -------------------------------------------------------------------------------------------------- GPT-2 parts


def gpt2_task(hf: PreTrainedModel, n_prompts: int) -> Task:
    task = synthetic_ioi_task(hf.config.vocab_size)
    return task if n_prompts >= task.n else task.rows(torch.arange(n_prompts))


def node_row(method: str, family: str, seconds: float, floors: dict[str, float], **extra: Any) -> dict[str, Any]:
    return {
        "method": method,
        "family": family,
        "model": GPT2,
        "seconds": _round(seconds),
        "floor_seconds": _round(floors["heads"]),
        "over_floor": _round(ratio(seconds, floors["heads"]), 3),
        "floor_all_seconds": _round(floors["all"]),
        "over_floor_all": _round(ratio(seconds, floors["all"]), 3),
        **extra,
    }


def run_gpt2_nodes(args: argparse.Namespace, problems: list[str], emit: Callable[[dict[str, Any]], None]) -> None:
    hf = build_gpt2(args.device)
    task = gpt2_task(hf, args.gpt2_prompts)
    model = pathlens.Model(hf)
    n_layers, n_heads = hf.config.n_layer, hf.config.n_head
    sites = all_node_sites(n_layers, n_heads)
    runners: dict[str, Runner] = {
        "floor:heads": lambda: plain_floor(hf, task, ("heads",)),
        "floor:all": lambda: plain_floor(hf, task, NODE_FAMILIES),
        "atp:heads": lambda: pathlens.atp(model, task, sites="heads"),
        "atp:all": lambda: pathlens.atp(model, task, sites=sites, positions="each"),
        "atp:per-family": lambda: [
            pathlens.atp(model, task, sites=f, positions="all" if f == "heads" else "each") for f in NODE_FAMILIES
        ],
        "relp:heads": lambda: pathlens.relp(model, task, sites="heads"),
        "relp:all": lambda: pathlens.relp(model, task, sites=sites, positions="each"),
        "atp*:heads": lambda: pathlens.atp_star(model, task, sites="heads"),
    }
    if not args.no_tl:
        runners["tl:node"] = tl_runner(tl_bridge(hf), task, "node")
    timed = round_robin(runners, args.repeats)
    sec = {name: t.median for name, t in timed.items()}
    floors = {"heads": sec["floor:heads"], "all": sec["floor:all"]}

    # agreement: the floor's own AtP arithmetic against pathlens', and pathlens' one-call "all" against per-family
    floor_heads = timed["floor:heads"].result["heads"]
    floor_all = timed["floor:all"].result
    atp_all = split_all_sites(effects(timed["atp:all"].result), n_layers, n_heads)
    per_family = dict(zip(NODE_FAMILIES, timed["atp:per-family"].result, strict=True))
    diff_heads = max_abs_diff(effects(timed["atp:heads"].result), floor_heads)
    diff_all = {f: max_abs_diff(atp_all[f], floor_all[f]) for f in NODE_FAMILIES}
    diff_per_family = {f: max_abs_diff(effects(per_family[f]), floor_all[f]) for f in NODE_FAMILIES}
    scale = max(float(g.abs().max()) for g in floor_all.values())
    for name, diff in [("atp heads", diff_heads)] + [(f"atp all/{f}", d) for f, d in diff_all.items()]:
        if diff > args.tol:
            problems.append(f"{GPT2}: pathlens {name} differs from the plain-torch floor's AtP by {diff:.3g}")
    for f, d in diff_per_family.items():
        if d > args.tol:
            problems.append(f"{GPT2}: pathlens atp(sites={f!r}) differs from the plain-torch floor's AtP by {d:.3g}")

    floor_notes = {
        "heads": "clean forward (no_grad) + corrupt forward + one backward; caches z (attn.c_proj input) and its "
        "gradient, computes the heads' AtP",
        "all": "as floor/heads, caching z, attn_out, mlp_out and resid_pre of every layer",
    }
    for family, note in floor_notes.items():
        seconds, heads_floor = _round(floors[family]), _round(floors["heads"])
        emit(
            {
                "method": "floor",
                "family": family,
                "model": GPT2,
                "seconds": seconds,
                "floor_seconds": heads_floor,
                "note": note,
            }
        )
    emit(node_row("atp", "heads", sec["atp:heads"], floors, max_abs_diff_vs_floor=diff_heads))
    emit(
        node_row(
            "atp",
            "all",
            sec["atp:all"],
            floors,
            calls="one call: explicit list of every head, attn_out, mlp_out and resid_pre site, positions='each'",
            seconds_per_family_calls=_round(sec["atp:per-family"]),
            max_abs_diff_vs_floor=max(diff_all.values()),
            max_abs_diff_vs_floor_per_family_calls=max(diff_per_family.values()),
            effect_abs_max=scale,
        )
    )
    emit(node_row("relp", "heads", sec["relp:heads"], floors))
    emit(node_row("relp", "all", sec["relp:all"], floors, calls="one call, same site list and positions as atp/all"))
    atp_star_diff = max_abs_diff(effects(timed["atp*:heads"].result), effects(timed["atp:heads"].result))
    emit(
        node_row(
            "atp*",
            "heads",
            sec["atp*:heads"],
            floors,
            max_abs_diff_vs_atp=atp_star_diff,
            note="atp_star(sites='heads'), qk_fix=True, grad_drop=False: the QK fix acts on q/k sites only, so on "
            "head outputs the values are plain AtP's",
        )
    )
    if "tl:node" in timed:
        tl = tl_node_grids(timed["tl:node"].result, n_layers, n_heads, task.seq_len)
        diff_tl = max(
            max_abs_diff(tl["heads"], effects(timed["atp:heads"].result)),
            max_abs_diff(tl["mlp_out"], effects(per_family["mlp_out"])),
        )
        if diff_tl > args.tol:
            problems.append(f"{GPT2}: TL node attribution differs from pathlens atp by {diff_tl:.3g}")
        emit(
            node_row(
                "tl-node-atp",
                "heads+mlp_out",
                sec["tl:node"],
                floors,
                pathlens_seconds=_round(sec["atp:all"]),
                speedup_vs_tl=_round(ratio(sec["tl:node"], sec["atp:all"]), 2),
                max_abs_diff=diff_tl,
                note="TL 4.3 attribution_patch(granularity='node') (embed, heads, mlp_out at every position) vs "
                "pathlens atp/all (a superset: also attn_out and resid_pre); agreement checked on heads and mlp_out",
                tl_variant=TL_EDGE_VARIANT,
            )
        )


def run_gpt2_eap(args: argparse.Namespace, problems: list[str], emit: Callable[[dict[str, Any]], None]) -> None:
    hf = build_gpt2(args.device)
    task = gpt2_task(hf, args.gpt2_prompts)
    model = pathlens.Model(hf)
    runners: dict[str, Runner] = {
        "floor:heads": lambda: plain_floor(hf, task, ("heads",)),
        "floor:all": lambda: plain_floor(hf, task, NODE_FAMILIES),
        "eap": lambda: pathlens.edge_attribution(model, task, method="eap"),
    }
    timed = round_robin(runners, args.repeats)
    sec = {name: t.median for name, t in timed.items()}
    floors = {"heads": sec["floor:heads"], "all": sec["floor:all"]}
    graph = timed["eap"].result

    # identity: a head's outgoing edge scores sum to its node AtP (noising, heads over all positions)
    atp_noise = effects(pathlens.atp(model, task, sites="heads", direction="noise")).flatten()
    node_sums = graph.node_scores()
    heads = [f"L{layer}.H{head}" for layer in range(hf.config.n_layer) for head in range(hf.config.n_head)]
    identity = max_abs_diff(torch.tensor([node_sums[h] for h in heads], dtype=torch.float64), atp_noise)
    if identity > args.tol:
        problems.append(f"{GPT2}: EAP head edge sums differ from AtP by {identity:.3g}")

    extra: dict[str, Any] = {
        "n_edges": graph.edges_total,
        "direction": "noise",
        "max_abs_diff_node_identity": identity,
        "score_abs_max": float(graph.scores.nan_to_num().abs().max()),
    }
    if not args.skip_memory:
        extra["peak_mb"] = _round(measure_eap_memory(args.threads, task.n), 1)
    if args.no_tl:
        extra.update({"tl_seconds": None, "note": "TransformerLens skipped (--no-tl)"})
    else:
        bridge = tl_bridge(hf)
        results, tl_seconds = time_once(tl_runner(bridge, task, "edge"))
        denoise = pathlens.edge_attribution(model, task, method="eap", direction="denoise")
        tl_scores, tl_seen = tl_edge_matrix(results, graph.senders, graph.receivers)
        valid = denoise.valid
        both = valid & tl_seen
        diff = float((tl_scores[both] - denoise.scores[both].double()).abs().max())
        only_tl, only_pl = int((tl_seen & ~valid).sum()), int((valid & ~tl_seen).sum())
        if diff > args.tol or only_tl or only_pl:
            problems.append(
                f"{GPT2}: TL edge attribution vs pathlens EAP (denoise): max |diff| {diff:.3g}, edges only in TL "
                f"{only_tl}, only in pathlens {only_pl}"
            )
        extra.update(
            {
                "tl_seconds": _round(tl_seconds),
                "tl_repeats": 1,
                "speedup_vs_tl": _round(ratio(tl_seconds, sec["eap"]), 2),
                "max_abs_diff": diff,
                "edges_compared": int(both.sum()),
                "edges_only_in_tl": only_tl,
                "edges_only_in_pathlens": only_pl,
                "tl_edges_per_position": len(results[0].edge_scores) // task.seq_len,
                "compared_direction": "denoise (TL's convention: gradient at the corrupted run, delta clean - "
                "corrupted); TL's per-position edges summed over positions",
                "tl_variant": TL_EDGE_VARIANT,
            }
        )
    emit(node_row("eap", "edges", sec["eap"], floors, **extra))


# ------------------------------------------------------------------------------------------------ SmolLM2 parts


class SmolLM2:
    """The embedded SmolLM2 with its IOI task, the exact full heads sweep (shared by both SmolLM2 parts) and the
    floor timings."""

    def __init__(self, args: argparse.Namespace) -> None:
        from pathlens.tasks import ioi

        self.model = pathlens.load("smollm2", device=args.device)
        self.task = ioi(self.model.tokenizer, n=args.smollm2_prompts, seed=SEED)
        self.exact: dict[str, Scores] = {}
        self.exact_seconds: dict[str, float] = {}
        self.floors: dict[str, float] | None = None
        self.args = args

    def patch_exact(self, family: str) -> Scores:
        if family not in self.exact:
            positions: Literal["all", "each"] = "all" if family == "heads" else "each"
            scores, seconds = time_once(
                lambda: pathlens.patch(self.model, self.task, sites=family, positions=positions, progress=False)
            )
            self.exact[family], self.exact_seconds[family] = scores, seconds
        return self.exact[family]

    def row(self, method: str, family: str, seconds: float, **extra: Any) -> dict[str, Any]:
        assert self.floors is not None
        return {
            "method": method,
            "family": family,
            "model": SMOLLM2,
            **extra,
            "seconds": _round(seconds),
            "floor_seconds": _round(self.floors["heads"]),
            "over_floor": _round(ratio(seconds, self.floors["heads"]), 3),
            "floor_all_seconds": _round(self.floors["all"]),
        }


def run_smollm2_corr(
    sm: SmolLM2, args: argparse.Namespace, problems: list[str], emit: Callable[[dict[str, Any]], None]
) -> None:
    model, task = sm.model, sm.task
    runners: dict[str, Runner] = {
        "floor:heads": lambda: plain_floor(model.hf, task, ("heads",)),
        "floor:all": lambda: plain_floor(model.hf, task, NODE_FAMILIES),
    }
    for name, fn in ESTIMATORS.items():
        for family in CORR_FAMILIES:
            positions = "all" if family == "heads" else "each"
            runners[f"{name}:{family}"] = functools.partial(fn, model, task, sites=family, positions=positions)
    timed = round_robin(runners, args.repeats)
    sm.floors = {"heads": timed["floor:heads"].median, "all": timed["floor:all"].median}
    floor_heads = timed["floor:heads"].result["heads"]
    diff = max_abs_diff(effects(timed["atp:heads"].result), floor_heads)
    if diff > args.tol:
        problems.append(f"{SMOLLM2}: pathlens atp heads differs from the plain-torch floor's AtP by {diff:.3g}")
    emit(
        {
            "method": "floor",
            "family": "heads",
            "model": SMOLLM2,
            "seconds": _round(sm.floors["heads"]),
            "floor_seconds": _round(sm.floors["heads"]),
            "max_abs_diff_atp_vs_floor": diff,
            "note": "clean forward (no_grad) + corrupt forward + one backward of the HF model; caches o_proj's "
            "input z and its gradient",
        }
    )
    emit(
        {
            "method": "floor",
            "family": "all",
            "model": SMOLLM2,
            "seconds": _round(sm.floors["all"]),
            "floor_seconds": _round(sm.floors["heads"]),
            "note": "as floor/heads, caching z, attn_out, mlp_out and resid_pre of every layer",
        }
    )
    for family in CORR_FAMILIES:
        exact = sm.patch_exact(family)
        emit(sm.row("exact", family, sm.exact_seconds[family], variants=int(exact.values.numel())))
    exact_all = {family: sm.exact[family] for family in CORR_FAMILIES}
    pearson: dict[str, dict[str, float]] = {}
    for name in ESTIMATORS:
        estimates = {family: timed[f"{name}:{family}"].result for family in CORR_FAMILIES}
        table = pathlens.compare(exact_all, estimates, k=TOP_K, labels=("exact", name)).table
        pearson[name] = {}
        for family in CORR_FAMILIES:
            pearson[name][family] = float(table.loc[family, "pearson"])
            emit(
                sm.row(
                    name,
                    family,
                    timed[f"{name}:{family}"].median,
                    pearson=_round(float(table.loc[family, "pearson"])),
                    spearman=_round(float(table.loc[family, "spearman"])),
                    **{f"top{TOP_K}_overlap": _round(float(table.loc[family, f"top{TOP_K}_overlap"]))},
                    cells=int(table.loc[family, "cells"]),
                )
            )
    emit(
        {
            "method": "relp>=atp",
            "model": SMOLLM2,
            **{family: pearson["relp"][family] >= pearson["atp"][family] for family in ("resid_pre", "mlp_out")},
            "with_AH": {
                family: pearson["relp+AH"][family] >= pearson["atp"][family] for family in ("resid_pre", "mlp_out")
            },
            "relp_rules": list(DEFAULT_RULES),
            **{f"pearson_{name}": {f: _round(v) for f, v in pearson[name].items()} for name in ESTIMATORS},
        }
    )


def top_set(scores: Scores, k: int) -> set[int]:
    """Flat indices of the k cells of largest |value − base metric|; unverified (NaN) cells never enter."""
    effect = effects(scores).flatten().abs().nan_to_num(nan=-1.0)
    return set(torch.topk(effect, k).indices.tolist())


def run_smollm2_topk(
    sm: SmolLM2, args: argparse.Namespace, problems: list[str], emit: Callable[[dict[str, Any]], None]
) -> None:
    if sm.floors is None:
        runners: dict[str, Runner] = {
            "floor:heads": lambda: plain_floor(sm.model.hf, sm.task, ("heads",)),
            "floor:all": lambda: plain_floor(sm.model.hf, sm.task, NODE_FAMILIES),
        }
        timed = round_robin(runners, args.repeats)
        sm.floors = {"heads": timed["floor:heads"].median, "all": timed["floor:all"].median}
    full = sm.patch_exact("heads")
    full_seconds = sm.exact_seconds["heads"]
    want = top_set(full, TOP_K)
    for prefilter in ("atp*", "relp"):
        scores, seconds = time_once(
            functools.partial(
                pathlens.patch, sm.model, sm.task, sites="heads", top_k=TOP_K, prefilter=prefilter, progress=False
            )
        )
        got = top_set(scores, TOP_K)
        verified = int(scores.meta["verified"])
        finite = ~torch.isnan(scores.values)
        diff = max_abs_diff(scores.values[finite], full.values[finite])
        if got != want or diff > args.tol:
            problems.append(
                f"{SMOLLM2}: verified top-{TOP_K} (prefilter {prefilter}) returned a different set "
                f"({len(got & want)} of {TOP_K} shared) or values off by {diff:.3g}"
            )
        emit(
            sm.row(
                "verified-topk",
                "heads",
                seconds,
                prefilter=prefilter,
                top_k=TOP_K,
                same_set=got == want,
                overlap=len(got & want),
                verified=verified,
                cells=int(full.values.numel()),
                max_abs_diff_vs_full=diff,
                full_seconds=_round(full_seconds),
                speedup_vs_full=_round(ratio(full_seconds, seconds), 2),
            )
        )


# ------------------------------------------------------------------------------------------------------- output


TABLE_COLUMNS = (
    ("model", "model", "", 18),
    ("method", "method", "", 14),
    ("family", "family", "", 14),
    ("seconds", "seconds", ".3f", 9),
    ("floor", "floor_seconds", ".3f", 8),
    ("/floor", "over_floor", ".2f", 8),
    ("pearson", "pearson", ".3f", 9),
    ("vs TL", "speedup_vs_tl", ".1f", 7),
    ("max|d|", "max_abs_diff", ".1e", 9),
)


def print_table(rows: list[dict[str, Any]]) -> None:
    print("".join(f"{title:>{w}}" if spec else f"{title:<{w}}" for title, _, spec, w in TABLE_COLUMNS))
    print("-" * sum(w for *_, w in TABLE_COLUMNS))
    for row in rows:
        if row["method"] == "relp>=atp":
            continue
        cells = []
        for _, key, spec, width in TABLE_COLUMNS:
            value = row.get(key)
            text = "-" if value is None else format(value, spec) if spec else str(value)
            cells.append(f"{text:>{width}}" if spec else f"{text:<{width}}")
        print("".join(cells))
    print("\nseconds = median wall time; /floor = seconds / floor (plain-torch 2 forwards + 1 backward caching heads);")
    print("vs TL = TransformerLens time / pathlens time; max|d| = largest |TL − pathlens| score difference.")
    for row in rows:
        if row["method"] == "eap":
            tl = row.get("tl_seconds")
            print(
                f"EAP over {row['n_edges']} edges: {row['seconds']:.3f} s ({row['over_floor']:.2f}x the floor, "
                f"{row['over_floor_all']:.2f}x the all-families floor), peak RSS growth "
                f"{row.get('peak_mb', '-')} MiB; TL edge attribution_patch "
                + ("skipped" if tl is None else f"{tl:.1f} s, max |diff| {row['max_abs_diff']:.1e}")
            )
        if row["method"] == "verified-topk":
            print(
                f"verified top-{row['top_k']} heads (prefilter {row['prefilter']}): same set {row['same_set']}, "
                f"{row['verified']}/{row['cells']} cells verified, {row['seconds']:.1f} s vs full sweep "
                f"{row['full_seconds']:.1f} s ({row['speedup_vs_full']}x)"
            )
        if row["method"] == "relp>=atp":
            print(
                f"SmolLM2 IOI: RelP >= AtP on resid_pre: {row['resid_pre']}, on mlp_out: {row['mlp_out']}; "
                f"with the AH rule added: {row['with_AH']}"
            )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object per row")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each cheap runner (median reported)")
    parser.add_argument("--quick", action="store_true", help="1 timed run, 4 prompts per task")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch intra-op threads; 0 (default) keeps torch's default"
    )
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma list of parts (default: {','.join(PARTS)})")
    parser.add_argument("--no-tl", action="store_true", help="skip TransformerLens")
    parser.add_argument("--skip-memory", action="store_true", help="do not measure EAP's peak memory")
    parser.add_argument("--tol", type=float, default=1e-4, help="largest allowed disagreement (exit 1 above)")
    add_device_argument(parser)
    args = parser.parse_args(argv)
    check_parts(parser, args, PARTS)
    check_repeats_and_threads(parser, args)
    if args.device.type != "cpu" and "gpt2-eap" in args.parts and not args.skip_memory:
        parser.error("EAP's peak memory is the CPU process's RSS: with --device other than cpu, add --skip-memory")
    args.gpt2_prompts = 4 if args.quick else 8
    args.smollm2_prompts = 4 if args.quick else 8
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    set_threads(args.threads)
    problems: list[str] = []
    emit = Emitter(json=args.json, extra={"threads": torch.get_num_threads(), "repeats": args.repeats})
    start = time.perf_counter()
    if "gpt2-nodes" in args.parts:
        run_gpt2_nodes(args, problems, emit)
    if "gpt2-eap" in args.parts:
        run_gpt2_eap(args, problems, emit)
    if "smollm2-corr" in args.parts or "smollm2-topk" in args.parts:
        sm = SmolLM2(args)
        if "smollm2-corr" in args.parts:
            run_smollm2_corr(sm, args, problems, emit)
        if "smollm2-topk" in args.parts:
            run_smollm2_topk(sm, args, problems, emit)
    summary = {
        "method": "run",
        "total_seconds": _round(time.perf_counter() - start, 1),
        "problems": problems,
        "versions": versions(("torch", "transformers", "transformer-lens")),
    }
    emit(summary)
    if not args.json:
        print_table(emit.rows)
    for problem in problems:
        print(f"DISAGREEMENT {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
