"""What a user sees on a mistake: one K rule in every command, and messages that name the real cause."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from m4r_export.checkpoint import save_checkpoint
from m4r_export.cli import main
from m4r_export.data import load_dataset, synthetic_interactions, write_inter_file
from m4r_export.errors import M4RError, UsageError
from m4r_export.model import Mamba4Rec
from m4r_export.serving import ServingModel
from m4r_export.training.config import load_config
from m4r_export.verify.artifact import load_artifact
from m4r_export.verify.testing import trace_onnx


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path | int]:
    root = tmp_path_factory.mktemp("errors")
    data = root / "syn.inter"
    write_inter_file(data, *synthetic_interactions(n_users=60, n_items=30, seed=0))
    ds = load_dataset(data, max_seq_len=10)
    torch.manual_seed(0)
    model = Mamba4Rec(ds.n_items, hidden_size=8, d_state=4).eval()
    ckpt = root / "model.pt"
    save_checkpoint(
        ckpt, model, ds.item_tokens, {"max_seq_len": 10, "min_user_inter": 5, "min_item_inter": 5}
    )
    onnx_path = trace_onnx(model, root / "export", head="scores")
    return {"root": root, "data": data, "ckpt": ckpt, "onnx": onnx_path, "rankable": ds.n_items - 1}


def _cli(*args: object) -> tuple[int, str]:
    res = CliRunner().invoke(main, [str(a) for a in args])
    return res.exit_code, res.output


# ------------------------------------------------------------------------------- item 3: one K rule


def test_k_above_the_rankable_items_is_refused_by_every_command(setup: dict, tmp_path: Path) -> None:
    n = setup["rankable"]
    expected = f"--k {n + 1}: the model ranks {n} items (index 0 is padding); choose K between 1 and {n}"
    ckpt, k = setup["ckpt"], n + 1
    runs = {
        "evaluate": ("evaluate", "--ckpt", ckpt, "--data", setup["data"], "--k", 10, k),
        "export": ("export", "--ckpt", ckpt, "--out-dir", tmp_path / "x", "--head", "topk", "--k", k),
        "verify": ("verify", "--ckpt", ckpt, "--artifact", setup["onnx"], "--k", k, "--users", 8),
    }  # fmt: skip
    for name, args in runs.items():
        code, out = _cli(*args)
        assert code == 2, (name, out)
        assert expected in " ".join(out.split()), (name, out)  # rich may wrap the line
    with pytest.raises(UsageError, match=f"choose K between 1 and {n}"):
        ServingModel(Mamba4Rec(n + 1, hidden_size=8, d_state=4), head="topk", k=n + 1)


def test_k_equal_to_the_rankable_items_is_accepted(setup: dict) -> None:
    n = setup["rankable"]
    code, out = _cli(
        "evaluate", "--ckpt", setup["ckpt"], "--data", setup["data"], "--k", n, "--baseline", "none"
    )
    assert code == 0, out
    assert f"hit@{n}" in out
    ServingModel(Mamba4Rec(n + 1, hidden_size=8, d_state=4), head="topk", k=n)


# -------------------------------------------------------------------- item 4: the real cause, named


def test_bad_cli_value_is_reported_as_the_option_not_the_recipe(setup: dict, tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("hidden_size: 8\nd_state: 4\nepochs: 1\n")
    code, out = _cli(
        "train", "--data", setup["data"], "--config", recipe, "--out", tmp_path / "m.pt", "--max-minutes", -1
    )
    assert code == 2, out
    assert "--max-minutes" in out and str(recipe) not in out
    # the library path names the override too; a bad recipe is still the recipe's error
    with pytest.raises(UsageError, match=r"^option\(s\) max_minutes=-1: max_minutes must be > 0") as exc:
        load_config(recipe, max_minutes=-1)
    assert str(recipe) not in str(exc.value)
    recipe.write_text("max_minutes: -1\n")
    with pytest.raises(UsageError, match=f"^{recipe}: max_minutes must be > 0"):
        load_config(recipe, epochs=1)
    assert load_config(recipe, max_minutes=5).max_minutes == 5  # an override may fix the recipe


def test_verify_artifact_directory_says_which_file_to_pass(setup: dict) -> None:
    export_dir = Path(setup["onnx"]).parent
    code, out = _cli("verify", "--ckpt", setup["ckpt"], "--artifact", export_dir)
    assert code == 2, out
    text = " ".join(out.split())
    assert "is a directory" in text and "model.onnx" in text and "does not exist" not in text


@pytest.mark.parametrize(
    ("content", "needle"),
    [(b"", "is empty (0 bytes)"), (b"\x08\x07", "not a valid ONNX")],  # 2nd: ir_version 7 and no graph
    ids=["empty", "no-graph"],
)
def test_empty_or_corrupt_onnx_names_the_file_problem(tmp_path: Path, content: bytes, needle: str) -> None:
    bad = tmp_path / "model.onnx"
    bad.write_bytes(content)
    with pytest.raises(M4RError, match="corrupt") as exc:
        load_artifact(bad)
    assert needle in str(exc.value)
    assert "graph outputs are" not in str(exc.value)
