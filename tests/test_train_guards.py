"""Issue 20 item 11 (hyper-parameters given on --resume) and item 13 (the loss's own NaN/Inf check)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from m4r_export.cli import main
from m4r_export.data import SequenceDataset, build_dataset, synthetic_interactions, write_inter_file
from m4r_export.errors import UsageError
from m4r_export.training import Trainer, config_from_dict, train
from m4r_export.training.trainer import TrainingDiverged, default_state_path

TINY = {"hidden_size": 8, "d_state": 4, "max_seq_len": 10, "train_batch_size": 64, "seed": 3}


@pytest.fixture(scope="module")
def ds() -> SequenceDataset:
    torch.set_num_threads(1)
    users, items, ts = synthetic_interactions(n_users=50, n_items=25, seed=5)
    return build_dataset(users, items, ts, max_seq_len=10, source="synthetic")


def quiet(**kw: Any) -> dict[str, Any]:
    return {"progress": False, "log": lambda m: None, **kw}


# ------------------------------------------------------------------------------ item 11


def test_learning_rate_given_on_resume_is_applied(ds: SequenceDataset, tmp_path: Path) -> None:
    """Two resumes of one state with lr 0.01 and 0.0001 must train differently (they did not: Adam's
    load_state_dict restored the saved lr), and each must train with the lr it was given."""
    first = tmp_path / "m.pt"
    train(ds, config_from_dict({**TINY, "epochs": 1}, "t"), first, **quiet())
    finals = {}
    for lr in (0.01, 0.0001):
        out = tmp_path / f"lr{lr}.pt"
        shutil.copy(default_state_path(first), default_state_path(out))
        lines: list[str] = []
        cfg = config_from_dict({**TINY, "epochs": 2, "learning_rate": lr}, "t")
        train(ds, cfg, out, resume=True, progress=False, log=lines.append)
        state = torch.load(default_state_path(out), weights_only=True)
        assert state["history"][-1]["epoch"] == 2
        assert [g["lr"] for g in state["optimizer"]["param_groups"]] == [lr]
        assert any(f"learning_rate 0.001 -> {lr}" in line for line in lines), lines
        finals[lr] = state["model"]
    a, b = finals[0.01], finals[0.0001]
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_unchanged_learning_rate_on_resume_is_silent_and_weight_decay_applies(
    ds: SequenceDataset, tmp_path: Path
) -> None:
    out = tmp_path / "m.pt"
    train(ds, config_from_dict({**TINY, "epochs": 1}, "t"), out, **quiet())
    lines: list[str] = []
    cfg = config_from_dict({**TINY, "epochs": 2, "weight_decay": 0.5}, "t")
    train(ds, cfg, out, resume=True, progress=False, log=lines.append)
    assert not any("resume: learning_rate" in line for line in lines), lines
    assert any("weight_decay 0.0 -> 0.5" in line for line in lines), lines
    state = torch.load(default_state_path(out), weights_only=True)
    assert [g["weight_decay"] for g in state["optimizer"]["param_groups"]] == [0.5]


def test_changed_valid_metric_on_resume_is_refused(ds: SequenceDataset, tmp_path: Path) -> None:
    """The best epoch so far was chosen by the old metric: comparing the new one against it is wrong."""
    out = tmp_path / "m.pt"
    train(ds, config_from_dict({**TINY, "epochs": 1}, "t"), out, **quiet())
    cfg = config_from_dict({**TINY, "epochs": 2, "valid_metric": "Hit@10"}, "t")
    with pytest.raises(UsageError, match=r"valid_metric changed \('NDCG@10' -> 'Hit@10'\)"):
        train(ds, cfg, out, resume=True, **quiet())


def test_cli_resume_with_lr_says_it_applies(tmp_path: Path) -> None:
    users, items, ts = synthetic_interactions(n_users=40, n_items=20, seed=6)
    data = tmp_path / "d.inter"
    write_inter_file(data, users, items, ts)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("hidden_size: 8\nd_state: 4\nmax_seq_len: 10\ntrain_batch_size: 64\n")
    base = ["train", "--data", str(data), "--config", str(recipe), "--out", str(tmp_path / "m.pt")]
    base += ["--no-progress", "--threads", "1"]
    assert CliRunner().invoke(main, [*base, "--epochs", "1"]).exit_code == 0
    res = CliRunner().invoke(main, [*base, "--epochs", "2", "--resume", "--lr", "0.0001"])
    assert res.exit_code == 0, res.output
    assert "learning_rate 0.001 -> 0.0001" in res.output.replace("\n", " "), res.output


# ------------------------------------------------------------------------------ item 13


class InfAtBatch(nn.Module):
    """The trainer's objective, with +inf added to the loss at one call (gradients stay finite)."""

    def __init__(self, inner: nn.Module, model: nn.Module, at: int) -> None:
        super().__init__()
        self.inner, self.model, self.at, self.calls = inner, model, at, 0
        self.before: dict[str, torch.Tensor] = {}

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        loss = self.inner(*args, **kwargs)
        self.calls += 1
        if self.calls == self.at:
            self.before = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            loss = loss + float("inf")
        return loss


def test_an_infinite_loss_with_finite_gradients_stops_training(ds: SequenceDataset, tmp_path: Path) -> None:
    """Issue 20 item 13: only the loss's own check sees a non-finite loss whose gradients are finite
    (the weights stay finite); the run must stop at that batch, before the optimizer step."""
    cfg = config_from_dict({**TINY, "epochs": 1}, "t")
    trainer = Trainer(ds, cfg, tmp_path / "m.pt", **quiet())
    spy = InfAtBatch(trainer.objective, trainer.model, at=2)
    trainer.objective = spy
    with pytest.raises(TrainingDiverged, match=r"non-finite loss \(inf\) at epoch 1, batch 2"):
        trainer.run()
    after = trainer.model.state_dict()
    assert spy.before and all(torch.equal(spy.before[k], after[k]) for k in after)  # no step was taken
