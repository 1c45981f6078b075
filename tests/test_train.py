"""Training: config loading, the loop (CE/BPR, early stopping, time budget), resume, checkpoint, CLI."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from m4r_export.checkpoint import load_checkpoint, read_checkpoint
from m4r_export.cli import main
from m4r_export.data import SequenceDataset, build_dataset, synthetic_interactions, write_inter_file
from m4r_export.errors import UsageError
from m4r_export.training import TrainConfig, Trainer, config_from_dict, load_config, train
from m4r_export.training.metrics import evaluate, popularity_scorer
from m4r_export.training.trainer import _batch_tensors, default_state_path

RECIPES = Path(__file__).resolve().parents[1] / "recipes"

# the reference Mamba4Rec config.yaml, verbatim keys and values
REFERENCE_CONFIG = """
gpu_id: '0'
log_wandb: False
hidden_size: 64
num_layers: 1
dropout_prob: 0.2
loss_type: 'CE'
d_state: 32
d_conv: 4
expand: 2
dataset: ml-1m
MAX_ITEM_LIST_LENGTH: 200
USER_ID_FIELD: user_id
ITEM_ID_FIELD: item_id
load_col:
    inter: [user_id, item_id, timestamp]
user_inter_num_interval: "[5,inf)"
item_inter_num_interval: "[5,inf)"
epochs: 300
train_batch_size: 2048
learner: adam
learning_rate: 0.001
eval_step: 1
stopping_step: 10
train_neg_sample_args: ~
metrics: ['Hit', 'NDCG', 'MRR']
valid_metric: NDCG@10
eval_batch_size: 4096
weight_decay: 0.0
topk: [10]
"""

TINY = {"hidden_size": 8, "d_state": 4, "max_seq_len": 10, "train_batch_size": 128, "seed": 3}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def ds() -> SequenceDataset:
    users, items, ts = synthetic_interactions(n_users=60, n_items=30, seed=4)
    return build_dataset(users, items, ts, max_seq_len=10, source="synthetic")


def tiny(**kw: Any) -> TrainConfig:
    return config_from_dict({**TINY, **kw}, "test")


# ----------------------------------------------------------------------------------- config


def test_reference_config_yaml_is_accepted(tmp_path: Path) -> None:
    p = tmp_path / "config.yaml"
    p.write_text(REFERENCE_CONFIG)
    cfg = load_config(p)
    assert (cfg.hidden_size, cfg.num_layers, cfg.d_state, cfg.d_conv, cfg.expand) == (64, 1, 32, 4, 2)
    assert cfg.dropout_prob == 0.2 and cfg.max_seq_len == 200 and cfg.train_batch_size == 2048
    assert cfg.learning_rate == 0.001 and cfg.stopping_step == 10 and cfg.epochs == 300
    assert (cfg.min_user_inter, cfg.min_item_inter) == (5, 5)
    assert cfg.valid_metric_key() == ("ndcg", 10)
    assert cfg.objective == "every-position"  # the default objective
    # the paper's recipe is the reference config, with the batch counted in windows (~2048 targets)
    paper = load_config(RECIPES / "ml-1m.yaml")
    assert paper.train_batch_size == 16 and dataclasses.replace(paper, train_batch_size=2048) == cfg
    small = load_config(RECIPES / "ml-100k.yaml")
    assert small.hidden_size == 64 and small.d_state == 32 and small.max_seq_len == 50
    beauty = load_config(RECIPES / "amazon-beauty.yaml")
    assert (beauty.hidden_size, beauty.num_layers, beauty.d_state, beauty.d_conv, beauty.expand) == (
        64,
        1,
        32,
        4,
        2,
    )
    assert beauty.max_seq_len == 50 and beauty.loss_type == "CE"


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"unknown config key\(s\) 'hiden_size', 'epoch'"):
        config_from_dict({"hiden_size": 32, "epoch": 3})
    with pytest.raises(UsageError, match="lower bounds only"):
        config_from_dict({"user_inter_num_interval": "[5,100]"})
    with pytest.raises(UsageError, match="learner"):
        config_from_dict({"learner": "sgd"})
    with pytest.raises(UsageError, match="metric 'AUC@10'"):
        config_from_dict({"valid_metric": "AUC@10"})
    with pytest.raises(UsageError, match="train_batch_size must be >= 1"):
        config_from_dict({"train_batch_size": 0})
    with pytest.raises(UsageError, match="must be an integer"):
        config_from_dict({"epochs": 2.5})
    assert config_from_dict({"learning_rate": "1e-3"}).learning_rate == 0.001  # YAML 1.1 gives a string
    p = tmp_path / "bad.yaml"
    p.write_text("hidden_size: [\n")
    with pytest.raises(UsageError, match="not valid YAML"):
        load_config(p)
    with pytest.raises(UsageError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


# ----------------------------------------------------------------------------------- loop


def test_batches_are_cropped_to_the_longest_row(ds: SequenceDataset) -> None:
    rows = np.flatnonzero(ds.train.item_seq_len <= 3)[:5]
    seq, lens, tgt = _batch_tensors(ds.train, rows, torch.device("cpu"))
    assert seq.shape == (len(rows), int(ds.train.item_seq_len[rows].max()))
    assert torch.equal(tgt, torch.from_numpy(ds.train.target[rows]))


def test_training_learns_and_writes_a_safe_checkpoint(ds: SequenceDataset, tmp_path: Path) -> None:
    out = tmp_path / "m.pt"
    res = train(
        ds, tiny(epochs=4, learning_rate=0.01), out, progress=False, log=lambda m: None, data_path="syn"
    )
    assert res.best_epoch >= 1 and res.last_epoch == 4 and res.stopped == "epochs"
    losses = [h["train_loss"] for h in res.history]
    assert losses[-1] < losses[0]
    raw = torch.load(out, weights_only=True)  # deployable file: safe format
    meta = raw["meta"]
    assert meta["epoch"] == res.best_epoch and meta["seed"] == 3 and meta["max_seq_len"] == 10
    assert meta["min_user_inter"] == 5 and meta["data"] == "syn" and meta["config"]["hidden_size"] == 8
    assert meta["valid"] == pytest.approx(res.best_valid) and "ndcg@10" in meta["test"]
    model = load_checkpoint(out)
    assert model.item_tokens == ds.item_tokens
    ours = evaluate(lambda s, n: model.full_sort_scores(s, n), ds.test, [10])
    assert ours["ndcg@10"] == pytest.approx(meta["test"]["ndcg@10"], abs=1e-6)
    pop = evaluate(popularity_scorer(ds.train, ds.n_items), ds.test, [10])
    assert ours["ndcg@10"] > pop["ndcg@10"] + 0.1  # learnt the sequential structure


def test_bpr_loss_trains(ds: SequenceDataset, tmp_path: Path) -> None:
    # (also runs the rich progress bar: the other tests switch it off)
    res = train(ds, tiny(epochs=2, loss_type="BPR"), tmp_path / "b.pt", progress=True, log=lambda m: None)
    assert math.isfinite(res.history[-1]["train_loss"])
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]


def test_flush_denormal_is_on_for_cpu_training(ds: SequenceDataset, tmp_path: Path) -> None:
    try:
        torch.set_flush_denormal(False)
        Trainer(ds, tiny(epochs=0), tmp_path / "z.pt", progress=False, log=lambda m: None)
        assert (torch.tensor([1e-39]) * 1.0).item() == 0.0  # subnormal flushed
    finally:
        torch.set_flush_denormal(False)
    assert (torch.tensor([1e-39]) * 1.0).item() != 0.0


def test_early_stopping_follows_recbole(ds: SequenceDataset, tmp_path: Path, monkeypatch: Any) -> None:
    """>= counts as an improvement; stop after stopping_step + 1 evaluations without one."""
    by_epoch = {0: 0.0, 1: 0.5, 2: 0.5, 3: 0.4, 4: 0.45, 5: 0.9}

    def fake(self: Trainer, which: str) -> dict[str, float]:
        return {"hit@10": 0.0, "ndcg@10": by_epoch[self.epoch], "mrr@10": 0.0}

    monkeypatch.setattr(Trainer, "evaluate_split", fake)
    cfg = tiny(epochs=10, stopping_step=1, train_batch_size=512)
    res = train(ds, cfg, tmp_path / "e.pt", progress=False, log=lambda m: None)
    # 0.5 best (1), 0.5 tie -> best (2), 0.4 (miss 1), 0.45 (miss 2 > 1) -> stop after epoch 4
    assert res.stopped == "early-stopping" and res.last_epoch == 4 and res.best_epoch == 2
    assert read_checkpoint(tmp_path / "e.pt").meta["epoch"] == 2


@pytest.mark.parametrize(("objective", "batch"), [("prefix", 128), ("every-position", 16)])
def test_time_budget_stops_mid_epoch_and_resume_is_exact(
    ds: SequenceDataset, tmp_path: Path, objective: str, batch: int
) -> None:
    cfg = tiny(epochs=2, train_batch_size=batch, objective=objective)
    straight = tmp_path / "straight.pt"
    train(ds, cfg, straight, progress=False, log=lambda m: None)
    st_straight = torch.load(default_state_path(straight), weights_only=True)

    split = tmp_path / "split.pt"
    budget = tiny(epochs=2, train_batch_size=batch, objective=objective, max_minutes=1e-9)
    res = train(ds, budget, split, progress=False, log=lambda m: None)
    assert res.stopped == "time-budget" and res.history[-1]["partial"] and res.history[-1]["batches"] == 1
    assert split.exists()  # a checkpoint exists even after a partial epoch
    state = torch.load(default_state_path(split), weights_only=True)
    assert (state["epoch"], state["next_batch"]) == (0, 1)
    res2 = train(ds, cfg, split, resume=True, progress=False, log=lambda m: None)
    assert res2.last_epoch == 2
    st_resumed = torch.load(default_state_path(split), weights_only=True)
    for k, v in st_straight["model"].items():
        torch.testing.assert_close(st_resumed["model"][k], v, rtol=0, atol=1e-6)
    # the optimizer moments carried over too
    a = st_straight["optimizer"]["state"][0]["exp_avg_sq"]
    torch.testing.assert_close(st_resumed["optimizer"]["state"][0]["exp_avg_sq"], a, rtol=0, atol=1e-9)


def test_resume_refuses_a_changed_config(ds: SequenceDataset, tmp_path: Path) -> None:
    out = tmp_path / "r.pt"
    train(ds, tiny(epochs=1), out, progress=False, log=lambda m: None)
    with pytest.raises(UsageError, match=r"config changed \(hidden_size: 8 -> 16\)"):
        train(ds, tiny(epochs=2, hidden_size=16), out, resume=True, progress=False, log=lambda m: None)
    with pytest.raises(UsageError, match="state file .* does not exist"):
        train(ds, tiny(epochs=2), tmp_path / "other.pt", resume=True, progress=False, log=lambda m: None)


# ----------------------------------------------------------------------------------- CLI


def test_cli_train_then_evaluate(tmp_path: Path) -> None:
    users, items, ts = synthetic_interactions(n_users=80, n_items=25, seed=1)
    data = tmp_path / "syn.inter"
    write_inter_file(data, users, items, ts)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("hidden_size: 8\nd_state: 4\nMAX_ITEM_LIST_LENGTH: 10\ntrain_batch_size: 128\n")
    out = tmp_path / "m.pt"
    args = ["train", "--data", str(data), "--config", str(recipe), "--out", str(out), "--epochs", "2"]
    res = CliRunner().invoke(main, [*args, "--seed", "5", "--scan-backend", "reference", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "best epoch" in res.output and "ndcg@10" in res.output
    meta = read_checkpoint(out).meta
    assert meta["scan_backend"] == "reference" and meta["seed"] == 5 and meta["config"]["epochs"] == 2
    res = CliRunner().invoke(main, ["evaluate", "--ckpt", str(out), "--data", str(data), "--split", "valid"])
    assert res.exit_code == 0, res.output
    assert f"{meta['valid']['ndcg@10']:.4f}" in res.output  # same numbers as the training run saw


def test_cli_train_bad_inputs(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["train", "--data", str(tmp_path / "missing.inter"), "--out", "x.pt"])
    assert res.exit_code == 2 and "missing.inter" in res.output and "Traceback" not in res.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("hidden_size: 8\nlearning_rat: 0.01\n")
    res = CliRunner().invoke(
        main, ["train", "--data", str(tmp_path), "--config", str(bad), "--out", str(tmp_path / "x.pt")]
    )
    assert res.exit_code == 2 and "'learning_rat'" in res.output
