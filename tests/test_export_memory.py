"""Export memory (issue 19 item 3): a graph below the external-data threshold is still written
tensor by tensor (external data folded back into one file), never serialized whole in memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from m4r_export.errors import M4RError
from m4r_export.onnx import export as ex
from m4r_export.verify.testing import tiny_model


def test_inlined_file_is_the_model_serialized_in_memory(tmp_path: Path) -> None:
    model = tiny_model(3000, seed=5)  # > 127 bytes per tensor length: multi-byte varints
    opts = ex.ExportOptions(head="topk", k=7, max_seq_len=9)
    reference = ex.trace_onnx(model, opts)  # the in-memory proto, as a small export used to be written
    path = tmp_path / "model.onnx"
    ex._inline_external_data(path, ex.trace_onnx(model, opts, path=path))  # what the export does
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


def test_parity_session_feeds_the_model_own_table(tmp_path: Path) -> None:
    """Export parity holds the item table once: the session gets the model's weight (no copy) after
    checking the staged side file holds the same bytes, and computes what a plain session computes."""
    model = tiny_model(3000, seed=5)
    opts = ex.ExportOptions(head="topk", k=7, max_seq_len=9)
    path = tmp_path / "model.onnx"
    ex.trace_onnx(model, opts, path=path)  # the staged form: weights in model.onnx.data
    sess = ex._parity_session(model, path, "fp32")
    assert isinstance(sess, ex._FedTable)
    assert np.shares_memory(sess.table, model.item_embedding.weight.detach().numpy())
    feeds = {
        "item_seq": np.array([[5, 9, 2999, 0, 0, 0, 0, 0, 0], [1, 2, 3, 4, 5, 6, 7, 8, 9]], np.int64),
        "item_seq_len": np.array([3, 9], np.int64),
        "exclude_items": np.array([[9], [0]], np.int64),
    }
    plain = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)
    for x, y in zip(sess.run(None, feeds), plain, strict=True):
        np.testing.assert_array_equal(x, y)
    assert ex.measure_parity(model, opts, path, "fp32")["passed"]


def test_parity_session_refuses_a_side_file_that_is_not_the_model(tmp_path: Path) -> None:
    model = tiny_model(3000, seed=5)
    path = tmp_path / "model.onnx"
    ex.trace_onnx(model, ex.ExportOptions(head="topk", k=7, max_seq_len=9), path=path)
    table = next(t for t in onnx.load(path, load_external_data=False).graph.initializer if t.dims[0] == 3000)
    offset = int({e.key: e.value for e in table.external_data}.get("offset", 0))
    side = tmp_path / "model.onnx.data"
    data = bytearray(side.read_bytes())
    data[offset + 4 * table.dims[1] * 2000 + 3] ^= 0x40  # a byte of item 2000's row
    side.write_bytes(bytes(data))
    with pytest.raises(M4RError, match="differ from the model"):
        ex._parity_session(model, path, "fp32")


@pytest.mark.parametrize("variant", ["fp16", "fused"])
def test_tracing_frees_its_copies_but_never_the_model(tmp_path: Path, variant: str) -> None:
    """The fp16 copy's storage is released after tracing; the caller's model is left byte for byte."""
    model = tiny_model(3000, seed=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opts = ex.ExportOptions(head="topk", k=7, max_seq_len=9, fused=variant == "fused")
    ex.trace_onnx(model, opts, fp16=variant == "fp16", path=tmp_path / "model.onnx")
    after = model.state_dict()
    assert before.keys() == after.keys()
    for name, value in before.items():
        assert torch.equal(after[name], value), name
