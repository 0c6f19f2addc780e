"""Train ``induction-2l``: a 2-layer attention-only transformer with a clean induction circuit.

Usage::

    python -m pathlens.zoo.train_induction --out pathlens/zoo/weights/induction-2l

Data. Every training sequence has ``seq_len`` tokens::

    [BOS, noise_1..noise_p, r_1..r_T, r_1..r_T, noise ...]

with the ``r_i`` and the noise drawn i.i.d. uniformly from the ``num_tokens`` ordinary tokens
(ids ``1..num_tokens``; id 0 is BOS), a repeat length ``T`` drawn uniformly from
``[min_repeat, max_repeat]`` and a prefix length ``p`` drawn uniformly from the lengths that fit.
The random ``T`` and offset ``p`` make the position of the earlier copy unpredictable from
absolute positions, so the only way to solve the task is in-context copying (an induction head)
rather than a fixed positional look-back. Evaluation uses the canonical ``[BOS, r, r]`` sequences.

Loss. Cross-entropy only on the targets ``r_2..r_T`` of the second copy, i.e. on the predictions
made at second-copy positions of ``r_1..r_{T-1}``: those are exactly the tokens an induction head
can predict. All other tokens are random, carry no learnable signal, and are excluded (label
``-100``) so that they do not dilute the gradient.

Circuit placement. For the first ``solo_steps`` only layer-0 head ``previous_token_head`` and
layer-1 head ``induction_head`` are active, so the circuit forms in exactly those heads; then all
heads train together under a group-lasso penalty on per-head weights, which keeps the remaining
heads idle instead of letting them become redundant copies (see :class:`TrainSettings` for why
plain joint training does not give a clean circuit).

Determinism. Fixed seed for the initialisation and a separate seeded generator for the data,
``torch.use_deterministic_algorithms(True)`` and one intra-op thread, so two runs on the same
machine and library versions produce bit-identical weights.

The script saves ``config.json`` and ``model.safetensors`` with ``save_pretrained`` plus a
``training.json`` holding the settings, the circuit head indices, the training time and the final
metrics (in-context accuracy and, per head, previous-token and induction attention scores and
weight norms).
"""

import argparse
import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers
from torch import nn

from pathlens.zoo.attn_only import AttnOnlyConfig, AttnOnlyForCausalLM

BOS_TOKEN_ID = 0
DEFAULT_OUT = Path(__file__).parent / "weights" / "induction-2l"


@dataclass(frozen=True)
class TrainSettings:
    """Every knob of a training run; stored verbatim in ``training.json``.

    Design choices that matter for a clean circuit:

    * ``embedding_init_std = 1.0``: token and position embeddings start as large, nearly orthogonal
      random vectors. With the default tiny init (std 0.02), in our runs Adam turned the position
      embeddings into a smooth low-dimensional curve, and the layer-0 heads then attended "roughly a
      few tokens back" (previous-token scores of 0.05-0.15) instead of exactly to ``i - 1``.
    * Head curriculum: for the first ``solo_steps`` only layer-0 head ``previous_token_head`` and
      layer-1 head ``induction_head`` are active (the others are silenced), so the circuit forms in
      exactly those two heads. Trained jointly from the start, in our runs both heads of a layer
      converged to the same role (previous-token scores 0.59 and 0.66, induction scores 0.80 and
      0.78), i.e. the circuit was duplicated, and a later head penalty did not break the tie.
    * Afterwards all heads train together, with a group-lasso penalty ``head_sparsity`` on each
      head's weights (see :func:`head_group_norms`) so that the other heads are not recruited as
      redundant copies of the circuit heads.
    """

    seed: int = 0
    num_tokens: int = 128
    hidden_size: int = 64
    num_heads: int = 2
    seq_len: int = 48
    min_repeat: int = 4
    max_repeat: int = 20
    batch_size: int = 64
    steps: int = 2500
    solo_steps: int = 1500
    previous_token_head: int = 1
    induction_head: int = 0
    lr: float = 3e-3
    warmup_steps: int = 100
    weight_decay: float = 0.1
    embedding_init_std: float = 1.0
    head_sparsity: float = 1e-3
    eval_repeat: int = 20
    eval_batch: int = 512


def make_batch(settings: TrainSettings, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample a training batch of noisy repeated sequences.

    Returns:
        ``input_ids`` ``(batch_size, seq_len)`` and ``labels`` of the same shape, equal to
        ``input_ids`` on the second-copy tokens ``r_2..r_T`` and ``-100`` elsewhere (the model
        shifts labels by one internally).
    """
    b, n = settings.batch_size, settings.seq_len
    input_ids = torch.randint(1, settings.num_tokens + 1, (b, n), generator=generator)
    input_ids[:, 0] = BOS_TOKEN_ID
    labels = torch.full_like(input_ids, -100)
    repeats = torch.randint(settings.min_repeat, settings.max_repeat + 1, (b,), generator=generator)
    room = n - 1 - 2 * repeats
    starts = 1 + (torch.rand(b, generator=generator) * (room + 1)).floor().long()
    for row, (t, s) in enumerate(zip(repeats.tolist(), starts.tolist(), strict=True)):
        input_ids[row, s + t : s + 2 * t] = input_ids[row, s : s + t]
        labels[row, s + t + 1 : s + 2 * t] = input_ids[row, s + t + 1 : s + 2 * t]
    return input_ids, labels


def repeated_sequences(batch: int, repeat: int, num_tokens: int, generator: torch.Generator) -> torch.Tensor:
    """Canonical evaluation sequences ``[BOS, r_1..r_T, r_1..r_T]``, shape ``(batch, 1 + 2 * repeat)``."""
    tokens = torch.randint(1, num_tokens + 1, (batch, repeat), generator=generator)
    bos = torch.full((batch, 1), BOS_TOKEN_ID, dtype=tokens.dtype)
    return torch.cat([bos, tokens, tokens], dim=1)


@torch.no_grad()
def evaluate(model: AttnOnlyForCausalLM, input_ids: torch.Tensor) -> dict[str, object]:
    """Measure the induction behaviour on ``[BOS, r, r]`` sequences ``(batch, 1 + 2T)``.

    Returns:
        ``accuracy``: top-1 accuracy of the predictions of ``r_2..r_T`` in the second copy;
        ``prev_token_scores[layer][head]``: mean attention from position ``i`` to ``i - 1``
        (over ``i >= 1``); ``induction_scores[layer][head]``: mean attention from the second-copy
        position of ``r_i`` to the first-copy position of ``r_{i+1}`` (over ``i < T``).
    """
    repeat = (input_ids.shape[1] - 1) // 2
    out = model(input_ids, output_attentions=True)
    second = torch.arange(repeat + 1, 2 * repeat)
    predictions = out.logits[:, second].argmax(-1)
    accuracy = (predictions == input_ids[:, second + 1]).float().mean().item()
    positions = torch.arange(1, input_ids.shape[1])
    prev_token, induction = [], []
    for attn in out.attentions:
        prev_token.append(attn[:, :, positions, positions - 1].mean(dim=(0, 2)).tolist())
        induction.append(attn[:, :, second, second - repeat + 1].mean(dim=(0, 2)).tolist())
    return {"accuracy": accuracy, "prev_token_scores": prev_token, "induction_scores": induction}


def head_group_norms(model: AttnOnlyForCausalLM) -> torch.Tensor:
    """Frobenius norm of each head's weights, ``(num_layers * num_heads,)``.

    A head's group is its rows of ``q_proj``/``k_proj``/``v_proj`` (weights and biases) and its
    columns of ``o_proj``. Penalising the sum of these norms (group lasso) pushes heads the task
    does not need towards zero, and, unlike L2 weight decay, does not reward spreading one
    function over several redundant heads, since every duplicate must pay for its own QK circuit.
    """
    norms = []
    for block in model.model.layers:
        attn = block.self_attn
        for head in range(attn.num_heads):
            rows = slice(head * attn.head_dim, (head + 1) * attn.head_dim)
            parts = [proj.weight[rows] for proj in (attn.q_proj, attn.k_proj, attn.v_proj)]
            parts += [proj.bias[rows] for proj in (attn.q_proj, attn.k_proj, attn.v_proj)]
            parts.append(attn.o_proj.weight[:, rows])
            norms.append(torch.cat([part.reshape(-1) for part in parts]).norm())
    return torch.stack(norms)


def learning_rate(step: int, settings: TrainSettings) -> float:
    """Linear warm-up followed by cosine decay to 10% of the peak rate."""
    if step < settings.warmup_steps:
        return settings.lr * (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    return settings.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


@contextmanager
def only_heads(model: AttnOnlyForCausalLM, active: dict[int, int]) -> Iterator[None]:
    """Silence every head except ``active[layer]`` in each layer, for the duration of the context.

    Implemented as a forward pre-hook that zeroes the silenced heads' slices of the ``o_proj``
    input ``(batch, seq, heads * head_dim)``, so silenced heads get no gradient from the loss.
    """

    def make_gate(keep: int, head_dim: int) -> Callable[[nn.Module, tuple[torch.Tensor, ...]], tuple[torch.Tensor]]:
        def gate(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor]:
            mask = torch.zeros(args[0].shape[-1], dtype=args[0].dtype)
            mask[keep * head_dim : (keep + 1) * head_dim] = 1.0
            return (args[0] * mask,)

        return gate

    handles = [
        block.self_attn.o_proj.register_forward_pre_hook(make_gate(active[layer], block.self_attn.head_dim))
        for layer, block in enumerate(model.model.layers)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def build_model(settings: TrainSettings) -> AttnOnlyForCausalLM:
    """A freshly initialised model; embeddings get ``embedding_init_std`` (see :class:`TrainSettings`)."""
    config = AttnOnlyConfig(
        vocab_size=settings.num_tokens + 1,
        hidden_size=settings.hidden_size,
        num_hidden_layers=2,
        num_attention_heads=settings.num_heads,
        max_position_embeddings=settings.seq_len,
        bos_token_id=BOS_TOKEN_ID,
        attn_implementation="sdpa",  # type: ignore[call-arg]  # a PretrainedConfig keyword outside the fields
    )
    model = AttnOnlyForCausalLM(config)
    nn.init.normal_(model.model.embed_tokens.weight, std=settings.embedding_init_std)
    nn.init.normal_(model.model.embed_positions.weight, std=settings.embedding_init_std)
    return model


def train(settings: TrainSettings, log_every: int = 250) -> tuple[AttnOnlyForCausalLM, dict[str, object]]:
    """Train a fresh model deterministically and return it with its final metrics.

    Sets torch's global state for determinism: one intra-op thread and deterministic algorithms.

    Steps ``[0, solo_steps)`` run with only the two designated circuit heads active; the remaining
    steps train all heads with the group-lasso head penalty (see :class:`TrainSettings`).
    """
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(settings.seed)
    model = build_model(settings)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.lr,
        betas=(0.9, 0.98),
    )
    data_generator = torch.Generator().manual_seed(settings.seed + 1)
    circuit = {0: settings.previous_token_head, 1: settings.induction_head}
    model.train()
    start = time.perf_counter()
    for step in range(settings.steps):
        solo = step < settings.solo_steps
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, settings)
        input_ids, labels = make_batch(settings, data_generator)
        with only_heads(model, circuit) if solo else nullcontext():
            loss = model(input_ids, labels=labels).loss
        objective = loss if solo else loss + settings.head_sparsity * head_group_norms(model).sum()
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        optimizer.step()
        if log_every and (step % log_every == 0 or step == settings.steps - 1):
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.perf_counter() - start:6.1f}s", flush=True)
    train_seconds = time.perf_counter() - start
    model.eval()
    model.set_attn_implementation("eager")
    eval_generator = torch.Generator().manual_seed(settings.seed + 2)
    eval_ids = repeated_sequences(settings.eval_batch, settings.eval_repeat, settings.num_tokens, eval_generator)
    metrics = evaluate(model, eval_ids)
    metrics["head_norms"] = [round(norm, 4) for norm in head_group_norms(model).tolist()]
    metrics["final_train_loss"] = loss.item()
    metrics["train_seconds"] = round(train_seconds, 1)
    return model, metrics


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point: train and save weights, config and ``training.json`` to ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    parser.add_argument("--steps", type=int, default=TrainSettings.steps, help="total optimizer steps")
    parser.add_argument(
        "--solo-steps", type=int, default=TrainSettings.solo_steps, help="steps with only the circuit heads active"
    )
    parser.add_argument("--seed", type=int, default=TrainSettings.seed, help="random seed")
    args = parser.parse_args(argv)
    settings = TrainSettings(steps=args.steps, solo_steps=args.solo_steps, seed=args.seed)
    model, metrics = train(settings)
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    record = {
        "circuit": {
            "previous_token_head": [0, settings.previous_token_head],
            "induction_head": [1, settings.induction_head],
        },
        "settings": asdict(settings),
        "metrics": metrics,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    (args.out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
