"""`model.session`: interventions held across any number of the model's own forwards.

References: the same interventions in one forward of the whole sequence (for a prefix forward plus single-token
forwards with the key/value cache), each row run alone (for left- and right-padded batches), and a plain greedy
loop of whole-sequence forwards (for `generate`). Tolerances: the difference the model itself shows between
the two ways without interventions, and at most 1e-4 (fp32).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from pathlens import Intervention, Model
from pathlens.errors import PathlensError
from pathlens.interventions import Ablate, Add, Project, Replace, Scale, Selection
from tests.helpers import FAMILIES, assert_untouched, snapshot, tiny_model

KV_FAMILIES = [f for f in FAMILIES if f != "attn_only"]


def _interventions(model: Model, seq_len: int, source: torch.Tensor) -> list[Intervention]:
    """Interventions whose effect does not depend on how the sequence is split into forwards."""
    a = model.arch
    d = a.d_model
    gen = torch.Generator().manual_seed(5)
    ivs = [
        Intervention("L0.resid_post", Add(torch.randn(d, generator=gen), 0.5)),
        Intervention("L1.resid_pre", Replace(source), positions=[1, seq_len - 2]),
        Intervention("L0.attn_out", Scale(0.5), positions=slice(2, seq_len - 1)),
        Intervention("L1.H0", Scale(1.5), positions=[0, seq_len - 1]),
    ]
    if a.mlp is not None:
        ivs.append(Intervention("L0.mlp_out", Ablate("zero"), positions=[seq_len - 3]))
    if a.qkv == "interface":
        ivs.append(Intervention("L1.k", Scale(0.7), positions=[seq_len - 1]))
    return ivs


def _stepwise_logits(model: Model, ids: torch.Tensor, prefix: int) -> torch.Tensor:
    """Logits (b, p, vocab) from a prefix forward then one forward per token, reusing the key/value cache."""
    out = model.hf(input_ids=ids[:, :prefix], use_cache=True)
    logits, past = [out.logits], out.past_key_values
    for t in range(prefix, ids.shape[1]):
        out = model.hf(input_ids=ids[:, t : t + 1], past_key_values=past, use_cache=True)
        logits.append(out.logits)
        past = out.past_key_values
    return torch.cat(logits, dim=1)


def _check_prefix_then_steps(model: Model, ids: torch.Tensor, prefix: int) -> None:
    seq_len = ids.shape[1]
    source = torch.randn(ids.shape[0], seq_len, model.arch.d_model, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        whole_plain = model.hf(input_ids=ids).logits
        model_gap = (whole_plain - _stepwise_logits(model, ids, prefix)).abs().max().item()
        with model.session(_interventions(model, seq_len, source), cache=["L1.resid_pre"]) as session:
            whole = model.hf(input_ids=ids).logits
            whole_read = session.cache["L1.resid_pre"]
        with model.session(_interventions(model, seq_len, source), cache=["L1.resid_pre"]) as session:
            steps = _stepwise_logits(model, ids, prefix)
            steps_read = session.cache["L1.resid_pre"]
    assert (whole - whole_plain).abs().max() > 1e-3  # the interventions do something
    tol = max(model_gap, 1e-6) * 2
    assert tol <= 1e-4, model_gap
    torch.testing.assert_close(steps, whole, atol=tol, rtol=0)
    torch.testing.assert_close(steps_read, whole_read, atol=tol, rtol=0)


@pytest.mark.parametrize("family", KV_FAMILIES)
def test_prefix_plus_cached_steps_equal_one_forward_with_interventions(family: str) -> None:
    model = tiny_model(family)
    before = snapshot(model)
    ids = torch.randint(1, 64, (2, 9), generator=torch.Generator().manual_seed(2))
    _check_prefix_then_steps(model, ids, prefix=4)
    assert_untouched(model, before)


def test_prefix_plus_cached_steps_on_smollm2(smollm2: Model) -> None:
    ids = torch.tensor([[1, 504, 3458, 314, 260, 1345, 282, 4132, 30, 378]])
    _check_prefix_then_steps(smollm2, ids, prefix=5)


def _padded(rows: list[list[int]], left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        cols = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, cols], mask[i, cols] = torch.tensor(r), 1
    return ids, mask


@pytest.mark.parametrize("left", [True, False], ids=["left", "right"])
@pytest.mark.parametrize("family", ["gpt2", "llama", "neox_parallel"])
def test_padded_rows_get_what_they_get_alone(family: str, left: bool) -> None:
    model = tiny_model(family)
    gen = torch.Generator().manual_seed(4)
    rows = [torch.randint(1, 64, (n,), generator=gen).tolist() for n in (7, 4, 6)]
    vector = torch.randn(model.arch.d_model, generator=gen)

    def ivs() -> list[Intervention]:
        return [
            Intervention("L0.resid_post", Add(vector, 2.0), positions=[1, -1]),
            Intervention("L1.attn_out", Scale(0.0), positions="last"),
            Intervention("L0.mlp_out", Scale(3.0), positions=slice(0, 2)),
        ]

    ids, mask = _padded(rows, left)
    batch = model.run(ids, attention_mask=mask, interventions=ivs(), cache=["L1.resid_post"])
    for i, r in enumerate(rows):
        alone = model.run(torch.tensor([r]), interventions=ivs(), cache=["L1.resid_post"])
        cols = slice(ids.shape[1] - len(r), None) if left else slice(0, len(r))
        torch.testing.assert_close(batch.logits[i, cols], alone.logits[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(batch.cache["L1.resid_post"][i, cols], alone.cache["L1.resid_post"][0])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_generate_inside_a_session_sees_the_interventions_at_every_step(family: str) -> None:
    """Greedy `hf.generate` (left-padded, key/value cache) equals a greedy loop of whole-sequence runs with the
    same interventions, row by row."""
    model = tiny_model(family)
    gen = torch.Generator().manual_seed(6)
    rows = [torch.randint(1, 64, (n,), generator=gen).tolist() for n in (5, 3)]
    vector = 3.0 * torch.randn(model.arch.d_model, generator=gen)
    ids, mask = _padded(rows, left=True)
    with torch.no_grad(), model.session([Intervention("L1.resid_pre", Add(vector))]):
        out = model.hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    plain = model.hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert not torch.equal(out, plain)
    for i, r in enumerate(rows):
        seq = torch.tensor([r])
        for _ in range(4):
            logits = model.run(seq, interventions=[Intervention("L1.resid_pre", Add(vector))]).logits
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        assert out[i, -4:].tolist() == seq[0, -4:].tolist()


def test_session_cache_holds_the_whole_generated_sequence() -> None:
    model = tiny_model("llama")
    ids = torch.randint(1, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole = model.run(ids, cache=["L0.resid_post", "L1.pattern"])
        with model.session(cache=["L0.resid_post", "L1.pattern"]) as session:
            _stepwise_logits(model, ids, prefix=3)
    torch.testing.assert_close(session.cache["L0.resid_post"], whole.cache["L0.resid_post"], atol=1e-5, rtol=0)
    torch.testing.assert_close(session.cache["L1.pattern"], whole.cache["L1.pattern"], atol=1e-5, rtol=0)


class _Stop(BaseException):
    pass


@pytest.mark.parametrize("raised", [RuntimeError, KeyboardInterrupt, _Stop])
def test_every_hook_is_gone_after_the_block_even_when_it_raised(raised: type[BaseException]) -> None:
    model = tiny_model("llama")
    before = snapshot(model)
    attn = model.hf.config._attn_implementation
    ids = torch.randint(1, 64, (1, 5))
    with pytest.raises(raised):
        with model.session(
            [Intervention("L0.resid_post", Add(torch.ones(model.arch.d_model))), Intervention("L1.q", Scale(2.0))],
            cache=["L1.head", "L0.pattern"],
        ):
            model.hf(input_ids=ids)
            raise raised()
    assert_untouched(model, before)
    assert model.hf.config._attn_implementation == attn
    for module in model.hf.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
    torch.testing.assert_close(model.run(ids).logits, model.hf(input_ids=ids).logits.detach())


def test_session_positions_policy_errors_name_the_policy() -> None:
    model = tiny_model("gpt2")
    with (
        pytest.raises(PathlensError, match="'first'"),
        model.session(
            [Intervention("L0.resid_post", Scale(0.0), positions="first")]  # type: ignore[arg-type]
        ),
    ):
        model.hf(input_ids=torch.tensor([[1, 2, 3]]))


# ---- ops restricted to rows and positions ---------------------------------------------------------------


def _full_selection(b: int, p: int) -> Selection:
    return Selection(torch.arange(b), torch.arange(p)[None], b, p)


OPS: dict[str, Callable[[torch.Tensor], object]] = {
    "replace": lambda src: Replace(src),
    "add_laid_out": lambda src: Add(src * 0.3, scale=2.0),
    "add_vector": lambda src: Add(src[0, 0], scale=-1.0),
    "scale": lambda src: Scale(0.25),
    "ablate_zero": lambda src: Ablate("zero"),
    "ablate_mean_ref": lambda src: Ablate("mean", reference=src[:3] + 1.0),
    "ablate_mean_batch": lambda src: Ablate("mean"),
    "ablate_resample": lambda src: Ablate("resample", reference=src.flip(0), seed=3),
    "project": lambda src: Project(torch.linalg.qr(src[0, :4].T).Q[:, :2].contiguous(), src * 2.0),
}


@pytest.mark.parametrize("name", list(OPS))
def test_restricted_op_equals_the_full_op_then_sliced(name: str) -> None:
    """op.restrict(rows, positions) on the restricted value == op on the whole value, then cut."""
    gen = torch.Generator().manual_seed(0)
    b, p, d = 5, 7, 6
    value = torch.randn(b, p, d, generator=gen, dtype=torch.float64)
    src = torch.randn(b, p, d, generator=gen, dtype=torch.float64)
    op = OPS[name](src)
    full = op.apply(value, value, _full_selection(b, p))  # type: ignore[attr-defined]
    # a batch statistic and a per-row random draw depend on which rows run together: restrict positions only
    rows = torch.arange(b) if name in ("ablate_mean_batch", "ablate_resample") else torch.tensor([4, 1, 2])
    positions = slice(3, 6)
    part = value[rows][:, positions]
    restricted = op.restrict(rows, positions)  # type: ignore[attr-defined]
    out = restricted.apply(part, part, _full_selection(rows.numel(), 3))
    torch.testing.assert_close(out, full[rows][:, positions], atol=1e-12, rtol=0)  # float64: summation order


@pytest.mark.parametrize("policy", ["prompt", "generated"])
def test_prompt_and_generated_positions_under_left_padding(policy: str) -> None:
    """ "prompt" touches no generated position and "generated" no prompt position: zeroing the cached site itself
    under left-padded greedy generation leaves exactly the chosen cells at 0."""
    model = tiny_model("llama")
    gen = torch.Generator().manual_seed(8)
    rows = [torch.randint(1, 64, (n,), generator=gen).tolist() for n in (5, 3)]
    ids, mask = _padded(rows, left=True)
    width, new = ids.shape[1], 3
    zeroed = [Intervention("L0.resid_post", Scale(0.0), positions=policy)]
    with torch.no_grad(), model.session(zeroed, cache=["L0.resid_post"]) as session:
        model.hf.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0
        )
    cached = session.cache["L0.resid_post"]  # (2, width + new - 1, d): the last generated token is never fed back
    assert cached.shape[1] == width + new - 1
    is_zero = (cached == 0).all(dim=-1)  # (2, columns)
    for i, r in enumerate(rows):
        real = slice(width - len(r), None)  # padding columns are the pad token's own activations: not checked
        prompt = torch.zeros(cached.shape[1], dtype=torch.bool)
        prompt[width - len(r) : width] = True
        generated = torch.zeros_like(prompt)
        generated[width:] = True
        assert torch.equal(is_zero[i, real], (prompt if policy == "prompt" else generated)[real])
