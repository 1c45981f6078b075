"""verify with --data: the vocabulary check of `m4r evaluate`, sampling said up front, and streaming
graphs refused with exit 2 instead of failing parity (issue 22.3, 22.4)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from m4r_export.checkpoint import save_checkpoint
from m4r_export.cli import main
from m4r_export.data import load_dataset, synthetic_interactions, write_inter_file
from m4r_export.verify.testing import tiny_model


def _cli(*args: object) -> tuple[int, str]:
    res = CliRunner().invoke(main, [str(a) for a in args])
    return res.exit_code, res.output


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vdata")
    mine, other = root / "mine.inter", root / "other.inter"
    write_inter_file(mine, *synthetic_interactions(n_users=60, n_items=30, seed=1))
    write_inter_file(other, *synthetic_interactions(n_users=60, n_items=30, seed=2))
    ds = load_dataset(mine, max_seq_len=12)
    ckpt = root / "model.pt"
    save_checkpoint(ckpt, tiny_model(ds.n_items), list(ds.item_tokens), {"max_seq_len": 12})
    code, out = _cli("export", "--ckpt", ckpt, "--out-dir", root / "exp", "--streaming", "--max-seq-len", 12)
    assert code == 0, out
    return {"root": root, "mine": mine, "other": other, "ckpt": ckpt, "exp": root / "exp"}


def test_verify_refuses_data_with_another_item_vocabulary(setup: dict[str, Path]) -> None:
    args = ("verify", "--ckpt", setup["ckpt"], "--artifact", setup["exp"] / "model.onnx", "--k", "5")
    code, out = _cli(*args, "--data", setup["other"])
    assert code == 2, out
    assert "item vocabulary mismatch" in out and "Traceback" not in out
    # the same check as `m4r evaluate`
    code, ev = _cli("evaluate", "--ckpt", setup["ckpt"], "--data", setup["other"])
    assert code == 2 and "item vocabulary mismatch" in ev
    # the checkpoint's own data passes, and the sampling is said before the work starts
    code, out = _cli(*args, "--data", setup["mine"], "--users", "10")
    assert code == 0, out
    first = out.splitlines()[0]
    assert first.startswith("verifying on dataset") and "10 of 60 test users, sampled at random" in first


def test_verify_refuses_streaming_graphs_with_exit_2_and_does_not_offer_them(setup: dict[str, Path]) -> None:
    for name in ("step.onnx", "init.onnx"):
        code, out = _cli("verify", "--ckpt", setup["ckpt"], "--artifact", setup["exp"] / name)
        assert code == 2, out
        assert "is a streaming graph" in out and "model.onnx" in out and "Traceback" not in out
    code, out = _cli("verify", "--ckpt", setup["ckpt"], "--artifact", setup["exp"])
    assert code == 2 and "model.onnx" in out
    assert "step.onnx" not in out and "init.onnx" not in out  # not offered as a choice
