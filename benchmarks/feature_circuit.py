"""A circuit with feature nodes on the embedded SmolLM2: a TopK transcoder trained briefly on one middle layer's MLP
(activations of `--tokens` tokens of the offline default corpus streamed once, `pathlens.features.stream`, then
`--epochs` shuffled epochs of `pathlens.features.train`), spliced, and `discover` on IOI with an
edge budget; the circuit's edges, faithfulness and the transcoder latents it holds, each with its top contexts
over corpus windows (`pathlens.features.top_contexts`).

Rows (JSON lines with `--json`; keys `workload`, `edges`, `faithfulness`, `feature_nodes`, `seconds`):
- `transcoder`: the training (tokens, seconds, fraction of variance of the MLP output explained on held-out
  windows, L0);
- `feature-circuit`: discover (EAP-IG) on the spliced model, top `--budget` of the graph's edges; `feature_nodes`
  lists the latents in the circuit with their AtP-style node score (outgoing edge sum) and top contexts;
- `unspliced-circuit`: the same discovery with the same edge fraction on the model without the transcoder, in
  the same run (what the MLP node alone gives at that budget).
Times were taken on whatever machine ran it; `--threads 1` is the default (a shared machine).
Run `python benchmarks/feature_circuit.py --json --threads 1`.
"""

from __future__ import annotations

import os
import sys

if not __package__:  # run as `python benchmarks/feature_circuit.py`: import the package from the repo root
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    import benchmarks  # noqa: F401  (turns tqdm off before torch imports it: see benchmarks/__init__.py)

import argparse
import time
from typing import Any

import torch

from benchmarks.common import Emitter, add_device_argument, check_repeats_and_threads, set_threads
from pathlens import Model, load
from pathlens.circuits import discover
from pathlens.circuits.layout import graph_layout, latent_families, valid_mask
from pathlens.features import (
    Dictionary,
    DictionaryConfig,
    TrainConfig,
    Trainer,
    default_corpus,
    stream,
    top_contexts,
    train,
    windows,
)
from pathlens.features.train import tensor_batches
from pathlens.graph import Graph
from pathlens.tasks.base import Task
from pathlens.tasks.ioi import ioi

Row = dict[str, Any]


def train_transcoder(model: Model, args: argparse.Namespace) -> tuple[Dictionary, Row, torch.Tensor]:
    """A TopK transcoder L{layer}.mlp_in → L{layer}.mlp_out trained on `--tokens` corpus tokens (FVE and L0 on
    held-out windows); its row and the windows where top contexts are searched."""
    source, target = f"L{args.layer}.mlp_in", f"L{args.layer}.mlp_out"
    corpus = windows(default_corpus(), model.tokenizer, args.context, args.tokens + args.heldout_tokens, seed=0)
    n_train = max(1, args.tokens // args.context)
    ids = corpus.ids
    d = model.arch.d_model
    config = DictionaryConfig(
        "topk", d, args.expansion * d, d_out=d, k=args.k, meta={"site": source, "target": target, "model": "smollm2"}
    )
    dictionary = Dictionary(config, seed=0).to(model.device)
    trainer = Trainer(dictionary, source, target, TrainConfig(lr=args.lr), seed=0)
    start = time.perf_counter()
    parts: dict[str, list[torch.Tensor]] = {source: [], target: []}
    for batch in stream(model, [source, target], ids[:n_train].to(model.device), batch_size=8, skip_first=True):
        for name in parts:
            parts[name].append(batch[name].float())
    columns = {name: torch.cat(values) for name, values in parts.items()}  # (tokens, d) each
    collected = time.perf_counter() - start
    train([trainer], tensor_batches(columns, args.batch, seed=0, epochs=args.epochs))
    seconds = time.perf_counter() - start
    heldout = ids[n_train:]
    with torch.no_grad():
        cache = model.run(heldout[:16].to(model.device), cache=[source, target]).cache
        x, y = cache[source][:, 1:].flatten(0, 1), cache[target][:, 1:].flatten(0, 1)  # (n, d)
        f = dictionary.encode(x)
        residual = y - dictionary.decode(f)
        fve = 1.0 - float(residual.pow(2).sum() / (y - y.mean(0)).pow(2).sum())
        l0 = float((f != 0).float().sum(-1).mean())
    row = {
        "workload": "transcoder",
        "site": source,
        "target": target,
        "width": dictionary.width,
        "k": args.k,
        "tokens": int(columns[source].shape[0]),
        "epochs": args.epochs,
        "steps": trainer.steps,
        "seconds": seconds,
        "collect_seconds": collected,
        "fve": fve,
        "l0": l0,
        "edges": None,
        "faithfulness": None,
        "feature_nodes": None,
    }
    return dictionary, row, ids[: min(len(ids), args.context_windows)]


def edges_total(model: Model, task: Task) -> int:
    return int(valid_mask(graph_layout(model, latent_families(model, task)), model.n_layers).sum())


def circuit_row(name: str, circuit: Graph, seconds: float, total: int) -> Row:
    return {
        "workload": name,
        "edges": circuit.n_edges,
        "edges_total": total,
        "fraction": circuit.n_edges / total,
        "faithfulness": float(circuit.meta["faithfulness"]),
        "ranked_by": circuit.meta["ranked_by"],
        "senders": len(circuit.senders),
        "receivers": len(circuit.receivers),
        "seconds": seconds,
    }


def feature_nodes(
    model: Model, dictionary: Dictionary, circuit: Graph, family: str, contexts_from: torch.Tensor, top: int
) -> list[Row]:
    """The latents of `family` in the circuit, by |node score| (their outgoing edge sum), with top contexts."""
    scores = circuit.node_scores()
    names = [n for n in circuit.nodes_in_circuit() if n.startswith(f"{family}.F")]
    names.sort(key=lambda n: -abs(float(scores.get(n, 0.0))))
    latents = [int(n.rsplit("F", 1)[1]) for n in names]
    found = top_contexts(model, dictionary, contexts_from.to(model.device), latents, top=top) if latents else {}
    frame = circuit.to_frame()
    kept = frame[frame["in_circuit"]]
    return [
        {
            "node": name,
            "score": float(scores.get(name, 0.0)),
            "edges_in": int((kept["receiver"] == name).sum()),
            "edges_out": int((kept["sender"] == name).sum()),
            "contexts": [str(c) for c in found.get(latent, [])],
        }
        for name, latent in zip(names, latents, strict=True)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON line per row")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=1, help="(one run: the workload is a single study)")
    parser.add_argument("--quick", action="store_true", help="fewer training tokens and prompts")
    add_device_argument(parser)
    parser.add_argument("--layer", type=int, default=15, help="the MLP the transcoder replaces")
    parser.add_argument("--tokens", type=int, default=24_576, help="training tokens (activations collected once)")
    parser.add_argument("--epochs", type=int, default=6, help="passes over the collected activations")
    parser.add_argument("--heldout-tokens", type=int, default=16 * 128, help="held-out tokens (FVE, contexts)")
    parser.add_argument("--context", type=int, default=128, help="tokens per corpus window")
    parser.add_argument("--expansion", type=int, default=4, help="latents per model dimension")
    parser.add_argument("--k", type=int, default=32, help="active latents per token")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=512, help="training batch (tokens)")
    parser.add_argument("--n", type=int, default=8, help="IOI prompts")
    parser.add_argument("--budget", type=float, default=0.02, help="circuit size as a fraction of the graph's edges")
    parser.add_argument("--edge-batch-tokens", type=int, default=256, help="tokens per edge-patched forward")
    parser.add_argument("--top", type=int, default=3, help="top contexts per feature node")
    parser.add_argument("--context-windows", type=int, default=64, help="corpus windows searched for top contexts")
    args = parser.parse_args()
    check_repeats_and_threads(parser, args)
    if args.quick:
        args.tokens, args.n = 8_000, 4
    set_threads(args.threads)
    emit = Emitter(args.json, {"threads": args.threads, "device": str(args.device), "machine": "shared, busy"})
    model = load("smollm2", device=args.device)
    dictionary, row, search = train_transcoder(model, args)
    emit(row)
    task = ioi(model.tokenizer, n=args.n, seed=0)
    site, target = dictionary.config.meta["site"], dictionary.config.meta["target"]
    with model.splice(dictionary, site, target=target, name="tc") as spliced:
        total = edges_total(model, task)
        start = time.perf_counter()
        circuit = discover(
            model, task, method="eap-ig", top_k=max(1, round(args.budget * total)),
            max_batch_tokens=args.edge_batch_tokens,
        )  # fmt: skip
        seconds = time.perf_counter() - start
        family = str(spliced.latents)
    nodes = feature_nodes(model, dictionary, circuit, family, search, args.top)
    frame = circuit.to_frame()
    kept = frame[frame["in_circuit"]]
    error = f"{family}.err"
    emit(
        {
            **circuit_row("feature-circuit", circuit, seconds, total),
            "feature_nodes": nodes,
            "n_feature_nodes": len(nodes),
            "error_node_edges": {
                "in": int((kept["receiver"] == error).sum()),
                "out": int((kept["sender"] == error).sum()),
            },
            "error_node_score": float(circuit.node_scores().get(error, 0.0)),
            "n_prompts": task.n,
        }
    )
    plain_total = edges_total(model, task)
    start = time.perf_counter()
    plain = discover(
        model, task, method="eap-ig", top_k=max(1, round(args.budget * plain_total)),
        max_batch_tokens=args.edge_batch_tokens,
    )  # fmt: skip
    emit({**circuit_row("unspliced-circuit", plain, time.perf_counter() - start, plain_total), "feature_nodes": []})
    emit.finish()
    if not args.json:
        print(f"\ncircuit with the transcoder on L{args.layer}: {circuit.n_edges} of {total} edges, faithfulness "
              f"{circuit.meta['faithfulness']:.3f}; without it: {plain.n_edges} of {plain_total} edges, "
              f"faithfulness {plain.meta['faithfulness']:.3f}")  # fmt: skip
        for node in nodes:
            print(f"  {node['node']}: score {node['score']:+.4f}, {node['edges_in']} in / {node['edges_out']} out")
            for context in node["contexts"]:
                print(f"      {context}")


if __name__ == "__main__":
    main()
