"""Synthetic interaction logs at catalogue scale (1M-10M items), written in bounded memory.

:func:`write_large_synthetic` streams a RecBole ``.inter`` file block by block of users, so memory is
O(n_items) (a successor table and a popularity CDF: 12 bytes per item) plus one block, never the
whole log. Structure, so that a sequential model has something to learn and a catalogue has a head
and a long tail:

* **sequential**: a fixed random permutation of the items defines each item's successor; a user
  mostly walks forward from item to successor;
* **long-tailed popularity**: each user's first item, and every "jump" (probability ``jump``),
  is drawn from a Zipf law over the items (exponent ``zipf``; item popularity rank is a random
  permutation), so a few items are seen by many users and most by few.

Rows are written user by user, each user's events in time order (like the Amazon files); user ids
are 1..n_users and item ids 1..n_items, as tokens. Same arguments -> same file (numpy PCG64).
"""

from __future__ import annotations

import os
from typing import IO, Any

import numpy as np

from ..errors import UsageError
from ..fileio import atomic_write

#: users generated (and formatted) at a time: bounds the memory besides the two O(n_items) arrays
BLOCK_USERS = 20_000


def _zipf_cdf(n_items: int, exponent: float) -> np.ndarray:
    weights = 1.0 / np.arange(1, n_items + 1, dtype=np.float64) ** exponent
    cdf = np.cumsum(weights)
    cdf /= cdf[-1]
    return cdf


def _block(
    rng: np.random.Generator,
    users: np.ndarray,
    succ: np.ndarray,
    by_rank: np.ndarray,
    cdf: np.ndarray,
    lengths: tuple[int, int],
    jump: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(users, items, timestamps) of one block of users, each user's events in time order."""
    n, width = len(users), lengths[1]
    length = rng.integers(lengths[0], lengths[1] + 1, size=n)
    popular = by_rank[np.minimum(np.searchsorted(cdf, rng.random((n, width))), len(cdf) - 1)]
    jumps = rng.random((n, width)) < jump
    items = np.empty((n, width), dtype=np.int64)
    items[:, 0] = popular[:, 0]
    for t in range(1, width):
        items[:, t] = np.where(jumps[:, t], popular[:, t], succ[items[:, t - 1] - 1])
    start = rng.integers(1_000_000_000, 1_000_000_000 + 30 * 86400, size=(n, 1))
    times = start + np.cumsum(rng.integers(60, 7200, size=(n, width)), axis=1)
    valid = np.arange(width)[None, :] < length[:, None]
    rows = np.broadcast_to(users[:, None], (n, width))
    return rows[valid], items[valid], times[valid]


def _write_rows(fh: IO[Any], users: np.ndarray, items: np.ndarray, times: np.ndarray) -> None:
    fh.writelines(
        f"{u}\t{i}\t{t}\n" for u, i, t in zip(users.tolist(), items.tolist(), times.tolist(), strict=True)
    )


def write_large_synthetic(
    path: str | os.PathLike[str],
    n_users: int,
    n_items: int,
    seed: int = 0,
    *,
    min_len: int = 5,
    max_len: int = 30,
    jump: float = 0.15,
    zipf: float = 1.0,
) -> int:
    """Write the log (atomically) and return its number of rows."""
    if n_users < 1 or n_items < 2:
        raise UsageError(f"synthetic data needs --users >= 1 and --items >= 2, got {n_users}, {n_items}")
    if not 1 <= min_len <= max_len:
        raise UsageError(f"need 1 <= min_len <= max_len, got min_len={min_len}, max_len={max_len}")
    if not 0.0 <= jump <= 1.0:
        raise UsageError(f"jump must be a probability in [0, 1], got {jump}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(n_items).astype(np.int32) + 1
    succ = np.empty(n_items, dtype=np.int32)  # succ[i - 1]: the item after item i
    succ[order - 1] = np.roll(order, -1)
    by_rank = (rng.permutation(n_items).astype(np.int32) + 1).astype(np.int64)
    cdf = _zipf_cdf(n_items, zipf)
    rows = 0
    with atomic_write(path, "w") as fh:
        fh.write("user_id:token\titem_id:token\ttimestamp:float\n")
        for first in range(1, n_users + 1, BLOCK_USERS):
            users = np.arange(first, min(n_users, first + BLOCK_USERS - 1) + 1)
            u, i, t = _block(rng, users, succ, by_rank, cdf, (min_len, max_len), jump)
            _write_rows(fh, u, i, t)
            rows += len(u)
    return rows
