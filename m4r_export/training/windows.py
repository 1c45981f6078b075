"""Training windows for the every-position objective, and length-bucketed batches of them.

Mamba4Rec is causal: its output at position t of a sequence is its output for the prefix that ends
at t. So instead of RecBole's one right-padded sample per target, a user's training history is cut
into *windows* of at most ``max_seq_len`` inputs, each input position paired with the next item as
its target, and one forward pass trains every target of the window.

A user's training history is ``s = [s_0, s_1, ..., s_m]``: the first item and the targets of the
user's training samples (everything before the valid and test targets). Input position ``p``
(``s_p``) has target ``s_{p+1}``. Windows start at ``0, stride, 2*stride, ...`` and hold at most
``max_seq_len`` inputs; a window after the first trains only the targets no earlier window trained
(its last ``stride`` positions), so every target is trained exactly once per epoch:

* ``stride == max_seq_len`` (consecutive windows): targets beyond the first window see only the
  history inside their own window (as little as one item);
* ``stride < max_seq_len`` (overlapping windows): every target sees at least
  ``max_seq_len - stride`` items of history, at the cost of recomputing the overlap.

Inside the first window every target sees exactly RecBole's input (the whole history, which is
shorter than ``max_seq_len``), so its loss equals the prefix objective's loss for that target.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..data.protocol import Split


@dataclass(eq=False)
class Windows:
    """``seq[w, :length[w]]`` are window ``w``'s inputs; ``target[w, p]`` the item to predict after
    input ``p`` (0 where no loss is taken: padding, or a target an earlier window trained);
    ``row[w, p]`` the training-split row (the prefix sample) of that target, -1 where none."""

    seq: np.ndarray  # (n, max_seq_len) int64
    target: np.ndarray  # (n, max_seq_len) int64
    length: np.ndarray  # (n,) int64
    row: np.ndarray  # (n, max_seq_len) int64

    def __len__(self) -> int:
        return int(self.length.shape[0])

    @property
    def n_targets(self) -> int:
        return int((self.target > 0).sum())


def user_histories(train: Split) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per user, the training history as one flat array: ``(items, user_start, first_row)``.

    ``items[user_start[u]:user_start[u+1]]`` is user ``u``'s ``s_0..s_m``; the prefix sample whose
    target is ``s_{p+1}`` is training row ``first_row[u] + p``. Relies on the split's layout:
    a user's rows are contiguous and chronological, and the first has the one-item history ``s_0``.
    """
    n = len(train)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(1, np.int64), np.zeros(0, np.int64)
    new_user = np.ones(n, dtype=bool)
    new_user[1:] = train.user[1:] != train.user[:-1]
    first_row = np.flatnonzero(new_user)
    counts = np.diff(np.append(first_row, n))  # targets per user
    sizes = counts + 1
    user_start = np.concatenate(([0], np.cumsum(sizes))).astype(np.int64)
    items = np.empty(int(user_start[-1]), dtype=np.int64)
    # s_0 of each user: the single item of its first sample's history
    items[user_start[:-1]] = train.item_seq[first_row, 0]
    slot = np.arange(n) - np.repeat(first_row, counts) + np.repeat(user_start[:-1], counts) + 1
    items[slot] = train.target
    return items, user_start, first_row.astype(np.int64)


def build_windows(train: Split, max_seq_len: int, stride: int | None = None) -> Windows:
    """Cut every user's training history into windows (module docstring); ``stride`` defaults to
    ``max_seq_len`` (consecutive windows)."""
    L = int(max_seq_len)
    stride = L if not stride else int(stride)
    if not 1 <= stride <= L:
        raise ValueError(f"window stride must be in [1, max_seq_len={L}], got {stride}")
    items, user_start, first_row = user_histories(train)
    n_inputs = np.diff(user_start) - 1  # inputs (= targets) per user
    # windows per user: starts 0, stride, ... while the previous window left inputs uncovered
    n_win = 1 + np.maximum(0, -(-(n_inputs - L) // stride))
    n_win = np.where(n_inputs > 0, n_win, 0)
    owner = np.repeat(np.arange(n_inputs.shape[0]), n_win)
    k = np.arange(owner.shape[0]) - np.repeat(np.cumsum(n_win) - n_win, n_win)  # window index in user
    start = k * stride
    length = np.minimum(L, n_inputs[owner] - start)
    ar = np.arange(L, dtype=np.int64)
    valid = ar[None, :] < length[:, None]
    base = user_start[owner][:, None] + start[:, None] + ar[None, :]
    base = np.where(valid, base, 0)
    seq = np.where(valid, items[base], 0)
    target = np.where(valid, items[base + 1], 0)
    # a later window trains only the targets past the previous window's end
    fresh = (k[:, None] == 0) | (ar[None, :] >= L - stride)
    target = np.where(fresh, target, 0)
    row = np.where(target > 0, first_row[owner][:, None] + start[:, None] + ar[None, :], -1)
    return Windows(seq.astype(np.int64), target.astype(np.int64), length.astype(np.int64), row)


def batch_plan(
    lengths: np.ndarray,
    batch_size: int,
    seed: int,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
    pool_batches: int = 50,
) -> list[np.ndarray]:
    """This rank's batches of window indices for ``epoch`` (identical plan on every rank).

    Length bucketing: the epoch's shuffled windows are taken in pools of ``pool_batches`` batches;
    each pool is sorted by length and cut into batches of ``batch_size`` windows (the *global*
    batch), so a batch's windows have similar lengths and cropping to the longest wastes little;
    then the order of the batches is shuffled. Under DDP each global batch is split over the
    ranks (padded by wrapping, as ``DistributedSampler`` does, so every rank gets the same count).
    """
    n = int(lengths.shape[0])
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(n)
    pool = max(1, batch_size * pool_batches)
    batches: list[np.ndarray] = []
    for a in range(0, n, pool):
        part = perm[a : a + pool]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches += [part[b : b + batch_size] for b in range(0, part.shape[0], batch_size)]
    order = rng.permutation(len(batches))
    out: list[np.ndarray] = []
    for i in order.tolist():
        rows = batches[i]
        if world_size > 1:
            total = -(-rows.shape[0] // world_size) * world_size
            rows = np.resize(rows, total)[rank::world_size]  # np.resize repeats from the start
        out.append(rows)
    return out


__all__ = ["Windows", "batch_plan", "build_windows", "user_histories"]
