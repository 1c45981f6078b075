"""The SelectiveScan function bodies, run by ONNX Runtime, against the reference scan."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from m4r_export.model.scan import selective_scan_ref
from m4r_export.onnx.bodies import BODIES, DOMAIN, INPUTS, OP_NAME, make_function


def scan_model(
    body: str, mode: str, fp16: bool = False, softplus: int = 1, opset: int = 20
) -> onnx.ModelProto:
    io = TensorProto.FLOAT16 if fp16 else TensorProto.FLOAT
    f32 = TensorProto.FLOAT
    types = [io, io, f32, io, io, f32, io, f32, TensorProto.INT32]
    shapes = [["b", "d", "L"], ["b", "d", "L"], ["d", "n"], ["b", "n", "L"], ["b", "n", "L"], ["d"]]
    shapes += [["b", "d", "L"], ["d"], ["b"]]
    node = helper.make_node(
        OP_NAME,
        list(INPUTS),
        ["y"],
        domain=DOMAIN,
        delta_softplus=softplus,
        mode=mode,
        plugin_namespace="m4r",
        plugin_version="1",
    )
    out_shape = ["b", "d"] if mode == "last" else ["b", "d", "L"]
    graph = helper.make_graph(
        [node],
        "scan",
        [helper.make_tensor_value_info(n, t, s) for n, t, s in zip(INPUTS, types, shapes, strict=True)],
        [helper.make_tensor_value_info("y", io, out_shape)],
    )
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(DOMAIN, 1)],
        functions=[make_function(body, opset, io_float16=fp16)],
    )


def inputs(b: int, d: int, n: int, seq_len: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(b, d, seq_len, generator=g, dtype=torch.float64)
    delta = torch.randn(b, d, seq_len, generator=g, dtype=torch.float64) * 0.5 - 1.0
    A = -(torch.rand(d, n, generator=g, dtype=torch.float64) * 5 + 0.1)
    B = torch.randn(b, n, seq_len, generator=g, dtype=torch.float64)
    C = torch.randn(b, n, seq_len, generator=g, dtype=torch.float64)
    D = torch.randn(d, generator=g, dtype=torch.float64)
    z = torch.randn(b, d, seq_len, generator=g, dtype=torch.float64)
    delta_bias = torch.randn(d, generator=g, dtype=torch.float64) * 0.1
    return [u, delta, A, B, C, D, z, delta_bias]


def run(
    model: onnx.ModelProto, args: list[torch.Tensor], lengths: torch.Tensor, fp16: bool = False
) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    io = np.float16 if fp16 else np.float32
    feeds = {}
    for name, a in zip(INPUTS, args, strict=False):
        feeds[name] = a.numpy().astype(np.float32 if name in ("A", "D", "delta_bias") else io)
    feeds["lengths"] = lengths.numpy().astype(np.int32)
    return sess.run(None, feeds)[0]


CASES = [
    # (batch, D, N, L, lengths)
    (1, 4, 3, 1, [1]),  # L = 1, batch 1
    (3, 4, 3, 1, [1, 0, 5]),  # L = 1, lengths clamped
    (1, 8, 5, 64, [64]),  # batch 1, full length
    (4, 8, 5, 64, [64, 1, 17, 40]),  # per-row lengths
    (5, 6, 4, 33, [0, -2, 99, 33, 2]),  # lengths outside [1, L] are clamped
]


@pytest.mark.parametrize("body", BODIES)
@pytest.mark.parametrize("mode", ["last", "all"])
@pytest.mark.parametrize("case", CASES, ids=[f"b{c[0]}-L{c[3]}" for c in CASES])
def test_body_matches_reference(body: str, mode: str, case: tuple[int, int, int, int, list[int]]) -> None:
    b, d, n, seq_len, lens = case
    args = inputs(b, d, n, seq_len)
    lengths = torch.tensor(lens, dtype=torch.int32)
    model = scan_model(body, mode)
    onnx.checker.check_model(model, full_check=True)
    got = run(model, args, lengths)
    ref = selective_scan_ref(*args, delta_softplus=True, lengths=lengths, mode=mode).numpy()
    assert got.shape == ref.shape == ((b, d) if mode == "last" else (b, d, seq_len))
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("body", BODIES)
def test_body_without_softplus(body: str) -> None:
    args = inputs(3, 4, 3, 9)
    args[1] = args[1].abs()  # dt >= 0 without softplus
    args[7] = args[7].abs()
    lengths = torch.tensor([9, 4, 1], dtype=torch.int32)
    got = run(scan_model(body, "last", softplus=0), args, lengths)
    ref = selective_scan_ref(*args, delta_softplus=False, lengths=lengths, mode="last").numpy()
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("body", BODIES)
@pytest.mark.parametrize("mode", ["last", "all"])
def test_body_fp16_io_keeps_fp32_state(body: str, mode: str) -> None:
    args = inputs(2, 8, 4, 40)
    args = [a.half().double() if i not in (2, 5, 7) else a for i, a in enumerate(args)]  # fp16-exact inputs
    lengths = torch.tensor([40, 13], dtype=torch.int32)
    model = scan_model(body, mode, fp16=True)
    onnx.checker.check_model(model, full_check=True)
    got = run(model, args, lengths, fp16=True)
    assert got.dtype == np.float16
    ref = selective_scan_ref(*args, delta_softplus=True, lengths=lengths, mode=mode).numpy()
    # only the final rounding to fp16 separates them (fp32 state inside)
    np.testing.assert_allclose(got.astype(np.float64), ref, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("body", ["chunked", "rowwise", "vectorized"])
def test_closed_form_long_sequence_has_no_cancellation(body: str) -> None:
    """L = 1000 with dt ~ 1: decay from a reverse exclusive CumSum stays accurate in fp32.

    Computing decay as total - cumsum (total ~ 1000) gives errors ~4e-6 here; the bound is 1e-6.
    """
    args = inputs(2, 4, 4, 1000, seed=3)
    args[1] = args[1] * 0.1 + 0.5  # dt ~ softplus(0.5) ~ 1: total ~ 1000, recent decays ~ 1
    args = [a.float().double() for a in args]  # the reference sees exactly the fp32 inputs
    lengths = torch.tensor([1000, 731], dtype=torch.int32)
    got = run(scan_model(body, "last"), args, lengths)
    ref = selective_scan_ref(*args, delta_softplus=True, lengths=lengths, mode="last").numpy()
    assert np.abs(got - ref).max() < 1e-6


def test_function_declares_contract_attributes() -> None:
    fn = make_function()
    assert (fn.domain, fn.name) == ("m4r", "SelectiveScan")
    assert list(fn.input) == ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "lengths"]
    defaults = {a.name: helper.get_attribute_value(a) for a in fn.attribute_proto}
    assert defaults == {
        "delta_softplus": 1,
        "mode": b"all",
        "plugin_namespace": b"m4r",
        "plugin_version": b"1",
    }
    with pytest.raises(ValueError, match="body"):
        make_function("nope")


@pytest.mark.parametrize("body", BODIES)
@pytest.mark.parametrize("mode", ["last", "all"])
def test_body_runs_when_the_caller_declares_no_shapes(body: str, mode: str) -> None:
    """Scan sub-graph outputs declare their rank, so ORT runs even without caller shape info."""
    model = scan_model(body, mode)
    for vi in [*model.graph.input, *model.graph.output]:
        vi.type.tensor_type.ClearField("shape")
    args = inputs(2, 4, 3, 6)
    lengths = torch.tensor([6, 2], dtype=torch.int32)
    got = run(model, args, lengths)
    ref = selective_scan_ref(*args, delta_softplus=True, lengths=lengths, mode=mode).numpy()
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("body", BODIES)
def test_huge_decays_are_exact_to_fp32(body: str) -> None:
    """Exponents far below -87 (fp32 denormal range) are clamped at -60 in the closed forms: the
    results still match the float64 reference (the clamp changes a term by <= 9e-27 * |term|)."""
    args = inputs(3, 8, 6, 64, seed=5)
    args[1] = args[1] + 4.0  # dt ~ softplus(3) ~ 3: decay * A reaches about -6000
    lengths = torch.tensor([64, 40, 3], dtype=torch.int32)
    got = run(scan_model(body, "last"), args, lengths)
    ref = selective_scan_ref(*args, delta_softplus=True, lengths=lengths, mode="last").numpy()
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5)
