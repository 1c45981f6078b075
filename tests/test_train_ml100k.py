"""End to end on ML-100K (slow): a short, time-bounded training run, then `m4r evaluate`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from m4r_export.cli import main

ML100K = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets" / "ml-100k" / "ml-100k.inter"
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "ml-100k.yaml"


@pytest.mark.slow
@pytest.mark.skipif(not ML100K.is_file(), reason="ML-100K not present")
def test_ml100k_train_and_evaluate(tmp_path: Path) -> None:
    out = tmp_path / "model.pt"
    args = ["train", "--data", str(ML100K), "--config", str(RECIPE), "--out", str(out), "--no-progress"]
    res = CliRunner().invoke(main, [*args, "--max-minutes", "0.5", "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert "time-budget" in res.output
    js = tmp_path / "test.json"
    res = CliRunner().invoke(main, ["evaluate", "--ckpt", str(out), "--data", str(ML100K), "--json", str(js)])
    assert res.exit_code == 0, res.output
    report = json.loads(js.read_text())
    assert report["rows"] == 943
    # most-popular on ML-100K's last items (a known quantity: about 0.05 hit@10)
    assert 0.02 < report["baseline"]["hit@10"] < 0.12
    assert 0.0 <= report["ndcg@10"] <= report["hit@10"] <= 1.0
