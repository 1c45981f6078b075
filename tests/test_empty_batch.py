"""Issue 8 item 9: an empty batch returns empty outputs in every backend, head and function body."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from m4r_export.onnx import bodies
from m4r_export.onnx import export as ex
from m4r_export.verify.artifact import load_artifact
from m4r_export.verify.runners import OrtCpuRunner, TorchRunner
from m4r_export.verify.testing import tiny_model

N_ITEMS = 30


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One export per head; the other bodies are swapped into copies (no re-trace)."""
    import onnx

    root = tmp_path_factory.mktemp("empty")
    model = tiny_model(N_ITEMS)
    paths: dict[str, Path] = {}
    for head in ("scores", "topk", "embedding"):
        opts = ex.ExportOptions(head=head, k=5, max_seq_len=6)
        proto = ex.trace_onnx(model, opts)
        for body in bodies.BODIES:
            ex.finalize_model(proto, ex.ExportOptions(head=head, k=5, max_seq_len=6, body=body), False)
            d = root / f"{head}-{body}"
            d.mkdir()
            onnx.save(proto, str(d / "model.onnx"))
            paths[f"{head}-{body}"] = d / "model.onnx"
    return paths


@pytest.mark.parametrize("body", bodies.BODIES)
@pytest.mark.parametrize("head", ["scores", "topk", "embedding"])
def test_empty_batch_gives_empty_outputs(traced: dict[str, Path], head: str, body: str) -> None:
    model = tiny_model(N_ITEMS)
    ort = OrtCpuRunner(load_artifact(traced[f"{head}-{body}"]), threads=1)
    ref = TorchRunner(model, head, 5, False, scan_backend="fast", threads=1)
    empty = (np.zeros((0, 4), dtype=np.int64), np.zeros(0, dtype=np.int64))
    got, want = ort.run(*empty), ref.run(*empty)
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].shape == want[name].shape and got[name].shape[0] == 0, name
        assert got[name].dtype == want[name].dtype, name
    # and a non-empty batch through the same runner still agrees
    seq = np.array([[1, 2, 3, 0], [4, 5, 6, 7]])
    lens = np.array([3, 4])
    full_got, full_want = ort.run(seq, lens), ref.run(seq, lens)
    for name in full_want:
        np.testing.assert_allclose(full_got[name], full_want[name], rtol=1e-4, atol=1e-4)
