"""Full-ranking metrics (RecBole semantics), the most-popular baseline, the vocabulary check, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from m4r_export.checkpoint import save_checkpoint
from m4r_export.cli import main
from m4r_export.data import Split, build_dataset, load_dataset, synthetic_interactions, write_inter_file
from m4r_export.errors import UsageError
from m4r_export.model import Mamba4Rec
from m4r_export.training.evaluation import check_vocabulary, evaluate_checkpoint
from m4r_export.training.metrics import (
    evaluate,
    evaluate_scorer,
    means,
    metric_sums,
    popularity_scorer,
    target_ranks,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _split(seqs: list[list[int]], targets: list[int], width: int = 4) -> Split:
    item_seq = np.zeros((len(seqs), width), dtype=np.int64)
    for r, s in enumerate(seqs):
        item_seq[r, : len(s)] = s
    lens = np.array([len(s) for s in seqs], dtype=np.int64)
    return Split(item_seq, lens, np.array(targets, dtype=np.int64), np.arange(1, len(seqs) + 1))


def test_metrics_by_hand() -> None:
    inf = float("-inf")
    scores = torch.tensor(
        [
            [inf, 0.9, 0.1, 0.5, 0.3],  # target 1: rank 1
            [inf, 0.9, 0.1, 0.5, 0.3],  # target 4: rank 3
            [inf, 0.9, 0.1, 0.5, 0.3],  # target 2: rank 4
        ]
    )
    ranks = target_ranks(scores, torch.tensor([1, 4, 2]))
    assert ranks.tolist() == [1, 3, 4]
    m = {k: v / 3 for k, v in metric_sums(ranks, [1, 3]).items()}
    assert m["hit@1"] == pytest.approx(1 / 3)
    assert m["hit@3"] == pytest.approx(2 / 3)
    assert m["ndcg@3"] == pytest.approx((1 + 1 / math.log2(4)) / 3)
    assert m["mrr@3"] == pytest.approx((1 + 1 / 3) / 3)
    assert m["ndcg@1"] == pytest.approx(1 / 3)


def test_ties_nan_and_padding() -> None:
    scores = torch.tensor([[float("-inf"), 1.0, 1.0, 1.0], [float("-inf"), 2.0, float("nan"), 1.0]])
    # a tie counts in the target's favour; a NaN target ranks last; NaN elsewhere outranks nothing
    assert target_ranks(scores, torch.tensor([3, 2])).tolist() == [1, 4]
    assert target_ranks(scores, torch.tensor([3, 3])).tolist() == [1, 2]


def test_metrics_match_a_topk_implementation() -> None:
    """RecBole: topk indices, then position of the target (random scores: no ties)."""
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(200, 50, generator=g)
    scores[:, 0] = float("-inf")
    target = torch.randint(1, 50, (200,), generator=g)
    ours = {k: v / 200 for k, v in metric_sums(target_ranks(scores, target), [5, 10, 20]).items()}
    for k in (5, 10, 20):
        top = scores.topk(k, dim=1).indices
        hit = (top == target[:, None]).float()
        pos = hit.argmax(1).double() + 1
        found = hit.sum(1).double()
        assert ours[f"hit@{k}"] == pytest.approx(found.mean().item())
        assert ours[f"ndcg@{k}"] == pytest.approx((found / torch.log2(pos + 1)).mean().item())
        assert ours[f"mrr@{k}"] == pytest.approx((found / pos).mean().item())


def test_history_is_not_masked() -> None:
    """A scorer that puts the history's last item first: the target equal to it counts as a hit."""
    split = _split([[1, 2, 3], [4, 2]], [3, 2])

    def scorer(seq: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        s = torch.zeros(seq.shape[0], 6)
        s[torch.arange(seq.shape[0]), seq[torch.arange(seq.shape[0]), lens - 1]] = 1.0
        s[:, 0] = float("-inf")
        return s

    assert evaluate(scorer, split, [1])["hit@1"] == 1.0


def test_batches_crops_and_shards_give_the_same_result() -> None:
    users, items, ts = synthetic_interactions(n_users=60, n_items=30, seed=1)
    ds = build_dataset(users, items, ts, max_seq_len=10)
    torch.manual_seed(0)
    model = Mamba4Rec(ds.n_items, hidden_size=8, d_state=4).eval()
    scorer = lambda s, n: model.full_sort_scores(s, n)  # noqa: E731
    full = evaluate(scorer, ds.test, [5, 10], batch_size=1000)
    small = evaluate(scorer, ds.test, [5, 10], batch_size=7)
    assert small == pytest.approx(full, abs=1e-6)
    # sums over two disjoint row shards = the whole (what DDP evaluation all-reduces)
    a, na = evaluate_scorer(scorer, ds.test.subset(np.arange(0, len(ds.test), 2)), [5, 10])
    b, nb = evaluate_scorer(scorer, ds.test.subset(np.arange(1, len(ds.test), 2)), [5, 10])
    assert means({k: a[k] + b[k] for k in a}, na + nb, [5, 10]) == pytest.approx(full, abs=1e-6)
    uncropped, _ = evaluate_scorer(scorer, ds.test, [10], crop=False)
    assert uncropped["ndcg@10"] / len(ds.test) == pytest.approx(full["ndcg@10"], abs=1e-6)


def test_popularity_baseline() -> None:
    train = _split([[1], [1], [2], [1]], [2, 2, 3, 3])  # counts: 2 -> 2, 3 -> 2, 1 -> 0
    score = popularity_scorer(train, 5)(torch.zeros(1, 1, dtype=torch.long), torch.ones(1, dtype=torch.long))
    order = torch.argsort(score[0], descending=True).tolist()
    assert order[:2] == [2, 3]  # equally popular: lower index first
    assert score[0, 0] == float("-inf")
    test = _split([[1], [1], [1]], [2, 3, 4])
    m = evaluate(popularity_scorer(train, 5), test, [1, 2])
    assert m["hit@1"] == pytest.approx(1 / 3)
    assert m["hit@2"] == pytest.approx(2 / 3)


@pytest.fixture(scope="module")
def data_and_ckpt(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Mamba4Rec]:
    tmp = tmp_path_factory.mktemp("eval")
    users, items, ts = synthetic_interactions(n_users=80, n_items=30, seed=2)
    data = tmp / "syn.inter"
    write_inter_file(data, users, items, ts)
    ds = load_dataset(data, max_seq_len=20)
    torch.manual_seed(0)
    model = Mamba4Rec(ds.n_items, hidden_size=8, d_state=4).eval()
    ckpt = tmp / "model.pt"
    save_checkpoint(
        ckpt, model, ds.item_tokens, {"max_seq_len": 20, "min_user_inter": 5, "min_item_inter": 5}
    )
    return data, ckpt, model


def test_evaluate_checkpoint_matches_direct_evaluation(data_and_ckpt: tuple[Path, Path, Mamba4Rec]) -> None:
    data, ckpt, model = data_and_ckpt
    ds = load_dataset(data, max_seq_len=20)
    direct = evaluate(lambda s, n: model.full_sort_scores(s, n), ds.valid, [10, 20])
    rep = evaluate_checkpoint(ckpt, data, ks=[20, 10], split="valid")
    assert rep.model == pytest.approx(direct, abs=1e-6)
    assert list(rep.model) == ["hit@10", "hit@20", "ndcg@10", "ndcg@20", "mrr@10", "mrr@20"]
    assert rep.baseline is not None and set(rep.baseline) == set(rep.model)
    assert rep.rows == len(ds.valid)


def test_cli_evaluate_table_and_json(data_and_ckpt: tuple[Path, Path, Mamba4Rec], tmp_path: Path) -> None:
    data, ckpt, _ = data_and_ckpt
    out = tmp_path / "m.json"
    res = CliRunner().invoke(
        main, ["evaluate", "--ckpt", str(ckpt), "--data", str(data), "--k", "10", "20", "--json", str(out)]
    )
    assert res.exit_code == 0, res.output
    assert "most popular" in res.output and "ndcg@20" in res.output
    js = json.loads(out.read_text())
    for key in ("hit@10", "ndcg@10", "mrr@10", "hit@20", "ndcg@20", "mrr@20"):
        assert 0.0 <= js[key] <= 1.0
        assert key in js["baseline"]
    assert js["split"] == "test"
    res = CliRunner().invoke(
        main, ["evaluate", "--ckpt", str(ckpt), "--data", str(data), "--k", "5,10", "--baseline", "none"]
    )
    assert res.exit_code == 0 and "hit@5" in res.output and "most popular" not in res.output
    res = CliRunner().invoke(main, ["evaluate", "--ckpt", str(ckpt), "--data", str(data), "--k", "0"])
    assert res.exit_code == 2 and "positive integers" in res.output


def test_vocabulary_mismatch_is_a_clear_error(
    data_and_ckpt: tuple[Path, Path, Mamba4Rec], tmp_path: Path
) -> None:
    data, ckpt, model = data_and_ckpt
    ds = load_dataset(data, max_seq_len=20)
    # same size, two tokens swapped: ids would silently mean other items
    tokens = list(ds.item_tokens)
    tokens[3], tokens[4] = tokens[4], tokens[3]
    swapped = tmp_path / "swapped.pt"
    save_checkpoint(swapped, model, tokens, {"max_seq_len": 20})
    with pytest.raises(UsageError, match="item vocabulary mismatch.*item index 3"):
        evaluate_checkpoint(swapped, data)
    # another dataset entirely (different item count)
    users, items, ts = synthetic_interactions(n_users=80, n_items=45, seed=5)
    other = tmp_path / "other.inter"
    write_inter_file(other, users, items, ts)
    res = CliRunner().invoke(main, ["evaluate", "--ckpt", str(ckpt), "--data", str(other)])
    assert res.exit_code == 2
    assert "item vocabulary mismatch" in res.output and "the checkpoint has 30 items" in res.output
    assert "Traceback" not in res.output


def test_recbole_style_checkpoint_without_vocabulary(data_and_ckpt: tuple[Path, Path, Mamba4Rec]) -> None:
    from m4r_export.checkpoint import read_checkpoint

    data, ckpt, _ = data_and_ckpt
    c = read_checkpoint(ckpt)
    c.item_tokens = None
    ds = load_dataset(data, max_seq_len=20)
    assert check_vocabulary(c, ds, "x") == ds.item_tokens
    users, items, ts = synthetic_interactions(n_users=80, n_items=20, seed=2)
    ds_small = build_dataset(users, items, ts, max_seq_len=20)
    with pytest.raises(UsageError, match="item rows"):
        check_vocabulary(c, ds_small, "x")


def test_missing_inputs(tmp_path: Path, data_and_ckpt: tuple[Path, Path, Mamba4Rec]) -> None:
    data, ckpt, _ = data_and_ckpt
    res = CliRunner().invoke(main, ["evaluate", "--ckpt", str(tmp_path / "nope.pt"), "--data", str(data)])
    assert res.exit_code == 2 and "does not exist" in res.output
    res = CliRunner().invoke(main, ["evaluate", "--ckpt", str(ckpt), "--data", str(tmp_path / "nope.inter")])
    assert res.exit_code == 2 and "nope.inter" in res.output
