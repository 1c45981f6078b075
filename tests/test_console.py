"""Tables read well in an 80-column terminal; the demo's output is not committed by accident."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from rich.console import Console

from m4r_export.console import titled_table

ROOT = Path(__file__).resolve().parents[1]


def _render(title: str, width: int = 80) -> list[str]:
    table = titled_table(title)
    for name in ("metric", "model", "most popular"):
        table.add_column(name)
    table.add_row("hit@10", "0.1273", "0.0530")
    console = Console(width=width)
    with console.capture() as captured:
        console.print(table)
    return [line.strip() for line in captured.get().splitlines()]


@pytest.mark.parametrize(
    "title",
    [
        "test split, 943 users, full ranking (12.3 s)",
        "best epoch 17 (by valid ndcg@10) -> /work/runs/ml100k/model.pt",
        "latency per call (ms), throughput (sequences/s), peak memory (MiB)",
    ],
)
def test_titles_of_narrow_tables_stay_on_one_line_at_80_columns(title: str) -> None:
    assert title in _render(title)


def test_titles_wider_than_the_terminal_wrap_between_words() -> None:
    title = "/data/movielens/ml-100k/ml-100k.inter (5/5-core, max_seq_len 50) with words past eighty columns"
    words = set(title.split())
    lines = _render(title)
    title_words = [w for line in lines[:2] for w in line.split()]
    assert title_words == title.split() and set(title_words) == words


def test_every_command_builds_titled_tables_through_the_helper() -> None:
    offenders = [
        str(p.relative_to(ROOT))
        for p in (ROOT / "m4r_export").rglob("*.py")
        if p.name != "console.py" and re.search(r"\bTable\(\s*title=", p.read_text(encoding="utf-8"))
    ]
    assert offenders == [], "use m4r_export.console.titled_table (rich wraps titles to the table width)"


@pytest.mark.skipif(
    shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs a git checkout"
)
def test_demo_output_directory_is_ignored_by_git() -> None:
    for path in ("m4r-demo/model.pt", "api-demo/export/model.onnx"):
        done = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT)
        assert done.returncode == 0, f"{path} is not in .gitignore"
