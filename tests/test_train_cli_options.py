"""`m4r train` at the command line: recipe keys as options, phases announced, an ETA (issue 22.5)."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from m4r_export.checkpoint import read_checkpoint
from m4r_export.cli import main
from m4r_export.data import synthetic_interactions, write_inter_file
from m4r_export.training.trainer import _ProgressBar


def test_progress_lines_show_an_eta() -> None:
    now = [0.0]

    def clock() -> float:
        now[0] += 2.0  # 2 s per batch
        return now[0]

    lines: list[str] = []
    with _ProgressBar(100, 0, enabled=True, epoch=1, log=lines.append, interactive=False, clock=clock) as up:
        for _ in range(40):
            up(32, 1.0, 10.0)
    # after 10 batches in 20 s, 90 remain: 180 s
    assert lines[0].startswith("epoch 1: batch 10/100") and lines[0].endswith("ETA 3 min 0 s for this epoch")
    assert lines[3].endswith("ETA 2 min 0 s for this epoch")  # 40 done in 80 s, 60 left


def test_recipe_keys_as_options_and_phases_announced(tmp_path: Path) -> None:
    data = tmp_path / "syn.inter"
    write_inter_file(data, *synthetic_interactions(n_users=50, n_items=20, seed=2))
    out = tmp_path / "m.pt"
    args = [
        "train",
        "--data",
        data,
        "--out",
        out,
        "--epochs",
        "1",
        "--max-seq-len",
        "7",
        "--hidden-size",
        "8",
    ]
    args += ["--d-state", "4", "--num-layers", "2", "--dropout", "0.1", "--stopping-step", "3"]
    args += ["--scan-backend", "reference", "--no-progress"]
    res = CliRunner().invoke(main, [str(a) for a in args], env={"COLUMNS": "40"})
    assert res.exit_code == 0, res.output
    meta = read_checkpoint(out).meta
    cfg = meta["config"]
    assert meta["max_seq_len"] == 7 and cfg["max_seq_len"] == 7
    assert (cfg["hidden_size"], cfg["d_state"], cfg["num_layers"]) == (8, 4, 2)
    assert (cfg["dropout_prob"], cfg["stopping_step"]) == (0.1, 3)
    assert "validating the untrained model" in res.output and "training: " in res.output
    # off a terminal (40 columns here), the closing line is one line, not wrapped mid-phrase
    assert any(ln.startswith("1 epoch(s) run") and ln.endswith(" min") for ln in res.output.splitlines())
