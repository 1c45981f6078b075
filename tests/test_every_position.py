"""The every-position objective: windows, batches, chunked CE, sampled softmax (training/windows.py,
training/losses.py) and its equality with RecBole's prefix objective."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from m4r_export.data import SequenceDataset, build_dataset, synthetic_interactions
from m4r_export.training import config_from_dict, losses, train
from m4r_export.training.losses import SampledSoftmax, ce_chunk, chunked_cross_entropy
from m4r_export.training.trainer import Trainer
from m4r_export.training.windows import batch_plan, build_windows, user_histories

L = 12


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def ds() -> SequenceDataset:
    # histories of 8..40 events: many users need more than one window of L = 12
    users, items, ts = synthetic_interactions(n_users=50, n_items=40, seed=5, min_len=8, max_len=40)
    return build_dataset(users, items, ts, max_seq_len=L, source="synthetic")


def test_histories_rebuild_every_prefix_sample(ds: SequenceDataset) -> None:
    items, start, first_row = user_histories(ds.train)
    tr = ds.train
    for u in range(len(first_row)):
        s = items[start[u] : start[u + 1]]
        for p in range(len(s) - 1):
            r = first_row[u] + p
            assert tr.target[r] == s[p + 1]
            hist = s[max(0, p + 1 - L) : p + 1]
            assert tr.item_seq[r, : tr.item_seq_len[r]].tolist() == hist.tolist()


@pytest.mark.parametrize("stride", [L, L // 2, 1])
def test_windows_train_every_target_once_with_its_next_item(ds: SequenceDataset, stride: int) -> None:
    win = build_windows(ds.train, L, stride)
    rows = win.row[win.target > 0]
    assert sorted(rows.tolist()) == list(range(len(ds.train)))  # every prefix sample exactly once
    assert win.n_targets == len(ds.train)
    w, p = np.nonzero(win.target > 0)
    # the target after input p is the prefix sample's target, and the window's inputs up to p are the
    # most recent (p + 1) items of the prefix sample's history
    assert np.array_equal(win.target[w, p], ds.train.target[win.row[w, p]])
    for wi, pi in zip(w.tolist(), p.tolist(), strict=True):
        r = win.row[wi, pi]
        hist = ds.train.item_seq[r, : ds.train.item_seq_len[r]]
        assert win.seq[wi, : pi + 1].tolist() == hist[-(pi + 1) :].tolist()
        if pi + 1 < len(hist):  # a later window: it sees at least max_seq_len - stride items
            assert pi + 1 >= L - stride
    assert (win.seq[np.arange(L)[None, :] >= win.length[:, None]] == 0).all()  # right padding


def test_every_position_loss_equals_the_prefix_loss_per_target(ds: SequenceDataset) -> None:
    """Targets inside a user's first window: same loss as RecBole's prefix sample (fp32, eval)."""
    torch.manual_seed(0)
    cfg = config_from_dict({"hidden_size": 16, "d_state": 8, "max_seq_len": L, "seed": 1}, "test")
    trainer = Trainer(ds, cfg, "unused.pt", progress=False, log=lambda m: None)
    model = trainer.model.eval()
    with torch.no_grad():  # a few steps away from the initialisation, so the logits are not flat
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    win = trainer.windows
    assert win is not None
    _, _, first_row = user_histories(ds.train)
    rows = np.flatnonzero(np.isin(win.row[:, 0], first_row))  # each user's first window
    seq, lens, tgt = (torch.from_numpy(a) for a in (win.seq[rows], win.length[rows], win.target[rows]))
    with torch.no_grad():
        hidden, target = trainer.objective.every_position_pairs(seq, lens, tgt)
        ours = trainer.objective.per_target(hidden, model.item_embedding.weight, target)
        sample = torch.from_numpy(win.row[rows][(tgt > 0).numpy()])
        tr = ds.train
        prefix = F.cross_entropy(
            model.logits(torch.from_numpy(tr.item_seq[sample]), torch.from_numpy(tr.item_seq_len[sample])),
            torch.from_numpy(tr.target[sample]),
            reduction="none",
        )
    assert len(sample) > 300 and len(set(sample.tolist())) == len(sample)
    torch.testing.assert_close(ours, prefix, rtol=0, atol=1e-5)


@pytest.mark.parametrize("keep", [True, False])
def test_chunked_ce_equals_full_ce_in_value_and_gradient(keep: bool, monkeypatch: Any) -> None:
    """Both backward paths: the softmax kept from the forward pass, or recomputed per chunk."""
    monkeypatch.setattr(losses, "CE_KEEP_LOGITS", 10**9 if keep else 0)
    torch.manual_seed(0)
    h = torch.randn(37, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 8, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 11, (37,))
    assert torch.autograd.gradcheck(lambda a, b: chunked_cross_entropy(a, b, t, 5), (h, w))
    g = torch.rand(37, dtype=torch.float64)
    full = F.cross_entropy(h @ w.t(), t, reduction="none")
    gh, gw = torch.autograd.grad((full * g).sum(), (h, w))
    for chunk in (1, 4, 37, 100):
        ours = chunked_cross_entropy(h, w, t, chunk)
        torch.testing.assert_close(ours, full)
        oh, ow = torch.autograd.grad((ours * g).sum(), (h, w))
        torch.testing.assert_close(oh, gh)
        torch.testing.assert_close(ow, gw)
    assert ce_chunk(10_000_000) == 1 and ce_chunk(100) == 2048


@pytest.mark.parametrize("n_items", [1_349, 12_101, 100_000])
def test_ce_chunk_logits_stay_below_glibc_mmap_threshold(n_items: int) -> None:
    """One chunk's fp32 logits must stay under glibc's largest mmap threshold (32 MiB): above it
    every chunk is a fresh zero-faulted mapping (Beauty: 50 ms of kernel time per step)."""
    assert ce_chunk(n_items) * n_items * 4 <= 24 * 2**20


def test_sampled_softmax_gradient_is_unbiased_with_logq() -> None:
    """Popularity-sampled negatives with logQ correction: the gradient approaches full CE's; the same
    loss without the correction is biased towards popular items."""
    torch.manual_seed(0)
    n_items, hidden = 30, 6
    counts = (1000.0 / np.arange(1, n_items + 1) ** 1.5).astype(np.int64)  # long-tailed
    w = torch.randn(n_items, hidden) * 0.5
    h = torch.randn(16, hidden, requires_grad=True)
    t = torch.randint(1, n_items, (16,))
    # what the sample estimates: the softmax over the real items, the positive's own share excluded
    # (accidental hits are masked and its corrected logit weighs ~1 / num_negatives)
    s = (h @ w.t())[:, 1:].clone()
    others = s.masked_fill(F.one_hot(t - 1, n_items - 1).bool(), float("-inf"))
    full = (torch.logsumexp(others, 1) - s.gather(1, (t - 1)[:, None]).squeeze(1)).sum()
    (g_full,) = torch.autograd.grad(full, h)
    loss = SampledSoftmax(n_items, 200_000, "popularity", counts)
    (g_ours,) = torch.autograd.grad(loss(h, w, t).sum(), h)
    err = (g_ours - g_full).norm() / g_full.norm()
    no_correction = SampledSoftmax(n_items, 200_000, "popularity", counts)
    no_correction.log_q = torch.zeros_like(no_correction.log_q)
    (g_biased,) = torch.autograd.grad(no_correction(h, w, t).sum(), h)
    err_biased = (g_biased - g_full).norm() / g_full.norm()
    assert err < 0.02 and err_biased > 0.15, (err, err_biased)  # measured 0.005 and 0.25


def test_sampled_softmax_masks_accidental_hits_and_never_samples_padding() -> None:
    torch.manual_seed(0)
    loss = SampledSoftmax(5, 4, "uniform")
    neg = loss.sample(torch.device("cpu"))
    assert neg.shape == (4,) and bool((neg >= 1).all())
    loss.sample = lambda device: torch.tensor([1, 2, 2, 3])  # type: ignore[method-assign]
    w = torch.randn(5, 3)
    h = torch.randn(2, 3)
    t = torch.tensor([2, 4])
    got = loss(h, w, t)
    s = h @ w.t()
    want0 = torch.logsumexp(torch.stack([s[0, 2], s[0, 1], s[0, 3]]), 0) - s[0, 2]  # the 2s are hits
    want1 = torch.logsumexp(torch.stack([s[1, 4], s[1, 1], s[1, 2], s[1, 2], s[1, 3]]), 0) - s[1, 4]
    torch.testing.assert_close(got, torch.stack([want0, want1]))
    assert set(
        SampledSoftmax(3, 500, "popularity", np.array([9, 0, 5])).sample(torch.device("cpu")).tolist()
    ) == {
        1,
        2,
    }


def test_batch_plan_buckets_lengths_and_splits_global_batches_over_ranks() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 200, 1000)
    plan = batch_plan(lengths, 32, seed=1, epoch=0, pool_batches=50)
    flat = np.concatenate(plan)
    assert sorted(flat.tolist()) == list(range(1000))
    padded = sum(int(lengths[b].max()) * len(b) for b in plan)
    assert padded < 1.1 * lengths.sum()  # bucketing: little padding (random batches: ~1.9x)
    assert not np.array_equal(flat, np.concatenate(batch_plan(lengths, 32, seed=1, epoch=1)))
    ranks = [batch_plan(lengths, 32, seed=1, epoch=0, rank=r, world_size=3) for r in range(3)]
    for b, parts in enumerate(zip(*ranks, strict=True)):
        assert len({len(p) for p in parts}) == 1  # same step count and batch size on every rank
        together = np.concatenate(parts)
        assert set(together.tolist()) == set(plan[b].tolist())
        assert len(together) - len(plan[b]) == (-len(plan[b])) % 3  # only the wrap-around pad


def test_sampled_and_every_position_training_learns(ds: SequenceDataset, tmp_path: Path) -> None:
    base = {"hidden_size": 16, "d_state": 8, "max_seq_len": L, "seed": 2, "epochs": 3, "train_batch_size": 8}
    for extra in ({"loss_type": "SAMPLED", "num_negatives": 10, "negative_distribution": "popularity"}, {}):
        cfg = config_from_dict({**base, "learning_rate": 0.01, **extra}, "test")
        out = tmp_path / "m.pt"
        res = train(ds, cfg, out, progress=False, log=lambda m: None)
        assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]
        assert res.best_valid["ndcg@10"] > 0.1
        meta = torch.load(out, weights_only=True)["meta"]
        assert meta["objective"] == "every-position"
        assert meta["loss"] == extra.get("loss_type", "CE")


def test_auto_loss_is_full_ce_below_the_documented_size() -> None:
    cfg = config_from_dict({}, "test")
    assert cfg.loss_type == "AUTO" and cfg.objective == "every-position"
    assert cfg.resolved_loss_type(100_000) == "CE" and cfg.resolved_loss_type(100_001) == "SAMPLED"
    assert config_from_dict({"loss_type": "ce"}, "test").resolved_loss_type(10**7) == "CE"
