"""Learning-rate schedules (training/schedule.py) and how the trainer applies them."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from m4r_export.data import SequenceDataset, build_dataset, synthetic_interactions
from m4r_export.errors import UsageError
from m4r_export.training import config_from_dict
from m4r_export.training.schedule import lr_factor, run_progress
from m4r_export.training.trainer import Trainer, default_state_path

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def ds() -> SequenceDataset:
    users, items, ts = synthetic_interactions(n_users=40, n_items=30, seed=3, min_len=6, max_len=20)
    return build_dataset(users, items, ts, max_seq_len=10, source="synthetic")


def test_factors_start_at_one_and_end_at_zero() -> None:
    assert lr_factor("constant", 0.7) == 1.0
    assert lr_factor("cosine", 0.0) == 1.0 and lr_factor("cosine", 1.0) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor("cosine", 0.5) == pytest.approx(0.5)
    assert lr_factor("linear", 0.25) == pytest.approx(0.75)
    assert lr_factor("linear", 3.0) == 0.0 and lr_factor("cosine", -1.0) == 1.0  # clamped
    assert run_progress(0.4, 0.5) == pytest.approx(0.7) and run_progress(0.4, 2.0) == 1.0
    with pytest.raises(ValueError, match="unknown lr_schedule"):
        lr_factor("step", 0.5)


def test_bad_schedule_name_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="lr_schedule must be one of constant, cosine, linear"):
        config_from_dict({"lr_schedule": "exp"}, "recipe.yaml")


def _record_lrs(trainer: Trainer) -> list[float]:
    seen: list[float] = []
    step = trainer.optimizer.step

    def wrapped(*a: Any, **k: Any) -> Any:
        seen.append(float(trainer.optimizer.param_groups[0]["lr"]))
        return step(*a, **k)

    trainer.optimizer.step = wrapped  # type: ignore[method-assign]
    return seen


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_epoch_schedule_decays_every_step_to_zero(ds: SequenceDataset, tmp_path: Path, schedule: str) -> None:
    cfg = config_from_dict(
        {
            "hidden_size": 8,
            "d_state": 4,
            "max_seq_len": 10,
            "epochs": 3,
            "train_batch_size": 8,
            "learning_rate": 0.01,
            "lr_schedule": schedule,
        },
        "test",
    )
    trainer = Trainer(ds, cfg, tmp_path / "m.pt", progress=False, log=lambda m: None)
    seen = _record_lrs(trainer)
    trainer.run()
    n = len(seen)
    assert n > 6 and seen[0] == pytest.approx(0.01)
    expect = [0.01 * lr_factor(schedule, i / n) for i in range(n)]
    assert seen == pytest.approx(expect, rel=1e-9, abs=1e-12)
    assert all(b < a for a, b in zip(seen, seen[1:], strict=False))


def test_time_budget_schedule_follows_the_clock_and_resume_keeps_its_progress(
    ds: SequenceDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With --max-minutes, progress is the share of the budget spent (a fake clock: 1 s per step),
    and a resumed run continues from the progress it had reached instead of restarting at the top."""
    clock = [1000.0]

    def tick() -> float:
        clock[0] += 1.0
        return clock[0]

    monkeypatch.setattr("m4r_export.training.trainer.time.perf_counter", tick)
    common = {
        "hidden_size": 8,
        "d_state": 4,
        "max_seq_len": 10,
        "epochs": 50,
        "train_batch_size": 8,
        "learning_rate": 0.01,
        "lr_schedule": "linear",
        "eval_step": 100,
    }
    cfg = config_from_dict({**common, "max_minutes": 0.5}, "test")  # a 30-tick budget
    out = tmp_path / "m.pt"
    trainer = Trainer(ds, cfg, out, progress=False, log=lambda m: None)
    seen = _record_lrs(trainer)
    trainer.run()
    assert seen[0] > 0.008 and seen[-1] < 0.002  # decayed over the budget
    assert all(b < a for a, b in zip(seen, seen[1:], strict=False))
    reached = torch.load(default_state_path(out), weights_only=True)["lr_progress"]
    assert 0.8 < reached <= 1.0
    resumed = Trainer(ds, cfg, out, progress=False, log=lambda m: None)
    seen2 = _record_lrs(resumed)
    resumed.run(resume=True)
    assert seen2 and max(seen2) <= 0.01 * (1 - reached) + 1e-12
    assert not math.isnan(resumed.lr_progress)
