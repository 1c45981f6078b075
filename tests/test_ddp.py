"""``m4r train`` under torchrun: 2 CPU processes (gloo) on a small synthetic dataset."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from m4r_export.checkpoint import load_checkpoint
from m4r_export.data import load_dataset, synthetic_interactions, write_inter_file
from m4r_export.training.distributed import shard_indices
from m4r_export.training.evaluation import evaluate_checkpoint
from m4r_export.training.windows import batch_plan, build_windows

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")

RECIPE = """
hidden_size: 16
d_state: 4
dropout_prob: 0.2
MAX_ITEM_LIST_LENGTH: 12
train_batch_size: 64
eval_batch_size: 128
epochs: 2
stopping_step: 10
seed: 7
"""


def test_shards_are_disjoint_and_cover_every_row() -> None:
    for n, world in [(10, 2), (11, 2), (97, 3), (5, 4)]:
        for epoch in range(3):
            shards = [shard_indices(n, 1, epoch, r, world) for r in range(world)]
            assert len({len(s) for s in shards}) == 1  # same number of steps on every rank
            together = np.concatenate(shards)
            assert set(together.tolist()) == set(range(n))
            assert len(together) - len(set(together.tolist())) == (-n) % world  # only the wrap-around pad
        a = shard_indices(n, 1, 0, 0, world)
        b = shard_indices(n, 1, 1, 0, world)
        assert not np.array_equal(a, b) or n < 3  # reshuffled every epoch


def test_torchrun_two_cpu_processes(tmp_path: Path) -> None:
    users, items, ts = synthetic_interactions(n_users=120, n_items=40, seed=3)
    data = tmp_path / "syn.inter"
    write_inter_file(data, users, items, ts)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(RECIPE)
    out = tmp_path / "model.pt"
    dump = tmp_path / "dump"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "m4r_export.cli", "train", "--data", str(data), "--config", str(recipe), "--out", str(out),
        "--no-progress", "--debug-dump", str(dump),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es)" in proc.stderr  # rank 0 logged, once
    assert proc.stderr.count("epoch 1:") == 1

    r0 = json.loads((dump / "rank0.json").read_text())
    r1 = json.loads((dump / "rank1.json").read_text())
    assert r0["world_size"] == r1["world_size"] == 2
    ds = load_dataset(data, max_seq_len=12)
    # the every-position objective (the default) shards windows: each global batch of 64 windows
    # is split over the ranks
    win = build_windows(ds.train, 12)
    n = len(win)
    for epoch in ("0", "1"):
        plan = batch_plan(win.length, 64, 7, int(epoch))
        pads = sum(len(b) % 2 for b in plan)
        s0, s1 = set(r0["shards"][epoch]), set(r1["shards"][epoch])
        assert len(r0["shards"][epoch]) == len(r1["shards"][epoch]) == sum(-(-len(b) // 2) for b in plan)
        assert len(s0 & s1) <= pads  # disjoint apart from the wrap-around row of an odd batch
        assert s0 | s1 == set(range(n))  # together they cover the epoch
    assert r0["shards"]["0"] != r0["shards"]["1"]  # reshuffled per epoch
    assert r0["weights_sha256"] == r1["weights_sha256"]  # identical weights after training

    model = load_checkpoint(out)  # rank 0's checkpoint: safe format, loads and evaluates
    assert model.item_tokens == ds.item_tokens
    ckpt_meta = torch.load(out, weights_only=True)["meta"]
    assert ckpt_meta["world_size"] == 2 and ckpt_meta["objective"] == "every-position"
    report = evaluate_checkpoint(out, data, ks=[10])
    assert report.rows == len(ds.test)
    assert report.model["hit@10"] == pytest.approx(ckpt_meta["test"]["hit@10"])


def test_torchrun_sampled_softmax_with_sparse_gradients(tmp_path: Path) -> None:
    """gloo all-reduces the row-indexed item-table gradient: both ranks end with the same weights."""
    users, items, ts = synthetic_interactions(n_users=120, n_items=40, seed=3)
    data = tmp_path / "syn.inter"
    write_inter_file(data, users, items, ts)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(
        RECIPE.replace("epochs: 2", "epochs: 1")
        + "loss_type: SAMPLED\nnum_negatives: 10\nsparse_embedding: true\n"
    )
    out, dump = tmp_path / "model.pt", tmp_path / "dump"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "m4r_export.cli", "train", "--data", str(data), "--config", str(recipe), "--out", str(out),
        "--no-progress", "--debug-dump", str(dump),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "SAMPLED loss (sparse item-table gradient, lazy Adam)" in proc.stderr
    r0 = json.loads((dump / "rank0.json").read_text())
    r1 = json.loads((dump / "rank1.json").read_text())
    assert r0["weights_sha256"] == r1["weights_sha256"]  # each rank drew its own negatives
    assert torch.load(out, weights_only=True)["meta"]["sparse_embedding"] is True
