"""ONNX function bodies of ``m4r::SelectiveScan`` (standard ops only, so ONNX Runtime needs no plugin).

The node and its function share one signature (design.md, "The selective scan as one ONNX node")::

    SelectiveScan(u, delta, A, B, C, D, z, delta_bias, lengths) -> y
      attributes: delta_softplus (int), mode ("all" | "last"), plugin_namespace, plugin_version

``u, delta, z`` are (batch, D, L); ``B, C`` (batch, N, L); ``A`` (D, N) fp32 (= -exp(A_log));
``D, delta_bias`` (D,) fp32; ``lengths`` (batch,) int32, clamped to [1, L] inside. The I/O dtype
(u, delta, B, C, z, y) is fp32 or fp16; every body casts to fp32 first and accumulates in fp32.

Bodies (pick with ``body=``; measured in docs/onnx-export.md). ``mode="last"`` uses the exact
closed form ``h_last = sum_s exp(A * decay_s) * dt_s * u_s * B_s`` with
``decay_s = sum_{s<r<=last} dt_r`` computed by ``CumSum(exclusive=1, reverse=1)`` (never as
``total - cumsum``, which cancels catastrophically in fp32 for long sequences); every exponent is
<= 0, so nothing overflows. The bodies differ in how they schedule it:

* ``chunked`` (default): a Scan over (row, chunk of <= CHUNK positions) items; chunks after a
  row's length are dropped; each block is L2-sized whatever L is.
* ``rowwise``: a Scan over rows, each sliced to its exact length.
* ``vectorized``: the whole batch at once ((batch, D, L, N) temporaries: memory-bound).
* ``timeloop``: no closed form; a Scan loop over time carrying the fp32 state (batch, D, N).

``mode="all"`` (only used by layers before the last one) runs the time ``Scan`` loop in every
body: a closed form for every position costs O(L^2) exponentials.

The string attribute ``mode`` selects the branch through ``If(Equal(Constant(value_string=@mode),
"last"))``; string ``Equal`` needs opset >= 19. After ONNX Runtime inlines the function the
condition is a constant and only one branch ever runs.

Defined behaviour shared with the custom-op library, the TensorRT plugin and PyTorch
(plugins/selectiveScanPlugin/README.md):

* the node is validated like the library validates it: ``mode`` in {all, last}, ``delta_softplus``
  in {0, 1}, ``plugin_version`` "1", and every input's shape exactly the contract's (no silent
  broadcasting, e.g. of A's state size against B's). A node that breaks one is refused: the run
  (or the session, when ONNX Runtime folds the check) fails at a node named
  ``m4r_SelectiveScan_refused_<what>`` (:data:`REFUSALS`);
* an empty problem (batch 0 or seq 0) gives zeros: ``mode="last"`` y ``(batch, D)`` of zeros at
  seq 0 (the empty history's state is zero and has no position to read out), ``mode="all"`` an
  empty y. Each Scan runs inside an ``If`` on "is there work" (ONNX Runtime's Scan cannot run zero
  iterations: it fails, or at seq 0 kills the process with SIGFPE);
* ``A = -inf`` is read as the most negative finite float, so every decay step clamps exactly like
  the library's (``exp(max(dt * A, floor))``) and ``0 * A`` (masked steps, the read-out position
  of the closed forms) is 0, not NaN.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, helper, numpy_helper

DOMAIN = "m4r"
OP_NAME = "SelectiveScan"
OP_VERSION = 1
PLUGIN_NAMESPACE = "m4r"
PLUGIN_VERSION = "1"
INPUTS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "lengths")
BODIES = ("chunked", "rowwise", "vectorized", "timeloop")
DEFAULT_BODY = "chunked"
MIN_OPSET = 19
#: closed-form exponents are clamped here: exp(-60) ~ 8.8e-27 is far above fp32's denormal range, so
#: the products that follow never hit (slow) denormal arithmetic; the change per term is at most
#: 8.8e-27 * |dt u B C|, far below fp32 resolution of any non-negligible result
EXP_FLOOR = -60.0
#: the checks every node passes before anything is computed: name suffix of the refusing node -> what
REFUSALS = {
    "mode": 'attribute mode must be "all" or "last"',
    "delta_softplus": "attribute delta_softplus must be 0 or 1",
    "plugin_version": 'attribute plugin_version must be "1"',
    "input_shapes": "inputs must have the contract's shapes: u, delta, z (b, D, L); A (D, N); "
    "B, C (b, N, L); D, delta_bias (D); lengths (b)",
}
REFUSED_PREFIX = "m4r_SelectiveScan_refused_"


def _const(name: str, value: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name))


def _i64(name: str, values: list[int]) -> onnx.NodeProto:
    return _const(name, np.array(values, dtype=np.int64))


def _f32(name: str, value: float) -> onnx.NodeProto:
    return _const(name, np.array(value, dtype=np.float32))


def _attr_ref_const(out: str, attr_name: str, attr_type: int, field: str) -> onnx.NodeProto:
    """A Constant whose value is the calling node's attribute ``attr_name``."""
    node = helper.make_node("Constant", [], [out])
    ref = AttributeProto()
    ref.name = field
    ref.ref_attr_name = attr_name
    ref.type = attr_type  # type: ignore[assignment]
    node.attribute.append(ref)
    return node


def _zeros_state(p: str) -> list[onnx.NodeProto]:
    """``{p}h0``: zeros (b, D, N) fp32."""
    return [
        helper.make_node("Shape", ["u"], [f"{p}BD"], start=0, end=2),
        helper.make_node("Shape", ["Af"], [f"{p}N1"], start=1, end=2),
        helper.make_node("Concat", [f"{p}BD", f"{p}N1"], [f"{p}hshape"], axis=0),
        helper.make_node(
            "ConstantOfShape",
            [f"{p}hshape"],
            [f"{p}h0"],
            value=numpy_helper.from_array(np.zeros(1, np.float32)),
        ),
    ]


def _if_nonempty(
    p: str, size_of: str, scan: onnx.NodeProto, empty: list[list[onnx.NodeProto]]
) -> list[onnx.NodeProto]:
    """Run ``scan`` only when ``size_of`` has elements; else each output is built by ``empty``.

    ONNX Runtime's Scan cannot run zero iterations (it fails, or divides by zero and kills the
    process), so every Scan of the bodies sits in this If. ``empty``: per Scan output, the nodes
    building its value for the empty case (the last node's output is that value).
    """
    f32 = TensorProto.FLOAT
    work = f"{p}has_work"
    out = [helper.make_tensor_value_info(f"{n}_s", f32, None) for n in scan.output]
    else_nodes = [n for nodes in empty for n in nodes]
    else_out = [helper.make_tensor_value_info(nodes[-1].output[0], f32, None) for nodes in empty]
    results = list(scan.output)
    inner = [f"{n}_s" for n in results]
    scan.output[:] = inner
    return [
        helper.make_node("Size", [size_of], [f"{p}size"]),
        helper.make_node("Greater", [f"{p}size", "zero_scalar"], [work]),
        helper.make_node(
            "If",
            [work],
            [f"{n}_r" for n in results],
            then_branch=helper.make_graph([scan], f"{p}work", [], out),
            else_branch=helper.make_graph(else_nodes, f"{p}empty", [], else_out),
        ),
        *[helper.make_node("Identity", [f"{n}_r"], [n]) for n in results],
    ]


def _zeros_like_shape(out: str, shape: str) -> onnx.NodeProto:
    return helper.make_node(
        "ConstantOfShape", [shape], [out], value=numpy_helper.from_array(np.zeros(1, np.float32))
    )


def _validation() -> list[onnx.NodeProto]:
    """The library's checks (:data:`REFUSALS`); their verdicts gate ``A``: ``Av`` is A once all pass.

    A failed check makes a Reshape of A to an impossible shape (-2) fail, in a node named
    ``m4r_SelectiveScan_refused_<check>``: ONNX Runtime names that node in its error.
    """
    i64 = TensorProto.INT64
    nodes = [
        _const("all_str", np.array("all", dtype=object)),
        _const("v1_str", np.array(PLUGIN_VERSION, dtype=object)),
        _attr_ref_const("version_str", "plugin_version", AttributeProto.STRING, "value_string"),
        _i64("bad_shape", [-2, -2]),
        helper.make_node("Shape", ["A"], ["A_shape"]),
        # mode
        helper.make_node("Equal", ["mode_str", "all_str"], ["is_all"]),
        helper.make_node("Or", ["is_last", "is_all"], ["ok_mode"]),
        # delta_softplus
        helper.make_node("Equal", ["softplus_i", "zero_scalar"], ["sp0"]),
        helper.make_node("Equal", ["softplus_i", "one_scalar"], ["sp1"]),
        helper.make_node("Or", ["sp0", "sp1"], ["ok_delta_softplus"]),
        # plugin_version
        helper.make_node("Equal", ["version_str", "v1_str"], ["ok_plugin_version"]),
        # shapes: all nine concatenated vs the contract's, built from (b, D, L) of u and N of A
        *[helper.make_node("Shape", [n], [f"shape_{n}"]) for n in INPUTS],
        helper.make_node("Concat", [f"shape_{n}" for n in INPUTS], ["shapes_got"], axis=0),
        helper.make_node("Shape", ["A"], ["N1_v"], start=1, end=2),
        helper.make_node("Concat", ["shape_u", "N1_v"], ["bDLN"], axis=0),
        # b D L | b D L | D N | b N L | b N L | D | b D L | D | b
        _i64("contract_idx", [0, 1, 2, 0, 1, 2, 1, 3, 0, 3, 2, 0, 3, 2, 1, 0, 1, 2, 1, 0]),
        helper.make_node("Gather", ["bDLN", "contract_idx"], ["shapes_want"], axis=0),
        helper.make_node(
            "Equal", ["shapes_got", "shapes_want"], ["shapes_eq"], name=f"{REFUSED_PREFIX}input_shapes_rank"
        ),
        helper.make_node("Cast", ["shapes_eq"], ["shapes_eq_i"], to=i64),
        helper.make_node("ReduceMin", ["shapes_eq_i"], ["shapes_min"], keepdims=0),
        helper.make_node("Cast", ["shapes_min"], ["ok_input_shapes"], to=TensorProto.BOOL),
    ]
    gated = "A"
    for i, check in enumerate(REFUSALS):
        nodes += [
            helper.make_node("Where", [f"ok_{check}", "A_shape", "bad_shape"], [f"A_target{i}"]),
            helper.make_node(
                "Reshape", [gated, f"A_target{i}"], [f"A_ok{i}"], name=f"{REFUSED_PREFIX}{check}"
            ),
        ]
        gated = f"A_ok{i}"
    # -inf -> the most negative float: dt * A still clamps to the floor, and 0 * A is 0 (not NaN)
    nodes += [
        _f32("neg_max", float(np.finfo(np.float32).min)),
        helper.make_node("Max", [gated, "neg_max"], ["Af"]),
    ]
    return nodes


def _scan_loop(p: str, dt: str, dtu: str, output_all: bool) -> tuple[list[onnx.NodeProto], str]:
    """The recurrence as a Scan over time (axis 2); fp32 state ``h`` (b, D, N).

    ``dt``/``dtu`` are (b, D, L); reads ``Bf``/``Cf`` (b, N, L) and ``Af``. Returns the nodes and
    the result: all read-outs ``C_t . h_t`` (b, D, L) when ``output_all``, else the final state.
    """
    f32 = TensorProto.FLOAT
    nodes = [
        *_zeros_state(p),
        helper.make_node("Unsqueeze", [dt, "ax3"], [f"{p}dt3"]),  # (b, D, L, 1)
        helper.make_node("Unsqueeze", [dtu, "ax3"], [f"{p}dtu3"]),
        helper.make_node("Transpose", ["Bf"], [f"{p}Bt"], perm=[0, 2, 1]),
        helper.make_node("Unsqueeze", [f"{p}Bt", "ax1"], [f"{p}Bs"]),  # (b, 1, L, N)
    ]
    body_nodes = [
        helper.make_node("Mul", [f"{p}dt_t", "Af"], [f"{p}adt_raw"]),  # (b, D, N)
        helper.make_node("Max", [f"{p}adt_raw", "expo_floor"], [f"{p}adt"]),  # no denormal decays
        helper.make_node("Exp", [f"{p}adt"], [f"{p}dA"]),
        helper.make_node("Mul", [f"{p}dA", f"{p}h_in"], [f"{p}hdecay"]),
        helper.make_node("Mul", [f"{p}dtu_t", f"{p}B_t"], [f"{p}dBu"]),
        helper.make_node("Add", [f"{p}hdecay", f"{p}dBu"], [f"{p}h_out"]),
    ]
    body_inputs = [
        helper.make_tensor_value_info(f"{p}{n}", f32, [None, None, None])
        for n in ("h_in", "dt_t", "dtu_t", "B_t")
    ]
    # ranks are declared: ONNX Runtime needs them on Scan outputs when the caller's shapes are unknown
    body_outputs = [helper.make_tensor_value_info(f"{p}h_out", f32, [None, None, None])]
    scan_inputs = [f"{p}h0", f"{p}dt3", f"{p}dtu3", f"{p}Bs"]
    scan_outputs = [f"{p}h_last"]
    if output_all:
        nodes += [
            helper.make_node("Transpose", ["Cf"], [f"{p}Ct"], perm=[0, 2, 1]),
            helper.make_node("Unsqueeze", [f"{p}Ct", "ax1"], [f"{p}Cs"]),
        ]
        body_inputs.append(helper.make_tensor_value_info(f"{p}C_t", f32, [None, None, None]))
        body_nodes += [
            helper.make_node("Mul", [f"{p}h_out", f"{p}C_t"], [f"{p}hc"]),
            helper.make_node("ReduceSum", [f"{p}hc", "ax2"], [f"{p}y_t"], keepdims=0),  # (b, D)
        ]
        body_outputs.append(helper.make_tensor_value_info(f"{p}y_t", f32, [None, None]))
        scan_inputs.append(f"{p}Cs")
        scan_outputs.append(f"{p}y_all")
    n_scan_in = len(scan_inputs) - 1
    scan = helper.make_node(
        "Scan",
        scan_inputs,
        scan_outputs,
        body=helper.make_graph(body_nodes, f"{p}step", body_inputs, body_outputs),
        num_scan_inputs=n_scan_in,
        scan_input_axes=[2] * n_scan_in,
    )
    # empty problem: the state stays h0 (zeros), the read-outs are an empty (b, D, L)
    empty = [[helper.make_node("Identity", [f"{p}h0"], [f"{p}h_empty"])]]
    if output_all:
        scan.attribute.append(helper.make_attribute("scan_output_axes", [2]))
        empty.append(
            [
                helper.make_node("Shape", ["u"], [f"{p}y_shape"]),
                _zeros_like_shape(f"{p}y_empty", f"{p}y_shape"),
            ]
        )
    nodes += _if_nonempty(p, "u", scan, empty)
    return nodes, scan_outputs[-1]


def _last_closed_form(p: str) -> tuple[list[onnx.NodeProto], str]:
    """mode="last", closed form over all positions at once -> (b, D) before the D/z terms."""
    nodes = [
        helper.make_node("CumSum", [f"{p}dtv", "ax2"], [f"{p}decay"], exclusive=1, reverse=1),
        helper.make_node("Unsqueeze", [f"{p}decay", "ax3"], [f"{p}decay4"]),  # (b, D, L, 1)
        helper.make_node("Unsqueeze", ["Af", "ax0_2"], [f"{p}A4"]),  # (1, D, 1, N)
        helper.make_node("Mul", [f"{p}decay4", f"{p}A4"], [f"{p}expo_raw"]),
        helper.make_node("Max", [f"{p}expo_raw", "expo_floor"], [f"{p}expo"]),
        helper.make_node("Exp", [f"{p}expo"], [f"{p}W"]),  # (b, D, L, N), all <= 1
        helper.make_node("Mul", ["Bf", f"{p}C_last"], [f"{p}BC"]),  # (b, N, L)
        helper.make_node("Transpose", [f"{p}BC"], [f"{p}BCt"], perm=[0, 2, 1]),  # (b, L, N)
        helper.make_node("Unsqueeze", [f"{p}BCt", "ax1"], [f"{p}BC4"]),  # (b, 1, L, N)
        helper.make_node("Mul", [f"{p}W", f"{p}BC4"], [f"{p}WBC"]),
        helper.make_node("ReduceSum", [f"{p}WBC", "ax3"], [f"{p}S"], keepdims=0),  # (b, D, L)
        helper.make_node("Mul", [f"{p}S", f"{p}dtu"], [f"{p}Sdtu"]),
        helper.make_node("ReduceSum", [f"{p}Sdtu", "ax2"], [f"{p}core"], keepdims=0),  # (b, D)
    ]
    return nodes, f"{p}core"


def _last_rowwise(p: str) -> tuple[list[onnx.NodeProto], str]:
    """mode="last", closed form one row at a time: a Scan over the batch (axis 0).

    Each iteration slices its row to its own length (padding costs nothing) and keeps its
    (len, N, D) temporaries cache-sized. Layout (len, N, D) keeps D innermost, so the exponent is
    one broadcast product, and the N reduction is a batched (1 x N) @ (N x D) product; the dt*u
    factor is applied after it, on (len, D) only. Per element: one Mul, one Exp, one MatMul read.
    """
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    r = f"{p}r_"
    body_nodes = [
        _i64(f"{r}zero", [0]),
        _i64(f"{r}one", [1]),
        helper.make_node("Reshape", [f"{r}len", f"{r}one"], [f"{r}len1"]),  # (1,)
        helper.make_node("Sub", [f"{r}len1", f"{r}one"], [f"{r}idx1"]),
        helper.make_node("Slice", [f"{r}dt", f"{r}zero", f"{r}len1", f"{r}one"], [f"{r}dts"]),  # (D, l)
        helper.make_node("Slice", [f"{r}u", f"{r}zero", f"{r}len1", f"{r}one"], [f"{r}us"]),
        helper.make_node("Slice", [f"{r}B", f"{r}zero", f"{r}len1", f"{r}one"], [f"{r}Bs"]),  # (N, l)
        helper.make_node("Gather", [f"{r}C", f"{r}idx1"], [f"{r}Cl"], axis=1),  # (N, 1)
        helper.make_node("Transpose", [f"{r}dts"], [f"{r}dtT"], perm=[1, 0]),  # (l, D)
        # decay_s = sum_{s<r<=last} dt_r, summed from the end (no total - cumsum cancellation)
        helper.make_node("CumSum", [f"{r}dtT", f"{r}zero"], [f"{r}decay"], exclusive=1, reverse=1),
        helper.make_node("Unsqueeze", [f"{r}decay", f"{r}one"], [f"{r}decay3"]),  # (l, 1, D)
        helper.make_node("Mul", [f"{r}decay3", f"{p}At3"], [f"{r}expo_raw"]),  # (l, N, D), <= 0
        helper.make_node("Max", [f"{r}expo_raw", "expo_floor"], [f"{r}expo"]),
        helper.make_node("Exp", [f"{r}expo"], [f"{r}W"]),
        helper.make_node("Mul", [f"{r}Bs", f"{r}Cl"], [f"{r}BC"]),  # (N, l)
        helper.make_node("Transpose", [f"{r}BC"], [f"{r}BCt"], perm=[1, 0]),  # (l, N)
        helper.make_node("Unsqueeze", [f"{r}BCt", f"{r}one"], [f"{r}BC3"]),  # (l, 1, N)
        helper.make_node("MatMul", [f"{r}BC3", f"{r}W"], [f"{r}S3"]),  # (l, 1, D)
        helper.make_node("Squeeze", [f"{r}S3", f"{r}one"], [f"{r}S"]),  # (l, D)
        helper.make_node("Mul", [f"{r}dts", f"{r}us"], [f"{r}dtu"]),  # (D, l)
        helper.make_node("Transpose", [f"{r}dtu"], [f"{r}dtuT"], perm=[1, 0]),
        helper.make_node("Mul", [f"{r}S", f"{r}dtuT"], [f"{r}Sd"]),
        helper.make_node("ReduceSum", [f"{r}Sd", f"{r}zero"], [f"{r}y"], keepdims=0),  # (D,)
    ]
    body = helper.make_graph(
        body_nodes,
        f"{p}row",
        [
            helper.make_tensor_value_info(f"{r}dt", f32, [None, None]),
            helper.make_tensor_value_info(f"{r}u", f32, [None, None]),
            helper.make_tensor_value_info(f"{r}B", f32, [None, None]),
            helper.make_tensor_value_info(f"{r}C", f32, [None, None]),
            helper.make_tensor_value_info(f"{r}len", i64, []),
        ],
        [helper.make_tensor_value_info(f"{r}y", f32, [None])],
    )
    nodes = [
        helper.make_node("Transpose", ["Af"], [f"{p}At"], perm=[1, 0]),  # (N, D)
        helper.make_node("Unsqueeze", [f"{p}At", "ax0"], [f"{p}At3"]),  # (1, N, D)
        *_if_nonempty(
            p,
            "u",
            helper.make_node(
                "Scan", ["dt", "uf", "Bf", "Cf", f"{p}len_c"], [f"{p}core"], body=body, num_scan_inputs=5
            ),
            [
                [
                    helper.make_node("Shape", ["u"], [f"{p}bD"], start=0, end=2),
                    _zeros_like_shape(f"{p}z_bD", f"{p}bD"),
                ]
            ],
        ),
    ]
    return nodes, f"{p}core"


#: most positions per chunk of the ``chunked`` body: a (T, N, D) fp32 block is T * 16 KiB at
#: N=32, D=128, so 32 positions (512 KiB) stay within L2, and padding is skipped 32 at a time
CHUNK = 32


def _last_chunked(p: str) -> tuple[list[onnx.NodeProto], str]:
    """mode="last", closed form over (row, time-chunk) items: a Scan over the active chunks.

    ``decay`` is computed once for the whole batch (reverse exclusive CumSum); then each row is cut
    into chunks of ``CHUNK`` positions, chunks that lie entirely after the row's length are dropped
    (``Compress``), and a Scan runs the closed form on one (T, N, D) block at a time, small enough
    to stay in L2 whatever the sequence length. The per-chunk results are summed back per row with
    a one-hot matrix product.
    """
    f32 = TensorProto.FLOAT
    c = f"{p}c_"
    nodes = [
        _i64(f"{c}CH", [CHUNK]),
        _i64(f"{c}CHm1", [CHUNK - 1]),
        _i64(f"{c}m1", [-1]),
        # time-major copies (b, L, X): chunks are then a pure reshape, CumSum runs on contiguous rows,
        # and ONNX Runtime's transpose optimizer can cancel these against the exporter's transposes
        helper.make_node("Transpose", [f"{p}dtv"], [f"{c}dtvT"], perm=[0, 2, 1]),
        helper.make_node("CumSum", [f"{c}dtvT", "ax1"], [f"{c}decay"], exclusive=1, reverse=1),  # (b, L, D)
        helper.make_node("Transpose", [f"{p}dtu"], [f"{c}dtuT"], perm=[0, 2, 1]),
        helper.make_node("Mul", ["Bf", f"{p}C_last"], [f"{c}BC"]),  # (b, N, L)
        helper.make_node("Transpose", [f"{c}BC"], [f"{c}BCT"], perm=[0, 2, 1]),  # (b, L, N)
        # nc = ceil(L / CHUNK) chunks of T = ceil(L / nc) <= CHUNK positions (balanced: little padding)
        helper.make_node("Reshape", [f"{p}L0", "one_s"], [f"{c}L1"]),
        helper.make_node("Add", [f"{c}L1", f"{c}CHm1"], [f"{c}Lr"]),
        helper.make_node("Div", [f"{c}Lr", f"{c}CH"], [f"{c}nc0_"]),
        helper.make_node("Max", [f"{c}nc0_", "one_s"], [f"{c}nc"]),  # (1,), >= 1 even at L = 0
        helper.make_node("Add", [f"{c}L1", f"{c}nc"], [f"{c}Ln"]),
        helper.make_node("Sub", [f"{c}Ln", "one_s"], [f"{c}Ln1"]),
        helper.make_node("Div", [f"{c}Ln1", f"{c}nc"], [f"{c}T0_"]),
        helper.make_node("Max", [f"{c}T0_", "one_s"], [f"{c}T"]),  # (1,), >= 1
        helper.make_node("Mul", [f"{c}nc", f"{c}T"], [f"{c}Lp"]),
        helper.make_node("Sub", [f"{c}Lp", f"{c}L1"], [f"{c}pad"]),
        helper.make_node("Concat", ["zero_s", f"{c}pad"], [f"{c}pads"], axis=0),
        helper.make_node("Shape", ["Af"], [f"{c}D1"], start=0, end=1),
        helper.make_node("Shape", ["Af"], [f"{c}N1"], start=1, end=2),
        helper.make_node("Concat", [f"{c}m1", f"{c}T", f"{c}D1"], [f"{c}shapeTD"], axis=0),
        helper.make_node("Concat", [f"{c}m1", f"{c}T", f"{c}N1"], [f"{c}shapeTN"], axis=0),
    ]
    for name, src, shape in (("dec", f"{c}decay", "TD"), ("dtu", f"{c}dtuT", "TD"), ("bc", f"{c}BCT", "TN")):
        nodes += [
            helper.make_node("Pad", [src, f"{c}pads", "", "ax1"], [f"{c}{name}_p"]),  # (b, Lp, X)
            helper.make_node(
                "Reshape", [f"{c}{name}_p", f"{c}shape{shape}"], [f"{c}{name}_i"]
            ),  # (b*nc, T, X)
        ]
    nodes += [
        # active chunks: start < length
        helper.make_node("Squeeze", [f"{c}nc"], [f"{c}nc0"]),
        helper.make_node("Range", ["zero_s", f"{c}nc0", "one_s"], [f"{c}cidx"]),
        helper.make_node("Mul", [f"{c}cidx", f"{c}T"], [f"{c}starts"]),
        helper.make_node("Unsqueeze", [f"{c}starts", "ax0"], [f"{c}starts2"]),  # (1, nc)
        helper.make_node("Unsqueeze", [f"{p}len_c", "ax1"], [f"{c}len2"]),  # (b, 1)
        helper.make_node("Less", [f"{c}starts2", f"{c}len2"], [f"{c}active2"]),  # (b, nc)
        helper.make_node("Reshape", [f"{c}active2", f"{c}m1"], [f"{c}active"]),
        helper.make_node("Shape", ["u"], [f"{c}B1"], start=0, end=1),
        helper.make_node("Squeeze", [f"{c}B1"], [f"{c}B0"]),
        helper.make_node("Range", ["zero_s", f"{c}B0", "one_s"], [f"{c}ridx"]),  # (b,)
        helper.make_node("Unsqueeze", [f"{c}ridx", "ax1"], [f"{c}ridx2"]),  # (b, 1)
        helper.make_node("Shape", [f"{c}active2"], [f"{c}bnc"]),
        helper.make_node("Expand", [f"{c}ridx2", f"{c}bnc"], [f"{c}rows2"]),
        helper.make_node("Reshape", [f"{c}rows2", f"{c}m1"], [f"{c}rows"]),
        helper.make_node("Compress", [f"{c}rows", f"{c}active"], [f"{c}rows_a"], axis=0),
        *[
            helper.make_node("Compress", [f"{c}{n}_i", f"{c}active"], [f"{c}{n}_a"], axis=0)
            for n in ("dec", "dtu", "bc")
        ],
        helper.make_node("Transpose", ["Af"], [f"{c}At"], perm=[1, 0]),  # (N, D)
        helper.make_node("Unsqueeze", [f"{c}At", "ax0"], [f"{c}At3"]),  # (1, N, D)
    ]
    q = f"{c}s_"
    body_nodes = [
        _i64(f"{q}zero", [0]),
        _i64(f"{q}one", [1]),
        helper.make_node("Unsqueeze", [f"{q}dec", f"{q}one"], [f"{q}dec3"]),  # (T, 1, D)
        helper.make_node("Mul", [f"{q}dec3", f"{c}At3"], [f"{q}expo_raw"]),  # (T, N, D), <= 0
        helper.make_node("Max", [f"{q}expo_raw", "expo_floor"], [f"{q}expo"]),
        helper.make_node("Exp", [f"{q}expo"], [f"{q}W"]),
        helper.make_node("Unsqueeze", [f"{q}bc", f"{q}one"], [f"{q}bc3"]),  # (T, 1, N)
        helper.make_node("MatMul", [f"{q}bc3", f"{q}W"], [f"{q}S3"]),  # (T, 1, D)
        helper.make_node("Squeeze", [f"{q}S3", f"{q}one"], [f"{q}S"]),
        helper.make_node("Mul", [f"{q}S", f"{q}dtu"], [f"{q}Sd"]),
        helper.make_node("ReduceSum", [f"{q}Sd", f"{q}zero"], [f"{q}y"], keepdims=0),  # (D,)
    ]
    body = helper.make_graph(
        body_nodes,
        f"{p}chunk",
        [helper.make_tensor_value_info(f"{q}{n}", f32, [None, None]) for n in ("dec", "dtu", "bc")],
        [helper.make_tensor_value_info(f"{q}y", f32, [None])],
    )
    nodes += [
        # (n_active, D); no active chunk (batch 0, seq 0): (0, D)
        *_if_nonempty(
            c,
            f"{c}dec_a",
            helper.make_node(
                "Scan", [f"{c}dec_a", f"{c}dtu_a", f"{c}bc_a"], [f"{c}y_a"], body=body, num_scan_inputs=3
            ),
            [
                [
                    helper.make_node("Concat", ["zero_s", f"{c}D1"], [f"{c}0D"], axis=0),
                    _zeros_like_shape(f"{c}y_0", f"{c}0D"),
                ]
            ],
        ),
        # sum the chunks of each row: one-hot (b, n_active) @ (n_active, D)
        helper.make_node("Unsqueeze", [f"{c}rows_a", "ax0"], [f"{c}rows_a2"]),
        helper.make_node("Equal", [f"{c}ridx2", f"{c}rows_a2"], [f"{c}sel"]),
        helper.make_node("Cast", [f"{c}sel"], [f"{c}self"], to=f32),
        helper.make_node("MatMul", [f"{c}self", f"{c}y_a"], [f"{p}core"]),
    ]
    return nodes, f"{p}core"


def _last_scan(p: str) -> tuple[list[onnx.NodeProto], str]:
    """mode="last" with a Scan: masked steps (dt = 0) keep the state; y = C_last . h_final."""
    nodes, h_last = _scan_loop(p, f"{p}dtv", f"{p}dtu", output_all=False)
    nodes += [
        helper.make_node("Transpose", [f"{p}C_last"], [f"{p}C_last_t"], perm=[0, 2, 1]),  # (b, 1, N)
        helper.make_node("Mul", [h_last, f"{p}C_last_t"], [f"{p}hC"]),
        helper.make_node("ReduceSum", [f"{p}hC", "ax2"], [f"{p}core"], keepdims=0),
    ]
    return nodes, f"{p}core"


def _softplus_graph() -> onnx.GraphProto:
    """softplus(dtb) = relu(x) + log(1 + exp(-|x|)): exact to fp32 rounding, and 2.3x faster in
    ONNX Runtime CPU than its ``Softplus`` kernel (which is not vectorised)."""
    f32 = TensorProto.FLOAT
    nodes = [
        _f32("sp_one", 1.0),
        helper.make_node("Abs", ["dtb"], ["sp_abs"]),
        helper.make_node("Neg", ["sp_abs"], ["sp_neg"]),
        helper.make_node("Exp", ["sp_neg"], ["sp_exp"]),
        helper.make_node("Add", ["sp_exp", "sp_one"], ["sp_1p"]),
        helper.make_node("Log", ["sp_1p"], ["sp_log"]),
        helper.make_node("Relu", ["dtb"], ["sp_relu"]),
        helper.make_node("Add", ["sp_relu", "sp_log"], ["dt_sp"]),
    ]
    return helper.make_graph(nodes, "softplus", [], [helper.make_tensor_value_info("dt_sp", f32, None)])


def _branch_graph(name: str, nodes: list[onnx.NodeProto], out: str) -> onnx.GraphProto:
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)])


def make_function(body: str = DEFAULT_BODY, opset: int = 20, io_float16: bool = False) -> onnx.FunctionProto:
    """The FunctionProto ``m4r::SelectiveScan`` with the chosen body (one of :data:`BODIES`).

    ``io_float16``: the model feeds fp16 u/delta/B/C/z; the body then casts them to fp32 first
    (for fp32 models the casts are left out: ONNX Runtime would remove them anyway, and warns
    when it cannot rename the sub-graph inputs that referred to them).
    """
    if body not in BODIES:
        raise ValueError(f"body must be one of {BODIES}, got {body!r}")
    F = TensorProto.FLOAT
    pre = [
        _i64("ax0", [0]),
        _i64("ax1", [1]),
        _i64("ax2", [2]),
        _i64("ax3", [3]),
        _i64("ax0_2", [0, 2]),
        _i64("one_s", [1]),
        _i64("zero_s", [0]),
        _const("zero_scalar", np.array(0, dtype=np.int64)),
        _const("one_scalar", np.array(1, dtype=np.int64)),
        _f32("expo_floor", EXP_FLOOR),
        _const("last_str", np.array("last", dtype=object)),
        _attr_ref_const("mode_str", "mode", AttributeProto.STRING, "value_string"),
        helper.make_node("Equal", ["mode_str", "last_str"], ["is_last"]),
        _attr_ref_const("softplus_i", "delta_softplus", AttributeProto.INT, "value_int"),
        helper.make_node("Cast", ["softplus_i"], ["softplus_b"], to=TensorProto.BOOL),
        *_validation(),  # -> Af
        # fp32 working copies (a no-op for fp32 inputs)
        *[helper.make_node("Cast", [n], [f"{n}f"], to=F) for n in ("u", "delta", "B", "C", "z")],
        # dt = softplus(delta + delta_bias) (softplus only when delta_softplus)
        helper.make_node("Unsqueeze", ["dbf", "ax1"], ["db2"]),
        helper.make_node("Add", ["deltaf", "db2"], ["dtb"]),
        # an If on the (constant) attribute: ONNX Runtime folds it, so only one branch is in the graph
        helper.make_node(
            "If",
            ["softplus_b"],
            ["dt"],
            then_branch=_softplus_graph(),
            else_branch=helper.make_graph(
                [helper.make_node("Identity", ["dtb"], ["dt_id"])],
                "no_softplus",
                [],
                [helper.make_tensor_value_info("dt_id", F, None)],
            ),
        ),
        helper.make_node("Mul", ["dt", "uf"], ["dtu_all"]),
        helper.make_node("Shape", ["u"], ["L1"], start=2, end=3),
    ]
    # --- mode="all": Scan over time, then y = (y + D u) * silu(z)
    all_nodes, y_all = _scan_loop("a_", "dt", "dtu_all", output_all=True)
    all_nodes += [
        helper.make_node("Unsqueeze", ["Df", "ax1"], ["a_D2"]),
        helper.make_node("Mul", ["uf", "a_D2"], ["a_Du"]),
        helper.make_node("Add", [y_all, "a_Du"], ["a_yD"]),
        helper.make_node("Sigmoid", ["zf"], ["a_zsig"]),
        helper.make_node("Mul", ["zf", "a_zsig"], ["a_zsilu"]),
        helper.make_node("Mul", ["a_yD", "a_zsilu"], ["a_y"]),
    ]
    # --- mode="last": mask positions after lengths-1, read out once at lengths-1
    p = "l_"
    last_nodes = [
        helper.make_node("Squeeze", ["L1"], [f"{p}L0"]),
        helper.make_node("Cast", ["lengths"], [f"{p}len64"], to=TensorProto.INT64),
        helper.make_node("Clip", [f"{p}len64", "one_s", f"{p}L0"], [f"{p}len_c"]),
        helper.make_node("Sub", [f"{p}len_c", "one_s"], [f"{p}idx"]),  # (b,)
        helper.make_node("Range", ["zero_s", f"{p}L0", "one_s"], [f"{p}pos"]),  # (L,)
        helper.make_node("Unsqueeze", [f"{p}pos", "ax0"], [f"{p}pos2"]),  # (1, L)
        helper.make_node("Unsqueeze", [f"{p}idx", "ax1"], [f"{p}idx2"]),  # (b, 1)
        helper.make_node("LessOrEqual", [f"{p}pos2", f"{p}idx2"], [f"{p}valid"]),  # (b, L)
        helper.make_node("Equal", [f"{p}pos2", f"{p}idx2"], [f"{p}is_idx"]),
        helper.make_node("Cast", [f"{p}valid"], [f"{p}validf"], to=F),
        helper.make_node("Cast", [f"{p}is_idx"], [f"{p}onehot"], to=F),
        helper.make_node("Unsqueeze", [f"{p}validf", "ax1"], [f"{p}valid3"]),  # (b, 1, L)
        helper.make_node("Unsqueeze", [f"{p}onehot", "ax2"], [f"{p}onehot3"]),  # (b, L, 1)
        helper.make_node("Mul", ["dt", f"{p}valid3"], [f"{p}dtv"]),
        helper.make_node("Mul", ["dtu_all", f"{p}valid3"], [f"{p}dtu"]),
        # gathers at lengths-1 as products with a one-hot column (exact for finite inputs)
        helper.make_node("MatMul", ["Cf", f"{p}onehot3"], [f"{p}C_last"]),  # (b, N, 1)
        helper.make_node("MatMul", ["uf", f"{p}onehot3"], [f"{p}u_last3"]),  # (b, D, 1)
        helper.make_node("MatMul", ["zf", f"{p}onehot3"], [f"{p}z_last3"]),
        helper.make_node("Squeeze", [f"{p}u_last3", "ax2"], [f"{p}u_last"]),
        helper.make_node("Squeeze", [f"{p}z_last3", "ax2"], [f"{p}z_last"]),
    ]
    builders = {
        "rowwise": _last_rowwise,
        "chunked": _last_chunked,
        "vectorized": _last_closed_form,
        "timeloop": _last_scan,
    }
    core, y_core = builders[body](p)
    last_nodes += core
    last_nodes += [
        helper.make_node("Mul", [f"{p}u_last", "Df"], [f"{p}Du"]),
        helper.make_node("Add", [y_core, f"{p}Du"], [f"{p}yD"]),
        helper.make_node("Sigmoid", [f"{p}z_last"], [f"{p}zsig"]),
        helper.make_node("Mul", [f"{p}z_last", f"{p}zsig"], [f"{p}zsilu"]),
        helper.make_node("Mul", [f"{p}yD", f"{p}zsilu"], [f"{p}y"]),
    ]
    branch_if = helper.make_node(
        "If",
        ["is_last"],
        ["yf"],
        then_branch=_branch_graph("last_mode", last_nodes, f"{p}y"),
        else_branch=_branch_graph("all_mode", all_nodes, "a_y"),
    )
    nodes = [*pre, branch_if, helper.make_node("Cast", ["yf"], ["y"], to=TensorProto.FLOAT16)]
    # A, D and delta_bias are fp32 by contract; fp32 I/O needs no casts at all
    alias = {"Df": "D", "dbf": "delta_bias"}
    if not io_float16:
        alias.update({f"{n}f": n for n in ("u", "delta", "B", "C", "z")})
        alias["yf"] = "y"
        nodes = nodes[:-1]  # the final Cast
    nodes = [n for n in nodes if not (n.op_type == "Cast" and n.output[0] in alias)]
    for n in _walk(nodes):
        for i, name in enumerate(n.input):
            n.input[i] = alias.get(name, name)
        for i, name in enumerate(n.output):
            n.output[i] = alias.get(name, name)
    return m4r_function(
        OP_NAME,
        INPUTS,
        ["y"],
        nodes,
        opset,
        f"m4r::SelectiveScan, function body '{body}' (see m4r_export/onnx/bodies.py)",
        {
            "delta_softplus": 1,
            "mode": "all",
            "plugin_namespace": PLUGIN_NAMESPACE,
            "plugin_version": PLUGIN_VERSION,
        },
    )


def m4r_function(
    name: str,
    inputs: Sequence[str],
    outputs: Sequence[str],
    nodes: list[onnx.NodeProto],
    opset: int,
    doc: str,
    attributes: dict[str, Any],
    *,
    calls_m4r_ops: bool = False,
) -> onnx.FunctionProto:
    """A model-local function ``m4r::<name>`` (every m4r op's body is one): its attributes with their
    defaults (nodes override them); ``calls_m4r_ops`` when the body itself holds m4r nodes."""
    imports = [helper.make_opsetid("", opset)]
    if calls_m4r_ops:
        imports.append(helper.make_opsetid(DOMAIN, OP_VERSION))
    fn = helper.make_function(
        DOMAIN, name, list(inputs), list(outputs), nodes, opset_imports=imports, attributes=[], doc_string=doc
    )
    fn.attribute_proto.extend(helper.make_attribute(key, value) for key, value in attributes.items())
    return fn


def _walk(nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """Nodes and the nodes of their sub-graphs (Scan bodies), depth first."""
    out: list[onnx.NodeProto] = []
    for n in nodes:
        out.append(n)
        for a in n.attribute:
            if a.type == AttributeProto.GRAPH:
                out += _walk(list(a.g.node))
    return out
