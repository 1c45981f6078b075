"""Sparse item-table gradient + lazy Adam (training/sparse.py) against the dense path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from m4r_export.checkpoint import read_checkpoint
from m4r_export.data import SequenceDataset, build_dataset, synthetic_interactions
from m4r_export.errors import UsageError
from m4r_export.training import Trainer, config_from_dict, train
from m4r_export.training.losses import SampledSoftmax
from m4r_export.training.sparse import SplitAdam, resolve_sparse_embedding
from m4r_export.training.trainer import default_state_path

# many items, few windows per step, few negatives: a step leaves most rows untouched
TINY = {
    "hidden_size": 8,
    "d_state": 4,
    "max_seq_len": 10,
    "train_batch_size": 4,
    "seed": 3,
    "loss_type": "SAMPLED",
    "num_negatives": 7,
    "min_item_inter": 0,
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def ds() -> SequenceDataset:
    users, items, ts = synthetic_interactions(n_users=40, n_items=400, seed=5)
    return build_dataset(users, items, ts, max_seq_len=10, min_item_inter=0, source="synthetic")


def tiny(**kw: Any) -> Any:
    return config_from_dict({**TINY, **kw}, "test")


def _trainer(ds: SequenceDataset, tmp_path: Path, sparse: str, **kw: Any) -> Trainer:
    cfg = tiny(sparse_embedding=sparse, **kw)
    return Trainer(ds, cfg, tmp_path / f"{sparse}.pt", progress=False, log=lambda m: None)


def _step(tr: Trainer, batch: int, seed: int) -> torch.Tensor:
    """One optimizer step on batch ``batch`` of epoch 0; same dropout and negatives for a given seed."""
    seq, lens, tgt = tr._tensors(tr._epoch_batches()[batch])
    tr.optimizer.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = tr.objective(seq, lens, tgt)
    loss.backward()
    return loss.detach()


def test_first_step_equals_dense_on_touched_rows_and_leaves_the_rest_bit_identical(
    ds: SequenceDataset, tmp_path: Path
) -> None:
    dense, sparse = _trainer(ds, tmp_path, "false"), _trainer(ds, tmp_path, "true")
    assert isinstance(sparse.optimizer, SplitAdam) and isinstance(dense.optimizer, torch.optim.Adam)
    before = sparse.model.item_embedding.weight.detach().clone()
    torch.testing.assert_close(dense.model.item_embedding.weight.detach(), before, rtol=0, atol=0)
    loss_d, loss_s = _step(dense, 0, 11), _step(sparse, 0, 11)
    torch.testing.assert_close(loss_s, loss_d, rtol=0, atol=0)
    g_dense = dense.model.item_embedding.weight.grad
    g_sparse = sparse.model.item_embedding.weight.grad
    assert g_sparse is not None and g_sparse.is_sparse and g_dense is not None and not g_dense.is_sparse
    g_sparse = g_sparse.coalesce()
    touched = g_sparse.indices()[0].unique()
    # every row the dense step moves is a row the sparse gradient carries, and vice versa
    nonzero = (g_dense != 0).any(1).nonzero()[:, 0]
    assert set(nonzero.tolist()) == set(touched.tolist())
    torch.testing.assert_close(g_sparse.to_dense(), g_dense, rtol=1e-6, atol=1e-9)
    # inputs, positives and negatives are all among the touched rows
    seq, _, tgt = sparse._tensors(sparse._epoch_batches()[0])
    assert set(tgt[tgt > 0].tolist()) <= set(touched.tolist())
    assert set(seq[seq > 0].tolist()) <= set(touched.tolist())
    assert len(touched) < ds.n_items // 2  # the test means something: most rows untouched
    # the other parameters' gradients are the same dense tensors
    for (name, p_d), p_s in zip(dense.model.named_parameters(), sparse.model.parameters(), strict=True):
        if name != "item_embedding.weight" and p_d.grad is not None:
            assert p_s.grad is not None and not p_s.grad.is_sparse
            torch.testing.assert_close(p_s.grad, p_d.grad, rtol=0, atol=0)
    dense.optimizer.step()
    sparse.optimizer.step()
    after = sparse.model.item_embedding.weight.detach()
    untouched = torch.ones(ds.n_items, dtype=torch.bool)
    untouched[touched] = False
    assert torch.equal(after[untouched], before[untouched])  # bit-identical
    assert (after[touched] != before[touched]).any(1).all()  # every touched row moved
    # first step: lazy Adam == Adam, up to eps: SparseAdam adds it before the bias correction, i.e.
    # eps / sqrt(1 - beta2) = 32 eps at step 1, which shows on rows whose gradient is ~1e-7; the
    # update itself is ~lr = 1e-3 per element, so 1% of lr is a tight bound
    for p_d, p_s in zip(dense.model.parameters(), sparse.model.parameters(), strict=True):
        torch.testing.assert_close(p_s.detach(), p_d.detach(), rtol=0, atol=1e-5)


def test_lazy_adam_leaves_rows_untouched_by_a_step_where_dense_adam_moves_them(
    ds: SequenceDataset, tmp_path: Path
) -> None:
    dense, sparse = _trainer(ds, tmp_path, "false"), _trainer(ds, tmp_path, "true")
    for tr in (dense, sparse):
        _step(tr, 0, 1)
        tr.optimizer.step()
    first = sparse.model.item_embedding.weight.grad
    assert first is not None
    rows1 = set(first.coalesce().indices()[0].tolist())
    w_s = sparse.model.item_embedding.weight.detach().clone()
    w_d = dense.model.item_embedding.weight.detach().clone()
    for tr in (dense, sparse):
        _step(tr, 1, 2)
        tr.optimizer.step()
    second = sparse.model.item_embedding.weight.grad
    assert second is not None
    only_first = sorted(rows1 - set(second.coalesce().indices()[0].tolist()))
    assert only_first
    assert torch.equal(sparse.model.item_embedding.weight.detach()[only_first], w_s[only_first])
    assert not torch.equal(dense.model.item_embedding.weight.detach()[only_first], w_d[only_first])


def test_weight_decay_applies_to_touched_rows_only(ds: SequenceDataset, tmp_path: Path) -> None:
    dense = _trainer(ds, tmp_path, "false", weight_decay=0.5)
    sparse = _trainer(ds, tmp_path, "true", weight_decay=0.5)
    plain = _trainer(ds, tmp_path, "true")  # no decay: must differ from the decayed one
    before = sparse.model.item_embedding.weight.detach().clone()
    for tr in (dense, sparse, plain):
        _step(tr, 0, 4)
    g = sparse.model.item_embedding.weight.grad
    assert g is not None
    touched = g.coalesce().indices()[0].unique()
    for tr in (dense, sparse, plain):
        tr.optimizer.step()
    w_d, w_s = dense.model.item_embedding.weight.detach(), sparse.model.item_embedding.weight.detach()
    w_p = plain.model.item_embedding.weight.detach()
    torch.testing.assert_close(w_s[touched], w_d[touched], rtol=0, atol=1e-5)  # eps: see above
    assert (w_s[touched] - w_p[touched]).abs().max() > 1e-4  # the decay changed the update
    untouched = torch.ones(ds.n_items, dtype=torch.bool)
    untouched[touched] = False
    assert torch.equal(w_s[untouched], before[untouched])


def test_resume_mid_epoch_is_exact_and_the_checkpoint_is_unchanged(
    ds: SequenceDataset, tmp_path: Path
) -> None:
    cfg = tiny(epochs=2, sparse_embedding="true")
    straight = tmp_path / "straight.pt"
    train(ds, cfg, straight, progress=False, log=lambda m: None)
    st_straight = torch.load(default_state_path(straight), weights_only=True)
    assert st_straight["sparse_embedding"] is True

    split = tmp_path / "split.pt"
    budget = tiny(epochs=2, sparse_embedding="true", max_minutes=1e-9)
    res = train(ds, budget, split, progress=False, log=lambda m: None)
    assert res.history[-1]["partial"] and res.history[-1]["batches"] == 1
    res2 = train(ds, cfg, split, resume=True, progress=False, log=lambda m: None)
    assert res2.last_epoch == 2
    st_resumed = torch.load(default_state_path(split), weights_only=True)
    for k, v in st_straight["model"].items():
        torch.testing.assert_close(st_resumed["model"][k], v, rtol=0, atol=1e-6)
    for part in ("dense", "sparse"):  # both optimizers' moments carried over
        a = st_straight["optimizer"][part]["state"][0]["exp_avg_sq"]
        torch.testing.assert_close(
            st_resumed["optimizer"][part]["state"][0]["exp_avg_sq"], a, rtol=0, atol=1e-9
        )

    # the checkpoint is the dense path's: same keys, shapes, dtypes, dense tensors; the choice is in meta
    ck_sparse = read_checkpoint(straight)
    dense_out = tmp_path / "dense.pt"
    train(ds, tiny(epochs=1, sparse_embedding="false"), dense_out, progress=False, log=lambda m: None)
    ck_dense = read_checkpoint(dense_out)
    sd_s, sd_d = ck_sparse.state_dict, ck_dense.state_dict
    assert list(sd_s) == list(sd_d) and "item_embedding.weight" in sd_s
    assert all(sd_s[k].shape == sd_d[k].shape and sd_s[k].layout == torch.strided for k in sd_s)
    assert ck_sparse.meta["sparse_embedding"] is True and ck_dense.meta["sparse_embedding"] is False

    with pytest.raises(UsageError, match="sparse item-table update on .* sparse_embedding: true"):
        train(
            ds,
            tiny(epochs=3, sparse_embedding="false"),
            split,
            resume=True,
            progress=False,
            log=lambda m: None,
        )


def test_config_choice(ds: SequenceDataset, tmp_path: Path) -> None:
    assert config_from_dict({"sparse_embedding": True}).sparse_embedding == "true"  # YAML's bool
    assert config_from_dict({}).sparse_embedding == "auto"
    with pytest.raises(UsageError, match="sparse_embedding must be auto, true or false"):
        config_from_dict({"sparse_embedding": "maybe"})
    # auto: off with full CE (kept exactly as before: one Adam, dense gradient)
    ce = Trainer(ds, tiny(loss_type="CE"), tmp_path / "ce.pt", progress=False, log=lambda m: None)
    assert not ce.sparse_embedding and isinstance(ce.optimizer, torch.optim.Adam)
    assert not ce.model.item_embedding.sparse
    with pytest.raises(UsageError, match="sparse_embedding: true needs loss_type SAMPLED"):
        Trainer(ds, tiny(loss_type="CE", sparse_embedding="true"), tmp_path / "x.pt", progress=False)
    # auto: on with SAMPLED above loss AUTO's threshold (100,000 items), off below and with other losses
    assert resolve_sparse_embedding("auto", "SAMPLED", 100_001, None)[0]
    assert not resolve_sparse_embedding("auto", "SAMPLED", 100_000, None)[0]
    assert not resolve_sparse_embedding("auto", "CE", 10**7, None)[0]
    assert resolve_sparse_embedding("true", "SAMPLED", 400, None)[0]
    logs: list[str] = []
    small = Trainer(ds, tiny(), tmp_path / "s.pt", progress=False, log=logs.append)
    assert not small.sparse_embedding and isinstance(small.optimizer, torch.optim.Adam)
    assert any(f"sparse_embedding auto is off: {ds.n_items} items <= 100,000" in m for m in logs), logs
    # DDP: gloo all-reduces sparse gradients, NCCL cannot (dense, with the reason for the log)
    assert resolve_sparse_embedding("auto", "SAMPLED", 10**6, "gloo")[0]
    on, why = resolve_sparse_embedding("true", "SAMPLED", 10**6, "nccl")
    assert not on and "NCCL cannot all-reduce sparse gradients" in why


def test_popularity_sampler_draws_in_proportion_without_padding() -> None:
    """The CDF search (no per-draw pass over the catalogue) draws row i with probability q(i)."""
    counts = np.arange(50) ** 2  # row 0 has count 0 but is padding anyway
    loss = SampledSoftmax(50, 400_000, "popularity", counts)
    torch.manual_seed(0)
    drawn = loss.sample(torch.device("cpu"))
    assert int(drawn.min()) >= 1 and int(drawn.max()) <= 49
    freq = torch.bincount(drawn, minlength=50).double() / len(drawn)
    assert loss.probs is not None
    tv = 0.5 * (freq - loss.probs.double()).abs().sum()
    assert tv < 0.01, tv  # sampling noise ~0.003
