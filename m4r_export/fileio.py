"""Atomic file writes, atomic directory publication, and checksums.

Every file m4r writes (checkpoints, ONNX files, manifests, engines, reports) goes through
:func:`atomic_write`: the bytes land in a temporary file in the target directory and are renamed
over the target only when complete, so a crash or error never leaves a half-written file that
looks valid. Written files get the mode a plain ``open()`` would give them (``0666 & ~umask``),
not ``mkstemp``'s 0600, so a server running as another user can read a model.

A set of files that only makes sense together (an export directory) goes through
:func:`publish_directory`: staged in a fresh sibling directory, then swapped in with one rename,
so a reader sees the old set or the new set, never a mix.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from .errors import M4RError, UsageError


class WriteError(M4RError):
    """Writing a file failed (disk full, quota, read-only file system, I/O error): exit code 1."""


def os_error_in(exc: BaseException) -> OSError | None:
    """The OSError ``exc`` is or was raised from (torch.save turns a failed write into RuntimeError)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, OSError):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


def write_error(path: str | os.PathLike[str], exc: OSError) -> WriteError:
    """One line naming the file and the cause (e.g. ``No space left on device (ENOSPC)``)."""
    code = errno.errorcode.get(exc.errno or 0)
    cause = (exc.strerror or str(exc)) + (f" ({code})" if code else "")
    hint = {
        errno.ENOSPC: "free some space there or choose another location",
        errno.EDQUOT: "free some space there or choose another location",
        errno.EFBIG: "a file-size limit (ulimit -f) or the file system refuses it; choose another location",
        errno.EROFS: "the file system is read-only; choose another location",
        errno.EACCES: "choose a writable location or fix its permissions",
        errno.EPERM: "choose a writable location or fix its permissions",
    }.get(exc.errno or 0, "check the disk and choose another location if it persists")
    return WriteError(
        f"cannot write {os.fspath(path)}: {cause}; {hint} (any previous file there is unchanged)"
    )


def raise_write_error(path: str | os.PathLike[str], exc: BaseException) -> None:
    """Re-raise ``exc`` as a :class:`WriteError` when an OSError caused it; else re-raise it as is."""
    os_exc = os_error_in(exc)
    if os_exc is None or isinstance(exc, M4RError):
        raise exc
    raise write_error(path, os_exc) from exc


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
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise write_error(target, exc) from exc
    try:
        os.fchmod(fd, default_file_mode())
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, Exception):  # not KeyboardInterrupt: that one keeps its traceback
            raise_write_error(target, exc)
        raise


def default_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: ``0o666`` minus the process umask."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


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


# ------------------------------------------------------------------------------- whole directories

#: sibling directories that belong to :func:`publish_directory` (``.<name>.<tag>.<pid>.<random>``)
_STAGING_TAG, _RETIRED_TAG = "m4r-staging", "m4r-retired"


def _rename_exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a))


def _remove_stale_siblings(parent: Path, name: str) -> None:
    """Remove staging/retired siblings of ``name`` left by a killed process (their pid is gone)."""
    for entry in parent.iterdir():
        parts = entry.name.split(".")
        # "", name parts..., tag, pid, random
        if (
            not entry.name.startswith(f".{name}.")
            or len(parts) < 5
            or parts[-3] not in (_STAGING_TAG, _RETIRED_TAG)
        ):
            continue
        try:
            os.kill(int(parts[-2]), 0)
            alive = True
        except (ValueError, ProcessLookupError):
            alive = False
        except PermissionError:  # another user's live process
            alive = True
        if not alive:
            shutil.rmtree(entry, ignore_errors=True)


def _stage_files(staging: Path, files: Mapping[str, bytes | Path], mode: int, out: Path) -> None:
    """Write ``files`` into a new ``staging`` directory; a failed write names the file and the cause.

    A :class:`~pathlib.Path` value is a finished file on the same file system: fsynced and renamed
    into place, never read into memory."""
    name = ""
    try:
        os.mkdir(staging)  # 0777 & ~umask, like any directory the user creates
        for name, data in files.items():
            if isinstance(data, Path):
                fd = os.open(data, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.chmod(data, mode)
                os.rename(data, staging / name)
                continue
            fd = os.open(staging / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
    except OSError as exc:
        where = f"{out / name} (staged in {staging})" if name else str(staging)
        raise write_error(where, exc) from exc


@contextlib.contextmanager
def _exclusive_lock(directory: Path) -> Iterator[None]:
    """flock on ``directory`` itself (no lock file is left behind)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def publish_directory(
    out_dir: str | os.PathLike[str],
    files: Mapping[str, bytes | Path],
    *,
    replaceable: Callable[[Path], bool] | None = None,
) -> Path:
    """Make ``out_dir`` hold exactly ``files`` (name -> bytes, or a file to move in), all at once.

    A :class:`~pathlib.Path` value is a finished file on the same file system (e.g. ONNX external
    data written in a temporary directory beside ``out_dir``): it is fsynced and renamed into place,
    never read into memory.

    The files are written (and fsynced) into a fresh sibling directory, which then replaces
    ``out_dir`` with one rename under an exclusive lock on the parent: a reader sees the old set
    or the new set, never a mix, and files of a previous set that are not in ``files`` are gone.
    Where the kernel offers ``renameat2(RENAME_EXCHANGE)`` the swap is a single atomic step;
    elsewhere the old directory is renamed aside first (for that instant the path is absent, never
    mixed). Temporaries are removed on every exit path; those of a killed process are removed by
    the next publication.

    ``replaceable(existing_dir)`` says whether an existing non-empty ``out_dir`` may be replaced
    (callers refuse to delete files they did not write); the default refuses any non-empty one.
    """
    out = Path(out_dir)
    if out.is_symlink():  # replace what the link points to; the link keeps pointing there
        out = out.resolve()
    for name in files:
        if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
            raise ValueError(f"publish_directory: {name!r} is not a plain file name")
    parent = ensure_writable_dir(out.absolute().parent)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a directory; choose a directory path")
    stem = f".{out.name}"
    staging = parent / f"{stem}.{_STAGING_TAG}.{os.getpid()}.{secrets.token_hex(4)}"
    retired = parent / f"{stem}.{_RETIRED_TAG}.{os.getpid()}.{secrets.token_hex(4)}"
    mode = default_file_mode()
    try:
        _stage_files(staging, files, mode, out)
        with _exclusive_lock(parent):
            _remove_stale_siblings(parent, out.name)
            may_replace = replaceable or (lambda _d: False)
            if out.is_dir() and any(out.iterdir()) and not may_replace(out):
                raise UsageError(
                    f"{out} holds files that m4r did not write; choose an empty directory or one "
                    "written by `m4r export` (a new export replaces the whole directory)"
                )
            if out.is_dir() and _rename_exchange(staging, out):
                staging, retired = retired, staging  # the old set now sits at the staging path
            else:
                if out.is_dir():
                    os.rename(out, retired)
                os.rename(staging, out)
            dir_fd = os.open(parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    finally:
        for leftover in (staging, retired):
            if leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)
    return out
