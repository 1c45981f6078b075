"""Checkpoints: own format round trip, RecBole checkpoints via the restricted unpickler, bad files."""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import pytest
import torch

from m4r_export.checkpoint import (
    UnsafeCheckpointError,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from m4r_export.errors import UsageError
from m4r_export.model import Mamba4Rec


def tiny_model(n_items: int = 30) -> Mamba4Rec:
    torch.manual_seed(0)
    return Mamba4Rec(n_items, hidden_size=16, d_state=8)


def test_own_format_round_trip_is_weights_only_loadable(tmp_path: Path) -> None:
    model = tiny_model()
    tokens = ["[PAD]"] + [f"item{i}" for i in range(1, 30)]
    path = tmp_path / "model.pt"
    save_checkpoint(path, model, tokens, {"epoch": 3})
    raw = torch.load(path, weights_only=True)  # no pickled code in our format
    assert raw["format"] == "m4r-checkpoint" and raw["meta"]["epoch"] == 3
    loaded = load_checkpoint(path)
    assert not loaded.training
    assert loaded.item_tokens == tokens
    seq, lengths = torch.randint(1, 30, (2, 5)), torch.tensor([5, 2])
    assert torch.equal(loaded(seq, lengths), model.eval()(seq, lengths))


def write_fake_recbole_checkpoint(path: Path, state_dict: dict[str, torch.Tensor], **config: object) -> None:
    """Pickle a stand-in for recbole.config.configurator.Config the way RecBole's Trainer does."""
    names = ["recbole", "recbole.config", "recbole.config.configurator"]
    mods = {n: types.ModuleType(n) for n in names}

    class Config:
        def __init__(self) -> None:
            self.final_config_dict = {"model": "Mamba4Rec", "device": torch.device("cpu"), **config}
            self.model = "Mamba4Rec"

    Config.__module__ = "recbole.config.configurator"
    Config.__qualname__ = "Config"
    mods["recbole.config.configurator"].Config = Config  # type: ignore[attr-defined]
    sys.modules.update(mods)
    try:
        torch.save({"config": Config(), "epoch": 7, "state_dict": state_dict, "optimizer": {}}, path)
    finally:
        for n in names:
            del sys.modules[n]


def test_recbole_checkpoint_loads_without_recbole_installed(tmp_path: Path) -> None:
    model = tiny_model()
    path = tmp_path / "Mamba4Rec-Nov-29.pth"
    write_fake_recbole_checkpoint(
        path,
        model.state_dict(),
        hidden_size=16,
        num_layers=1,
        d_state=8,
        d_conv=4,
        expand=2,
        dropout_prob=0.3,
        MAX_ITEM_LIST_LENGTH=200,
    )
    ck = read_checkpoint(path)
    assert ck.source_format == "recbole"
    assert ck.config.n_items == 30 and ck.config.dropout_prob == 0.3
    assert ck.meta["max_seq_len"] == 200 and ck.meta["epoch"] == 7
    loaded = ck.build_model()
    seq, lengths = torch.randint(1, 30, (2, 5)), torch.tensor([5, 2])
    assert torch.equal(loaded(seq, lengths), model.eval()(seq, lengths))


def test_dataset_vocabulary_must_have_one_token_per_item_row(tmp_path: Path) -> None:
    model = tiny_model()  # 30 item rows (29 items + padding)
    path = tmp_path / "Mamba4Rec.pth"
    write_fake_recbole_checkpoint(
        path, model.state_dict(), hidden_size=16, num_layers=1, d_state=8, d_conv=4, expand=2
    )
    tokens = ["[PAD]"] + [f"m{i}" for i in range(1, 30)]
    ck = read_checkpoint(path, types.SimpleNamespace(item_tokens=tokens))
    assert ck.item_tokens == tokens
    for wrong in (tokens[:-1], [*tokens, "extra"]):  # a dataset filtered differently
        with pytest.raises(UsageError, match=rf"has 30 item rows but the dataset maps {len(wrong)} items"):
            read_checkpoint(path, types.SimpleNamespace(item_tokens=wrong))
    # the own format refuses to store a vocabulary that does not match the item table
    with pytest.raises(ValueError, match="vocabulary has 29 tokens but the model has 30 items"):
        save_checkpoint(tmp_path / "m.pt", model, tokens[:-1])
    assert not (tmp_path / "m.pt").exists()


class Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("touch /tmp/m4r-pwned-by-checkpoint",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = Path("/tmp/m4r-pwned-by-checkpoint")
    marker.unlink(missing_ok=True)
    path = tmp_path / "evil.pt"
    torch.save({"config": Evil(), "state_dict": {}}, path)
    with pytest.raises(UnsafeCheckpointError, match="system"):
        read_checkpoint(path)
    assert not marker.exists()


def test_shape_mismatch_names_the_tensor(tmp_path: Path) -> None:
    model = tiny_model()
    sd = model.state_dict()
    sd["mamba_layers.0.mamba.A_log"] = torch.zeros(32, 4)
    path = tmp_path / "rb.pth"
    write_fake_recbole_checkpoint(path, sd, hidden_size=16, num_layers=1, d_state=8, d_conv=4, expand=2)
    with pytest.raises(UsageError, match=r"mamba_layers\.0\.mamba\.A_log has shape \(32, 4\)"):
        load_checkpoint(path)


def test_bad_files_get_clear_errors(tmp_path: Path) -> None:
    good = tmp_path / "good.pt"
    save_checkpoint(good, tiny_model(), None)
    truncated = tmp_path / "trunc.pt"
    truncated.write_bytes(good.read_bytes()[:2000])
    cases = {
        tmp_path / "missing.pt": "does not exist",
        tmp_path / "empty.pt": "empty",
        truncated: "truncated or corrupt",
        tmp_path / "text.pt": "not a PyTorch checkpoint",
        tmp_path / "sd.pt": "not a known checkpoint",
    }
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "text.pt").write_text("hello")
    torch.save({"weight": torch.zeros(2)}, tmp_path / "sd.pt")
    for path, message in cases.items():
        with pytest.raises(UsageError, match=message):
            read_checkpoint(path)
