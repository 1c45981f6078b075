"""Readers for interaction files: RecBole atomic ``.inter`` files and MovieLens raw rating files.

Every reader returns :class:`Interactions`: three parallel columns (user token, item token,
timestamp) in file row order. Row order matters: the id mapping follows the order in which tokens
first appear (as RecBole does), so readers never sort or deduplicate.

Supported inputs (detected from the path, see :func:`detect_format`):

* RecBole atomic file ``*.inter`` with a typed header, e.g.
  ``user_id:token<TAB>item_id:token<TAB>rating:float<TAB>timestamp:float``; the columns
  ``user_id``, ``item_id`` and ``timestamp`` are located by name (the part before the colon).
* MovieLens-100K ``u.data``: ``user<TAB>item<TAB>rating<TAB>timestamp``, no header.
* MovieLens-1M (and 10M) ``ratings.dat``: ``UserID::MovieID::Rating::Timestamp``, no header.
* A directory holding exactly one of these (two or more: refused, naming them).

Files are streamed (blocks of whole lines, :func:`m4r_export.safeopen.line_blocks`): memory is one
block plus the parsed columns, whatever the file's size. Only regular files are read (a FIFO, a
device or a symlink to one is refused without blocking); a header line may hold at most
:data:`MAX_HEADER_BYTES` and a data line :data:`MAX_LINE_BYTES` (a sparse or binary file without
line breaks is refused after that many bytes).
"""

from __future__ import annotations

import codecs
import io
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UsageError
from ..safeopen import line_blocks, open_regular, read_line

#: format name -> human description (used in messages and docs)
FORMATS: dict[str, str] = {
    "recbole": "RecBole atomic file (*.inter with a typed header such as user_id:token)",
    "ml-100k": "MovieLens-100K u.data (user<TAB>item<TAB>rating<TAB>timestamp)",
    "ml-1m": "MovieLens-1M ratings.dat (UserID::MovieID::Rating::Timestamp)",
    "csv": "CSV/TSV log with a header row (*.csv, *.tsv; pick columns with --user-col/--item-col/--time-col)",
    "parquet": "Parquet log (*.parquet, *.pq; same column options)",
}

REQUIRED_COLUMNS = ("user_id", "item_id", "timestamp")
RAW_FILENAMES = {"u.data": "ml-100k", "ratings.dat": "ml-1m"}
RAW_SEPARATORS = {"ml-100k": "\t", "ml-1m": "::"}

#: the longest header (first) line read, in bytes: when detecting a format and in a .inter file
MAX_HEADER_BYTES = 64 << 10
#: the longest data line, in bytes; a longer run without a line break is refused
MAX_LINE_BYTES = 1 << 20
_OPEN_FIX = "pass a RecBole .inter file, a MovieLens u.data/ratings.dat file or a directory holding one"


@dataclass
class Interactions:
    """Interaction log in file row order (raw tokens as strings, timestamps as float64)."""

    users: list[str]
    items: list[str]
    timestamps: np.ndarray
    source: str = ""
    #: rows skipped because the user or item token was empty (RecBole drops them as NaN)
    n_skipped: int = 0

    def __len__(self) -> int:
        return len(self.users)


def _supported_list() -> str:
    return "; ".join(FORMATS.values())


def detect_format(path: str | os.PathLike[str]) -> tuple[Path, str]:
    """Return ``(file, format)`` for a file or a directory holding exactly one supported file."""
    p = Path(path)
    if not p.exists():
        raise UsageError(
            f"data path {p} does not exist; pass a RecBole .inter file, a MovieLens u.data/ratings.dat "
            "file or a directory holding one (or run `m4r data download movielens-100k`)"
        )
    if p.is_dir():
        p = _only_candidate(p)
    if p.suffix == ".inter":
        return p, "recbole"
    if p.name in RAW_FILENAMES:
        return p, RAW_FILENAMES[p.name]
    # Not recognised by name: accept a file whose header looks like a RecBole typed header.
    with open_regular(p, "data file", _OPEN_FIX) as fh:
        first = fh.readline(MAX_HEADER_BYTES + 1)
    text = first.decode("utf-8", errors="replace")
    header_names = [f.split(":", 1)[0].strip() for f in text.rstrip("\r\n").split("\t")]
    if len(first) <= MAX_HEADER_BYTES and ":" in text and all(c in header_names for c in REQUIRED_COLUMNS):
        return p, "recbole"
    raise UsageError(
        f"unsupported data file {p}: the format is not recognised from its name or header. "
        f"Supported: {_supported_list()}. Rename the file accordingly or convert it to a RecBole .inter file"
    )


def _only_candidate(directory: Path) -> Path:
    """The one interaction file in ``directory`` (any ``*.inter``, ``u.data``, ``ratings.dat``)."""
    found = sorted(c for c in directory.glob("*.inter") if not c.is_dir())
    found += [
        directory / n for n in RAW_FILENAMES if (directory / n).exists() and not (directory / n).is_dir()
    ]
    if not found:
        raise UsageError(
            f"directory {directory} holds no supported interaction file; expected {directory.name}.inter "
            "(RecBole), u.data (MovieLens-100K) or ratings.dat (MovieLens-1M)"
        )
    if len(found) > 1:
        names = ", ".join(c.name for c in found)
        raise UsageError(
            f"directory {directory} holds several interaction files ({names}); pass the file you mean "
            f"directly, e.g. {found[0]}"
        )
    return found[0]


def _check_encoding(encoding: str, path: Path) -> None:
    """Refuse unknown encodings and those whose line break is not the byte ``\\n`` (UTF-16, ...)."""
    try:
        codecs.lookup(encoding)
        ok = b"a\tb:\r\n".decode(encoding) == "a\tb:\r\n"
    except LookupError:
        raise UsageError(f"unknown text encoding {encoding!r} for {path}") from None
    except UnicodeDecodeError:
        ok = False
    if not ok:
        raise UsageError(
            f"text encoding {encoding!r} for {path} is not supported: m4r streams files line by line and "
            "needs an encoding whose line break is the byte \\n (UTF-8, latin-1, cp1252, ...); convert the "
            "file to UTF-8"
        )


def _decode(raw: bytes, encoding: str, path: Path, first_lineno: int) -> str:
    """``raw`` (whole lines, starting at line ``first_lineno``) decoded strictly.

    A bad byte is an error naming its line and byte, never mojibake.
    """
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as exc:
        line = first_lineno + raw.count(b"\n", 0, exc.start)
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise UsageError(
            f"data file {path}: line {line}, byte {column} (0x{raw[exc.start]:02x}) is not valid "
            f"{encoding}; "
            f"convert the file to UTF-8 (e.g. `iconv -f latin1 -t utf-8 {path.name} > fixed.inter`) or "
            "read it with an explicit encoding (read_interactions(path, encoding=...))"
        ) from None


def _split_lines(text: str) -> list[str]:
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if "\r" in text:
        lines = [ln[:-1] if ln.endswith("\r") else ln for ln in lines]
    return lines


def _line_blocks(
    fh: io.BufferedReader, path: Path, encoding: str, first_lineno: int, strip_bom: bool
) -> Iterator[tuple[int, list[str]]]:
    """``(number of the first line, lines)`` for the rest of ``fh``, decoded, a block at a time."""
    for lineno, raw in line_blocks(fh, path, MAX_LINE_BYTES, first_lineno=first_lineno):
        text = _decode(raw, encoding, path, lineno)
        if strip_bom and text.startswith("\ufeff"):
            text = text[1:]
        strip_bom = False
        yield lineno, _split_lines(text)


def _parse_timestamps(values: list[str], linenos: Sequence[int], path: Path) -> np.ndarray:
    try:
        ts = np.array(values, dtype=np.float64)
    except ValueError:
        ts = None
    if ts is not None:
        bad_idx = np.flatnonzero(~np.isfinite(ts))
        if bad_idx.size == 0:
            return ts
        i = int(bad_idx[0])
        raise UsageError(
            f"{path}, line {linenos[i]}: timestamp {values[i]!r} is not a finite number; "
            "timestamps must be numeric (e.g. Unix seconds); fix or remove that row"
        )
    for i, v in enumerate(values):
        try:
            float(v)
        except ValueError:
            raise UsageError(
                f"{path}, line {linenos[i]}: timestamp {v!r} is not a number; timestamps must be numeric "
                "(e.g. Unix seconds); convert dates to numbers or remove that row"
            ) from None
    raise AssertionError("unreachable")  # pragma: no cover


def _parse_block(
    lines: list[str], first_lineno: int, sep: str, ncols: int, cols: tuple[int, int, int], path: Path
) -> tuple[list[str], list[str], np.ndarray, int]:
    """Split one block of lines on ``sep``; keep columns ``cols`` = (user, item, timestamp).

    Returns users, items, timestamps and the number of rows dropped for an empty token. Column-wise
    for speed: one join + split over the block instead of a list per row (about 1 s for MovieLens-1M
    instead of several), after checking every row has exactly ``ncols`` fields. Blank lines are skipped.
    """
    ui, ii, ti = cols
    body = lines
    linenos: list[int] | range
    if any(not ln or ln.isspace() for ln in body):
        keep_rows = [k for k, ln in enumerate(body) if ln and not ln.isspace()]
        body = [body[k] for k in keep_rows]
        linenos = [first_lineno + k for k in keep_rows]
    else:
        linenos = range(first_lineno, first_lineno + len(body))
    if not body:
        return [], [], np.zeros(0), 0
    want = ncols - 1
    counts = [ln.count(sep) for ln in body]
    if any(c != want for c in counts):
        k = next(k for k, c in enumerate(counts) if c != want)
        raise UsageError(
            f"{path}, line {linenos[k]}: expected {ncols} fields separated by {sep!r}, "
            f"found {counts[k] + 1}; fix or remove that row"
        )
    del counts
    flat = sep.join(body).split(sep)
    del body
    users = flat[ui::ncols]
    items = flat[ii::ncols]
    ts_raw = flat[ti::ncols]
    del flat
    timestamps = _parse_timestamps(ts_raw, linenos, path)
    # RecBole (pandas) reads empty tokens as NaN and drops those rows; do the same, counting them.
    if "" in users or "" in items:
        keep = [k for k in range(len(users)) if users[k] != "" and items[k] != ""]
        n_skipped = len(users) - len(keep)
        users = [users[k] for k in keep]
        items = [items[k] for k in keep]
        timestamps = timestamps[np.asarray(keep, dtype=np.int64)]
        return users, items, timestamps, n_skipped
    return users, items, timestamps, 0


def _parse_rows(
    blocks: Iterator[tuple[int, list[str]]], sep: str, ncols: int, cols: tuple[int, int, int], path: Path
) -> Interactions | None:
    """Parse every block; None when there is no non-blank row at all."""
    users: list[str] = []
    items: list[str] = []
    stamps: list[np.ndarray] = []
    n_rows = n_skipped = 0
    for first_lineno, lines in blocks:
        u, i, t, skipped = _parse_block(lines, first_lineno, sep, ncols, cols, path)
        users += u
        items += i
        stamps.append(t)
        n_rows += len(u) + skipped
        n_skipped += skipped
    if n_rows == 0:
        return None
    if not users:
        raise UsageError(f"data file {path}: every row has an empty user_id or item_id")
    timestamps = np.concatenate(stamps) if len(stamps) > 1 else stamps[0]
    return Interactions(users, items, timestamps, source=str(path), n_skipped=n_skipped)


def _read_header(fh: io.BufferedReader, path: Path, encoding: str) -> tuple[int, str | None]:
    """(line number, text) of the first non-blank line, at most MAX_HEADER_BYTES long; (n, None) at EOF."""
    lineno = 0
    while True:
        lineno += 1
        raw = read_line(fh, MAX_HEADER_BYTES, path, lineno)
        if not raw:
            return lineno, None
        text = _decode(raw, encoding, path, lineno)
        if lineno == 1 and text.startswith("\ufeff"):
            text = text[1:]
        if text.strip():
            return lineno, text.rstrip("\r\n")


def read_recbole_inter(path: str | os.PathLike[str], encoding: str = "utf-8") -> Interactions:
    """Read a RecBole atomic ``.inter`` file (tab-separated, typed header), streaming it."""
    p = Path(path)
    _check_encoding(encoding, p)
    with open_regular(p, "data file", _OPEN_FIX) as fh:
        lineno, header_text = _read_header(fh, p, encoding)
        if header_text is None:
            raise UsageError(
                f"data file {p} is empty; a RecBole .inter file needs a header such as "
                "'user_id:token<TAB>item_id:token<TAB>timestamp:float' and one row per interaction"
            )
        header = header_text.split("\t")
        names = [h.split(":", 1)[0].strip() for h in header]
        missing = [c for c in REQUIRED_COLUMNS if c not in names]
        if missing:
            raise UsageError(
                f"data file {p} lacks the column(s) {', '.join(missing)} in its header "
                f"(found: {', '.join(h.strip() for h in header) or 'nothing'}); the header must name "
                "user_id, item_id and timestamp, tab-separated, e.g. "
                "'user_id:token<TAB>item_id:token<TAB>timestamp:float'"
            )
        cols = (names.index("user_id"), names.index("item_id"), names.index("timestamp"))
        blocks = _line_blocks(fh, p, encoding, lineno + 1, strip_bom=False)
        inter = _parse_rows(blocks, "\t", len(header), cols, p)
    if inter is None:
        raise UsageError(
            f"data file {p} has no interaction rows; it must hold one row per (user, item, timestamp)"
        )
    return inter


def read_movielens_raw(path: str | os.PathLike[str], fmt: str, encoding: str = "utf-8") -> Interactions:
    """Read MovieLens ``u.data`` (fmt ``ml-100k``) or ``ratings.dat`` (fmt ``ml-1m``), streaming it."""
    p = Path(path)
    _check_encoding(encoding, p)
    with open_regular(p, "data file", _OPEN_FIX) as fh:
        blocks = _line_blocks(fh, p, encoding, 1, strip_bom=True)
        inter = _parse_rows(blocks, RAW_SEPARATORS[fmt], 4, (0, 1, 3), p)
    if inter is None:
        raise UsageError(f"data file {p} is empty; expected {FORMATS[fmt]}")
    return inter


def movielens_to_inter_rows(data: bytes, fmt: str, name: str) -> list[str]:
    """Raw MovieLens rating bytes -> tab-separated ``user, item, rating, timestamp`` lines (file order)."""
    text = data.decode("latin-1")
    sep = RAW_SEPARATORS[fmt]
    lines = [ln[:-1] if ln.endswith("\r") else ln for ln in text.split("\n")]
    lines = [ln for ln in lines if ln and not ln.isspace()]
    for n, ln in enumerate(lines):
        if ln.count(sep) != 3:
            raise UsageError(
                f"{name}: row {n + 1} has {ln.count(sep) + 1} fields, expected 4; the archive looks damaged"
            )
    if sep != "\t":
        lines = [ln.replace(sep, "\t") for ln in lines]
    return lines


def read_interactions(path: str | os.PathLike[str], encoding: str = "utf-8") -> Interactions:
    """Read any supported interaction file (format detected from ``path``).

    Text is decoded strictly as ``encoding`` (UTF-8 by default): an undecodable byte is an error
    naming its line, not a silent fallback that would turn every token into mojibake.
    """
    file, fmt = detect_format(path)
    if fmt == "recbole":
        return read_recbole_inter(file, encoding)
    return read_movielens_raw(file, fmt, encoding)
