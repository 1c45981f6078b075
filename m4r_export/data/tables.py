"""Interaction logs as users have them: CSV/TSV and Parquet files with any column names.

Read through pyarrow in batches (streaming, a bounded buffer whatever the file size; only the three
needed columns are decoded), into the same :class:`~m4r_export.data.readers.Interactions` the
RecBole reader returns, so everything downstream (k-core filter, id mapping, split) is unchanged.

* CSV/TSV (``*.csv``, ``*.tsv``, ``*.tab``, ``*.txt``, or any file when a column option is given):
  one header row; the delimiter is given (``--delimiter``) or detected from the header among
  ``, TAB ; |``. Header names may carry RecBole type suffixes (``user_id:token``), which are ignored.
* Parquet (``*.parquet``, ``*.pq``): integer or string ids, numeric or timestamp times.
* A RecBole ``.inter`` whose header is not tab-separated (a comma-separated export) is read as CSV.

Column names default to ``user_id``, ``item_id`` and ``timestamp`` (RecBole's); choose others
with :class:`Columns` (``--user-col``, ``--item-col``, ``--time-col``, or a recipe's
``USER_ID_FIELD``, ``ITEM_ID_FIELD``, ``TIME_FIELD``).
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UsageError
from ..safeopen import open_regular
from .readers import Interactions

CSV_SUFFIXES = (".csv", ".tsv", ".tab", ".txt")
PARQUET_SUFFIXES = (".parquet", ".pq")
DELIMITERS = {",": "comma", "\t": "tab", ";": "semicolon", "|": "pipe"}
#: bytes read to find the header row (a longer first line is refused, never read unbounded)
HEADER_LIMIT = 1 << 16
BLOCK_SIZE = 1 << 20  # pyarrow's CSV block: the streaming buffer


@dataclass(frozen=True)
class Columns:
    """Which columns hold the user, item and timestamp, and the text delimiter (None = detect)."""

    user: str = "user_id"
    item: str = "item_id"
    time: str = "timestamp"
    delimiter: str | None = None
    #: True when a name or the delimiter was chosen by the user (route every file through this reader)
    explicit: bool = False

    @classmethod
    def of(
        cls,
        user: str | None = None,
        item: str | None = None,
        time: str | None = None,
        delimiter: str | None = None,
    ) -> Columns:
        if delimiter is not None:
            delimiter = {"tab": "\t", "\\t": "\t", "comma": ",", "semicolon": ";", "pipe": "|"}.get(
                delimiter, delimiter
            )
            if len(delimiter) != 1 or delimiter in "\r\n\"'":
                raise UsageError(
                    f"--delimiter must be one character (or tab, comma, semicolon, pipe), got {delimiter!r}"
                )
        explicit = any(v is not None for v in (user, item, time, delimiter))
        return cls(user or "user_id", item or "item_id", time or "timestamp", delimiter, explicit)

    def with_defaults(self, user: str, item: str, time: str) -> Columns:
        """These names where the user gave none (e.g. a recipe's USER_ID_FIELD under --user-col)."""
        base = Columns()
        return Columns(
            self.user if self.user != base.user else user,
            self.item if self.item != base.item else item,
            self.time if self.time != base.time else time,
            self.delimiter,
            self.explicit or (user, item, time) != (base.user, base.item, base.time),
        )


def read_log(
    path: str | os.PathLike[str], columns: Columns | None = None, encoding: str = "utf-8"
) -> Interactions:
    """Read any supported interaction file: CSV/TSV/Parquet here, RecBole/MovieLens files by
    :func:`~m4r_export.data.readers.read_interactions`."""
    from .readers import RAW_FILENAMES, detect_format, read_interactions

    p = Path(path)
    if p.is_dir():
        p, _ = detect_format(p)
    fmt = None if p.name in RAW_FILENAMES else table_format(p, columns)
    if fmt is None:
        return read_interactions(p, encoding)
    return read_table(p, fmt, columns, encoding)


def table_format(path: Path, columns: Columns | None) -> str | None:
    """``"csv"``/``"parquet"`` when this module reads ``path`` (a file), else None (the RecBole/MovieLens
    readers do)."""
    if not path.is_file():
        return None
    suffix = path.suffix.lower()
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    if suffix in CSV_SUFFIXES:
        return "csv"
    if suffix == ".inter":
        with _open(path) as fh:
            first = _header_line(fh, path)
        other = "\t" not in first and any(d in first for d in DELIMITERS)  # e.g. a comma-separated export
        return "csv" if other or (columns is not None and columns.explicit) else None
    if columns is not None and columns.explicit:
        return "csv"
    return None


def read_table(path: Path, fmt: str, columns: Columns | None = None, encoding: str = "utf-8") -> Interactions:
    """Read a CSV/TSV or Parquet interaction log (module docstring)."""
    cols = columns or Columns()
    with _open(path) as fh:  # one descriptor, checked to be a regular file, handed to pyarrow
        return _collect(path, fh, fmt, cols, encoding)


def _collect(path: Path, fh: io.BufferedReader, fmt: str, cols: Columns, encoding: str) -> Interactions:
    batches = _parquet_batches(fh, path, cols) if fmt == "parquet" else _csv_batches(fh, path, cols, encoding)
    users: list[str] = []
    items: list[str] = []
    times: list[np.ndarray] = []
    skipped = 0
    for u, i, t in batches:
        if t.null_count:
            row = len(users) + skipped + int(np.flatnonzero(t.is_null().to_numpy(zero_copy_only=False))[0])
            raise UsageError(
                f"{path}, data row {row + 1}: column {cols.time!r} is empty; every interaction needs a "
                "timestamp; fix or remove that row"
            )
        tv = t.to_numpy(zero_copy_only=False).astype(np.float64, copy=False)
        ul, il = u.to_pylist(), i.to_pylist()
        keep = [k for k in range(len(ul)) if ul[k] and il[k]]
        if len(keep) != len(ul):
            skipped += len(ul) - len(keep)
            ul, il, tv = [ul[k] for k in keep], [il[k] for k in keep], tv[keep]
        users += ul
        items += il
        times.append(tv)
    if not users:
        what = "every row has an empty user or item" if skipped else "it has no interaction rows"
        raise UsageError(f"data file {path}: {what}; it must hold one row per (user, item, timestamp)")
    ts = np.concatenate(times)
    if not np.isfinite(ts).all():
        k = int(np.flatnonzero(~np.isfinite(ts))[0])
        raise UsageError(f"{path}: timestamp {ts[k]} is not a finite number; fix or remove that row")
    return Interactions(users, items, ts, source=str(path), n_skipped=skipped)


def _open(path: Path) -> io.BufferedReader:
    """The log opened for reading: a regular file (no FIFO or device), never blocking on open."""
    return open_regular(path, "data file", "pass a CSV/TSV or Parquet interaction log")


def _header_line(fh: io.BufferedReader, path: Path) -> str:
    """The first line (at most HEADER_LIMIT bytes) of ``fh``; ``fh`` is rewound afterwards."""
    try:
        head = fh.read(HEADER_LIMIT)
        fh.seek(0)
    except OSError as exc:
        raise UsageError(f"cannot read data file {path}: {exc.strerror}") from None
    if head.startswith(b"\xef\xbb\xbf"):
        head = head[3:]
    line, newline, _ = head.partition(b"\n")
    if not newline and len(head) == HEADER_LIMIT:
        raise UsageError(
            f"data file {path}: no line break in its first {HEADER_LIMIT} bytes; expected a header row "
            "naming the columns"
        )
    return line.decode("utf-8", errors="replace").rstrip("\r")


def _strip_type(name: str) -> str:
    return name.split(":", 1)[0].strip()


def _detect_delimiter(path: Path, header: str) -> str:
    counts = {d: header.count(d) for d in DELIMITERS}
    best = max(counts, key=lambda d: counts[d])
    if counts[best] == 0:
        raise UsageError(
            f"data file {path}: cannot detect the delimiter from its header {header[:200]!r} (no comma, "
            "tab, semicolon or pipe); pass --delimiter, or check that the file has a header row"
        )
    return best


def _resolve(path: Path, found: list[str], cols: Columns, how: str) -> list[str]:
    """The file's own names of the user, item and time columns, or an error naming what was found."""
    plain = [_strip_type(n) for n in found]
    wanted = [("user", cols.user, "--user-col"), ("item", cols.item, "--item-col")]
    wanted.append(("timestamp", cols.time, "--time-col"))
    missing = [f"{role} column {name!r} ({opt})" for role, name, opt in wanted if name not in plain]
    if missing:
        raise UsageError(
            f"data file {path} has no {', no '.join(missing)}; found {len(found)} column(s) "
            f"{', '.join(repr(n) for n in found[:20])}{' ...' if len(found) > 20 else ''} {how}. "
            "Name the columns to use with --user-col, --item-col and --time-col (or the recipe's "
            "USER_ID_FIELD, ITEM_ID_FIELD, TIME_FIELD)"
        )
    return [found[plain.index(name)] for _, name, _ in wanted]


def _csv_batches(
    fh: io.BufferedReader, path: Path, cols: Columns, encoding: str
) -> Iterator[tuple[Any, Any, Any]]:
    import pyarrow as pa
    import pyarrow.csv as pacsv

    header = _header_line(fh, path)
    delim = cols.delimiter or _detect_delimiter(path, header)
    names = [n.strip().strip('"') for n in header.split(delim)]
    how = f"(split on {DELIMITERS.get(delim, repr(delim))})"
    u, i, t = _resolve(path, names, cols, how)
    opts = pacsv.ConvertOptions(
        include_columns=[u, i, t],
        column_types={u: pa.string(), i: pa.string(), t: pa.float64()},
        strings_can_be_null=False,
    )
    return _guard(
        path,
        lambda: pacsv.open_csv(
            fh,
            read_options=pacsv.ReadOptions(block_size=BLOCK_SIZE, encoding=encoding),
            parse_options=pacsv.ParseOptions(delimiter=delim),
            convert_options=opts,
        ),
        (u, i, t),
        f"a {DELIMITERS.get(delim, repr(delim))}-separated file",
    )


def _parquet_batches(fh: io.BufferedReader, path: Path, cols: Columns) -> Iterator[tuple[Any, Any, Any]]:
    import pyarrow.parquet as pq

    def open_file() -> Any:
        pf = pq.ParquetFile(fh)
        u, i, t = _resolve(path, list(pf.schema_arrow.names), cols, "(Parquet schema)")
        return pf.iter_batches(batch_size=65536, columns=[u, i, t])

    return _guard(path, open_file, None, "a Parquet file")


def _guard(
    path: Path, open_reader: Callable[[], Any], names: tuple[str, str, str] | None, what: str
) -> Iterator[tuple[Any, Any, Any]]:
    """Batches of (user, item, time) arrays; pyarrow's errors become one-line UsageErrors."""
    import pyarrow as pa

    try:
        for batch in open_reader():
            u, i, t = (batch.column(k) for k in range(3)) if names is None else map(batch.column, names)
            yield _as_str(u), _as_str(i), _as_seconds(t)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, OSError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(
            f"cannot read data file {path} as {what}: {msg}. Check the delimiter (--delimiter) and that "
            "the timestamp column holds numbers (e.g. Unix seconds)"
        ) from None


def _as_str(col: Any) -> Any:
    import pyarrow as pa

    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        return col
    return col.cast(pa.string())


def _as_seconds(col: Any) -> Any:
    """Numbers as float64; Arrow timestamps and dates as Unix seconds."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_timestamp(col.type) or pa.types.is_date(col.type):
        micros = col.cast(pa.timestamp("us"), safe=False).cast(pa.int64())
        return pc.divide(micros.cast(pa.float64()), 1e6)
    return col.cast(pa.float64())


def write_inter(path: str | os.PathLike[str], inter: Interactions) -> None:
    """Write ``inter`` as a RecBole ``.inter`` file (atomically), rows in file order."""
    from .synthetic import write_inter_file

    write_inter_file(path, inter.users, inter.items, inter.timestamps)
