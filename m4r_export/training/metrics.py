"""Full-ranking evaluation with RecBole's metric names and semantics.

Every user (row of a split) has exactly one target item. Each row is scored against every item,
padding (item 0) gets -inf, and -- as RecBole does for sequential models -- items already in the
user's history are NOT masked. With ``rank`` = 1 + the number of items scored strictly higher than
the target (a tie with the target counts in its favour; ties between float scores practically never
happen, and a NaN score never outranks anything):

* ``hit@K``  = 1 if rank <= K else 0
* ``ndcg@K`` = 1 / log2(rank + 1) if rank <= K else 0   (one relevant item, so IDCG = 1)
* ``mrr@K``  = 1 / rank if rank <= K else 0

each averaged over rows. With ``exclude`` (``m4r evaluate --exclude-history``) each row's listed
items -- the user's full known history -- are -inf too, as a deployed top-K artifact fed that
history through ``exclude_items`` ranks them; a target the user had already consumed then never hits.

A *scorer* is any callable ``(item_seq, item_seq_len) -> (batch, n_items)``
scores, so the model and the most-popular baseline go through the same code.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..data import Split

Scorer = Callable[[Tensor, Tensor], Tensor]

METRICS = ("hit", "ndcg", "mrr")


def metric_keys(ks: Iterable[int]) -> list[str]:
    return [f"{m}@{k}" for m in METRICS for k in sorted(set(ks))]


def target_ranks(scores: Tensor, target: Tensor) -> Tensor:
    """1-based rank of each row's target among all items (padding column must already be -inf)."""
    scores = scores.float()
    tgt = scores.gather(1, target.view(-1, 1))
    higher = (scores > tgt).sum(1)
    # a NaN target score ranks last
    higher = torch.where(torch.isnan(tgt.squeeze(1)), torch.full_like(higher, scores.shape[1] - 1), higher)
    return higher + 1


def metric_sums(ranks: Tensor, ks: Sequence[int]) -> dict[str, float]:
    """Sum over rows of every metric (divide by the row count for the mean)."""
    r = ranks.double()
    out: dict[str, float] = {}
    for k in sorted(set(ks)):
        inside = r <= k
        out[f"hit@{k}"] = float(inside.sum())
        out[f"ndcg@{k}"] = float((inside / torch.log2(r + 1)).sum())
        out[f"mrr@{k}"] = float((inside / r).sum())
    return out


def _order(keys: Iterable[str], ks: Sequence[int]) -> list[str]:
    wanted = metric_keys(ks)
    return [k for k in wanted if k in set(keys)]


@torch.no_grad()
def evaluate_scorer(
    scorer: Scorer,
    split: Split,
    ks: Sequence[int] = (10,),
    *,
    batch_size: int = 4096,
    device: torch.device | str = "cpu",
    crop: bool = True,
    exclude: Sequence[np.ndarray] | None = None,
) -> tuple[dict[str, float], int]:
    """Metric sums and the number of rows of ``split`` (see :func:`evaluate` for the means).

    ``crop`` cuts each batch to its longest history (exact for a causal, right-padded model).
    ``exclude[r]``: item indices scored -inf for row ``r`` (one array per row of ``split``).
    """
    if exclude is not None and len(exclude) != len(split):
        raise ValueError(f"exclude has {len(exclude)} rows, the split {len(split)}")
    sums: dict[str, float] = {}
    n = len(split)
    # rows in order of history length (the sums do not depend on the order): with ``crop``, each
    # batch is then cut to a length close to its rows' own, not to the longest of a random batch
    order = np.argsort(split.item_seq_len, kind="stable") if crop else np.arange(n)
    for a in range(0, n, batch_size):
        rows = order[a : a + batch_size]
        lens = torch.from_numpy(split.item_seq_len[rows]).to(device)
        width = int(lens.max()) if crop and len(rows) else split.item_seq.shape[1]
        seq = torch.from_numpy(np.ascontiguousarray(split.item_seq[rows, : max(width, 1)])).to(device)
        tgt = torch.from_numpy(split.target[rows]).to(device)
        scores = scorer(seq, lens)
        if exclude is not None:
            scores = _mask_rows(scores, [exclude[r] for r in rows.tolist()])
        for key, v in metric_sums(target_ranks(scores, tgt), ks).items():
            sums[key] = sums.get(key, 0.0) + v
    if n == 0:
        sums = dict.fromkeys(metric_keys(ks), 0.0)
    return sums, n


def _mask_rows(scores: Tensor, rows: Sequence[np.ndarray]) -> Tensor:
    """``scores`` with ``scores[r, rows[r]] = -inf`` (out of place: scorers may return shared views)."""
    width = max([1, *(len(r) for r in rows)])
    index = np.zeros((len(rows), width), dtype=np.int64)  # padding 0: column 0 is -inf already
    for r, ids in enumerate(rows):
        index[r, : len(ids)] = ids
    idx = torch.from_numpy(index).to(scores.device)
    return scores.scatter(1, idx, float("-inf"))


def means(sums: dict[str, float], n: int, ks: Sequence[int]) -> dict[str, float]:
    return {k: (sums[k] / n if n else math.nan) for k in _order(sums, ks)}


def evaluate(
    scorer: Scorer,
    split: Split,
    ks: Sequence[int] = (10,),
    *,
    batch_size: int = 4096,
    device: torch.device | str = "cpu",
    exclude: Sequence[np.ndarray] | None = None,
) -> dict[str, float]:
    """Mean hit@K, ndcg@K, mrr@K over the rows of ``split`` (keys ``"hit@10"``, ...)."""
    sums, n = evaluate_scorer(scorer, split, ks, batch_size=batch_size, device=device, exclude=exclude)
    return means(sums, n, ks)


def model_scorer(model: Any) -> Scorer:
    """The model's full ranking (``full_sort_scores``: padding -inf, history not masked)."""

    def score(item_seq: Tensor, item_seq_len: Tensor) -> Tensor:
        out: Tensor = model.full_sort_scores(item_seq, item_seq_len)
        return out

    return score


def popularity_counts(train: Split, n_items: int) -> np.ndarray:
    """How often each item is a training target (RecBole's Pop model counts the same rows)."""
    return np.bincount(train.target, minlength=n_items).astype(np.float64)


def popularity_scorer(train: Split, n_items: int, device: torch.device | str = "cpu") -> Scorer:
    """Most-popular baseline: every user gets the same scores (training counts), padding -inf.

    Ties between equally popular items are broken by item index (lower first), deterministically.
    """
    counts = torch.from_numpy(popularity_counts(train, n_items)).double()
    # a tiny index-dependent offset (< 1 count) makes the ranking a strict order
    scores = counts - torch.arange(n_items, dtype=torch.float64) / (2 * n_items)
    scores[0] = float("-inf")
    scores = scores.to(device)

    def score(item_seq: Tensor, item_seq_len: Tensor) -> Tensor:
        return scores.unsqueeze(0).expand(item_seq.shape[0], -1)

    return score
