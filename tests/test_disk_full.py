"""A failed write (disk full, quota, size limit) is one ``Error:`` line naming the file (issue 20.7).

The kernel's own refusal is produced with ``RLIMIT_FSIZE`` (every write past the limit fails with
EFBIG, through every layer: our atomic writes, shutil, torch.save's zip writer), lowered only
around one in-process command; ENOSPC itself is injected at ``fsync``, where a full disk reports
delayed-allocation failures. Each time the previous state must be kept and no traceback shown.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from m4r_export.checkpoint import save_checkpoint
from m4r_export.cli import main
from m4r_export.data import synthetic_interactions, write_inter_file
from m4r_export.fileio import WriteError, write_bytes_atomic
from m4r_export.onnx import export as ex
from m4r_export.verify.testing import tiny_model

N_ITEMS = 40


@contextlib.contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """Lower the soft RLIMIT_FSIZE for the block (Python ignores SIGXFSZ: writes fail with EFBIG)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _one_error_line(res: Result, names: str) -> str:
    """The command failed with exactly one ``Error:`` line naming ``names`` and the cause."""
    assert isinstance(res.exception, SystemExit) and res.exit_code == 1, (res.exception, res.output)
    errors = [line for line in res.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, res.output
    assert "Traceback" not in res.output
    assert names in errors[0] and "File too large (EFBIG)" in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("disk_full")
    model = tiny_model(N_ITEMS, seed=1)
    save_checkpoint(root / "model.pt", model, None, {"max_seq_len": 8})
    ex.export_artifacts(model, root / "art", ex.ExportOptions(max_seq_len=8), build_trt=False)
    return {"root": root, "ckpt": root / "model.pt", "art": root / "art"}


def test_export_on_a_full_disk_keeps_the_previous_export(setup: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(setup["art"], out)
    before = _snapshot(out)
    args = ["export", "--ckpt", setup["ckpt"], "--out-dir", out, "--max-seq-len", 8, "--head", "topk"]
    args += ["--k", 5]
    with file_size_limit(4096):
        res = CliRunner().invoke(main, [str(a) for a in args])
    _one_error_line(res, str(out))
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging directory left


def test_triton_on_a_full_disk_keeps_the_previous_repository(setup: dict[str, Path], tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    args = ["triton", "--artifacts", setup["art"], "--repo", repo, "--backend", "python"]
    assert CliRunner().invoke(main, [str(a) for a in args]).exit_code == 0
    before = _snapshot(repo)
    with file_size_limit(4096):
        res = CliRunner().invoke(main, [str(a) for a in args])
    assert f"{repo}/" in _one_error_line(res, "(staged in ")
    assert _snapshot(repo) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]


def test_train_resume_on_a_full_disk_keeps_the_previous_state(tmp_path: Path) -> None:
    users, items, ts = synthetic_interactions(n_users=80, n_items=25, seed=1)
    write_inter_file(tmp_path / "syn.inter", users, items, ts)
    (tmp_path / "r.yaml").write_text("hidden_size: 8\nd_state: 4\nMAX_ITEM_LIST_LENGTH: 10\n")
    out = tmp_path / "m.pt"
    args = ["train", "--data", tmp_path / "syn.inter", "--config", tmp_path / "r.yaml", "--out", out]
    args += ["--no-progress", "--scan-backend", "reference", "--threads", "1"]
    first = CliRunner().invoke(main, [str(a) for a in [*args, "--epochs", "1"]])
    assert first.exit_code == 0, first.output
    state = out.with_name("m.pt.state")
    before = state.read_bytes()
    assert len(before) > 20_000
    with file_size_limit(20_000):  # model.pt fits, the training state does not
        res = CliRunner().invoke(main, [str(a) for a in [*args, "--epochs", "2", "--resume"]])
    _one_error_line(res, str(state))
    assert state.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_enospc_names_the_file_and_the_cause(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")

    def full(_fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(WriteError) as info:
        write_bytes_atomic(target, b"new")
    assert str(info.value).startswith(f"cannot write {target}: No space left on device (ENOSPC);")
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]
