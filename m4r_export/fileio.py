"""Atomic file writes and checksums.

Every artifact m4r writes (checkpoints, ONNX files, manifests, engines, reports) goes through
:func:`atomic_write`: the bytes land in a temporary file in the target directory and are renamed
over the target only when complete, so a crash or error never leaves a half-written file that
looks valid.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from .errors import UsageError


def ensure_writable_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` (and parents) and check we can write there; raise a clear error if not."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(
            f"cannot create output directory {p}: {exc.strerror}; choose a writable path"
        ) from exc
    if not os.access(p, os.W_OK):
        raise UsageError(
            f"output directory {p} is not writable; choose a writable path or fix its permissions"
        )
    return p


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path``; rename it onto ``path`` only if the block succeeds."""
    target = Path(path)
    ensure_writable_dir(target.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_write(path, "wb") as fh:
        fh.write(data)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    with atomic_write(path, "w") as fh:
        fh.write(text)


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
