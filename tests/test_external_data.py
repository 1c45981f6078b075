"""ONNX external data (issue 19 item 3): weights in model.onnx.data above a threshold (forced here),
listed and hashed in the manifest; every reader refuses a tampered or missing side file (exit 3)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from m4r_export.checkpoint import save_checkpoint
from m4r_export.cli import main
from m4r_export.fileio import sha256_file
from m4r_export.integrity import ArtifactIntegrityError
from m4r_export.onnx import export as ex
from m4r_export.serve.repository import TritonOptions, plan_repository
from m4r_export.serving import ServingModel
from m4r_export.streaming import StreamingSession
from m4r_export.verify.testing import tiny_model

N_ITEMS = 60


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("extdata")
    model = tiny_model(N_ITEMS, seed=1)
    model.item_tokens = ["[PAD]", *(f"i{i}" for i in range(1, N_ITEMS))]
    save_checkpoint(root / "model.pt", model, model.item_tokens, {"max_seq_len": 8})
    mp = pytest.MonkeyPatch()
    mp.setattr(ex, "EXTERNAL_DATA_BYTES", 0)  # any graph is "over the threshold"
    try:
        ex.export_artifacts(
            model,
            root / "out",
            ex.ExportOptions(head="topk", k=5, max_seq_len=8, fp16=True),
            checkpoint_path=root / "model.pt",
            build_trt=False,
        )
    finally:
        mp.undo()
    return {"dir": root / "out", "ckpt": root / "model.pt", "model": model}


def test_weights_are_in_side_files_listed_in_the_manifest(exported: dict[str, object]) -> None:
    d = exported["dir"]
    assert isinstance(d, Path)
    manifest = json.loads((d / "manifest.json").read_text())
    files = manifest["files"]
    for name in ("model.onnx", "model.fp16.onnx"):
        assert files[name]["external_data"] == [f"{name}.data"]
        side = f"{name}.data"
        assert files[side]["sha256"] == sha256_file(d / side)
        assert files[side]["bytes"] == (d / side).stat().st_size
        proto = onnx.load(str(d / name), load_external_data=False)
        table = next(i for i in proto.graph.initializer if "item_embedding" in i.name)
        assert table.data_location == onnx.TensorProto.EXTERNAL and not table.raw_data
        assert {e.key: e.value for e in table.external_data}["location"] == side
    # fp16 halves the side file (the scan's few fp32 parameters aside)
    ratio = files["model.fp16.onnx.data"]["bytes"] / files["model.onnx.data"]["bytes"]
    assert 0.45 < ratio < 0.6
    assert manifest["external_data"]["files"] == ["model.onnx.data", "model.fp16.onnx.data"]


def test_side_file_model_runs_like_pytorch(exported: dict[str, object]) -> None:
    d, model = exported["dir"], exported["model"]
    assert isinstance(d, Path)
    sess = ort.InferenceSession(str(d / "model.onnx"), providers=["CPUExecutionProvider"])
    seq = np.array([[3, 5, 7, 0], [1, 2, 3, 4]], dtype=np.int64)
    lens = np.array([3, 4], dtype=np.int64)
    excl = np.array([[9, 0], [0, 0]], dtype=np.int64)
    scores, items = sess.run(None, {"item_seq": seq, "item_seq_len": lens, "exclude_items": excl})
    with torch.no_grad():
        ref = ServingModel(model, "topk", 5)(*(torch.from_numpy(a) for a in (seq, lens, excl)))  # type: ignore[arg-type]
    np.testing.assert_allclose(scores, ref[0].numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(items, ref[1].numpy())


def _cli(*args: object) -> tuple[int, str]:
    res = CliRunner().invoke(main, [str(a) for a in args])
    return res.exit_code, res.output


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _drop_entry(d: Path) -> None:
    m = json.loads((d / "manifest.json").read_text())
    del m["files"]["model.onnx.data"]
    (d / "manifest.json").write_text(json.dumps(m))


TAMPER = {
    "flipped": (lambda d: _flip(d / "model.onnx.data"), "model.onnx.data does not match its sha256"),
    "missing": (lambda d: (d / "model.onnx.data").unlink(), "model.onnx.data is listed"),
    "unlisted": (_drop_entry, "listed and hashed in 'files'"),
}


@pytest.mark.parametrize("case", sorted(TAMPER))
def test_every_reader_refuses_a_bad_side_file(case: str, exported: dict[str, object], tmp_path: Path) -> None:
    src, ckpt = exported["dir"], exported["ckpt"]
    assert isinstance(src, Path)
    d = tmp_path / "art"
    shutil.copytree(src, d)
    code, out = _cli("verify", "--ckpt", ckpt, "--artifact", d / "model.onnx", "--users", 8, "--k", 5)
    assert code == 0, out  # the untouched copy passes
    tamper, expected = TAMPER[case]
    tamper(d)
    for args in (
        ("verify", "--ckpt", ckpt, "--artifact", d / "model.onnx", "--users", 8, "--k", 5),
        ("bench", "--artifact", d / "model.onnx", "--batch", 1, "--seq", 4, "--repeats", 1),
        ("triton", "--artifacts", d, "--repo", tmp_path / "repo"),
    ):
        code, out = _cli(*args)
        assert code == 3, (args[0], out)
        assert out.startswith("Error: ") and expected in out, (args[0], out)
    with pytest.raises(ArtifactIntegrityError, match=expected):
        StreamingSession.from_dir(d)


def test_triton_repository_carries_the_side_file(exported: dict[str, object]) -> None:
    d = exported["dir"]
    assert isinstance(d, Path)
    manifest = json.loads((d / "manifest.json").read_text())
    for backend in ("python", "onnxruntime"):
        plan = plan_repository(d, TritonOptions(backend=backend, name="m"), manifest)
        assert plan.copies["m/1/model.onnx.data"] == d / "model.onnx.data"
