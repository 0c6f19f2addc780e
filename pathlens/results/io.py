"""Atomic file IO: every file pathlens writes, and the safetensors + JSON pairs that results are saved as.

A file is written whole or not at all: the bytes go to a hidden temporary file in the target's folder, are
flushed and fsynced, the temporary file is renamed over the target with `os.replace` (atomic on one
filesystem), and the folder is fsynced so the rename itself survives a crash. A reader therefore sees the old
file or the new one, never a mixture, and a write that fails part way leaves the old file as it was and no
temporary file behind. Files get the permissions the user's umask gives (not `tempfile.mkstemp`'s 0600), like
any other file the user writes.

A result is saved as a pair: `<name>.safetensors` holds only tensors and `<name>.json` the labels and
provenance, with a SHA-256 of the tensor file so a pair mixed from two saves is detected. Nothing is pickled, so
loading never runs code.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import safetensors.torch
from torch import Tensor

from pathlens.errors import PathlensError

__all__ = [
    "FORMAT_VERSION",
    "load_pair",
    "save_pair",
    "write_bytes",
    "write_files",
    "write_safetensors",
    "write_text",
]

FORMAT_VERSION = 1
"""Version of the on-disk layout written by `save_pair` (`Scores.save`, `Graph.save`); bumped when the JSON
layout changes."""


def write_files(files: Mapping[Path, bytes]) -> None:
    """Write each `{path: data}` atomically, creating missing parent folders.

    Every file is first written and fsynced under a temporary name; only then are they moved into place, so
    when writing any of them fails none of the targets has changed. (Between the moves a reader may see some
    files new and some old; `load_pair` detects such a pair by its checksum.)
    """
    pending: dict[Path, Path] = {}
    try:
        for target, data in files.items():
            target.parent.mkdir(parents=True, exist_ok=True)
            pending[target] = _write_temp(target, data)
        for target in list(pending):
            os.replace(pending.pop(target), target)
    finally:
        for tmp in pending.values():
            tmp.unlink(missing_ok=True)
    for folder in {target.parent for target in files}:
        _sync_folder(folder)


def write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write `data` to `path` atomically; returns the path."""
    target = Path(os.fspath(path))
    write_files({target: data})
    return target


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write `text` to `path` as UTF-8, atomically; returns the path."""
    return write_bytes(path, text.encode("utf-8"))


def write_safetensors(path: str | os.PathLike[str], tensors: Mapping[str, Tensor]) -> Path:
    """Write `tensors` to `path` in the safetensors format (no metadata), atomically; returns the path.

    The bytes are those `safetensors.torch.save_file` writes; they are serialized in memory first, so a tensor
    that cannot be saved raises before any file is touched.
    """
    return write_bytes(path, safetensors.torch.save(dict(tensors)))


def save_pair(
    path: str | os.PathLike[str], format_name: str, tensors: dict[str, Tensor], header: dict[str, Any]
) -> None:
    """Write `tensors` to `<path>.safetensors` and `header` (+ format, version, checksum) to `<path>.json`.

    `path` may end in ".safetensors" or ".json" or have neither; missing parent folders are created. Both
    files are written with `write_files`. The JSON is indented, UTF-8 (not ASCII-escaped), with a final newline.
    """
    tensor_path, json_path = _file_pair(path)
    tensor_bytes = safetensors.torch.save(tensors)
    full = {
        "format": format_name,
        "format_version": FORMAT_VERSION,
        **header,
        "values_sha256": hashlib.sha256(tensor_bytes).hexdigest(),
    }
    json_bytes = (json.dumps(full, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    write_files({tensor_path: tensor_bytes, json_path: json_bytes})


def load_pair(
    path: str | os.PathLike[str], format_name: str, tensor_names: Sequence[str], header_keys: Sequence[str]
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read and check a pair written by `save_pair`: (tensors, header). Errors say what is wrong with which file."""
    owner = f"{format_name.removeprefix('pathlens.')}.load"
    tensor_path, json_path = _file_pair(path)
    for p in (json_path, tensor_path):
        if not p.is_file():
            raise PathlensError(
                f"{owner}: {p} does not exist; save writes both {json_path.name} and {tensor_path.name}, keep "
                "them together."
            )
    try:
        header = json.loads(json_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise PathlensError(f"{owner}: {json_path} is not valid JSON ({exc}).") from exc
    if not isinstance(header, dict) or header.get("format") != format_name:
        raise PathlensError(f"{owner}: {json_path} was not written by {format_name.removeprefix('pathlens.')}.save.")
    missing = [k for k in header_keys if k not in header]
    if missing:
        raise PathlensError(f"{owner}: {json_path} lacks {missing}; it is damaged, save the result again.")
    version = header.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise PathlensError(
            f"{owner}: {json_path} has format version {version!r}, this pathlens reads up to {FORMAT_VERSION}; "
            "upgrade pathlens."
        )
    tensor_bytes = tensor_path.read_bytes()
    if hashlib.sha256(tensor_bytes).hexdigest() != header.get("values_sha256"):
        raise PathlensError(
            f"{owner}: {tensor_path.name} does not match {json_path.name} (they come from different saves, or "
            "one was modified); save the result again."
        )
    tensors = safetensors.torch.load(tensor_bytes)
    if set(tensors) != set(tensor_names):
        raise PathlensError(f"{owner}: {tensor_path} should hold {sorted(tensor_names)}, has {sorted(tensors)}.")
    return tensors, header


def _file_pair(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """The (.safetensors, .json) paths for a save path given with either suffix or none."""
    base = Path(os.fspath(path)).expanduser()
    if base.suffix in (".safetensors", ".json"):
        base = base.with_suffix("")
    if not base.name:
        raise PathlensError(f"Scores: {os.fspath(path)!r} is not a file path.")
    return base.with_name(base.name + ".safetensors"), base.with_name(base.name + ".json")


def _write_temp(target: Path, data: bytes) -> Path:
    """Write `data` to a new hidden file next to `target`, flushed and fsynced; returns its path.

    The file is created with mode 0o666 minus the umask, which `os.replace` keeps for the final file.
    """
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _sync_folder(folder: Path) -> None:
    """fsync `folder`, so that a rename into it is on disk; skipped where a folder cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
