"""A deterministic synthetic interaction log with learnable sequential structure.

Items are split into ``n_chains`` cycles. Each user starts at a random point of a random cycle
and mostly walks forward along it (next item = the following item of the cycle); with
probability ``skip`` it jumps one item ahead, with probability ``switch`` it moves to another
cycle, and with probability ``noise`` it consumes a random item drawn from a skewed popularity
distribution (then resumes the walk). A sequential model can predict the next item from the last
one; a most-popular baseline cannot, so the gap between them is large and easy to test.

Used by ``m4r demo`` and by fast tests. Same arguments -> same output, on every platform
(numpy's ``default_rng``/PCG64).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import UsageError
from ..fileio import atomic_write


def synthetic_interactions(
    n_users: int = 300,
    n_items: int = 120,
    seed: int = 0,
    *,
    min_len: int = 8,
    max_len: int = 30,
    n_chains: int = 6,
    noise: float = 0.1,
    skip: float = 0.05,
    switch: float = 0.02,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return ``(users, items, timestamps)`` raw columns in log order (sorted by time).

    ``users`` and ``items`` are int64 raw ids (items are numbered 1..n_items, users 1..n_users, and
    they are not the indices the protocol assigns), ``timestamps`` float64 Unix-like seconds.
    """
    if n_users < 1 or n_items < 2:
        raise UsageError(f"synthetic data needs n_users >= 1 and n_items >= 2, got {n_users}, {n_items}")
    if not 1 <= n_chains <= n_items // 2:
        raise UsageError(f"n_chains must be between 1 and n_items // 2 = {n_items // 2}, got {n_chains}")
    if not 1 <= min_len <= max_len:
        raise UsageError(f"need 1 <= min_len <= max_len, got min_len={min_len}, max_len={max_len}")
    for name, p in (("noise", noise), ("skip", skip), ("switch", switch)):
        if not 0.0 <= p <= 1.0:
            raise UsageError(f"{name} must be a probability in [0, 1], got {p}")
    rng = np.random.default_rng(seed)
    chains = np.array_split(rng.permutation(n_items) + 1, n_chains)
    popularity = 1.0 / np.arange(1, n_items + 1) ** 0.8
    popularity /= popularity.sum()
    popular_items = rng.permutation(n_items) + 1

    users: list[int] = []
    items: list[int] = []
    times: list[float] = []
    for u in range(1, n_users + 1):
        length = int(rng.integers(min_len, max_len + 1))
        c = int(rng.integers(n_chains))
        pos = int(rng.integers(len(chains[c])))
        t = float(rng.integers(1_000_000_000, 1_000_000_000 + 30 * 86400))
        draws = rng.random((length, 3))
        gaps = rng.integers(60, 7200, size=length)
        for k in range(length):
            if draws[k, 0] < noise:
                item = int(popular_items[rng.choice(n_items, p=popularity)])
            else:
                if draws[k, 1] < switch:
                    c = int(rng.integers(n_chains))
                    pos = int(rng.integers(len(chains[c])))
                elif draws[k, 2] < skip:
                    pos += 1
                item = int(chains[c][pos % len(chains[c])])
                pos += 1
            users.append(u)
            items.append(item)
            times.append(t)
            t += float(gaps[k])
    ts = np.asarray(times, dtype=np.float64)
    order = np.argsort(ts, kind="stable")
    return (
        np.asarray(users, dtype=np.int64)[order],
        np.asarray(items, dtype=np.int64)[order],
        ts[order],
    )


def _fmt_number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def write_inter_file(
    path: str | os.PathLike[str],
    users: Sequence[Any] | np.ndarray,
    items: Sequence[Any] | np.ndarray,
    timestamps: Sequence[float] | np.ndarray,
    ratings: Sequence[Any] | np.ndarray | None = None,
) -> None:
    """Write a RecBole atomic ``.inter`` file (atomically), rows in the given order.

    Columns: ``user_id:token``, ``item_id:token``, optional ``rating:float``, ``timestamp:float``.
    Tokens are written with ``str``; they must not contain tabs or newlines.
    """
    n = len(users)
    if len(items) != n or len(timestamps) != n or (ratings is not None and len(ratings) != n):
        raise UsageError("write_inter_file: users, items, timestamps (and ratings) must have the same length")
    u = [str(x) for x in (users.tolist() if isinstance(users, np.ndarray) else users)]
    i = [str(x) for x in (items.tolist() if isinstance(items, np.ndarray) else items)]
    for col, name in ((u, "user"), (i, "item")):
        bad = next((t for t in col if "\t" in t or "\n" in t or "\r" in t or t == ""), None)
        if bad is not None:
            raise UsageError(f"write_inter_file: {name} token {bad!r} is empty or holds a tab/newline")
    ts = [_fmt_number(x) for x in np.asarray(timestamps, dtype=np.float64).tolist()]
    with atomic_write(path, "w") as fh:
        if ratings is None:
            fh.write("user_id:token\titem_id:token\ttimestamp:float\n")
            fh.writelines(f"{a}\t{b}\t{c}\n" for a, b, c in zip(u, i, ts, strict=True))
        else:
            r = [str(x) for x in (ratings.tolist() if isinstance(ratings, np.ndarray) else ratings)]
            fh.write("user_id:token\titem_id:token\trating:float\ttimestamp:float\n")
            fh.writelines(f"{a}\t{b}\t{d}\t{c}\n" for a, b, d, c in zip(u, i, r, ts, strict=True))
