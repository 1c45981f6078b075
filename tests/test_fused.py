"""The fused Mamba block (``m4r export --fused``): one m4r::MambaMixer node per mixer.

Checked against the unfused export (the reference path): the fused file on plain ONNX Runtime (both
function levels inlined) and with libm4r_ort_ops.so (fused CPU kernel; its counter
``m4r_ort_ops_mixer_calls`` proves it ran), ragged lengths (0, -1, 1, middle, full, past the end), a 2-layer
model (mode "all" then "last"), a single node in mode "all" compared output by output, fp16, 1 and 3
threads. The library: as in tests/test_ort_ops.py ($M4R_ORT_OPS, or built with $ONNXRUNTIME_ROOT; CI
requires it with $M4R_REQUIRE_ORT_OPS=1).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from test_ort_ops import N_ITEMS, lib, tiny_model  # noqa: F401  (lib: the library fixture)

from m4r_export.onnx import bodies, fused
from m4r_export.onnx import export as ex
from m4r_export.onnx.ort_ops import mixer_calls

MAX_SEQ = 12


@pytest.fixture(scope="module")
def ops(lib: Path) -> Path:  # noqa: F811
    return lib


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    model = tiny_model(num_layers=2)
    out = tmp_path_factory.mktemp("fused")
    for name, is_fused in (("base", False), ("fused", True)):
        opts = ex.ExportOptions(head="scores", max_seq_len=MAX_SEQ, fp16=True, fused=is_fused)
        ex.export_artifacts(model, out / name, opts, build_trt=False)
    return {"base": out / "base", "fused": out / "fused"}


def _feeds(batch: int, seq: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = np.array([0, -1, 1, max(1, seq // 2), seq, seq + 5, seq, 2][:batch] + [seq] * max(0, batch - 8))
    return {
        "item_seq": rng.integers(1, N_ITEMS, (batch, seq)).astype(np.int64),
        "item_seq_len": lengths.astype(np.int64),
        "exclude_items": rng.integers(0, N_ITEMS, (batch, 3)).astype(np.int64),
    }


def test_fused_file_has_one_node_per_mixer_and_passes_the_full_checker(exports: dict[str, Path]) -> None:
    for name in ("model.onnx", "model.fp16.onnx"):
        proto = onnx.load(exports["fused"] / name)
        onnx.checker.check_model(proto, full_check=True)
        mixers = [n for n in proto.graph.node if (n.domain, n.op_type) == ("m4r", "MambaMixer")]
        modes = [helper.get_attribute_value(a) for n in mixers for a in n.attribute if a.name == "mode"]
        assert modes == [b"all", b"last"]  # layer 0 keeps every position, the last layer prunes
        assert not [n for n in proto.graph.node if n.op_type == bodies.OP_NAME]
        funcs = {f.name: f for f in proto.functions}
        assert set(funcs) == {"SelectiveScan", "MambaMixer"}
        assert [n.op_type for n in funcs["MambaMixer"].node if n.domain == "m4r"] == ["SelectiveScan"]
        # TensorRT inlines this body (onnx-tensorrt's LocalFunctionImporter) and imports neither string
        # tensors nor an If on them: sizes come from attribute-referencing Constants
        body = funcs["MambaMixer"].node
        assert not [n for n in body if n.op_type in ("If", "Equal")]
        strings = [a for n in body if n.op_type == "Constant" for a in n.attribute if "string" in a.name]
        assert not strings
    manifest = json.loads((exports["fused"] / "manifest.json").read_text())
    assert manifest["custom_op"]["fused_mixer"]["used"] is True
    base = json.loads((exports["base"] / "manifest.json").read_text())
    assert base["custom_op"]["fused_mixer"]["used"] is False


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_fused_kernel_and_fused_body_match_the_unfused_file(
    exports: dict[str, Path],
    ops: Path,
    threads: int,
    precision: str,
) -> None:
    name = "model.onnx" if precision == "fp32" else "model.fp16.onnx"
    base = ex.ort_session((exports["base"] / name).read_bytes(), threads)
    body = ex.ort_session((exports["fused"] / name).read_bytes(), threads)
    kernel = ex.ort_session((exports["fused"] / name).read_bytes(), threads, ops)
    tol = 1e-5 if precision == "fp32" else 2e-2
    for batch, seq, seed in ((8, MAX_SEQ, 0), (8, 7, 1), (1, 1, 2), (20, MAX_SEQ, 3)):
        feeds = _feeds(batch, seq, seed)
        ref = base.run(None, feeds)[0]
        before = mixer_calls(ops)
        got = kernel.run(None, feeds)[0]
        assert mixer_calls(ops) == before + 2  # both nodes ran the fused kernel
        same = body.run(None, feeds)[0]
        finite = np.isfinite(ref)
        assert np.array_equal(finite, np.isfinite(got)) and np.array_equal(finite, np.isfinite(same))
        scale = float(np.abs(ref[finite]).max())
        assert float(np.abs(got[finite] - ref[finite]).max()) <= tol * max(1.0, scale), (batch, seq)
        assert float(np.abs(same[finite] - ref[finite]).max()) <= 1e-6 * max(1.0, scale)
        if precision == "fp32":
            top = np.argsort(-ref, 1, kind="stable")[:, :10]
            assert np.array_equal(top, np.argsort(-got, 1, kind="stable")[:, :10])


def _mixer_model(mode: str, float16: bool, seed: int = 0) -> tuple[bytes, dict[str, np.ndarray], Any]:
    """One MambaMixer node (weights as initializers) + the Mamba module it was built from."""
    from m4r_export.model.mamba import Mamba

    torch.manual_seed(seed)
    m = Mamba(d_model=12, d_state=5, d_conv=3, expand=2).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    T, np_t = (TensorProto.FLOAT16, np.float16) if float16 else (TensorProto.FLOAT, np.float32)
    weights = {
        "in_proj_weight": m.in_proj.weight.detach().numpy().astype(np_t),
        "conv_weight": m.conv1d.weight.detach().numpy().astype(np_t),
        "conv_bias": m.conv1d.bias.detach().numpy().astype(np_t),
        "x_proj_weight": m.x_proj.weight.detach().numpy().astype(np_t),
        "dt_proj_weight": m.dt_proj.weight.detach().numpy().astype(np_t),
        "dt_bias": m.dt_proj.bias.detach().numpy(),
        "A": (-torch.exp(m.A_log)).detach().numpy(),
        "D": m.D.detach().numpy(),
        "out_proj_weight": m.out_proj.weight.detach().numpy().astype(np_t),
    }
    node = helper.make_node(
        "MambaMixer",
        list(fused.INPUTS),
        ["y"],
        domain="m4r",
        mode=mode,
        d_inner=m.d_inner,
        x_proj_split=[m.dt_rank, m.d_state, m.d_state],
        conv_pads=[0, 0, m.d_conv - 1, 0, 0, 0],
    )
    graph = helper.make_graph(
        [node],
        "mixer",
        [
            helper.make_tensor_value_info("hidden", T, ["b", "L", 12]),
            helper.make_tensor_value_info("lengths", TensorProto.INT32, ["b"]),
        ],
        [helper.make_tensor_value_info("y", T, ["b", 1 if mode == "last" else "L", 12])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    proto = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("m4r", 1)],
        functions=[
            bodies.make_function(io_float16=float16),
            fused.make_mixer_function(20, io_float16=float16),
        ],
    )
    onnx.checker.check_model(proto, full_check=True)
    return proto.SerializeToString(), weights, m


@pytest.mark.parametrize("float16", [False, True])
@pytest.mark.parametrize("mode", ["all", "last"])
@pytest.mark.parametrize("threads", [1, 3])
def test_single_node_kernel_matches_its_function_body_and_pytorch(
    ops: Path,
    mode: str,
    float16: bool,
    threads: int,
) -> None:
    blob, _, m = _mixer_model(mode, float16)
    body = ex.ort_session(blob, threads)
    kernel = ex.ort_session(blob, threads, ops)
    rng = np.random.default_rng(5)
    one = ex.ort_session(blob, 1, ops)  # rows are independent: threads must not change a single bit
    for batch, seq in ((9, 13), (1, 1), (17, 40), (96, 60)):
        hidden = rng.normal(size=(batch, seq, 12)).astype(np.float16 if float16 else np.float32)
        lengths = rng.integers(-1, seq + 3, batch).astype(np.int32)
        feeds = {"hidden": hidden, "lengths": lengths}
        want = body.run(None, feeds)[0].astype(np.float64)
        got = kernel.run(None, feeds)[0].astype(np.float64)
        assert np.array_equal(got, one.run(None, feeds)[0].astype(np.float64))
        assert got.shape == want.shape == (batch, 1 if mode == "last" else seq, 12)
        with torch.no_grad():
            ref = m(
                torch.from_numpy(hidden.astype(np.float32)),
                torch.from_numpy(lengths).long(),
                last_only=mode == "last",
            )
        ref = ref[:, None] if mode == "last" else ref
        scale = max(1.0, float(np.abs(want).max()))
        tol = 1e-5 if not float16 else 1e-2
        assert float(np.abs(got - want).max()) <= tol * scale
        assert float(np.abs(got - ref.numpy()).max()) <= (1e-5 if not float16 else 2e-2) * scale
