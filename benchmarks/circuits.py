"""Circuit-discovery benchmark: faithfulness-curve cost, discovery on the induction model, SmolLM2 IOI circuits.

Parts (`--parts`, default all):

- curve: the cost of one 20-size faithfulness curve (`faithfulness_curve`) in units of one plain batched forward
  of the same model on the same prompts: SmolLM2 on IOI (n=8) with its EAP-IG graph, and the GPT-2-small shape of
  `benchmarks/patching.py` (random init, synthetic IOI-shaped task) with its EAP graph.
- induction: every discovery method (`discover`) on the embedded induction-2l model, checked against its known
  circuit (previous-token head L0.H1 -> induction head L1.H0 through the key input), with the top pathway.
- ioi: SmolLM2 IOI circuits (EAP-IG for task seeds 0 and 1, RelP for seed 0): size, faithfulness, the curve,
  the smallest circuit reaching 0.8, the best one within 5% of the edges, MIB's CPR and CMD (the method's edge
  scores at MIB's edge fractions, ranked as discovery ranked them; `mib_by_ranking` for each ranking), and the
  overlap of the top-10 pathways of the two seeds.

Run `python benchmarks/circuits.py --json` for one JSON line per row; see benchmarks/README.md for what each
number means.
"""

from __future__ import annotations

import os
import sys

if not __package__:  # run as `python benchmarks/circuits.py`: import the package from the repo root, as -m does
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    import benchmarks  # noqa: F401  (turns tqdm off before torch imports it: see benchmarks/__init__.py)

import argparse
import dataclasses
import functools
import statistics
import time
from typing import Any, cast

import torch

import pathlens
from benchmarks.common import (
    Emitter,
    add_device_argument,
    build_gpt2,
    check_parts,
    check_repeats_and_threads,
    plain_forward,
    round_robin,
    set_threads,
    synthetic_ioi_task,
    task_on,
    time_once,
)
from pathlens import Graph, Model, Task
from pathlens.circuits import Curve, EdgePatcher, discover, edge_attribution, faithfulness_curve, pathways
from pathlens.circuits.discover import DISCOVERY_METHODS, DiscoveryMethod, layer_signature

PARTS = ("curve", "induction", "ioi")
CURVE_TARGET = 20  # forwards' worth of time allowed for a 20-size curve
ACDC_TARGET_S = 60.0
FAITHFULNESS_TARGET = 0.8
EDGE_FRACTION_TARGET = 0.05
N_IOI = 8
N_INDUCTION = 16
IOI_SEEDS = (0, 1)
TOP_PATHWAYS = 10
# Rows (circuit, prompt) per edge-patched forward are chunked to this many tokens. The sender differences held
# during one chunk take tokens x senders x d_model x 4 bytes: about 0.7 GB for SmolLM2 at 1024 tokens.
EDGE_BATCH_TOKENS = 1024
INDUCTION_CIRCUIT = frozenset({("input", "L0.H1.v"), ("L0.H1", "L1.H0.k"), ("input", "L1.H0.v"), ("L1.H0", "logits")})
KEY_ROUTE = ["input", "L0.H1.v", "L0.H1", "L1.H0.k", "L1.H0", "logits"]


# ---------------------------------------------------------------------------------------------------- helpers


def kept_edges(graph: Graph) -> set[tuple[str, str]]:
    rows, cols = torch.nonzero(graph.in_circuit, as_tuple=True)
    return {(graph.senders[i], graph.receivers[j]) for i, j in zip(rows.tolist(), cols.tolist(), strict=True)}


def unpruned(circuit: Graph) -> Graph:
    """The scored graph a circuit was pruned from (`Graph.prune` keeps every score)."""
    return dataclasses.replace(circuit, kept=None)


def curve_summary(curve: Curve) -> dict[str, Any]:
    """The curve, the smallest size reaching the target, and the best faithfulness within 5% of the edges."""
    total = curve.edges_total
    points = list(zip(curve.sizes, curve.faithfulness, strict=True))
    reached = [s for s, f in points if f >= FAITHFULNESS_TARGET]
    small = [(f, s) for s, f in points if s <= EDGE_FRACTION_TARGET * total]
    best_f, best_s = max(small) if small else (None, None)
    return {
        "curve": {"sizes": curve.sizes, "faithfulness": curve.faithfulness},
        "curve_full_metric": curve.full,
        "curve_empty_metric": curve.empty,
        "area": curve.area,
        "first_size_reaching_target": reached[0] if reached else None,
        "first_fraction_reaching_target": reached[0] / total if reached else None,
        "best_faithfulness_within_5pct": best_f,
        "best_size_within_5pct": best_s,
        "met_5pct_target": best_f is not None and best_f >= FAITHFULNESS_TARGET,
    }


def mib_summary(curve: Curve) -> dict[str, Any]:
    """MIB's scores of a curve measured at MIB's edge fractions (`faithfulness_curve(sizes="mib")`)."""
    return {
        "cpr": curve.cpr,
        "cmd": curve.cmd,
        "fractions": curve.fractions,
        "sizes": curve.sizes,
        "faithfulness": curve.faithfulness,
    }


def path_rows(routes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: r[k] for k in ("rank", "nodes", "score", "estimate", "faithfulness")} for r in routes]


def overlap(a: set[Any], b: set[Any]) -> dict[str, Any]:
    union = a | b
    return {"shared": len(a & b), "sizes": [len(a), len(b)], "jaccard": len(a & b) / len(union) if union else None}


# ------------------------------------------------------------------------------------------------ curve cost


def curve_row(
    name: str, model: Model, task: Task, graph: Graph, repeats: int, forward_times: int = 3
) -> dict[str, Any]:
    """Time `repeats` 20-size curves of `graph`, each after `forward_times` plain forwards of the same batch, and
    `forward_times` more forwards after the last. Only the forward is warmed up: the first curve of a patcher also
    pays for its buffer's pages, and is timed like the others."""
    patcher = EdgePatcher(model, task, max_batch_tokens=EDGE_BATCH_TOKENS)
    forward = plain_forward(model.hf, task_on(task, model.device))
    per_round = {"forward": forward_times}
    timed = round_robin(
        {"forward": forward, "curve": functools.partial(faithfulness_curve, patcher, graph)},
        repeats,
        warm_up={"forward"},
        runs_per_round=per_round,
    )
    closing = round_robin({"forward": forward}, 1, warm_up=False, runs_per_round=per_round)
    curve: Curve = timed["curve"].result
    curve_seconds = timed["curve"].seconds
    forwards = timed["forward"].seconds + closing["forward"].seconds
    t_curve, t_forward = statistics.median(curve_seconds), statistics.median(forwards)
    return {
        "workload": "curve-20",
        "model": name,
        "seconds": t_curve,
        "forward_seconds": t_forward,
        "forwards_equiv": t_curve / t_forward,
        "target": CURVE_TARGET,
        "met": t_curve / t_forward <= CURVE_TARGET,
        "n_sizes": len(curve.sizes),
        "edge_patched_circuits": sum(size < curve.edges_total for size in curve.sizes),
        "plain_forwards": 1,
        "edges_total": graph.edges_total,
        "n_prompts": task.n,
        "seq_len": task.seq_len,
        "max_batch_tokens": EDGE_BATCH_TOKENS,
        "graph": graph.method,
        "area": curve.area,
        "curve_seconds_all": curve_seconds,
        "forward_seconds_all": forwards,
    }


def gpt2_curve_row(repeats: int, device: torch.device) -> dict[str, Any]:
    hf = build_gpt2(device)
    task = synthetic_ioi_task(hf.config.vocab_size)
    model = Model(hf, name="gpt2-small-shape-random")
    graph = edge_attribution(model, task, "eap")
    return curve_row("gpt2-small-shape", model, task, graph, repeats)


# ------------------------------------------------------------------------------------------------- induction


def induction_rows(repeats: int, device: torch.device) -> list[dict[str, Any]]:
    """Every discovery method on induction-2l: time (median), size, faithfulness, exactness, top pathway."""
    from pathlens.report.studies import task_for

    model = pathlens.load("induction-2l", device=device)
    task = task_for(model, "induction", N_INDUCTION, 0)
    patcher = EdgePatcher(model, task)
    rows = []
    for method in DISCOVERY_METHODS:
        run = functools.partial(discover, model, task, method=cast(DiscoveryMethod, method))
        runs = round_robin({method: run}, repeats, warm_up=False)
        circuit, seconds = runs[method].result, runs[method].seconds
        kept = kept_edges(circuit)
        routes = pathways(patcher, circuit, k=TOP_PATHWAYS)
        top = routes[0]["nodes"] if routes else None
        rows.append(
            {
                "workload": "discover-induction",
                "model": "induction-2l",
                "method": method,
                "seconds": statistics.median(seconds),
                "n_edges": circuit.n_edges,
                "edges_total": circuit.edges_total,
                "faithfulness": circuit.meta["faithfulness"],
                "exact": kept == INDUCTION_CIRCUIT,
                "contains_known": kept >= INDUCTION_CIRCUIT,
                "extra_edges": sorted(kept - INDUCTION_CIRCUIT),
                "missing_edges": sorted(INDUCTION_CIRCUIT - kept),
                "top_pathway": top,
                "top_pathway_is_key_route": top == KEY_ROUTE,
                "key_route_rank": next((r["rank"] for r in routes if r["nodes"] == KEY_ROUTE), None),
                "pathways": path_rows(routes),
            }
        )
    acdc = next(r for r in rows if r["method"] == "acdc")
    head = {
        "workload": "acdc-induction",
        "model": "induction-2l",
        "seconds": acdc["seconds"],
        "n_edges": acdc["n_edges"],
        "faithfulness": acdc["faithfulness"],
        "recovered": acdc["exact"],
        "contains_known": acdc["contains_known"],
        "target_seconds": ACDC_TARGET_S,
        "met": acdc["seconds"] < ACDC_TARGET_S,
    }
    return [head, *rows]


# ------------------------------------------------------------------------------------------------ SmolLM2 IOI


def ioi_rows(repeats: int, quick: bool, parts: list[str], device: torch.device) -> list[dict[str, Any]]:
    """SmolLM2 IOI: circuits per (method, seed) and the pathway overlap of the seeds ("ioi" part), and the cost
    of the seed-0 EAP-IG graph's curve ("curve" part; that graph comes from the seed-0 discovery when it runs)."""
    from pathlens.tasks.ioi import ioi

    model = pathlens.load("smollm2", device=device)
    tasks = {seed: ioi(model.tokenizer, n=N_IOI, seed=seed) for seed in IOI_SEEDS}
    runs: list[tuple[DiscoveryMethod, int]] = [("eap-ig", seed) for seed in IOI_SEEDS] + (
        [] if quick else [("relp", 0)]
    )
    rows: list[dict[str, Any]] = []
    top: dict[int, list[dict[str, Any]]] = {}
    graph = None
    for method, seed in runs if "ioi" in parts else []:
        task = tasks[seed]
        circuit, seconds = time_once(
            functools.partial(discover, model, task, method=method, max_batch_tokens=EDGE_BATCH_TOKENS)
        )
        curves = {
            ranking: Curve(c["sizes"], c["faithfulness"], c["metric"], c["full"], c["empty"], c["edges_total"])
            for ranking, c in circuit.meta["curves"].items()
        }
        curve = curves[circuit.meta["ranked_by"]]
        patcher = EdgePatcher(model, task, max_batch_tokens=EDGE_BATCH_TOKENS)
        mib = {r: faithfulness_curve(patcher, unpruned(circuit), sizes="mib", by=r) for r in curves}
        row = {
            "workload": "discover-ioi",
            "model": "smollm2",
            "method": method,
            "seed": seed,
            "n_prompts": task.n,
            "seconds": seconds,
            "n_edges": circuit.n_edges,
            "edges_total": circuit.edges_total,
            "fraction": circuit.n_edges / circuit.edges_total,
            "faithfulness": circuit.meta["faithfulness"],
            "ranked_by": circuit.meta["ranked_by"],
            **curve_summary(curve),
            "by_ranking": {ranking: curve_summary(c) for ranking, c in curves.items()},
            "cpr": mib[circuit.meta["ranked_by"]].cpr,
            "cmd": mib[circuit.meta["ranked_by"]].cmd,
            "mib_by_ranking": {ranking: mib_summary(c) for ranking, c in mib.items()},
        }
        if method == "eap-ig":
            routes, row["pathways_seconds"] = time_once(functools.partial(pathways, patcher, circuit, k=TOP_PATHWAYS))
            top[seed] = path_rows(routes)
            row["pathways"] = top[seed]
            if seed == 0:
                graph = unpruned(circuit)
        rows.append(row)
    if "curve" in parts:
        if graph is None:
            graph = edge_attribution(model, tasks[0], "eap-ig")
        cost = curve_row("smollm2", model, tasks[0], graph, repeats)
        cost["task"] = f"ioi n={N_IOI} seed 0"
        rows.insert(0, cost)
    if len(top) == len(IOI_SEEDS):
        first, second = (top[s] for s in IOI_SEEDS)
        nodes = [{tuple(r["nodes"]) for r in routes} for routes in (first, second)]
        signatures = [{layer_signature(tuple(r["nodes"])) for r in routes} for routes in (first, second)]
        rows.append(
            {
                "workload": "pathways-ioi-stability",
                "model": "smollm2",
                "method": "eap-ig",
                "seeds": list(IOI_SEEDS),
                "k": TOP_PATHWAYS,
                "node_overlap": overlap(*nodes),
                "signature_overlap": overlap(*signatures),
                "shared_paths": sorted(list(p) for p in nodes[0] & nodes[1]),
                "top1_equal": bool(first and second and first[0]["nodes"] == second[0]["nodes"]),
            }
        )
    return rows


# ----------------------------------------------------------------------------------------------------- output


def fmt(value: Any, spec: str = ".3f") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def print_rows(rows: list[dict[str, Any]]) -> None:
    """Readable summary, one block per workload kind."""
    curves = [r for r in rows if r["workload"] == "curve-20"]
    if curves:
        print("Faithfulness curve (20 sizes) vs one plain batched forward")
        print(f"{'model':<18}{'curve s':>10}{'forward s':>11}{'forwards':>10}{'target':>8}{'edges':>8}")
        for r in curves:
            print(
                f"{r['model']:<18}{r['seconds']:>10.2f}{r['forward_seconds']:>11.3f}"
                f"{r['forwards_equiv']:>10.1f}{r['target']:>8}{r['edges_total']:>8}"
            )
        print()
    induction = [r for r in rows if r["workload"] == "discover-induction"]
    if induction:
        print(
            "Discovery on induction-2l (known circuit: 4 edges; key route = input>L0.H1.v>L0.H1>L1.H0.k>L1.H0>logits)"
        )
        print(
            f"{'method':<10}{'seconds':>9}{'edges':>7}{'faith':>8}{'exact':>7}{'has known':>11}{'top = key':>11}  extra"
        )
        for r in induction:
            extra = ", ".join(f"{u}->{v}" for u, v in r["extra_edges"]) or "-"
            print(
                f"{r['method']:<10}{r['seconds']:>9.2f}{r['n_edges']:>7}{r['faithfulness']:>8.3f}{fmt(r['exact']):>7}"
                f"{fmt(r['contains_known']):>11}{fmt(r['top_pathway_is_key_route']):>11}  {extra}"
            )
        for r in induction:
            print(f"  {r['method']}: top pathway {' > '.join(r['top_pathway'] or [])}")
        print()
    ioi_rows_ = [r for r in rows if r["workload"] == "discover-ioi"]
    if ioi_rows_:
        print("SmolLM2 IOI circuits (n=8, noising, interchange ablation, logit difference)")
        print(
            f"{'method':<8}{'seed':>5}{'seconds':>9}{'edges':>8}{'fraction':>10}{'faith':>8}"
            f"{'>=0.8 at':>10}{'fraction':>10}{'best<=5%':>10}{'at':>7}{'area':>7}{'CPR':>7}{'CMD':>7}"
        )
        for r in ioi_rows_:
            print(
                f"{r['method']:<8}{r['seed']:>5}{r['seconds']:>9.1f}{r['n_edges']:>8}{r['fraction']:>10.4f}"
                f"{r['faithfulness']:>8.3f}{fmt(r['first_size_reaching_target']):>10}"
                f"{fmt(r['first_fraction_reaching_target'], '.4f'):>10}{fmt(r['best_faithfulness_within_5pct']):>10}"
                f"{fmt(r['best_size_within_5pct']):>7}{r['area']:>7.3f}{r['cpr']:>7.3f}{r['cmd']:>7.3f}"
            )
        for r in ioi_rows_:
            points = " ".join(
                f"{s}:{f:.2f}" for s, f in zip(r["curve"]["sizes"], r["curve"]["faithfulness"], strict=True)
            )
            print(f"  {r['method']} seed {r['seed']} curve ranked by {r['ranked_by']} (size:faithfulness): {points}")
        print()
    for r in (r for r in rows if r["workload"] == "pathways-ioi-stability"):
        n, s = r["node_overlap"], r["signature_overlap"]
        print(
            f"Top-{r['k']} pathway overlap, seeds {r['seeds']}: {n['shared']} shared node paths "
            f"(Jaccard {fmt(n['jaccard'])}), {s['shared']} shared layer signatures (Jaccard {fmt(s['jaccard'])})"
        )
        for path in r["shared_paths"]:
            print(f"  shared: {' > '.join(path)}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON line per row")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of the curves and of each induction method")
    parser.add_argument(
        "--quick", action="store_true", help="one timed run each; no GPT-2 curve and no RelP on SmolLM2"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads; 0 keeps torch's default")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma list of parts: {', '.join(PARTS)}")
    add_device_argument(parser)
    args = parser.parse_args(argv)
    check_parts(parser, args, PARTS)
    check_repeats_and_threads(parser, args)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    set_threads(args.threads)
    emit = Emitter(json=args.json, extra={"threads": torch.get_num_threads(), "repeats": args.repeats})
    start = time.perf_counter()
    if "induction" in args.parts:
        for row in induction_rows(args.repeats, args.device):
            emit(row)
    if "curve" in args.parts and not args.quick:
        emit(gpt2_curve_row(args.repeats, args.device))
    if "ioi" in args.parts or "curve" in args.parts:
        for row in ioi_rows(args.repeats, args.quick, args.parts, args.device):
            emit(row)
    if not args.json:
        print_rows(emit.rows)
    print(f"total {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
