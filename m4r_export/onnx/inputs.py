"""Serving inputs: the exact semantics every backend applies, and the long-history helper.

Inputs of every exported model: ``item_seq`` int64 [batch, seq] (right-padded, oldest first) and
``item_seq_len`` int64 [batch]. Inside the graph, exactly as in the PyTorch module:

* item ids outside ``[0, n_items)`` are treated as padding (0);
* ``item_seq_len`` is clamped to ``[1, seq]`` (0 or negative -> 1, larger than seq -> seq);
* only positions ``< item_seq_len`` matter (the model is causal; padding after them is ignored).

Ranking heads also take ``exclude_items`` int64 [batch, E] (unless exported with
``--no-exclude-items``): items never ranked for that row; 0 and ids outside ``[1, n_items)`` are
ignored; :func:`exclude_inputs` pads ragged per-row lists (zeros ``[batch, 1]`` = nothing).

Histories longer than the exported ``max_seq_len`` must be cut to the most recent items before
they reach the model; :func:`truncate_inputs` does that for padded arrays and
:func:`histories_to_inputs` for Python lists (both keep the newest items, like training did).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..data import pad_sequences
from ..data.protocol import index_array
from ..errors import UsageError


def truncate_inputs(
    item_seq: np.ndarray, item_seq_len: np.ndarray, max_seq_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """Keep at most the ``max_seq_len`` most recent valid items of each row.

    Lengths are first clamped to ``[1, seq]`` (the model's own rule), then each row whose length
    exceeds ``max_seq_len`` is shifted so that its last ``max_seq_len`` items come first. Returns
    ``(item_seq[:, :min(seq, max_seq_len)], new_lengths)`` as int64; rows that already fit are
    unchanged, so the result feeds the model the same as the original would for them.
    """
    if max_seq_len < 1:
        raise UsageError(f"max_seq_len must be >= 1, got {max_seq_len}")
    seq = index_array(item_seq, "item_seq")
    if seq.ndim != 2:
        raise UsageError(f"item_seq must be 2-D [batch, seq], got shape {seq.shape}")
    lengths = np.asarray(item_seq_len, dtype=np.int64).reshape(-1)
    if lengths.shape[0] != seq.shape[0]:
        raise UsageError(f"item_seq_len has {lengths.shape[0]} rows but item_seq has {seq.shape[0]}")
    width = seq.shape[1]
    if width <= max_seq_len:
        return seq, lengths
    lengths = np.clip(lengths, 1, width)
    start = np.maximum(lengths - max_seq_len, 0)  # first kept position per row
    cols = start[:, None] + np.arange(max_seq_len)[None, :]
    out = np.take_along_axis(seq, np.minimum(cols, width - 1), axis=1)
    new_len = np.minimum(lengths, max_seq_len)
    out[np.arange(max_seq_len)[None, :] >= new_len[:, None]] = 0
    return out, new_len


def histories_to_inputs(
    histories: Sequence[Sequence[int]], max_seq_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """Item-index histories (oldest first) -> padded ``(item_seq, item_seq_len)``, newest items kept."""
    return pad_sequences(histories, max_seq_len)


def exclude_inputs(exclude: Sequence[Sequence[int] | np.ndarray], batch: int | None = None) -> np.ndarray:
    """Per-row item-index lists to exclude -> the ``exclude_items`` input, int64 ``[batch, E]``.

    Rows are right-padded with 0 ("no item") to the longest list; E is at least 1, so a batch with
    nothing to exclude becomes zeros ``[batch, 1]`` (what every backend accepts, a TensorRT profile
    included). ``batch`` defaults to ``len(exclude)``; with ``exclude=[]`` it gives that many zero rows.
    Ids are passed as given: the model ignores 0 and ids outside ``[1, n_items)``.
    """
    rows = [list(r) for r in exclude] or [[] for _ in range(batch or 0)]
    if batch is not None and len(rows) != batch:
        raise UsageError(f"exclude_items has {len(rows)} rows but the batch has {batch}")
    out = np.zeros((len(rows), max([1, *map(len, rows)])), dtype=np.int64)
    for r, ids in enumerate(rows):
        out[r, : len(ids)] = ids
    return out
