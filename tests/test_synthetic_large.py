"""m4r data synthetic at catalogue scale (issue 19 item 2): streamed, long-tailed, sequential."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from m4r_export.cli import main
from m4r_export.data import synthetic_large as sl
from m4r_export.data.readers import read_interactions


def _columns(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows = np.loadtxt(path, skiprows=1, dtype=np.int64)
    return rows[:, 0], rows[:, 1], rows[:, 2]


def test_large_generator_is_long_tailed_sequential_and_streamed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sl, "BLOCK_USERS", 300)  # several blocks
    out = tmp_path / "big.inter"
    rows = sl.write_large_synthetic(out, 2_000, 50_000, seed=1)
    users, items, times = _columns(out)
    assert len(users) == rows and set(np.unique(users).tolist()) == set(range(1, 2_001))
    assert items.min() >= 1 and items.max() <= 50_000
    same_user = users[1:] == users[:-1]
    assert (np.diff(times)[same_user] > 0).all()  # each user's events in time order
    counts = np.sort(np.bincount(items))[::-1]
    assert counts[:500].sum() / counts.sum() > 0.25  # the top 1% of items get a quarter of the events
    # sequential: most next items are the previous item's successor in one fixed order
    prev, nxt = items[:-1][same_user].tolist(), items[1:][same_user].tolist()
    seen: dict[int, dict[int, int]] = {}
    for a, b in zip(prev, nxt, strict=True):
        seen.setdefault(a, {}).setdefault(b, 0)
        seen[a][b] += 1
    top = {a: max(c, key=lambda b: c[b]) for a, c in seen.items()}  # the usual next item of a
    walked = np.mean([top[a] == b for a, b in zip(prev, nxt, strict=True)])
    assert walked > 0.8
    # same arguments -> same bytes
    again = tmp_path / "again.inter"
    sl.write_large_synthetic(again, 2_000, 50_000, seed=1)
    assert again.read_bytes() == out.read_bytes()


def test_cli_uses_the_large_generator_from_100k_items(tmp_path: Path) -> None:
    out = tmp_path / "syn.inter"
    res = CliRunner().invoke(main, ["data", "synthetic", str(out), "--users", "300", "--items", "100000"])
    assert res.exit_code == 0, res.output
    inter = read_interactions(out)
    assert len(inter.users) == len(_columns(out)[0])
    res = CliRunner().invoke(main, ["data", "synthetic", str(out), "--users", "0", "--items", "100000"])
    assert res.exit_code == 2 and "Error: " in res.output
