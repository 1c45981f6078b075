"""``exclude_items`` beyond the serving graph: the known-history helper, ``m4r evaluate
--exclude-history`` and what ``m4r verify`` feeds, each against plain-Python references."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from m4r_export.checkpoint import save_checkpoint
from m4r_export.cli import main
from m4r_export.data import SequenceDataset, load_dataset, synthetic_interactions, write_inter_file
from m4r_export.model import Mamba4Rec
from m4r_export.serving import ServingModel
from m4r_export.training.evaluation import evaluate_checkpoint
from m4r_export.verify import BACKENDS, run_verify
from m4r_export.verify.runners import ArtifactRunner, OrtCpuRunner
from m4r_export.verify.testing import tiny_model, trace_onnx
from m4r_export.verify.verify import _history_mask

MAX_LEN = 6  # shorter than most histories, so the full history reaches beyond the model's window


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("exclude")
    users, items, ts = synthetic_interactions(n_users=70, n_items=40, seed=3, min_len=8, max_len=20)
    # repeat consumption: user 1 sees their first item again as their last interaction
    first, last_t = items[users == 1][0], ts.max() + 1
    users, items, ts = np.append(users, 1), np.append(items, first), np.append(ts, last_t)
    data = root / "data.inter"
    write_inter_file(data, users, items, ts)
    ds = load_dataset(data, max_seq_len=MAX_LEN)
    torch.manual_seed(0)
    model = Mamba4Rec(ds.n_items, hidden_size=16, d_state=8).eval()
    with torch.no_grad():
        model.item_embedding.weight.normal_(0.0, 1.0)
    ckpt = root / "model.pt"
    save_checkpoint(ckpt, model, list(ds.item_tokens), {"max_seq_len": MAX_LEN})
    artifact = trace_onnx(model, root / "topk", head="topk", k=10, max_seq_len=MAX_LEN)
    return {
        "data": data,
        "ds": ds,
        "model": model,
        "ckpt": ckpt,
        "artifact": artifact,
        "raw": (users, items, ts),
    }


def python_known(raw: tuple[np.ndarray, ...], ds: SequenceDataset, drop_last: int) -> dict[int, set[int]]:
    """user index -> set of item indices of all but the user's last ``drop_last`` interactions."""
    users, items, ts = raw
    events: dict[str, list[tuple[float, int, str]]] = defaultdict(list)
    for row, (u, i, t) in enumerate(zip(users.tolist(), items.tolist(), ts.tolist(), strict=True)):
        events[str(u)].append((t, row, str(i)))
    user_index = {tok: i for i, tok in enumerate(ds.user_tokens)}
    out = {}
    for u, evs in events.items():
        if u not in user_index:
            continue  # filtered out by k-core
        kept = [tok for _, _, tok in sorted(evs) if tok in ds.item_index]
        out[user_index[u]] = {ds.item_index[tok] for tok in kept[:-drop_last]}
    return out


@pytest.mark.parametrize(("split", "drop_last"), [("test", 1), ("valid", 2)])
def test_known_items_are_every_earlier_item(setup: dict[str, Any], split: str, drop_last: int) -> None:
    ds = setup["ds"]
    expected = python_known(setup["raw"], ds, drop_last)
    rows = getattr(ds, split)
    got = ds.known_items(split)
    assert len(got) == len(rows)
    longer = 0
    for r, user in enumerate(rows.user.tolist()):
        assert set(got[r].tolist()) == expected[user], (split, user)
        longer += len(expected[user]) > rows.item_seq_len[r]
    assert longer > len(rows) // 2  # most histories reach beyond the window: the test means something
    # the repeat: user 1's test target is in their known history
    one = ds.user_tokens.index("1")
    r = int(np.flatnonzero(ds.test.user == one)[0])
    assert split != "test" or ds.test.target[r] in set(got[r].tolist())


def python_ranking_metrics(setup: dict[str, Any], k: int) -> tuple[float, float]:
    """hit@k and ndcg@k with the known history masked, computed row by row with Python sets."""
    ds, model = setup["ds"], setup["model"]
    known = python_known(setup["raw"], ds, 1)
    with torch.no_grad():
        scores = model.full_sort_scores(
            torch.from_numpy(ds.test.item_seq), torch.from_numpy(ds.test.item_seq_len)
        )
    hits, ndcg = 0.0, 0.0
    for r, user in enumerate(ds.test.user.tolist()):
        row = scores[r].tolist()
        banned = known[user] | {0}
        target = int(ds.test.target[r])
        t_score = -float("inf") if target in banned else row[target]
        rank = 1 + sum(1 for i, s in enumerate(row) if i not in banned and s > t_score)
        if target in banned:
            rank = ds.n_items  # a masked target is never recommended
        if rank <= k:
            hits += 1
            ndcg += 1 / np.log2(rank + 1)
    n = len(ds.test)
    return hits / n, ndcg / n


def test_evaluate_exclude_history_masks_the_full_history(setup: dict[str, Any], tmp_path: Path) -> None:
    hit, ndcg = python_ranking_metrics(setup, 10)
    rep = evaluate_checkpoint(setup["ckpt"], setup["data"], ks=[10], exclude_history=True)
    assert rep.model["hit@10"] == pytest.approx(hit, abs=1e-9)
    assert rep.model["ndcg@10"] == pytest.approx(ndcg, abs=1e-9)
    plain = evaluate_checkpoint(setup["ckpt"], setup["data"], ks=[10])
    assert plain.model["hit@10"] != rep.model["hit@10"]  # the masking changes the numbers here
    out = tmp_path / "e.json"
    res = CliRunner().invoke(
        main,
        [
            "evaluate",
            "--ckpt",
            str(setup["ckpt"]),
            "--data",
            str(setup["data"]),
            "--exclude-history",
            "--json",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "known history excluded" in res.output
    report = json.loads(out.read_text())
    assert report["exclude_history"] is True and report["hit@10"] == pytest.approx(hit, abs=1e-9)


def test_verify_feeds_known_history_and_matches_evaluate(setup: dict[str, Any]) -> None:
    rep = run_verify(setup["ckpt"], setup["artifact"], data=setup["data"], users=10_000, k=10)
    assert rep.passed, rep.failure_message()
    assert rep.inputs["exclude_items"] == "known history"
    m = rep.results[0].metrics
    hit, ndcg = python_ranking_metrics(setup, 10)
    # verify on a top-K artifact fed the known history == evaluate --exclude-history
    assert m["hit@10_ref"] == pytest.approx(hit, abs=1e-9) and m["hit@10_out"] == pytest.approx(hit, abs=1e-9)
    assert m["ndcg@10_ref"] == pytest.approx(ndcg, abs=1e-9)
    none = run_verify(
        setup["ckpt"], setup["artifact"], data=setup["data"], users=10_000, k=10, exclude="none"
    )
    assert none.inputs["exclude_items"] is None and none.passed
    assert none.results[0].metrics["hit@10_ref"] != pytest.approx(hit, abs=1e-9)


def test_verify_catches_a_backend_that_ignores_exclude_items(setup: dict[str, Any]) -> None:
    class DropsExcludes(ArtifactRunner):
        """ORT CPU that feeds zeros instead of the caller's exclude lists (a buggy client/backend)."""

        backend = "test-drops-excludes"
        kinds = ("onnx",)

        def __init__(self, artifact: Any, *, threads: int | None = None) -> None:
            self.inner = OrtCpuRunner(artifact, threads=threads)
            self.output_names = self.inner.output_names
            self.takes_exclude = True
            self.name = self.backend

        def infer(self, item_seq: np.ndarray, item_seq_len: np.ndarray, exclude_items: Any) -> dict[str, Any]:
            return self.inner.infer(item_seq, item_seq_len, np.zeros_like(exclude_items))

    try:
        rep = run_verify(
            setup["ckpt"], setup["artifact"], users=64, k=10, backends=["ort-cpu", DropsExcludes.backend]
        )
    finally:
        BACKENDS.pop(DropsExcludes.backend, None)
    good, bad = rep.results
    assert rep.inputs["exclude_items"] == "random lists"
    assert good.passed and not bad.passed
    assert "mask_mismatches" in {c.metric for c in bad.failures}
    assert bad.metrics["mask_mismatches"] > 0


# ------------------------------------------------------------------ exclude_history (the input window)

N = 40
RAGGED_SEQ = np.array(
    [
        [5, 7, 7, 0, 0, 0],  # length 3, a duplicate
        [9, 4, 0, 0, 0, 0],  # length 0 -> 1: item 9 is history, 4 is not
        [1, 2, 3, 4, 5, 6],  # length 99 > seq -> 6
        [-4, 3, N + 4, N, 2, 0],  # out-of-range ids in the window are no items
        [8, 9, 10, 11, 12, 13],  # length 2: the later items are not history
        [3, 6, 0, 0, 0, 0],  # negative length -> 1
    ],
    dtype=np.int64,
)
RAGGED_LEN = np.array([3, 0, 99, 5, 2, -2], dtype=np.int64)


def python_window(seq: np.ndarray, lens: np.ndarray, n_items: int) -> list[set[int]]:
    """Item 0 plus every valid id among the first clamp(len, 1, seq) positions, with Python sets."""
    out = []
    for row, length in zip(seq.tolist(), lens.tolist(), strict=True):
        valid = min(max(length, 1), len(row))
        out.append({0} | {i for i in row[:valid] if 0 <= i < n_items})
    return out


def test_exclude_history_masks_exactly_the_clamped_window() -> None:
    expected = python_window(RAGGED_SEQ, RAGGED_LEN, N)
    assert expected[1] == {0, 9} and expected[2] == {0, 1, 2, 3, 4, 5, 6} and expected[3] == {0, 3, 2}
    model = tiny_model(N)
    seq, lens = torch.from_numpy(RAGGED_SEQ), torch.from_numpy(RAGGED_LEN)
    with torch.no_grad():
        (scores,) = ServingModel(model, "scores", exclude_history=True)(seq, lens)
        (plain,) = ServingModel(model, "scores")(seq, lens)
        _, top = ServingModel(model, "topk", k=N - 8, exclude_history=True)(seq, lens)
        extra = torch.tensor([[11, 0], [-1, 12], [N, 0], [0, 0], [13, 13], [39, 1]])
        (both,) = ServingModel(model, "scores", exclude_history=True)(seq, lens, extra)
    for r, banned in enumerate(expected):
        assert set(np.flatnonzero(np.isneginf(scores[r].numpy())).tolist()) == banned, r
        kept = [i for i in range(N) if i not in banned]
        np.testing.assert_array_equal(scores[r, kept].numpy(), plain[r, kept].numpy())
        rankable = N - len(banned)
        assert not banned & set(top[r, :rankable].tolist())
        more = banned | {i for i in extra[r].tolist() if 1 <= i < N}
        assert set(np.flatnonzero(np.isneginf(both[r].numpy())).tolist()) == more, r
    # verify's own mask (embedding artifacts exported with --exclude-history) is the same set
    mask = _history_mask(RAGGED_SEQ, RAGGED_LEN, N)
    assert [set(np.flatnonzero(m).tolist()) | {0} for m in mask] == expected
