"""One verdict for SelectiveScan's edge cases on every path (issue 20 items 3 and 9).

Paths: the ONNX function body (every body, plain ONNX Runtime), the custom-op library
(libm4r_ort_ops.so; fixture ``lib`` of test_ort_ops: skips, or fails under $M4R_REQUIRE_ORT_OPS=1)
and PyTorch's scan backends. The TensorRT plugin's seq-0 path is the ctests' (scan_kernel_emulated_vs_cpu,
trt_plugin_core_emulated). Contract: plugins/selectiveScanPlugin/README.md, "Empty inputs, invalid nodes".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper
from test_onnx_bodies import scan_model
from test_ort_ops import _scan_inputs, _scan_model, _session_bytes, lib  # noqa: F401 (fixture)

from m4r_export.model.scan import selective_scan_fast, selective_scan_ref
from m4r_export.model.scan_native import native_available, selective_scan_native
from m4r_export.onnx import bodies, ort_ops
from m4r_export.onnx import export as ex
from m4r_export.verify.testing import tiny_model


def _body_session(model: onnx.ModelProto | bytes) -> Any:
    so = ort.SessionOptions()
    so.log_severity_level = 4
    data = model if isinstance(model, bytes) else model.SerializeToString()
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def _torch_backends() -> list[Any]:
    return [selective_scan_ref, selective_scan_fast] + ([selective_scan_native] if native_available() else [])


def _torch(fn: Any, x: dict[str, np.ndarray], mode: str) -> np.ndarray:
    t = {k: torch.from_numpy(v) for k, v in x.items()}
    args = [t[n] for n in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    y = fn(*args, True, t["lengths"], mode)
    return y.numpy()


# ----------------------------------------------------------------------------------- seq 0, batch 0


@pytest.mark.parametrize("mode", ["last", "all"])
@pytest.mark.parametrize("body", bodies.BODIES)
def test_body_seq0_and_batch0_give_zeros(body: str, mode: str) -> None:
    """Seq 0: zeros (b, D) in mode last, empty y in mode all; batch 0: empty y. Before: errors, or SIGFPE."""
    sess = _body_session(scan_model(body, mode))
    for batch, seqlen in ((2, 0), (0, 5), (0, 0)):
        y = sess.run(None, _scan_inputs(batch, 4, seqlen, 3, seed=1))[0]
        want = (batch, 4) if mode == "last" else (batch, 4, seqlen)
        assert y.shape == want and y.dtype == np.float32 and not y.any(), (batch, seqlen)


@pytest.mark.parametrize("mode", ["last", "all"])
def test_library_seq0_gives_zeros_not_stale_memory(lib: Path, mode: str) -> None:  # noqa: F811
    sess = _session_bytes(_scan_model(mode), lib)
    for _ in range(3):
        sess.run(None, _scan_inputs(2, 4, 6, 3, seed=2))  # leaves non-zero y buffers in ORT's arena
        y = sess.run(None, _scan_inputs(2, 4, 0, 3, seed=2))[0]
        assert y.shape == ((2, 4) if mode == "last" else (2, 4, 0))
        assert not y.any(), y


@pytest.mark.parametrize("mode", ["last", "all"])
def test_pytorch_backends_seq0_give_zeros(mode: str) -> None:
    x = _scan_inputs(2, 4, 0, 3, seed=3)
    for fn in _torch_backends():
        y = _torch(fn, x, mode)
        assert y.shape == ((2, 4) if mode == "last" else (2, 4, 0)) and not y.any(), fn.__name__


def test_whole_model_empty_inputs_through_plain_onnxruntime_and_the_library(lib: Path) -> None:  # noqa: F811
    """model.onnx itself (no m4r runner): batch 0 and item_seq [2, 0] run, stable, and both paths agree."""
    model = tiny_model(30)
    opts = ex.ExportOptions(head="topk", k=5, max_seq_len=6)  # default body: chunked
    proto = ex.trace_onnx(model, opts)
    ex.finalize_model(proto, opts, False)
    so = ort.SessionOptions()
    so.log_severity_level = 4
    ort_ops.register_ort_ops(so, lib)
    with_lib = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    plain = _body_session(proto)
    seq, lens, excl = (i.name for i in proto.graph.input)
    for shape in ((0, 6), (2, 0)):
        feeds = {seq: np.zeros(shape, np.int64), lens: np.zeros(shape[0], np.int64)}
        feeds[excl] = np.zeros((shape[0], 1), np.int64)
        runs = [s.run(None, feeds) for s in (plain, plain, with_lib, with_lib)]
        full = {seq: np.array([[3, 4, 5, 0, 0, 0]] * 2), lens: np.array([3, 3])}
        full[excl] = np.zeros((2, 1), np.int64)
        with_lib.run(None, full)  # between calls: a stale buffer would show up below
        runs.append(with_lib.run(None, feeds))
        for other in runs[1:]:
            for a, b in zip(runs[0], other, strict=True):
                assert a.shape[0] == shape[0]
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------- invalid nodes


def _edited_node(node: onnx.NodeProto, **attrs: Any) -> None:
    for name, value in attrs.items():
        kept = [a for a in node.attribute if a.name != name]
        del node.attribute[:]
        node.attribute.extend([*kept, helper.make_attribute(name, value)])


def _edited(model: onnx.ModelProto, **attrs: Any) -> bytes:
    _edited_node(model.graph.node[0], **attrs)
    return model.SerializeToString()


@pytest.mark.parametrize(
    ("attrs", "body_node", "lib_message"),
    [
        ({"mode": "middle"}, "mode", 'mode="middle" is not supported'),
        ({"delta_softplus": 5}, "delta_softplus", "delta_softplus=5 is not supported"),
        ({"plugin_version": "2"}, "plugin_version", 'plugin_version="2" is not supported'),
    ],
)
def test_hand_edited_attributes_are_refused_on_both_paths(
    lib: Path,  # noqa: F811
    attrs: dict[str, Any],
    body_node: str,
    lib_message: str,
) -> None:
    x = _scan_inputs(2, 4, 6, 3, seed=4)
    for body in bodies.BODIES:
        with pytest.raises(Exception, match=f"{bodies.REFUSED_PREFIX}{body_node}"):
            _body_session(_edited(scan_model(body, "last"), **attrs)).run(None, x)
    with pytest.raises(Exception, match=lib_message):
        _session_bytes(_edited(scan_model("chunked", "last"), **attrs), lib).run(None, x)


@pytest.mark.parametrize("a_state", [1, 4])
@pytest.mark.parametrize("mode", ["last", "all"])
def test_state_size_mismatch_is_refused_on_both_paths(lib: Path, mode: str, a_state: int) -> None:  # noqa: F811
    """A (D, 1) broadcast against B (b, 3, L) gave finite numbers in the body; the library refuses."""
    x = _scan_inputs(2, 4, 6, 3, seed=5)
    x["A"] = -np.exp(np.random.default_rng(0).standard_normal((4, a_state))).astype(np.float32)
    for body in bodies.BODIES:
        with pytest.raises(Exception, match=f"{bodies.REFUSED_PREFIX}input_shapes"):
            _body_session(scan_model(body, mode)).run(None, x)
    with pytest.raises(Exception, match=r"input B has shape \(2, 3, 6\), expected"):
        _session_bytes(_scan_model(mode), lib).run(None, x)


def test_other_broadcastable_shapes_are_refused_by_the_body() -> None:
    """With no shapes declared on the graph (a file made elsewhere), size-1 dims would broadcast silently."""
    model = scan_model("chunked", "last")
    for value in [*model.graph.input, *model.graph.output]:
        value.type.tensor_type.ClearField("shape")
    sess = _body_session(model)
    base = _scan_inputs(2, 4, 6, 3, seed=6)
    assert sess.run(None, base)[0].shape == (2, 4)
    broadcastable = {"delta": (2, 4, 1), "z": (2, 1, 6), "D": (1,), "delta_bias": (1,), "C": (1, 3, 6)}
    for name, shape in broadcastable.items():
        x = dict(base)
        x[name] = np.ones(shape, dtype=base[name].dtype)
        with pytest.raises(Exception, match=f"{bodies.REFUSED_PREFIX}input_shapes"):
            sess.run(None, x)


@pytest.mark.parametrize("mode", ["last", "all"])
def test_a_minus_inf_is_finite_and_equal_on_every_path(lib: Path, mode: str) -> None:  # noqa: F811
    x = _scan_inputs(3, 4, 7, 3, seed=7)
    x["A"][0, 0] = x["A"][2, 1] = -np.inf
    want = _session_bytes(_scan_model(mode), lib).run(None, x)[0]
    assert np.isfinite(want).all()
    for body in bodies.BODIES:
        got = _body_session(scan_model(body, mode)).run(None, x)[0]
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5, err_msg=body)
    for fn in _torch_backends():
        np.testing.assert_allclose(_torch(fn, x, mode), want, rtol=2e-5, atol=2e-5, err_msg=fn.__name__)


def test_verify_refuses_an_edited_and_rehashed_node_on_both_paths(lib: Path, tmp_path: Path) -> None:  # noqa: F811
    """A model.onnx whose scan node was edited (mode="middle") and re-hashed into the manifest: `m4r
    verify` refuses it at load through the function body as through the library, naming the node."""
    import json

    from click.testing import CliRunner

    from m4r_export.checkpoint import save_checkpoint
    from m4r_export.cli import main
    from m4r_export.fileio import sha256_file

    model = tiny_model(30)
    model.item_tokens = ["[PAD]"] + [f"t{i}" for i in range(1, 30)]
    save_checkpoint(tmp_path / "model.pt", model, model.item_tokens, {"max_seq_len": 8})
    art = tmp_path / "art"
    ex.export_artifacts(
        model, art, ex.ExportOptions(head="topk", k=5, max_seq_len=8, fp16=False), build_trt=False
    )
    proto = onnx.load(str(art / "model.onnx"))
    (node,) = [n for n in proto.graph.node if n.op_type == "SelectiveScan"]
    _edited_node(node, mode="middle")
    onnx.save(proto, str(art / "model.onnx"))
    manifest = json.loads((art / "manifest.json").read_text())
    entry = manifest["files"]["model.onnx"]
    entry["sha256"], entry["bytes"] = sha256_file(art / "model.onnx"), (art / "model.onnx").stat().st_size
    (art / "manifest.json").write_text(json.dumps(manifest))
    args = ["verify", "--ckpt", str(tmp_path / "model.pt"), "--artifact", str(art / "model.onnx")]
    args += ["--users", "8", "--k", "5"]
    body = CliRunner().invoke(main, args)
    assert body.exit_code == 1 and f"{bodies.REFUSED_PREFIX}mode" in body.output, body.output
    with_lib = CliRunner().invoke(main, [*args, "--backend", "ort-cpu-ops", "--ort-ops", str(lib)])
    assert with_lib.exit_code == 1 and 'mode="middle" is not supported' in with_lib.output, with_lib.output
    for res in (body, with_lib):
        errors = [line for line in res.output.splitlines() if line.startswith("Error: ")]
        assert len(errors) == 1 and res.output.rstrip().endswith(errors[0]), res.output
        assert "Traceback" not in res.output
