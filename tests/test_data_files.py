"""Issue 20 item 6: interaction files are streamed with bounded lines, only regular files are read,
and a directory with several candidate files is refused."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from m4r_export.cli import main
from m4r_export.data import detect_format, read_interactions
from m4r_export.data import readers as rd
from m4r_export.errors import UsageError

HEADER = "user_id:token\titem_id:token\ttimestamp:float\n"


@pytest.fixture
def no_hang() -> Iterator[None]:
    """Fail (instead of hanging forever) when a read blocks, e.g. on a FIFO without a writer."""

    def timeout(*_: object) -> None:
        raise TimeoutError("the reader blocked")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


# Reads a file in a child whose address space is capped at 1 GiB above what it has after imports,
# so a reader that slurps a 5 GB file fails with MemoryError there (and never eats the machine).
_CHILD = """
import resource, sys
from m4r_export.data import read_interactions
from m4r_export.errors import M4RError
size = next(l for l in open("/proc/self/status") if l.startswith("VmSize:"))
cap = int(size.split()[1]) * 1024 + (1 << 30)
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
try:
    read_interactions(sys.argv[1])
    print("READ")
except M4RError as exc:
    print("ERROR", exc)
except MemoryError:
    print("MemoryError")
hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print("PEAK_MB", int(hwm.split()[1]) / 1024)
"""


def sparse(path: Path, head: bytes, size: int = 5 << 30) -> Path:
    with open(path, "wb") as fh:
        fh.write(head)
        fh.truncate(size)  # a hole: no disk space used
    return path


SPARSE = {
    "zeros.inter": (b"", "line 1: longer than 65,536 bytes"),
    "header-then-zeros.inter": (HEADER.encode(), "line 2: longer than 1,048,576 bytes"),
    "zeros.txt": (b"", "unsupported data file"),
    "u.data": (b"1\t2\t3\t4\n", "line 2: longer than 1,048,576 bytes"),
}


@pytest.mark.parametrize("name", sorted(SPARSE))
def test_5gb_sparse_file_is_refused_after_a_bounded_read(name: str, tmp_path: Path) -> None:
    head, message = SPARSE[name]
    path = sparse(tmp_path / name, head)
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path)], capture_output=True, text=True, timeout=120
    )
    out = proc.stdout
    assert out.startswith("ERROR") and message in out, out + proc.stderr[-2000:]
    assert float(out.split("PEAK_MB")[1]) < 300, out


def test_fifos_are_named_and_never_opened_for_a_blocking_read(tmp_path: Path, no_hang: None) -> None:
    fifo = tmp_path / "pipe.inter"
    os.mkfifo(fifo)  # opening it for reading would block until a writer comes
    fifo_txt = tmp_path / "pipe.txt"  # a name that makes the reader sniff the header
    os.mkfifo(fifo_txt)
    folder = tmp_path / "folder"
    folder.mkdir()
    os.mkfifo(folder / "folder.inter")
    for path in (fifo, fifo_txt, folder):
        with pytest.raises(UsageError, match=r"data file .* is a FIFO \(named pipe\)"):
            read_interactions(path)


def _devices(tmp_path: Path) -> dict[str, Path]:
    link = tmp_path / "dev.inter"
    link.symlink_to("/dev/zero")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "folder.inter").symlink_to("/dev/zero")
    return {"/dev/zero": Path("/dev/zero"), "symlink.inter": link, "folder": folder}


@pytest.mark.parametrize("case", ["/dev/zero", "symlink.inter", "folder"])
def test_devices_are_named_and_never_read(case: str, tmp_path: Path) -> None:
    """/dev/zero never ends: read in the capped child, so a regression cannot eat the machine."""
    path = _devices(tmp_path)[case]
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path)], capture_output=True, text=True, timeout=120
    )
    assert proc.stdout.startswith("ERROR data file ") and "is a character device" in proc.stdout, (
        proc.stdout + proc.stderr[-2000:]
    )


def test_cli_fifo_is_a_one_line_error(tmp_path: Path, no_hang: None) -> None:
    fifo = tmp_path / "pipe.inter"
    os.mkfifo(fifo)
    result = CliRunner().invoke(main, ["data", "stats", str(fifo)])
    assert result.exit_code == 2, (result.output, result.exception)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: data file ") and "is a FIFO" in lines[0], lines


@pytest.mark.parametrize(
    "names",
    [("d.inter", "other.inter"), ("u.data", "ratings.dat"), ("x.inter", "u.data")],
    ids=["name-inter+other", "u.data+ratings.dat", "inter+u.data"],
)
def test_directory_with_two_candidates_is_refused_naming_both(names: tuple[str, str], tmp_path: Path) -> None:
    folder = tmp_path / "d"
    folder.mkdir()
    for name in names:
        (folder / name).write_text(HEADER + "1\t2\t3\n")
    with pytest.raises(UsageError, match="holds several interaction files") as info:
        detect_format(folder)
    assert all(name in str(info.value) for name in names), info.value
    (folder / names[1]).unlink()
    assert detect_format(folder) == (folder / names[0], rd.detect_format(folder / names[0])[1])


# ------------------------------------------------------------------- streaming is exact


def naive(
    text: str, sep: str, ncols: int, cols: tuple[int, int, int]
) -> tuple[list[str], list[str], list[float]]:
    rows = [ln.rstrip("\r").split(sep) for ln in text.split("\n") if ln.strip()]
    return [r[cols[0]] for r in rows], [r[cols[1]] for r in rows], [float(r[cols[2]]) for r in rows]


def test_multi_block_files_parse_exactly_and_errors_name_the_right_line(tmp_path: Path) -> None:
    """Lines straddling read boundaries, CRLF, blank lines, a BOM: same rows as a naive parse."""
    rng = np.random.default_rng(0)
    rows = [f"u{rng.integers(50)}\titem {rng.integers(10**6)}\t{k}.5" for k in range(120_000)]
    rows[70_000] = ""  # a blank line
    body = "\r\n".join(rows) + "\r\n"
    path = tmp_path / "big.inter"
    path.write_bytes(("\ufeff" + HEADER + body).encode())
    assert path.stat().st_size > 2 * rd.MAX_LINE_BYTES  # several blocks
    inter = read_interactions(path)
    users, items, ts = naive(body, "\t", 3, (0, 1, 2))
    assert inter.users == users and inter.items == items and inter.timestamps.tolist() == ts
    # a bad timestamp / a bad byte far into the file: the line number counts every block before it
    bad = rows.copy()
    bad[100_000] = "u1\tx\tlater"  # file line 100,002 (header is line 1)
    path.write_text(HEADER + "\n".join(bad) + "\n")
    with pytest.raises(UsageError, match=r"line 100002: timestamp 'later'"):
        read_interactions(path)
    path.write_bytes((HEADER + "\n".join(rows[:90_000])).encode() + b"\nu1\tcaf\xe9\t1\n")
    with pytest.raises(UsageError, match=r"line 90002, byte 7 \(0xe9\) is not valid utf-8"):
        read_interactions(path)


def test_line_length_limit_is_exact(tmp_path: Path) -> None:
    limit = rd.MAX_LINE_BYTES
    path = tmp_path / "long.inter"
    ok = "u" * (limit - len("\ti\t1")) + "\ti\t1"  # exactly the limit
    path.write_text(HEADER + "a\tb\t1\n" + ok + "\nc\td\t2\n")
    assert read_interactions(path).users == ["a", ok.split("\t")[0], "c"]
    path.write_text(HEADER + "a\tb\t1\n" + "u" + ok + "\nc\td\t2\n")
    with pytest.raises(UsageError, match=r"line 3: longer than 1,048,576 bytes"):
        read_interactions(path)


def test_an_encoding_whose_line_break_is_not_the_newline_byte_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.inter"
    path.write_text(HEADER + "1\t2\t3\n", encoding="utf-16")
    with pytest.raises(UsageError, match="encoding 'utf-16' .* is not supported"):
        read_interactions(path, encoding="utf-16")


def test_line_blocks_reassembles_any_file_and_refuses_exactly_the_long_lines() -> None:
    """The shared helper on random small files and limits: blocks rejoin to the file; a refusal names
    the first line over the limit (each read is `limit` bytes, so lines straddle reads constantly)."""
    import io
    import random

    from m4r_export.safeopen import line_blocks

    rng = random.Random(0)
    for _ in range(500):
        lines = [b"x" * rng.randint(0, 12) for _ in range(rng.randint(0, 30))]
        data = b"\n".join(lines) + (b"\n" if rng.random() < 0.5 else b"")
        limit = rng.randint(1, 12)
        too_long = [k + 1 for k, ln in enumerate(data.split(b"\n")) if len(ln) > limit]
        reader = io.BufferedReader(io.BytesIO(data))  # type: ignore[arg-type]
        if too_long:
            with pytest.raises(UsageError, match=rf"line {too_long[0]}: longer than {limit} bytes"):
                list(line_blocks(reader, Path("x"), limit))
        else:
            blocks = list(line_blocks(reader, Path("x"), limit))
            assert b"".join(b for _, b in blocks) == data
            assert [n for n, _ in blocks] == [
                1 + b"".join(b for _, b in blocks[:i]).count(b"\n") for i in range(len(blocks))
            ]
