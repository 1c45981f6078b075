"""Parity metrics and input adaptation: hand-checked values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from m4r_export.verify.metrics import (
    kendall_tau_topk,
    non_finite,
    offline_metrics,
    ranking_parity,
    rbo,
    score_errors,
    topk_from_scores,
    topk_overlap,
)
from m4r_export.verify.runners import fit_width

NEG = -np.inf


def test_topk_from_scores_orders_best_first_and_breaks_ties_by_item_id() -> None:
    scores = np.array([[NEG, 0.5, 2.0, 2.0, -1.0, 3.0]])
    assert topk_from_scores(scores, 3).tolist() == [[5, 2, 3]]
    assert topk_from_scores(scores, 10).shape == (1, 6)


def test_score_errors_ignore_masked_entries_and_count_mask_mismatches() -> None:
    ref = np.array([[NEG, 1.0, -2.0, 4.0], [NEG, 0.0, 1.0, 2.0]])
    out = np.array([[NEG, 1.1, -2.0, 4.0], [NEG, NEG, 1.0, 2.5]])
    e = score_errors(ref, out)
    assert e.compared == 5  # 3 + 2 finite-in-both entries
    assert e.max_abs == pytest.approx(0.5)
    assert e.worst_user == 1
    assert e.mask_mismatches == 1  # ref finite, out -inf
    # relative: 0.5 / max(|2|, std(0, 1, 2) = 0.816) = 0.25
    assert e.max_rel == pytest.approx(0.25)
    assert e.mean_abs == pytest.approx(0.6 / 5)


def test_relative_error_floor_keeps_near_zero_scores_finite() -> None:
    ref = np.array([[NEG, 1e-9, 10.0]])
    out = np.array([[NEG, 1e-3, 10.0]])
    # floor = the row's score spread: std(1e-9, 10) = 5 (masked entries ignored)
    assert score_errors(ref, out).max_rel == pytest.approx(1e-3 / 5, rel=1e-6)
    big = np.array([[NEG, 100.0, 101.0]])
    assert score_errors(big, big + [[0, 1.0, 0]]).max_rel == pytest.approx(0.01)  # |ref| > spread


def test_non_finite_counts() -> None:
    ref = np.array([[NEG, 1.0, 2.0, 3.0]])
    out = np.array([[NEG, np.nan, np.inf, NEG]])
    bad = non_finite(out, ref)
    assert (bad.nan, bad.pos_inf, bad.unexpected_neg_inf, bad.total) == (1, 1, 1, 3)


def test_overlap_tau_rbo_on_identical_reversed_and_disjoint_lists() -> None:
    a = np.array([[1, 2, 3, 4]])
    assert topk_overlap(a, a)[0] == 1.0
    assert kendall_tau_topk(a, a)[0] == 1.0
    assert rbo(a, a)[0] == pytest.approx(1.0)
    rev = a[:, ::-1]
    assert topk_overlap(a, rev)[0] == 1.0
    assert kendall_tau_topk(a, rev)[0] == pytest.approx(-1.0)
    assert rbo(a, rev)[0] < 1.0
    other = np.array([[5, 6, 7, 8]])
    assert topk_overlap(a, other)[0] == 0.0
    assert kendall_tau_topk(a, other)[0] == -1.0
    assert rbo(a, other)[0] == 0.0


def test_rbo_hand_value_and_boundary_swap() -> None:
    # [1,2] vs [2,1], p=0.9: depth 1 agreement 0, depth 2 agreement 1 ->
    # 1 * 0.9^2 + (0.1 / 0.9) * (0 + 1 * 0.81) = 0.81 + 0.09 = 0.9
    assert rbo(np.array([[1, 2]]), np.array([[2, 1]]), p=0.9)[0] == pytest.approx(0.9)
    a = np.array([[1, 2, 3, 4, 5]])
    b = np.array([[1, 2, 3, 4, 9]])  # last item differs
    assert topk_overlap(a, b)[0] == pytest.approx(0.8)
    assert kendall_tau_topk(a, b)[0] == 1.0  # common items keep their order
    swapped_top = np.array([[2, 1, 3, 4, 5]])
    swapped_end = np.array([[1, 2, 3, 5, 4]])
    # RBO weighs the top: a swap at the head costs more than one at the tail
    assert rbo(a, swapped_top)[0] < rbo(a, swapped_end)[0] < 1.0


def test_offline_metrics_and_deltas() -> None:
    ref = np.array([[7, 8, 9], [1, 2, 3]])
    out = np.array([[8, 7, 9], [1, 2, 3]])
    targets = np.array([7, 4])
    m = offline_metrics(ref, targets)
    assert m == {"hit": 0.5, "ndcg": 0.5, "mrr": 0.5}
    res = ranking_parity(ref, out, targets).summary()
    assert res["hit@3_delta"] == 0.0
    assert res["mrr@3_out"] == pytest.approx(0.25)
    assert res["ndcg@3_delta"] == pytest.approx(0.5 / math.log2(3) - 0.5)
    assert res["topk_overlap_min"] == 1.0 and res["kendall_tau_min"] < 1.0


def test_fit_width_keeps_most_recent_items_and_pads() -> None:
    seq = np.array([[1, 2, 3, 4, 5, 0], [6, 7, 0, 0, 0, 0], [9, 0, 0, 0, 0, 0]])
    lens = np.array([5, 2, 0])  # length 0 is clamped to 1, like the model does
    s3, l3 = fit_width(seq, lens, 3)
    assert s3.tolist() == [[3, 4, 5], [6, 7, 0], [9, 0, 0]]
    assert l3.tolist() == [3, 2, 1]
    s8, l8 = fit_width(seq, lens, 8)
    assert s8.shape == (3, 8) and s8[0].tolist() == [1, 2, 3, 4, 5, 0, 0, 0]
    assert l8.tolist() == [5, 2, 1]
