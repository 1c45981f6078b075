"""Parity metrics and input adaptation: hand-checked values."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from m4r_export.verify.artifact import ArtifactInfo
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
from m4r_export.verify.verify import Thresholds, VerifyInputs, check_metrics, compare_outputs

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


# ------------------------------------------------------------------------------ the gates of verify

T32 = Thresholds.defaults("fp32")
#: metric key -> (value exactly at the limit: passes, value just beyond: fails, gate name in the report)
GATES: dict[str, tuple[float, float, str]] = {
    "non_finite": (T32.max_non_finite, T32.max_non_finite + 1, "non_finite"),
    "mask_mismatches": (T32.max_mask_mismatches, T32.max_mask_mismatches + 1, "mask_mismatches"),
    "max_abs_error": (T32.max_abs_error, T32.max_abs_error * 1.01, "max_abs_error"),
    "max_rel_error": (T32.max_rel_error, T32.max_rel_error * 1.01, "max_rel_error"),
    "topk_overlap_mean": (T32.min_topk_overlap_mean, T32.min_topk_overlap_mean - 1e-4, "topk_overlap_mean"),
    "topk_overlap_min": (T32.min_topk_overlap_min, T32.min_topk_overlap_min - 0.1, "topk_overlap_min"),
    "kendall_tau_mean": (T32.min_kendall_tau_mean, T32.min_kendall_tau_mean - 1e-4, "kendall_tau_mean"),
    "rbo_mean": (T32.min_rbo_mean, T32.min_rbo_mean - 1e-4, "rbo_mean"),
    # deltas are judged by magnitude: the failing values are negative on purpose
    "ndcg@10_delta": (-T32.max_abs_ndcg_delta, -T32.max_abs_ndcg_delta * 1.5, "|ndcg@10_delta|"),
    "hit@10_delta": (T32.max_abs_hit_delta, -T32.max_abs_hit_delta * 1.5, "|hit@10_delta|"),
}


def _perfect_metrics() -> dict[str, float]:
    return {
        "non_finite": 0, "mask_mismatches": 0, "max_abs_error": 0.0, "max_rel_error": 0.0,
        "topk_overlap_mean": 1.0, "topk_overlap_min": 1.0, "kendall_tau_mean": 1.0, "rbo_mean": 1.0,
        "ndcg@10_delta": 0.0, "hit@10_delta": 0.0,
    }  # fmt: skip


def test_every_gate_is_checked() -> None:
    checks = check_metrics(_perfect_metrics(), T32, 10)
    assert all(c.passed for c in checks)
    assert {c.metric for c in checks} == {gate for _, _, gate in GATES.values()}
    # without targets (generated inputs) there is no ndcg/hit to compare
    no_targets = {k: v for k, v in _perfect_metrics().items() if "@" not in k}
    assert {c.metric for c in check_metrics(no_targets, T32, 10)} == {
        gate for key, (_, _, gate) in GATES.items() if "@" not in key
    }


@pytest.mark.parametrize("key", list(GATES))
def test_each_gate_passes_at_its_limit_and_fails_beyond_it(key: str) -> None:
    at_limit, beyond, gate = GATES[key]
    metrics = _perfect_metrics()
    metrics[key] = at_limit
    assert all(c.passed for c in check_metrics(metrics, T32, 10)), key
    metrics[key] = beyond
    failures = [c for c in check_metrics(metrics, T32, 10) if not c.passed]
    assert [c.metric for c in failures] == [gate]  # this gate, reading this metric, and no other
    assert failures[0].value == pytest.approx(abs(beyond) if gate.startswith("|") else beyond)
    metrics[key] = float("nan")  # a NaN metric never passes
    assert gate in {c.metric for c in check_metrics(metrics, T32, 10) if not c.passed}


def test_worst_user_gate_reads_the_worst_user_not_the_mean() -> None:
    metrics = _perfect_metrics()
    metrics["topk_overlap_mean"] = 0.9995  # one user of 1000 lost half of their top-10
    metrics["topk_overlap_min"] = 0.5
    failures = [c for c in check_metrics(metrics, T32, 10) if not c.passed]
    assert [(c.metric, c.value) for c in failures] == [("topk_overlap_min", 0.5)]


def _artifact(head: str) -> ArtifactInfo:
    return ArtifactInfo(Path("model.onnx"), "onnx", head, 10, False, None, "fp32")


def test_unmasked_padding_fails_the_mask_gate() -> None:
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(8, 30))
    ref[:, 0] = NEG
    inputs = VerifyInputs(np.ones((8, 3), np.int64), np.full(8, 3), None, "test")
    out = ref.copy()
    metrics, _ = compare_outputs(_artifact("scores"), ref, {"scores": out}, 10, inputs)
    assert all(c.passed for c in check_metrics(metrics, T32, 10))
    out[:, 0] = ref[:, 1:].min() - 1.0  # padding scored (finite), ranked last: nothing else changes
    metrics, _ = compare_outputs(_artifact("scores"), ref, {"scores": out}, 10, inputs)
    assert metrics["mask_mismatches"] == 8
    assert [c.metric for c in check_metrics(metrics, T32, 10) if not c.passed] == ["mask_mismatches"]
    # a top-K artifact that returns the padding item
    top = topk_from_scores(ref, 10)
    items = top.copy()
    items[:, -1] = 0
    scores = np.take_along_axis(ref, top, axis=1)
    scores[:, -1] = scores[:, -2] - 1.0
    metrics, _ = compare_outputs(
        _artifact("topk"), ref, {"topk_items": items, "topk_scores": scores}, 10, inputs
    )
    assert metrics["mask_mismatches"] == 8
    assert "mask_mismatches" in {c.metric for c in check_metrics(metrics, T32, 10) if not c.passed}
