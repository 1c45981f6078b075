"""Issue 8 items 11-12: a diverging run is not saved as the best model; Ctrl-C / SIGTERM keep the work."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from m4r_export.checkpoint import save_checkpoint
from m4r_export.cli import main
from m4r_export.data import SequenceDataset, build_dataset, synthetic_interactions, write_inter_file
from m4r_export.errors import M4RError, UsageError
from m4r_export.training import config_from_dict, train
from m4r_export.training.trainer import default_state_path

TINY = {"hidden_size": 8, "d_state": 4, "max_seq_len": 10, "train_batch_size": 32, "seed": 3}


@pytest.fixture(scope="module")
def ds() -> SequenceDataset:
    users, items, ts = synthetic_interactions(n_users=60, n_items=30, seed=4)
    return build_dataset(users, items, ts, max_seq_len=10, source="synthetic")


def test_diverging_training_stops_and_keeps_the_last_finite_checkpoint(
    ds: SequenceDataset, tmp_path: Path
) -> None:
    out = tmp_path / "m.pt"
    train(ds, config_from_dict({**TINY, "epochs": 1}, "t"), out, progress=False, log=lambda m: None)
    before = torch.load(out, weights_only=True)["state_dict"]
    cfg = config_from_dict({**TINY, "epochs": 3, "learning_rate": 1e30}, "t")
    with pytest.raises(M4RError, match=r"training diverged: non-finite .* at epoch 1, batch \d+") as info:
        train(ds, cfg, out, progress=False, log=lambda m: None)
    assert info.value.exit_code != 0
    after = torch.load(out, weights_only=True)["state_dict"]
    assert all(torch.isfinite(v).all() for v in after.values())
    assert all(torch.equal(before[k], after[k]) for k in before)  # the finite checkpoint is untouched


def test_non_finite_config_numbers_are_refused(tmp_path: Path) -> None:
    from m4r_export.training.config import load_config

    for key, value in (("learning_rate", ".inf"), ("learning_rate", ".nan"), ("weight_decay", ".inf")):
        recipe = tmp_path / "r.yaml"
        recipe.write_text(f"{key}: {value}\n")  # YAML's own spelling of inf/nan
        with pytest.raises(UsageError, match=f"{key} must be a finite number"):
            load_config(recipe)


def test_export_names_non_finite_weights(tmp_path: Path) -> None:
    from m4r_export.verify.testing import tiny_model

    model = tiny_model(20)
    with torch.no_grad():
        model.mamba_layers[0].mamba.out_proj.weight[0, 0] = float("nan")
    save_checkpoint(tmp_path / "nan.pt", model, None)
    res = CliRunner().invoke(
        main, ["export", "--ckpt", str(tmp_path / "nan.pt"), "--out-dir", str(tmp_path / "o")]
    )
    assert res.exit_code == 2, res.output
    assert "non-finite weights" in res.output and "out_proj.weight" in res.output and "bug" not in res.output


# ------------------------------------------------------------------------------------ signals


@pytest.mark.parametrize(
    "signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"]
)
def test_signal_saves_the_state_and_resume_finishes(signum: int, code: int, tmp_path: Path) -> None:
    users, items, ts = synthetic_interactions(n_users=300, n_items=40, seed=1)
    data = tmp_path / "syn.inter"
    write_inter_file(data, users, items, ts)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("hidden_size: 8\nd_state: 4\nMAX_ITEM_LIST_LENGTH: 10\ntrain_batch_size: 16\n")
    out = tmp_path / "m.pt"
    args = [
        "train", "--data", str(data), "--config", str(recipe), "--out", str(out), "--epochs", "3",
        "--no-progress", "--scan-backend", "reference", "--threads", "1",
    ]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "m4r_export.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    for line in proc.stdout:  # wait until training has started (the first epoch line)
        lines.append(line)
        if line.startswith("epoch 1"):
            break
    proc.send_signal(signum)
    rest, _ = proc.communicate(timeout=120)
    output = "".join(lines) + rest
    assert proc.returncode == code, output
    assert "--resume" in output and str(default_state_path(out)) in output.replace("\n", ""), output
    state = torch.load(default_state_path(out), weights_only=True)
    assert (state["epoch"], state["next_batch"]) != (3, 0)  # it stopped early ...
    res = CliRunner().invoke(main, ["train", *args[1:], "--resume"])  # ... and resume finishes
    assert res.exit_code == 0, res.output
    assert torch.load(default_state_path(out), weights_only=True)["epoch"] == 3
