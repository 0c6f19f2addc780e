"""Acceptance checks for the shipped ``induction-2l`` model and its known circuit.

The model must (1) solve in-context copying on fresh ``[BOS, r, r]`` sequences, (2) contain exactly one
clear previous-token head in layer 0 and one dominant induction head in layer 1, at the indices recorded in
``training.json``, (3) depend causally on those two heads and on no other single head, with the previous-token
head acting through the induction head's keys (K-composition), and (4) give the same logits under eager and sdpa
attention, with and without padding.
"""

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import pathlens.zoo
from pathlens.zoo.attn_only import AttnOnlyForCausalLM

WEIGHTS = Path(pathlens.zoo.__file__).parent / "weights" / "induction-2l"
REPEAT = 20
BATCH = 256


@pytest.fixture(scope="module")
def model() -> AttnOnlyForCausalLM:
    """The shipped model with eager attention, so attention weights can be returned."""
    return AttnOnlyForCausalLM.from_pretrained(WEIGHTS, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def circuit() -> dict[str, list[int]]:
    """The ``[layer, head]`` of the two circuit heads as recorded by the training script."""
    return json.loads((WEIGHTS / "training.json").read_text())["circuit"]


@pytest.fixture(scope="module")
def sequences(model: AttnOnlyForCausalLM) -> torch.Tensor:
    """Fresh ``[BOS, r_1..r_T, r_1..r_T]`` batches ``(BATCH, 1 + 2 * REPEAT)``, independent of training data."""
    generator = torch.Generator().manual_seed(20240601)
    tokens = torch.randint(0, model.config.vocab_size - 1, (BATCH, REPEAT), generator=generator)
    tokens = tokens + (tokens >= model.config.bos_token_id).long()
    bos = torch.full((BATCH, 1), model.config.bos_token_id)
    return torch.cat([bos, tokens, tokens], dim=1)


def second_copy_positions() -> torch.Tensor:
    """Second-copy positions of ``r_1..r_{T-1}``: where the next token is predictable by induction."""
    return torch.arange(REPEAT + 1, 2 * REPEAT)


def induction_accuracy(model: AttnOnlyForCausalLM, sequences: torch.Tensor) -> float:
    """Top-1 accuracy of predicting ``r_2..r_T`` in the second copy."""
    positions = second_copy_positions()
    with torch.no_grad():
        logits = model(sequences).logits
    return (logits[:, positions].argmax(-1) == sequences[:, positions + 1]).float().mean().item()


@pytest.fixture(scope="module")
def head_scores(model: AttnOnlyForCausalLM, sequences: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Previous-token and induction scores, each ``(num_layers, num_heads)``.

    Previous-token score: mean attention from position ``i`` to ``i - 1`` over ``i >= 1``.
    Induction score: mean attention from the second-copy position of ``r_i`` to the position right after
    the first copy of ``r_i`` (that of ``r_{i+1}``), over ``i < T``.
    """
    with torch.no_grad():
        attentions = model(sequences, output_attentions=True).attentions
    queries = torch.arange(1, sequences.shape[1])
    second = second_copy_positions()
    prev_token = torch.stack([a[:, :, queries, queries - 1].mean(dim=(0, 2)) for a in attentions])
    induction = torch.stack([a[:, :, second, second - REPEAT + 1].mean(dim=(0, 2)) for a in attentions])
    return prev_token, induction


@contextmanager
def ablate_head(model: AttnOnlyForCausalLM, layer: int, head: int) -> Iterator[None]:
    """Zero one head's output by clearing its slice of the ``o_proj`` input ``(batch, seq, heads * head_dim)``."""
    attn = model.model.layers[layer].self_attn
    columns = slice(head * attn.head_dim, (head + 1) * attn.head_dim)

    def zero_head(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        ablated = args[0].clone()
        ablated[..., columns] = 0.0
        return (ablated, *args[1:])

    handle = attn.o_proj.register_forward_pre_hook(zero_head)
    try:
        yield
    finally:
        handle.remove()


def test_config_and_layout(model: AttnOnlyForCausalLM) -> None:
    """The shipped config is the small attention-only layout the architecture map expects."""
    config = model.config
    assert config.model_type == "pathlens-attn-only"
    assert config.num_hidden_layers == 2
    assert config.tie_word_embeddings is False
    assert len(model.model.layers) == 2
    for block in model.model.layers:
        assert set(dict(block.named_children())) == {"input_layernorm", "self_attn"}
        assert block.self_attn.num_heads * block.self_attn.head_dim == config.hidden_size
    assert sum(p.numel() for p in model.parameters()) < 500_000


def test_loads_through_auto_class() -> None:
    """Importing ``pathlens.zoo.attn_only`` registers the model with ``AutoModelForCausalLM``."""
    auto_model = AutoModelForCausalLM.from_pretrained(WEIGHTS)
    assert isinstance(auto_model, AttnOnlyForCausalLM)


def test_in_context_accuracy(model: AttnOnlyForCausalLM, sequences: torch.Tensor) -> None:
    assert induction_accuracy(model, sequences) >= 0.9


def test_single_previous_token_head(
    head_scores: tuple[torch.Tensor, torch.Tensor], circuit: dict[str, list[int]]
) -> None:
    prev_token = head_scores[0][0]
    assert prev_token.max().item() >= 0.8
    assert (prev_token > 0.5).sum().item() == 1
    assert [0, prev_token.argmax().item()] == circuit["previous_token_head"]


def test_single_dominant_induction_head(
    head_scores: tuple[torch.Tensor, torch.Tensor], circuit: dict[str, list[int]]
) -> None:
    induction = head_scores[1][1]
    best, runner_up = induction.topk(2).values.tolist()
    assert best >= 0.7
    assert runner_up <= 0.3
    assert [1, induction.argmax().item()] == circuit["induction_head"]


@pytest.mark.parametrize("role", ["previous_token_head", "induction_head"])
def test_ablating_circuit_head_collapses_accuracy(
    model: AttnOnlyForCausalLM, sequences: torch.Tensor, circuit: dict[str, list[int]], role: str
) -> None:
    layer, head = circuit[role]
    with ablate_head(model, layer, head):
        assert induction_accuracy(model, sequences) <= 0.2


@pytest.mark.parametrize(("projection", "collapses"), [("k_proj", True), ("q_proj", False), ("v_proj", False)])
def test_previous_token_head_feeds_induction_keys(
    model: AttnOnlyForCausalLM,
    sequences: torch.Tensor,
    circuit: dict[str, list[int]],
    projection: str,
    collapses: bool,
) -> None:
    """K-composition: removing the previous-token head from the induction head's key input alone breaks copying.

    The induction head's ``projection`` is fed the layer-1 LayerNorm output computed with the previous-token
    head ablated, ``(batch, seq, hidden_size)``, while every other path sees the clean residual stream.
    """
    prev_layer, prev_head = circuit["previous_token_head"]
    layer = circuit["induction_head"][0]
    block = model.model.layers[layer]
    captured: list[torch.Tensor] = []
    capture = block.input_layernorm.register_forward_hook(lambda _module, _args, output: captured.append(output))
    with ablate_head(model, prev_layer, prev_head), torch.no_grad():
        model(sequences)
    capture.remove()
    patch = getattr(block.self_attn, projection).register_forward_pre_hook(lambda _module, _args: (captured[0],))
    try:
        accuracy = induction_accuracy(model, sequences)
    finally:
        patch.remove()
    assert (accuracy <= 0.2) if collapses else (accuracy >= 0.9)


def test_ablating_other_heads_keeps_accuracy(
    model: AttnOnlyForCausalLM, sequences: torch.Tensor, circuit: dict[str, list[int]]
) -> None:
    baseline = induction_accuracy(model, sequences)
    circuit_heads = {tuple(circuit["previous_token_head"]), tuple(circuit["induction_head"])}
    for layer in range(model.config.num_hidden_layers):
        for head in range(model.config.num_attention_heads):
            if (layer, head) in circuit_heads:
                continue
            with ablate_head(model, layer, head):
                assert induction_accuracy(model, sequences) >= baseline - 0.05, (layer, head)


@pytest.mark.parametrize(
    ("dtype", "rtol"),
    [
        # float64: the kernels must agree to within 1e-5 absolutely (in practice ~1e-13).
        (torch.float64, 0.0),
        # float32: the kernels sum in different orders; the sharp attention and logits of up to ~10 in
        # magnitude turn that into absolute differences of ~2e-5, hence the additional relative tolerance.
        (torch.float32, 1e-5),
    ],
)
def test_eager_and_sdpa_agree(sequences: torch.Tensor, dtype: torch.dtype, rtol: float) -> None:
    """Same logits under both kernels, without a mask and with right padding of varying length."""
    input_ids = sequences[:8]
    attention_mask = torch.ones_like(input_ids)
    for row, length in enumerate(range(5, 5 + 4 * 8, 4)):
        attention_mask[row, length:] = 0
    logits = {}
    for implementation in ("eager", "sdpa"):
        model = AttnOnlyForCausalLM.from_pretrained(WEIGHTS, attn_implementation=implementation, dtype=dtype).eval()
        assert model.config._attn_implementation == implementation
        with torch.no_grad():
            logits[implementation] = (
                model(input_ids).logits,
                model(input_ids, attention_mask=attention_mask).logits,
            )
    for eager, sdpa in zip(logits["eager"], logits["sdpa"], strict=True):
        assert eager.dtype == dtype
        torch.testing.assert_close(eager, sdpa, atol=1e-5, rtol=rtol)
    for implementation, (unpadded, padded) in logits.items():
        valid = attention_mask.bool()
        torch.testing.assert_close(padded[valid], unpadded[valid], atol=1e-5, rtol=rtol, msg=implementation)
