"""Training progress when the output is not a terminal: periodic lines instead of a silent bar."""

from __future__ import annotations

from pathlib import Path

import torch

from m4r_export.data import build_dataset, synthetic_interactions
from m4r_export.training import config_from_dict, train
from m4r_export.training.trainer import _ProgressBar


def _drive(bar: _ProgressBar, batches: int) -> None:
    with bar as update:
        for _ in range(batches):
            update(32, 1.5, 100.0)


def test_not_a_terminal_logs_every_n_batches() -> None:
    lines: list[str] = []
    _drive(_ProgressBar(100, 0, enabled=True, epoch=3, log=lines.append, interactive=False), 100)
    # a line every tenth of the epoch, none for the last batch (the epoch line follows it)
    assert [line.split(",")[0] for line in lines] == [f"epoch 3: batch {b}/100" for b in range(10, 100, 10)]
    assert "loss 1.5000" in lines[0] and "100 samples/s" in lines[0]


def test_not_a_terminal_logs_every_30_seconds_on_slow_batches() -> None:
    now = [0.0]

    def clock() -> float:
        now[0] += 31.0  # every batch takes 31 s
        return now[0]

    lines: list[str] = []
    bar = _ProgressBar(1000, 0, enabled=True, epoch=1, log=lines.append, interactive=False, clock=clock)
    _drive(bar, 4)
    assert [line.split(",")[0] for line in lines] == [f"epoch 1: batch {b}/1000" for b in (1, 2, 3, 4)]


def test_resumed_epoch_counts_from_its_start_and_disabled_or_terminal_is_silent() -> None:
    lines: list[str] = []
    _drive(_ProgressBar(100, 50, enabled=True, epoch=1, log=lines.append, interactive=False), 20)
    assert [line.split(",")[0] for line in lines] == ["epoch 1: batch 60/100", "epoch 1: batch 70/100"]
    lines.clear()
    _drive(_ProgressBar(100, 0, enabled=False, epoch=1, log=lines.append, interactive=False), 100)
    _drive(_ProgressBar(100, 0, enabled=True, epoch=1, log=lines.append, interactive=True), 100)
    assert lines == []


def test_training_into_a_pipe_prints_batch_lines(tmp_path: Path) -> None:
    # pytest captures stderr, so the console is not a terminal here, as under nohup or CI
    torch.set_num_threads(1)
    users, items, ts = synthetic_interactions(n_users=60, n_items=30, seed=4)
    ds = build_dataset(users, items, ts, max_seq_len=10, source="synthetic")
    recipe = {"hidden_size": 8, "d_state": 4, "max_seq_len": 10, "train_batch_size": 16, "epochs": 1}
    lines: list[str] = []
    train(ds, config_from_dict(recipe, "test"), tmp_path / "m.pt", log=lines.append)
    batch_lines = [i for i, line in enumerate(lines) if line.startswith("epoch 1: batch ")]
    epoch_line = next(i for i, line in enumerate(lines) if line.startswith("epoch 1: train loss"))
    assert batch_lines and max(batch_lines) < epoch_line, lines
