"""Small file utilities: atomic writes, hashing, JSON read with typed errors, weight fingerprints."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ArtifactError, CorruptArtifactError

__all__ = [
    "ensure_writable_dir",
    "ensure_writable_file",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_json",
    "read_json",
    "sha256_file",
    "weights_fingerprint",
]


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it over ``path``.

    A reader never sees a half-written file: it sees the old one or the new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda p: p.write_bytes(data))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    text = json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n"
    atomic_write_bytes(path, text.encode())


def read_json(path: str | os.PathLike, what: str) -> Any:
    """Read a JSON file, turning absence and syntax errors into typed errors naming ``what``."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptArtifactError(f"{what} {path} is not valid JSON: {e}") from e


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def weights_fingerprint(state: Mapping[str, np.ndarray]) -> str:
    """sha256 over a classifier's weights, independent of how the file serialized them.

    Hashes, in sorted name order, each tensor's name, dtype, shape and little-endian bytes. Training
    (torch tensors converted to numpy) and export compute the same value from the same weights.
    """
    h = hashlib.sha256()
    for name in sorted(state):
        a = np.ascontiguousarray(state[name])
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        h.update(name.encode())
        h.update(str(a.dtype).encode())
        h.update(repr(tuple(a.shape)).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def ensure_writable_file(path: str | os.PathLike, what: str) -> Path:
    """Check, before work starts, that file ``path`` can be (re)written: nothing but a regular file may
    be there, and its folder (or the nearest existing ancestor) must take a file. Creates nothing."""
    path = Path(path)
    if (path.exists() or path.is_symlink()) and (path.is_symlink() or not path.is_file()):
        raise ArtifactError(f"{what} {path} exists and is not a regular file")
    ensure_writable_dir(path.parent, f"{what}'s folder")
    return path


def ensure_writable_dir(path: str | os.PathLike, what: str) -> Path:
    """Check, before long work starts, that folder ``path`` can be written: it, or the nearest ancestor
    that exists (it will be created there), must be a folder that takes a file. Creates nothing.
    Anything else is an :class:`ArtifactError`."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ArtifactError(f"{what} {path} exists and is not a folder")
    probe_dir = path
    while not probe_dir.exists():
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise ArtifactError(f"cannot write {what} {path}: {probe_dir} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".forgetrt-write-check.", dir=probe_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ArtifactError(f"cannot write {what} {path}: {e.strerror or e}") from None
    return path
