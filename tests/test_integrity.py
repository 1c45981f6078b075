"""Artifact integrity (issue 8 items 5-8, issue 13 item 6): manifests checked, exports published whole.

Every tampered case must fail ``m4r verify`` (and ``m4r bench``) with exit code 3 and a message
naming the file, before any model runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from m4r_export.checkpoint import save_checkpoint
from m4r_export.cli import main
from m4r_export.fileio import WriteError, write_text_atomic
from m4r_export.onnx import export as ex
from m4r_export.verify.testing import tiny_model

N_ITEMS = 40


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("integrity")
    model = tiny_model(N_ITEMS, seed=1)
    model.item_tokens = ["[PAD]", *(f"i{i}" for i in range(1, N_ITEMS))]
    save_checkpoint(root / "model.pt", model, model.item_tokens, {"max_seq_len": 8})
    ex.export_artifacts(
        model,
        root / "out",
        ex.ExportOptions(max_seq_len=8),
        checkpoint_path=root / "model.pt",
        build_trt=False,
    )
    other = tiny_model(N_ITEMS, seed=2)
    save_checkpoint(root / "other.pt", other, model.item_tokens, {"max_seq_len": 8})
    return {"dir": root / "out", "ckpt": root / "model.pt", "other": root / "other.pt"}


def _cli(*args: object) -> tuple[int, str]:
    res = CliRunner().invoke(main, [str(a) for a in args])
    return res.exit_code, res.output


def _one_ulp(d: Path) -> None:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(d / "model.onnx"))
    init = max(model.graph.initializer, key=lambda i: int(np.prod(i.dims)))
    arr = numpy_helper.to_array(init).copy()
    arr.flat[0] = np.nextafter(arr.flat[0], np.float32(np.inf))
    init.CopyFrom(numpy_helper.from_array(arr, init.name))
    onnx.save(model, str(d / "model.onnx"))


def _flip(d: Path) -> None:
    data = bytearray((d / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (d / "model.onnx").write_bytes(bytes(data))


def _swap_items(d: Path) -> None:
    lines = (d / "items.txt").read_text().split("\n")
    lines[1], lines[2] = lines[2], lines[1]
    (d / "items.txt").write_text("\n".join(lines))


def _edit_manifest(d: Path, edit: object) -> None:
    m = json.loads((d / "manifest.json").read_text())
    edit(m)  # type: ignore[operator]
    (d / "manifest.json").write_text(json.dumps(m))


def _zero_all(m: dict) -> None:
    for entry in m["files"].values():
        entry["sha256"] = "0" * 64


TAMPER = {
    "one-ulp weight change": (_one_ulp, "model.onnx"),
    "flipped bytes": (_flip, "model.onnx"),
    "swapped items.txt lines": (_swap_items, "items.txt"),
    "deleted items.txt": (
        lambda d: (d / "items.txt").unlink(),
        "items.txt is listed in manifest.json but missing",
    ),
    "items.txt deleted and unlisted": (
        lambda d: ((d / "items.txt").unlink(), _edit_manifest(d, lambda m: m["files"].pop("items.txt"))),
        "does not list items.txt",
    ),
    "all checksums zeroed": (lambda d: _edit_manifest(d, _zero_all), "does not match its sha256"),
    "manifest deleted, model kept": (lambda d: None, None),
}


@pytest.mark.parametrize("case", [c for c in TAMPER if TAMPER[c][1] is not None])
def test_tampered_artifact_fails_verify_with_exit_3(
    case: str, exported: dict[str, Path], tmp_path: Path
) -> None:
    """Issue 8 item 5: each of these passed with exit 0 before."""
    tamper, expected = TAMPER[case]
    d = tmp_path / "art"
    shutil.copytree(exported["dir"], d)
    code, out = _cli("verify", "--ckpt", exported["ckpt"], "--artifact", d / "model.onnx", "--users", 8)
    assert code == 0, out  # the untouched copy passes
    tamper(d)
    code, out = _cli("verify", "--ckpt", exported["ckpt"], "--artifact", d / "model.onnx", "--users", 8)
    assert code == 3, out
    assert out.startswith("Error: ") and expected in out, out
    assert "PASS" not in out and "FAIL" not in out  # nothing ran


def test_bench_checks_the_manifest_first(exported: dict[str, Path], tmp_path: Path) -> None:
    d = tmp_path / "art"
    shutil.copytree(exported["dir"], d)
    _swap_items(d)
    code, out = _cli("bench", "--artifact", d / "model.onnx", "--batch", 1, "--seq", 4, "--repeats", 1)
    assert code == 3 and "items.txt" in out, out


def test_manifest_states_the_items_format(exported: dict[str, Path]) -> None:
    """Issue 8 item 10: the manifest says what items.txt is (line i = token of index i, UTF-8, \\n)."""
    manifest = json.loads((exported["dir"] / "manifest.json").read_text())
    for text in (manifest["items_format"], manifest["files"]["items.txt"]["format"]):
        assert "UTF-8" in text and "line i" in text and "'\\n'" in text and "splitlines" in text
    lines = (exported["dir"] / "items.txt").read_text(encoding="utf-8").splitlines()
    assert lines == ["[PAD]", *(f"i{i}" for i in range(1, N_ITEMS))]


def test_verify_says_when_the_checkpoint_is_another_one(exported: dict[str, Path]) -> None:
    manifest = json.loads((exported["dir"] / "manifest.json").read_text())
    assert manifest["checkpoint"]["sha256"] == hashlib.sha256(exported["ckpt"].read_bytes()).hexdigest()
    art = exported["dir"] / "model.onnx"
    code, out = _cli("verify", "--ckpt", exported["other"], "--artifact", art, "--users", 8)
    assert code == 3 and "this artifact was exported from a different checkpoint" in out, out
    code, out = _cli(
        "verify", "--ckpt", exported["other"], "--artifact", art, "--users", 8, "--allow-other-checkpoint"
    )
    assert code == 1 and "parity FAILED" in out, out  # other weights: compared, and they differ


def test_manifest_hashes_match_hashlib_beyond_any_buffer(exported: dict[str, Path], tmp_path: Path) -> None:
    """Issue 13 item 6: hashes checked against hashlib directly, on a file larger than any read buffer."""
    from m4r_export.integrity import ArtifactIntegrityError, check_artifact_files

    d = tmp_path / "art"
    shutil.copytree(exported["dir"], d)
    for name, entry in json.loads((d / "manifest.json").read_text())["files"].items():
        assert entry["sha256"] == hashlib.sha256((d / name).read_bytes()).hexdigest(), name
    big = np.random.default_rng(0).integers(0, 256, size=(6 << 20) + 123, dtype=np.uint8).tobytes()
    (d / "extra.bin").write_bytes(big)
    digest = hashlib.sha256(big).hexdigest()
    _edit_manifest(d, lambda m: m["files"].__setitem__("extra.bin", {"sha256": digest, "bytes": len(big)}))
    assert check_artifact_files(d)["files"]["extra.bin"]["sha256"] == digest
    tail = bytearray(big)
    tail[-1] ^= 1  # a change after the first 4 MiB only
    (d / "extra.bin").write_bytes(bytes(tail))
    with pytest.raises(ArtifactIntegrityError, match="extra.bin does not match its sha256"):
        check_artifact_files(d)


# ------------------------------------------------------------------------- publication as a unit


def _snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_reexport_leaves_no_stale_file(exported: dict[str, Path], tmp_path: Path) -> None:
    """Issue 8 item 7: re-exporting another head removes files the new manifest does not list."""
    d = tmp_path / "art"
    shutil.copytree(exported["dir"], d)
    (d / "model.fp16.onnx").write_bytes((d / "model.onnx").read_bytes())  # a previous --fp16 export
    _edit_manifest(d, lambda m: m["files"].__setitem__("model.fp16.onnx", dict(m["files"]["model.onnx"])))
    model = tiny_model(N_ITEMS, seed=1)
    ex.export_artifacts(model, d, ex.ExportOptions(head="topk", k=5, max_seq_len=8), build_trt=False)
    manifest = json.loads((d / "manifest.json").read_text())
    assert sorted(p.name for p in d.iterdir()) == sorted([*manifest["files"], "manifest.json"])
    assert "model.fp16.onnx" not in manifest["files"]
    assert not [p for p in tmp_path.iterdir() if p.name != "art"]  # no staging leftovers


def test_failed_export_midway_keeps_the_previous_set(
    exported: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 8 item 7: a failure after the first file is written leaves the old set, no temporaries."""
    d = tmp_path / "art"
    shutil.copytree(exported["dir"], d)
    before = _snapshot(d)
    calls = {"n": 0}
    real_fsync = os.fsync

    def failing_fsync(fd: int) -> None:
        calls["n"] += 1
        if calls["n"] == 2:  # the second file of the new export
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(WriteError, match=r"cannot write .*art/.*No space left on device \(ENOSPC\)"):
        ex.export_artifacts(tiny_model(N_ITEMS, seed=5), d, ex.ExportOptions(max_seq_len=8), build_trt=False)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert _snapshot(d) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


_KILLED_CHILD = """
import os, sys, time
from m4r_export import fileio
real = os.fsync
def slow(fd):
    real(fd)
    print("staged", flush=True)
    time.sleep(30)
os.fsync = slow
fileio.publish_directory(sys.argv[1], {"a.txt": b"new", "b.txt": b"new"}, replaceable=lambda d: True)
"""


def test_kill_9_during_publication_keeps_the_old_set(tmp_path: Path) -> None:
    from m4r_export.fileio import publish_directory

    out = tmp_path / "out"
    publish_directory(out, {"a.txt": b"old", "c.txt": b"old"})
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_CHILD, str(out)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "staged"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _snapshot(out) == {"a.txt": b"old", "c.txt": b"old"}
    assert len(list(tmp_path.iterdir())) == 2  # the dead process's staging directory
    publish_directory(out, {"a.txt": b"newer"}, replaceable=lambda d: True)
    assert _snapshot(out) == {"a.txt": b"newer"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the stale one is cleaned up


_WRITER = """
import json, sys
from m4r_export.fileio import publish_directory
out, tag = sys.argv[1], sys.argv[2]
for i in range(15):
    files = {f"f{j}.txt": f"{tag}{i}".encode() for j in range(4)}
    files["manifest.json"] = json.dumps({"tag": f"{tag}{i}"}).encode()
    publish_directory(out, files, replaceable=lambda d: True)
"""


def test_concurrent_publications_never_mix(tmp_path: Path) -> None:
    out = tmp_path / "out"
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(out), tag]) for tag in "AB"]
    seen = 0
    while any(p.poll() is None for p in procs):
        try:
            fd = os.open(out, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            names = sorted(os.listdir(fd))
            base = Path(f"/proc/self/fd/{fd}")  # the directory as opened: one set, whatever swaps later
            tag = json.loads((base / "manifest.json").read_text())["tag"]
            bodies = {(base / n).read_text() for n in names if n != "manifest.json"}
        except (FileNotFoundError, ValueError):
            continue  # the old set was removed under us after the swap; never a mix
        finally:
            os.close(fd)
        assert names == ["f0.txt", "f1.txt", "f2.txt", "f3.txt", "manifest.json"]
        assert bodies == {tag}
        seen += 1
        time.sleep(0.001)
    assert all(p.returncode == 0 for p in procs)
    final = _snapshot(out)
    assert {v.decode() for k, v in final.items() if k != "manifest.json"} == {
        json.loads(final["manifest.json"])["tag"]
    }
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_publication_refuses_a_directory_with_foreign_files(
    exported: dict[str, Path], tmp_path: Path
) -> None:
    d = tmp_path / "run"
    d.mkdir()
    (d / "model.pt").write_bytes(b"a checkpoint the user keeps here")
    with pytest.raises(Exception, match="holds files that m4r did not write"):
        ex.export_artifacts(tiny_model(N_ITEMS), d, ex.ExportOptions(max_seq_len=8), build_trt=False)
    assert (d / "model.pt").read_bytes() == b"a checkpoint the user keeps here"


def test_written_files_get_the_umask_mode(exported: dict[str, Path], tmp_path: Path) -> None:
    """Issue 8 item 8: not mkstemp's 0600, so a server running as another user can read the model."""
    old = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "report.json", "{}")
        assert (tmp_path / "report.json").stat().st_mode & 0o777 == 0o644
        out = tmp_path / "out"
        ex.export_artifacts(tiny_model(N_ITEMS), out, ex.ExportOptions(max_seq_len=8), build_trt=False)
        modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
        assert set(modes.values()) == {0o644}, modes
        assert out.stat().st_mode & 0o777 == 0o755
    finally:
        os.umask(old)
