"""Open user-supplied input files safely: regular files only, bounded reads.

A path a user passes (a checkpoint, an interaction file) may name a FIFO (reading blocks forever),
a device (``/dev/zero`` never ends), a directory, or a symlink to one of these. :func:`open_regular`
opens without blocking, checks what the *opened* descriptor is (no window between a check and the
open), and refuses anything but a regular file with a one-line :class:`UsageError`.
:func:`read_line` and :func:`line_blocks` read text line by line with a cap on the line length, so
a file without newlines (a sparse file of zeros) is refused after the cap instead of being read
whole into memory.
"""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from .errors import UsageError

_KINDS = (
    (stat.S_ISDIR, "is a directory"),
    (stat.S_ISFIFO, "is a FIFO (named pipe)"),
    (stat.S_ISCHR, "is a character device"),
    (stat.S_ISBLK, "is a block device"),
    (stat.S_ISSOCK, "is a socket"),
)


def describe_mode(mode: int) -> str | None:
    """What a file of ``mode`` is when it is not a regular file (None when it is one)."""
    if stat.S_ISREG(mode):
        return None
    return next((text for test, text in _KINDS if test(mode)), "is not a regular file")


def open_regular(path: str | os.PathLike[str], what: str, fix: str) -> io.BufferedReader:
    """Open ``path`` for binary reading if it is a regular file, else raise ``UsageError``.

    The message reads ``{what} {path} {problem}; {fix}``. The open uses ``O_NONBLOCK`` (a FIFO
    without a writer would block a plain open) and the check is made on the opened descriptor.
    """
    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise UsageError(f"{what} {p} does not exist; {fix}") from None
    except IsADirectoryError:
        raise UsageError(f"{what} {p} is a directory; {fix}") from None
    except OSError as exc:
        raise UsageError(f"{what} {p} cannot be read ({exc.strerror}); {fix}") from None
    try:
        problem = describe_mode(os.fstat(fd).st_mode)
        if problem is not None:
            raise UsageError(f"{what} {p} {problem}; {fix}")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def line_too_long(path: Path, lineno: int, limit: int) -> UsageError:
    return UsageError(
        f"{path}, line {lineno}: longer than {limit:,} bytes without a line break; this is not a "
        "text interaction file (a binary, sparse or truncated file?). Pass the right file"
    )


def read_line(fh: io.BufferedReader, limit: int, path: Path, lineno: int = 1) -> bytes:
    """One line (with its ``\\n``, if any) of at most ``limit`` bytes before the ``\\n``; longer: refused."""
    line = fh.readline(limit + 1)
    if len(line) > limit and not line.endswith(b"\n"):
        raise line_too_long(path, lineno, limit)
    return line


def line_blocks(
    fh: io.BufferedReader, path: Path, max_line: int, first_lineno: int = 1
) -> Iterator[tuple[int, bytes]]:
    """``(number of the block's first line, block)``: the rest of ``fh`` in blocks of whole lines.

    Reads ``max_line`` bytes at a time; a block ends with ``\\n`` (except the file's last one), so
    memory stays at about two reads whatever the file's size. A line longer than ``max_line`` bytes
    is refused: only a block's first line (which joins the previous read's tail) can exceed a read,
    and the tail itself is checked before it grows.
    """
    lineno = first_lineno
    carry = b""  # the tail of the last read: never holds a line break, at most max_line bytes
    while True:
        chunk = fh.read(max_line)
        if not chunk:
            break
        data = carry + chunk
        first = data.find(b"\n")
        if first == -1 and len(data) <= max_line:
            carry = data
            continue
        if first == -1 or first > max_line:
            raise line_too_long(path, lineno, max_line)
        cut = data.rfind(b"\n") + 1
        done, carry = data[:cut], data[cut:]
        yield lineno, done
        lineno += done.count(b"\n")
    if carry:
        yield lineno, carry
