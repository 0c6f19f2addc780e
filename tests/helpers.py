"""Builders and references the tests share: tiny random models of every supported family (built from configs,
no downloads), token batches and a padded task, the check that a model is left exactly as it was, the slow
per-receiver reference for edge scores, small `Scores`, and a headless Chromium to load HTML pages in. Test
modules import these from here; conftest.py holds only fixtures."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import cast

import torch
import transformers
from torch import nn

from pathlens import Model
from pathlens.graph import Graph
from pathlens.results import Scores
from pathlens.sites import Site
from pathlens.tasks.base import Task

VOCAB = 64


# ---- tiny models ------------------------------------------------------------------------------------


def _gpt2() -> transformers.PreTrainedModel:
    return transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            n_layer=2, n_head=4, n_embd=32, vocab_size=VOCAB, n_positions=64, bos_token_id=0, eos_token_id=0
        )
    )


def _gpt_neo() -> transformers.PreTrainedModel:
    cfg = transformers.GPTNeoConfig(
        num_layers=2,
        num_heads=4,
        hidden_size=32,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        attention_types=[[["global", "local"], 1]],
        window_size=4,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPTNeoForCausalLM(cfg)


def _neox(parallel: bool) -> Callable[[], transformers.PreTrainedModel]:
    def build() -> transformers.PreTrainedModel:
        cfg = transformers.GPTNeoXConfig(
            num_hidden_layers=2,
            num_attention_heads=4,
            hidden_size=32,
            intermediate_size=64,
            vocab_size=VOCAB,
            use_parallel_residual=parallel,
            rotary_pct=0.5,  # type: ignore[call-arg]  # the legacy name, still accepted as a keyword
            max_position_embeddings=64,
            bos_token_id=0,
            eos_token_id=0,
        )
        return transformers.GPTNeoXForCausalLM(cfg)

    return build


def llama_like(cls_cfg: type, cls_model: type, **overrides: object) -> Callable[[], transformers.PreTrainedModel]:
    """Llama-style configs (Llama, Qwen, Mistral, Gemma, OLMo): 2 layers, 4 heads, 2 KV groups unless overridden."""

    def build() -> transformers.PreTrainedModel:
        settings: dict[str, object] = {
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "vocab_size": VOCAB,
            "max_position_embeddings": 64,
            "bos_token_id": 0,
            "eos_token_id": 0,
            "pad_token_id": 0,
        }
        return cls_model(cls_cfg(**{**settings, **overrides}))

    return build


def _attn_only() -> transformers.PreTrainedModel:
    from pathlens.zoo.attn_only import AttnOnlyConfig, AttnOnlyForCausalLM

    return AttnOnlyForCausalLM(
        AttnOnlyConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64
        )
    )


FAMILIES: dict[str, Callable[[], transformers.PreTrainedModel]] = {
    "gpt2": _gpt2,
    "gpt_neo": _gpt_neo,
    "neox_parallel": _neox(True),
    "neox_sequential": _neox(False),
    "llama": llama_like(transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "qwen2": llama_like(transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "mistral": llama_like(transformers.MistralConfig, transformers.MistralForCausalLM, sliding_window=4),
    "gemma3": llama_like(
        transformers.Gemma3TextConfig,
        transformers.Gemma3ForCausalLM,
        num_key_value_heads=1,
        head_dim=8,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
    ),
    "gemma2": llama_like(
        transformers.Gemma2Config,
        transformers.Gemma2ForCausalLM,
        head_dim=8,
        sliding_window=4,
        attn_logit_softcapping=5.0,
        final_logit_softcapping=3.0,
    ),
    "qwen3": llama_like(transformers.Qwen3Config, transformers.Qwen3ForCausalLM, head_dim=8),
    "olmo_generic": llama_like(transformers.OlmoConfig, transformers.OlmoForCausalLM),
    "attn_only": _attn_only,
}


def tiny_model(family: str, seed: int = 0, weight_scale: float = 1.0) -> Model:
    """A tiny random model of `family`, with non-zero biases and norm weights so identities are not trivial.

    weight_scale multiplies every matrix, so that patching effects are large (random init gives tiny ones).
    """
    torch.manual_seed(seed)
    hf = FAMILIES[family]()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln" in name.split(".")[-2:][0]:
                p.add_(0.1 * torch.randn_like(p))
            elif p.ndim == 2:
                p.mul_(weight_scale)
    return Model(hf, name=f"tiny-{family}")


# ---- inputs -----------------------------------------------------------------------------------------


def token_batch(n: int = 3, p: int = 9, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (n, p), generator=g)


def padded_task(n: int = 3, p: int = 9) -> Task:
    """Prompt pairs of different lengths (right-padded), answers scored at each row's last real token."""
    clean, corrupt = token_batch(n=n, p=p), token_batch(n=n, p=p, seed=7)
    lengths = torch.tensor([p, p - 2, p - 1][:n])
    mask = (torch.arange(p)[None, :] < lengths[:, None]).long()
    clean, corrupt = clean * mask, corrupt * mask
    return Task("padded", clean, corrupt, torch.arange(n) + 1, torch.arange(n) + 5, lengths - 1, mask)


# ---- the model is left as it was --------------------------------------------------------------------


def snapshot(model: Model) -> dict[str, object]:
    return {
        "params": {n: p.detach().clone() for n, p in model.hf.named_parameters()},
        "buffers": {n: b.detach().clone() for n, b in model.hf.named_buffers()},
        "attn": model.hf.config._attn_implementation,  # type: ignore[union-attr]
        "training": model.hf.training,
    }


def assert_untouched(model: Model, before: dict[str, object]) -> None:
    for name, module in model.hf.named_modules():
        assert not module._forward_hooks, f"forward hook left on {name}"
        assert not module._forward_pre_hooks, f"forward pre-hook left on {name}"
        assert not module._backward_hooks, f"backward hook left on {name}"
    params = dict(model.hf.named_parameters())
    for name, value in before["params"].items():  # type: ignore[attr-defined]
        assert torch.equal(params[name], value), f"parameter {name} changed"
    buffers = dict(model.hf.named_buffers())
    for name, value in before["buffers"].items():  # type: ignore[attr-defined]
        assert torch.equal(buffers[name], value), f"buffer {name} changed"
    assert model.hf.config._attn_implementation == before["attn"]  # type: ignore[union-attr]
    assert model.hf.training == before["training"]


# ---- slow reference for edge scores -----------------------------------------------------------------


def _moved_input_hook(
    make_delta: Callable[[torch.Tensor], torch.Tensor], columns: torch.Tensor, eps: torch.Tensor, norm: nn.Module
) -> Callable[..., torch.Tensor | None]:
    """Forward hook on a projection: its output at `columns` is recomputed from norm(x + ε·Δ) (x = the
    norm's input, recorded by `_record_input`); the other columns keep reading norm(x)."""

    inside: list[bool] = []

    def hook(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor | None:
        if inside:  # the recomputation below calls the module again
            return None
        x = cast(torch.Tensor, norm.recorded)
        inside.append(True)
        try:
            moved = module(norm(x + eps * make_delta(x)))
        finally:
            inside.clear()
        mask = torch.zeros(output.shape[-1], dtype=torch.bool)
        mask[columns] = True
        return torch.where(mask, moved, output)

    return hook


def _record_input(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
    module.recorded = args[0]


def reference_column(
    model: Model,
    task: Task,
    graph: Graph,
    receiver: str,
    proj: str,
    norm: str,
    columns: list[int],
    eps_value: float | None = None,
) -> torch.Tensor:
    """Slow reference: for each sender u, d m / d ε with receiver's projection columns reading x + ε Δz_u —
    or, with `eps_value`, the finite change m(ε) − m(0) (exact patching of the edge when ε = 1)."""
    deltas = _deltas(model, task, graph)
    with torch.no_grad():
        clean_logits = model.hf(input_ids=task.clean_ids, attention_mask=task.attention_mask).logits
        clean_value = task.metric(clean_logits, task).mean()
    out = []
    norm_module = model.hf.get_submodule(norm)
    proj_module = model.hf.get_submodule(proj)
    for s in range(len(graph.senders)):
        if torch.isnan(graph.scores[s, graph.receivers.index(receiver)]):
            out.append(float("nan"))
            continue
        eps = torch.zeros((), requires_grad=True) if eps_value is None else torch.tensor(eps_value)
        record = norm_module.register_forward_pre_hook(_record_input)
        handle = proj_module.register_forward_hook(
            _moved_input_hook(lambda x, s=s: deltas[:, :, s], torch.tensor(columns), eps, norm_module)  # type: ignore[misc]
        )
        try:
            with torch.enable_grad():
                logits = model.hf(input_ids=task.clean_ids, attention_mask=task.attention_mask).logits
                value = task.metric(logits, task).mean()
                if eps_value is None:
                    (grad,) = torch.autograd.grad(value, eps)
                else:
                    grad = value - clean_value
        finally:
            handle.remove()
            record.remove()
            del norm_module.recorded
        out.append(float(grad))
    return torch.tensor(out, dtype=torch.float64)


def _deltas(model: Model, task: Task, graph: Graph) -> torch.Tensor:
    """Δz per sender (N, P, S, d) from cached runs, computed independently of the engine (head = z_h W_O[h])."""
    a = model.arch
    fams = [Site("resid_pre", 0)] + [Site("head", layer) for layer in range(a.n_layers)]
    fams += [Site("mlp_out", layer) for layer in range(a.n_layers)] if a.mlp else []
    corrupt = model.run(task.corrupt_ids, attention_mask=task.attention_mask, cache=fams).cache
    clean = model.run(task.clean_ids, attention_mask=task.attention_mask, cache=fams).cache
    parts = []
    for name in graph.senders:
        if name == "input":
            parts.append(corrupt["L0.resid_pre"] - clean["L0.resid_pre"])
        elif name.endswith(".mlp"):
            layer = int(name[1:].split(".")[0])
            parts.append(corrupt[Site("mlp_out", layer)] - clean[Site("mlp_out", layer)])
        else:
            layer, head = (int(x) for x in name[1:].split(".H"))
            parts.append((corrupt[Site("head", layer)] - clean[Site("head", layer)])[:, :, head])
    return torch.stack(parts, dim=2)


RECEIVERS = {
    # family: (receiver, projection module, its input norm, the projection's output columns for that input)
    "gpt2": [
        ("L1.H2.q", "transformer.h.1.attn.c_attn", "transformer.h.1.ln_1", list(range(16, 24))),
        ("L1.H1.k", "transformer.h.1.attn.c_attn", "transformer.h.1.ln_1", list(range(40, 48))),
        ("L1.H3.v", "transformer.h.1.attn.c_attn", "transformer.h.1.ln_1", list(range(88, 96))),
        ("L1.mlp", "transformer.h.1.mlp.c_fc", "transformer.h.1.ln_2", list(range(128))),
    ],
    "llama": [
        ("L1.H3.q", "model.layers.1.self_attn.q_proj", "model.layers.1.input_layernorm", list(range(24, 32))),
        ("L1.G1.k", "model.layers.1.self_attn.k_proj", "model.layers.1.input_layernorm", list(range(8, 16))),
        ("L1.G0.v", "model.layers.1.self_attn.v_proj", "model.layers.1.input_layernorm", list(range(0, 8))),
    ],
    "neox_sequential": [
        (
            "L1.H1.q",
            "gpt_neox.layers.1.attention.query_key_value",
            "gpt_neox.layers.1.input_layernorm",
            list(range(24, 32)),
        ),
        (
            "L1.H2.k",
            "gpt_neox.layers.1.attention.query_key_value",
            "gpt_neox.layers.1.input_layernorm",
            list(range(56, 64)),
        ),
        (
            "L1.H0.v",
            "gpt_neox.layers.1.attention.query_key_value",
            "gpt_neox.layers.1.input_layernorm",
            list(range(16, 24)),
        ),
    ],
}


# ---- results ----------------------------------------------------------------------------------------

SCORES_2X3 = [[0.5, -3.0, 1.0], [2.0, -0.1, -2.5]]
"""Values of a small ("layer", "head") result: distinct magnitudes, both signs."""


def make_scores(values: list | torch.Tensor, dims: tuple[str, ...] = ("layer", "head"), **kwargs) -> Scores:
    """A Scores over `values` with integer coords 0..n-1 on every dim."""
    values = torch.as_tensor(values, dtype=torch.float32)
    coords = {d: list(range(n)) for d, n in zip(dims, values.shape, strict=True)}
    kwargs.setdefault("metric", "logit_diff")
    kwargs.setdefault("method", "patch:denoise")
    kwargs.setdefault("meta", {})
    return Scores(values=values, dims=dims, coords=coords, **kwargs)


BROWSERS = ("chromium-headless-shell", "headless_shell", "chromium", "chromium-browser", "google-chrome")


def headless_chromium() -> tuple[str | None, str]:
    """A headless Chromium executable (PATH first, then playwright's browser), or None and why not."""
    for name in BROWSERS:
        if found := shutil.which(name):
            return found, ""
    why = f"no headless Chromium: none of {', '.join(BROWSERS)} is on PATH (make install installs Debian's "
    why += "chromium-headless-shell when it can)"
    if importlib.util.find_spec("playwright") is None:
        return None, why + " and the playwright package is not installed"
    from playwright.sync_api import sync_playwright  # type: ignore[import-not-found]  # optional

    with sync_playwright() as playwright:
        executable = playwright.chromium.executable_path
    if os.path.isfile(executable):
        return executable, ""
    return None, why + f" and playwright's browser is not installed at {executable}"


def load_in_chromium(browser: str, page: Path | str, profile: Path) -> subprocess.CompletedProcess[str]:
    """Load `page` (a path, or a URL such as a file URI with a query) headless and dump its DOM after its
    scripts ran; console messages go to stderr as `...:CONSOLE...` lines."""
    args = ["--headless", "--disable-gpu", "--no-sandbox", "--enable-logging=stderr", "--v=0", "--no-first-run"]
    url = page if isinstance(page, str) else page.as_uri()
    command = [browser, *args, f"--user-data-dir={profile}", "--dump-dom", url]
    return subprocess.run(command, capture_output=True, text=True, timeout=90, check=True)
