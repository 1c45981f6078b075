"""Export memory (issue 19 item 3): a graph below the external-data threshold is still written
tensor by tensor (external data folded back into one file), never serialized whole in memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from m4r_export.onnx import export as ex
from m4r_export.verify.testing import tiny_model


def test_inlined_file_is_the_model_serialized_in_memory(tmp_path: Path) -> None:
    model = tiny_model(3000, seed=5)  # > 127 bytes per tensor length: multi-byte varints
    opts = ex.ExportOptions(head="topk", k=7, max_seq_len=9)
    reference = ex.trace_onnx(model, opts)  # the in-memory proto, as a small export used to be written
    path = tmp_path / "model.onnx"
    ex.trace_onnx(model, opts, path=path, inline=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # the side file is gone
    got = onnx.load(str(path))  # one self-contained file: no external data left
    assert all(t.data_location == onnx.TensorProto.DEFAULT for t in got.graph.initializer)

    def weights(m: onnx.ModelProto) -> dict[str, np.ndarray]:
        return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}

    want, have = weights(reference), weights(got)
    assert want.keys() == have.keys() and len(want) > 3
    for name, value in want.items():
        np.testing.assert_array_equal(have[name], value, err_msg=name)
        assert have[name].dtype == value.dtype
    assert [n.SerializeToString() for n in got.graph.node] == [
        n.SerializeToString() for n in reference.graph.node
    ]
    assert [f.name for f in got.functions] == [f.name for f in reference.functions]
    onnx.checker.check_model(got, full_check=True)
    # ONNX Runtime reads it as the same model
    feeds = {
        "item_seq": np.array([[5, 9, 2999, 0, 0, 0, 0, 0, 0]], np.int64),
        "item_seq_len": np.array([3], np.int64),
        "exclude_items": np.zeros((1, 1), np.int64),
    }
    a = ort.InferenceSession(reference.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, feeds
    )
    b = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
