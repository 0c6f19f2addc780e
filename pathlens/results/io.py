"""Atomic file IO: every file pathlens writes, and the safetensors + JSON pairs that results are saved as.

A file is written whole or not at all: the bytes go to a hidden temporary file in the target's folder, are
flushed and fsynced, the temporary file is renamed over the target with `os.replace` (atomic on one
filesystem), and the folder is fsynced so the rename itself survives a crash. A reader therefore sees the old
file or the new one, never a mixture, and a write that fails part way leaves the old file as it was and no
temporary file behind. Files get the permissions the user's umask gives (not `tempfile.mkstemp`'s 0600), like
any other file the user writes.

A result is saved as a pair: `<name>.safetensors` holds only tensors and `<name>.json` the labels and
provenance, with a SHA-256 of the tensor file (so a pair mixed from two saves is detected) and a SHA-256 of the
header itself (so relabelled coordinates or an edited metadata field are detected, not trusted). Nothing is
pickled, so loading never runs code.

A long computation saves its progress with `AppendLog`: each finished piece is appended as one framed,
CRC-checked record, which costs one small write instead of rewriting the whole state.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
import uuid
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import safetensors.torch
from torch import Tensor

from pathlens.errors import PathlensError

__all__ = [
    "FORMAT_VERSION",
    "AppendLog",
    "load_pair",
    "save_pair",
    "write_bytes",
    "write_files",
    "write_safetensors",
    "write_text",
    "writable_folder",
]

FORMAT_VERSION = 2
"""Version of the on-disk layout written by `save_pair` (`Scores.save`, `Graph.save`); bumped when the JSON
layout changes. 2 adds `header_sha256`; version-1 files (no header checksum) still load."""
_HEADER_CHECKSUM_SINCE = 2


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


def writable_folder(path: str | os.PathLike[str], label: str) -> Path:
    """Create the folder `path` if missing and check that files can be written in it; returns it as a Path.

    Meant to run before any long computation, so a bad output folder fails at once. Errors name the folder as
    `label` (e.g. "out=") and say what blocks it: a file in its place or above it, or a write that the system
    refuses (permissions, a read-only filesystem), found by creating and removing a probe file."""
    folder = Path(os.fspath(path)).expanduser()
    blocking = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        where = "is a file" if blocking == folder else f"is under {blocking}, which is a file"
        raise PathlensError(f"{label}{folder} {where}, not a folder; pass a folder path.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _write_temp(folder / "probe", b"").unlink()
    except OSError as err:
        raise PathlensError(
            f"{label}{folder} cannot be written ({err.strerror or err}); pass a folder you can write to."
        ) from err
    return folder


def save_pair(
    path: str | os.PathLike[str], format_name: str, tensors: dict[str, Tensor], header: dict[str, Any]
) -> None:
    """Write `tensors` to `<path>.safetensors` and `header` (+ format, version, checksums) to `<path>.json`.

    `path` may end in ".safetensors" or ".json" or have neither; missing parent folders are created. Both
    files are written with `write_files`. The JSON is indented, UTF-8 (not ASCII-escaped), with a final newline.
    `header_sha256` is the SHA-256 of the header's canonical JSON without that field (see `_header_digest`).
    """
    tensor_path, json_path = _file_pair(path)
    tensor_bytes = safetensors.torch.save(tensors)
    full = {
        "format": format_name,
        "format_version": FORMAT_VERSION,
        **header,
        "values_sha256": hashlib.sha256(tensor_bytes).hexdigest(),
    }
    full["header_sha256"] = _header_digest(json.loads(json.dumps(full)))
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
    if version >= _HEADER_CHECKSUM_SINCE and header.get("header_sha256") != _header_digest(header):
        raise PathlensError(
            f"{owner}: {json_path} was modified after it was saved (its labels or metadata no longer match the "
            "checksum written with them); save the result again rather than editing the file."
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


class AppendLog:
    """An append-only file of framed records: `append(payload)` costs one small write, not a rewrite.

    Layout: the line `pathlens-log 1`, then per record its payload length (8 bytes, little-endian), the CRC-32 of
    length and payload (4 bytes) and the payload. A record is one `write` call; the file is fsynced at most every
    `sync_seconds` and on `close`. So a killed process loses no appended record (the operating system holds it),
    and a machine crash loses at most the last `sync_seconds` of records: `read` drops a torn or garbled last
    record (the one an interrupted write leaves), and raises on damage anywhere before it.
    """

    MAGIC = b"pathlens-log 1\n"
    _FRAME = struct.Struct("<QI")

    def __init__(self, path: Path, sync_seconds: float = 5.0) -> None:
        """Open the log at `path` (made with `create`) for appending."""
        self.path = path
        self.sync_seconds = sync_seconds
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        self._synced_at = time.monotonic()

    @classmethod
    def create(cls, path: Path, sync_seconds: float = 5.0) -> AppendLog:
        """Write an empty log at `path` atomically (replacing any file there) and open it for appending."""
        write_bytes(path, cls.MAGIC)
        return cls(path, sync_seconds)

    def append(self, payload: bytes) -> None:
        os.write(self._fd, self._FRAME.pack(len(payload), _crc(payload)) + payload)
        if time.monotonic() - self._synced_at >= self.sync_seconds:
            os.fsync(self._fd)
            self._synced_at = time.monotonic()

    def close(self) -> None:
        """fsync and close (idempotent)."""
        if self._fd >= 0:
            try:
                os.fsync(self._fd)
            finally:
                os.close(self._fd)
                self._fd = -1

    def __enter__(self) -> AppendLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @classmethod
    def read(cls, path: Path) -> list[bytes]:
        """The payloads of the log at `path`, in order. Raises `ValueError` saying what is damaged where."""
        data = path.read_bytes()
        if not data.startswith(cls.MAGIC):
            raise ValueError("it is not a pathlens progress log (its first line differs)")
        records: list[bytes] = []
        at = len(cls.MAGIC)
        while at < len(data):
            end = at + cls._FRAME.size
            length, crc = cls._FRAME.unpack(data[at:end]) if end <= len(data) else (0, None)
            payload = data[end : end + length]
            if crc is None or len(payload) < length or _crc(payload) != crc:
                if end + length >= len(data):
                    break  # the last record, torn by an interrupted write: its work is redone
                raise ValueError(f"record {len(records)} (at byte {at}) is damaged")
            records.append(payload)
            at = end + length
        return records


def _crc(payload: bytes) -> int:
    """CRC-32 of a record's length and payload (so a zero-filled frame, as a crash may leave, never checks)."""
    return zlib.crc32(payload, zlib.crc32(len(payload).to_bytes(8, "little")))


def _header_digest(header: Mapping[str, Any]) -> str:
    """SHA-256 of `header` without its `header_sha256` field, as canonical JSON (sorted keys, no spaces, UTF-8).

    Computed on the header as JSON reads it back, so the value written and the value checked on load agree."""
    body = {key: value for key, value in header.items() if key != "header_sha256"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


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
