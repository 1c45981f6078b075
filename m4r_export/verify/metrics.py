"""Parity metrics between a reference ranking (PyTorch) and a candidate (an exported artifact).

Everything here is plain numpy on host arrays, so every backend is judged by the same code.

Inputs are per-user score rows ``[users, n_items]`` (masked entries are ``-inf``) or, for a top-K
artifact, its ``topk_items``/``topk_scores``. Definitions (also in docs/verify-bench.md):

* **abs error**: ``|out - ref|`` over entries finite in both; **relative error**:
  ``|out - ref| / max(|ref|, std_row(ref))``: relative to the score itself, but never to less than
  the spread of that user's scores (the scale a ranking cares about), so that scores near zero do
  not divide by ~0. An error of 0.01 means 1 % of the score or 1 % of the spread, whichever is larger.
* **mask mismatches**: entries that are ``-inf`` on one side only (item 0, excluded history).
* **NaN / +Inf / unexpected -Inf** counts in the candidate's outputs.
* **top-K overlap**: ``|top_K(ref) & top_K(out)| / K`` per user; mean and worst user.
* **Kendall tau within top-K**: over the items present in both top-K lists, the rank correlation
  of their positions in the two lists (tau-a; positions never tie). 1 = same order. Users with
  fewer than two common items count as -1 (nothing in common is the worst order).
* **RBO**: rank-biased overlap (Webber et al. 2010), extrapolated form at depth K with
  persistence ``p`` (default 0.9): 1 = identical lists, 0 = disjoint; top positions weigh most.
* **hit / ndcg / mrr @K** of a held-out target item on each side, and their differences
  (candidate - reference).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


def topk_from_scores(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` best items per row, best first (ties broken by lower item id)."""
    scores = np.asarray(scores, dtype=np.float64)
    k = min(k, scores.shape[1])
    # argsort of -scores is stable, so equal scores keep ascending item order on every platform
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    part_scores = np.take_along_axis(scores, part, axis=1)
    order = np.lexsort((part, -part_scores), axis=1)
    return np.take_along_axis(part, order, axis=1).astype(np.int64)


@dataclass
class ScoreErrors:
    compared: int  # entries finite on both sides
    max_abs: float
    mean_abs: float
    max_rel: float
    mean_rel: float
    worst_user: int  # row of max_abs (-1 when nothing compared)
    mask_mismatches: int


def score_errors(ref: np.ndarray, out: np.ndarray) -> ScoreErrors:
    """Abs/relative errors over entries finite in both arrays (same shape)."""
    ref = np.asarray(ref, dtype=np.float64)
    out = np.asarray(out, dtype=np.float64)
    if ref.shape != out.shape:
        raise ValueError(f"shape mismatch: reference {ref.shape}, candidate {out.shape}")
    ref_masked = np.isneginf(ref)
    out_masked = np.isneginf(out)
    mismatches = int(np.count_nonzero(ref_masked != out_masked))
    both = np.isfinite(ref) & np.isfinite(out)
    n = int(np.count_nonzero(both))
    if n == 0:
        return ScoreErrors(0, float("nan"), float("nan"), float("nan"), float("nan"), -1, mismatches)
    ref0 = np.where(both, ref, 0.0)
    diff = np.abs(np.where(both, out, 0.0) - ref0)
    mag = np.abs(ref0)
    finite_ref = np.isfinite(ref)
    count = np.maximum(finite_ref.sum(axis=-1, keepdims=True), 1)
    mean = np.where(finite_ref, ref, 0.0).sum(axis=-1, keepdims=True) / count
    spread = np.sqrt((np.where(finite_ref, ref - mean, 0.0) ** 2).sum(axis=-1, keepdims=True) / count)
    scale = np.maximum(mag, spread)
    scale = np.where(scale > 0, scale, 1.0)
    rel = diff / scale
    flat = int(np.argmax(diff))
    worst_user = int(np.unravel_index(flat, diff.shape)[0]) if diff.ndim > 1 else 0
    return ScoreErrors(
        compared=n,
        max_abs=float(diff.max()),
        mean_abs=float(diff.sum() / n),
        max_rel=float(rel.max()),
        mean_rel=float(rel.sum() / n),
        worst_user=worst_user,
        mask_mismatches=mismatches,
    )


@dataclass
class NonFinite:
    nan: int
    pos_inf: int
    unexpected_neg_inf: int  # -inf where the reference is finite

    @property
    def total(self) -> int:
        return self.nan + self.pos_inf + self.unexpected_neg_inf


def non_finite(out: np.ndarray, ref: np.ndarray | None = None) -> NonFinite:
    out = np.asarray(out, dtype=np.float64)
    neg = np.isneginf(out)
    unexpected = int(np.count_nonzero(neg & np.isfinite(ref))) if ref is not None else 0
    return NonFinite(
        int(np.count_nonzero(np.isnan(out))), int(np.count_nonzero(np.isposinf(out))), unexpected
    )


def topk_overlap(ref_top: np.ndarray, out_top: np.ndarray) -> np.ndarray:
    """Per-user fraction of the reference top-K also in the candidate's top-K."""
    k = ref_top.shape[1]
    return np.array(
        [len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(ref_top, out_top, strict=True)]
    )


def kendall_tau_topk(ref_top: np.ndarray, out_top: np.ndarray) -> np.ndarray:
    """Per-user Kendall tau-a of the positions of the items common to both top-K lists."""
    taus = np.empty(len(ref_top))
    for u, (a, b) in enumerate(zip(ref_top, out_top, strict=True)):
        pos_b = {item: i for i, item in enumerate(b.tolist())}
        common = [(i, pos_b[item]) for i, item in enumerate(a.tolist()) if item in pos_b]
        n = len(common)
        if n < 2:
            taus[u] = 1.0 if n == len(a) else -1.0  # K == 1 and the same item: perfect
            continue
        ra = np.array([c[0] for c in common])
        rb = np.array([c[1] for c in common])
        sa = np.sign(ra[:, None] - ra[None, :])
        sb = np.sign(rb[:, None] - rb[None, :])
        taus[u] = float((sa * sb).sum()) / (n * (n - 1))
    return taus


def rbo(ref_top: np.ndarray, out_top: np.ndarray, p: float = 0.9) -> np.ndarray:
    """Per-user extrapolated rank-biased overlap at depth K (Webber, Moffat, Zobel 2010, eq. 32)."""
    k = ref_top.shape[1]
    vals = np.empty(len(ref_top))
    for u, (a, b) in enumerate(zip(ref_top, out_top, strict=True)):
        seen_a: set[int] = set()
        seen_b: set[int] = set()
        overlap = 0
        acc = 0.0
        for d in range(1, k + 1):
            x, y = int(a[d - 1]), int(b[d - 1])
            if x == y:
                overlap += 1
            else:
                overlap += (x in seen_b) + (y in seen_a)
            seen_a.add(x)
            seen_b.add(y)
            acc += overlap / d * p**d
        vals[u] = overlap / k * p**k + (1 - p) / p * acc
    return vals


def target_ranks(top: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """1-based rank of each target in its row's top-K, 0 when absent."""
    hit = top == targets[:, None]
    return np.where(hit.any(axis=1), hit.argmax(axis=1) + 1, 0)


def offline_metrics(top: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """hit / ndcg / mrr @K of one held-out target per user."""
    ranks = target_ranks(top, targets)
    found = ranks > 0
    safe = np.where(found, ranks, 1)
    return {
        "hit": float(found.mean()),
        "ndcg": float(np.where(found, 1.0 / np.log2(safe + 1), 0.0).mean()),
        "mrr": float(np.where(found, 1.0 / safe, 0.0).mean()),
    }


@dataclass
class RankingParity:
    k: int
    users: int
    overlap: np.ndarray = field(repr=False)
    tau: np.ndarray = field(repr=False)
    rbo: np.ndarray = field(repr=False)
    offline_ref: dict[str, float] | None = None
    offline_out: dict[str, float] | None = None

    def summary(self) -> dict[str, Any]:
        worst = int(np.argmin(self.overlap)) if self.users else -1
        d: dict[str, Any] = {
            "k": self.k,
            "users": self.users,
            "topk_overlap_mean": float(self.overlap.mean()),
            "topk_overlap_min": float(self.overlap.min()),
            "topk_overlap_worst_user": worst,
            "users_topk_identical": int(np.count_nonzero(self.overlap == 1.0)),
            "kendall_tau_mean": float(self.tau.mean()),
            "kendall_tau_min": float(self.tau.min()),
            "rbo_mean": float(self.rbo.mean()),
            "rbo_min": float(self.rbo.min()),
        }
        if self.offline_ref is not None and self.offline_out is not None:
            for name in self.offline_ref:
                d[f"{name}@{self.k}_ref"] = self.offline_ref[name]
                d[f"{name}@{self.k}_out"] = self.offline_out[name]
                d[f"{name}@{self.k}_delta"] = self.offline_out[name] - self.offline_ref[name]
        return d


def ranking_parity(
    ref_top: np.ndarray, out_top: np.ndarray, targets: np.ndarray | None = None, p: float = 0.9
) -> RankingParity:
    """All ranking metrics for top-K lists ``[users, K]`` (best first)."""
    if ref_top.shape != out_top.shape:
        raise ValueError(f"top-K shape mismatch: reference {ref_top.shape}, candidate {out_top.shape}")
    res = RankingParity(
        k=int(ref_top.shape[1]),
        users=int(ref_top.shape[0]),
        overlap=topk_overlap(ref_top, out_top),
        tau=kendall_tau_topk(ref_top, out_top),
        rbo=rbo(ref_top, out_top, p),
    )
    if targets is not None:
        res.offline_ref = offline_metrics(ref_top, targets)
        res.offline_out = offline_metrics(out_top, targets)
    return res
