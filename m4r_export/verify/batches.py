"""Verify in bounded memory: compare one batch of users at a time, merge the batches' metrics.

``m4r verify`` used to hold the reference's ``[users, n_items]`` scores for every user at once and
compute the errors on float64 copies of it (22,363 Beauty users peaked at 18.7 GB). Now each batch
of users is scored, compared and reduced to what the report needs (error sums and maxima, counts,
each user's two top-K lists), so peak memory is ``rows x n_items`` (:func:`score_rows`) whatever the
number of users. :func:`merge` turns the batches into the metrics dict of one comparison; the
numbers equal those of one big batch (sums and maxima merge exactly; means are weighted).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .metrics import NonFinite, ScoreErrors, offline_metrics, ranking_parity

#: float64 score entries one comparison batch may hold (~32 MB each; the comparison makes ~10)
SCORE_BUDGET = 1 << 22


def score_rows(batch_size: int, n_items: int) -> int:
    """Users per comparison batch: ``batch_size``, fewer when ``rows x n_items`` passes the budget."""
    return max(1, min(batch_size, SCORE_BUDGET // max(n_items, 1)))


@dataclass
class BatchComparison:
    """What one batch of users contributes to a backend's report."""

    errors: ScoreErrors
    bad: NonFinite
    ref_top: np.ndarray
    out_top: np.ndarray
    #: per-batch extras: counts (summed) and ``(max, sum, n)`` triples of the embedding errors
    counts: dict[str, int] = field(default_factory=dict)
    embedding: tuple[float, float, int] | None = None
    #: embedding artifacts with an ANN index: the index's top-K for the artifact's user vectors
    ann_top: np.ndarray | None = None


def _merge_errors(parts: list[BatchComparison], offsets: list[int]) -> ScoreErrors:
    compared = sum(p.errors.compared for p in parts)
    mismatches = sum(p.errors.mask_mismatches for p in parts)
    live = [(p.errors, off) for p, off in zip(parts, offsets, strict=True) if p.errors.compared]
    if not live:
        nan = float("nan")
        return ScoreErrors(0, nan, nan, nan, nan, -1, mismatches)
    worst, off = max(live, key=lambda e: e[0].max_abs)
    return ScoreErrors(
        compared=compared,
        max_abs=max(e.max_abs for e, _ in live),
        mean_abs=sum(e.mean_abs * e.compared for e, _ in live) / compared,
        max_rel=max(e.max_rel for e, _ in live),
        mean_rel=sum(e.mean_rel * e.compared for e, _ in live) / compared,
        worst_user=off + worst.worst_user,
        mask_mismatches=mismatches,
    )


def merge(parts: list[BatchComparison], targets: np.ndarray | None) -> tuple[dict[str, Any], np.ndarray]:
    """The metrics of all batches together (as one comparison of every user), and per-user overlap."""
    offsets = list(np.cumsum([0] + [len(p.ref_top) for p in parts[:-1]]))
    err = _merge_errors(parts, [int(o) for o in offsets])
    fields = ("nan", "pos_inf", "unexpected_neg_inf")
    bad = NonFinite(*(sum(getattr(p.bad, f) for p in parts) for f in fields))
    metrics: dict[str, Any] = {}
    for key in sorted({key for p in parts for key in p.counts}):
        metrics[key] = sum(p.counts.get(key, 0) for p in parts)
    emb = [p.embedding for p in parts if p.embedding is not None]
    if emb:
        n = sum(e[2] for e in emb)
        metrics["embedding_max_abs_error"] = max(e[0] for e in emb)
        metrics["embedding_mean_abs_error"] = sum(e[1] for e in emb) / max(n, 1)
    ranking = ranking_parity(
        np.concatenate([p.ref_top for p in parts]), np.concatenate([p.out_top for p in parts]), targets
    )
    if parts and all(p.ann_top is not None for p in parts):
        metrics.update(_ann_metrics(parts, targets))
    metrics.update(
        {
            "max_abs_error": err.max_abs,
            "mean_abs_error": err.mean_abs,
            "max_rel_error": err.max_rel,
            "mean_rel_error": err.mean_rel,
            "worst_user_abs_error": err.worst_user,
            "scores_compared": err.compared,
            "mask_mismatches": err.mask_mismatches,
            "nan": bad.nan,
            "pos_inf": bad.pos_inf,
            "unexpected_neg_inf": bad.unexpected_neg_inf,
            "non_finite": bad.total,
            **ranking.summary(),
        }
    )
    return metrics, ranking.overlap


def _ann_metrics(parts: list[BatchComparison], targets: np.ndarray | None) -> dict[str, float]:
    """Recall@K of the ANN top-K against the exact top-K (of the same user vectors), and offline metrics."""
    from ..ann import recall

    exact = np.concatenate([p.out_top for p in parts])
    approx = np.concatenate([p.ann_top for p in parts if p.ann_top is not None])
    r = recall(exact, approx)
    k = exact.shape[1]
    out = {f"ann_recall@{k}_mean": float(r.mean()), f"ann_recall@{k}_min": float(r.min())}
    if targets is not None:
        for name, value in offline_metrics(approx, targets).items():
            out[f"ann_{name}@{k}"] = value
        for name, value in offline_metrics(exact, targets).items():
            out[f"exact_{name}@{k}"] = value
    return out
