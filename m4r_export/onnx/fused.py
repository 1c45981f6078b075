"""The fused Mamba block: one ``m4r::MambaMixer`` node per Mamba mixer (``m4r export --fused``).

The node covers in_proj -> causal depthwise conv -> SiLU -> x_proj -> dt_proj -> (softplus) selective
scan -> gate -> out_proj (plugins/selectiveScanPlugin/README-MambaMixer.md). Its model-local function
body is the standard-op subgraph of today's unfused export with the ``m4r::SelectiveScan`` node inside,
so the file runs as before without any library (ONNX Runtime inlines both functions), and
``libm4r_ort_ops.so`` registers a fused CPU kernel for the node.

    MambaMixer(hidden, lengths, in_proj_weight, conv_weight, conv_bias, x_proj_weight, dt_proj_weight,
               dt_bias, A, D, out_proj_weight) -> y
      attributes: mode ("all" | "last"), d_inner (int, the conv's group count),
                  x_proj_split (ints [dt_rank, d_state, d_state]),
                  conv_pads (ints [0, 0, d_conv - 1, 0, 0, 0])

``hidden`` (batch, L, d_model) T; ``lengths`` (batch,) int32; weights in PyTorch's layouts (Linear
(out, in), conv (d_inner, 1, d_conv)) in T, except ``dt_bias``, ``A`` (= -exp(A_log)) and ``D``: fp32.
``y``: (batch, 1, d_model) at ``clamp(lengths, 1, L) - 1`` for ``mode="last"``, else (batch, L, d_model)
(one rank for both modes, so that the body needs no ``If``).
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import AttributeProto, helper, numpy_helper
from torch import Tensor, nn

from ..model.mamba import Mamba
from . import bodies

OP_NAME = "MambaMixer"
#: the mixer's weights, in the order both fused ops take them (MambaMixer and MambaMixerStep; the C++ kernels'
#: kNames follow it)
MIXER_WEIGHTS = (
    "in_proj_weight",
    "conv_weight",
    "conv_bias",
    "x_proj_weight",
    "dt_proj_weight",
    "dt_bias",
    "A",
    "D",
    "out_proj_weight",
)
INPUTS = ("hidden", "lengths", *MIXER_WEIGHTS)


class FusedMixer(nn.Module):
    """Wraps a :class:`~m4r_export.model.mamba.Mamba`: eager calls run it, an ONNX trace emits one node."""

    def __init__(self, mamba: Mamba) -> None:
        super().__init__()
        self.inner = mamba

    def forward(self, hidden: Tensor, lengths: Tensor | None = None, last_only: bool = False) -> Tensor:
        m = self.inner
        if not (torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()):
            return m(hidden, lengths, last_only=last_only)
        if m.in_proj.bias is not None or m.out_proj.bias is not None or m.conv1d.bias is None:
            raise ValueError("the MambaMixer op needs bias=False in/out projections and a conv bias")
        batch, seq_len, d_model = hidden.shape
        if lengths is None:
            lengths = torch.full((batch,), seq_len, dtype=torch.int32, device=hidden.device)
        shape = [batch, 1 if last_only else seq_len, d_model]
        inputs: list[Tensor | None] = [
            hidden,
            lengths.to(torch.int32),
            m.in_proj.weight,
            m.conv1d.weight,
            m.conv1d.bias,
            m.x_proj.weight,
            m.dt_proj.weight,
            m.dt_proj.bias.float(),
            -torch.exp(m.A_log.float()),
            m.D.float(),
            m.out_proj.weight,
        ]
        attrs = {
            "mode": "last" if last_only else "all",
            "d_inner": int(m.d_inner),
            "x_proj_split": [int(m.dt_rank), int(m.d_state), int(m.d_state)],
            "conv_pads": [0, 0, int(m.d_conv) - 1, 0, 0, 0],
        }
        y = torch.onnx.ops.symbolic(
            f"{bodies.DOMAIN}::{OP_NAME}",
            inputs,
            attrs,
            dtype=hidden.dtype,
            shape=shape,
            version=bodies.OP_VERSION,
        )
        return y[:, 0] if last_only else y


def fuse_mixers(model: nn.Module) -> None:
    """Replace every layer's ``mamba`` module of ``model`` (an export copy) by a :class:`FusedMixer`."""
    for layer in model.mamba_layers:  # type: ignore[union-attr]
        if isinstance(layer.mamba, Mamba):
            layer.mamba = FusedMixer(layer.mamba)


def _ref(node: onnx.NodeProto, name: str, ref: str, kind: int) -> onnx.NodeProto:
    a = AttributeProto()
    a.name, a.ref_attr_name, a.type = name, ref, kind  # type: ignore[assignment]
    node.attribute.append(a)
    return node


def make_mixer_function(opset: int = 20, io_float16: bool = False) -> onnx.FunctionProto:
    """FunctionProto ``m4r::MambaMixer``: standard ops around one ``m4r::SelectiveScan`` node.

    The body is type-generic (``io_float16`` only names the variant): T flows from the inputs. It has no
    string tensors and no ``If`` (TensorRT imports neither): every static size comes from the node's
    attributes through ``Constant(value_ints=@attr)``, so an importer that inlines it sees constants.
    """

    def i64(name: str, values: list[int]) -> onnx.NodeProto:
        v = np.array(values, dtype=np.int64)
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(v, name))

    n = helper.make_node
    scan = n(
        bodies.OP_NAME,
        ["u", "delta", "A", "Bt", "Ct", "D", "z", "dt_bias", "lengths"],
        ["y_scan"],
        domain=bodies.DOMAIN,
        delta_softplus=1,
        plugin_namespace=bodies.PLUGIN_NAMESPACE,
        plugin_version=bodies.PLUGIN_VERSION,
    )
    _ref(scan, "mode", "mode", AttributeProto.STRING)
    conv = _ref(
        n("Conv", ["x_pad", "conv_weight", "conv_bias"], ["x_conv"]), "group", "d_inner", AttributeProto.INT
    )
    split_const = _ref(n("Constant", [], ["split_sizes"]), "value_ints", "x_proj_split", AttributeProto.INTS)
    pads_const = _ref(n("Constant", [], ["pads"]), "value_ints", "conv_pads", AttributeProto.INTS)
    nodes = [
        i64("c_m1", [-1]),
        split_const,
        pads_const,
        # in_proj, split into x and z, channel-first
        n("Transpose", ["in_proj_weight"], ["w_in_t"], perm=[1, 0]),
        n("MatMul", ["hidden", "w_in_t"], ["xz"]),
        n("Transpose", ["xz"], ["xz_t"], perm=[0, 2, 1]),
        n("Split", ["xz_t"], ["x", "z"], axis=1, num_outputs=2),
        # causal depthwise conv: d_conv - 1 zeros in front of the time axis
        n("Pad", ["x", "pads"], ["x_pad"]),
        conv,
        n("Sigmoid", ["x_conv"], ["x_sig"]),
        n("Mul", ["x_conv", "x_sig"], ["u"]),
        # x_proj -> dt, B, C; dt_proj (its bias is added inside the scan)
        n("Transpose", ["u"], ["u_t"], perm=[0, 2, 1]),
        n("Transpose", ["x_proj_weight"], ["w_x_t"], perm=[1, 0]),
        n("MatMul", ["u_t", "w_x_t"], ["x_dbl"]),
        n("Split", ["x_dbl", "split_sizes"], ["dt_low", "Bm", "Cm"], axis=2),
        n("Transpose", ["dt_proj_weight"], ["w_dt_t"], perm=[1, 0]),
        n("MatMul", ["dt_low", "w_dt_t"], ["dt_full"]),
        n("Transpose", ["dt_full"], ["delta"], perm=[0, 2, 1]),
        n("Transpose", ["Bm"], ["Bt"], perm=[0, 2, 1]),
        n("Transpose", ["Cm"], ["Ct"], perm=[0, 2, 1]),
        scan,
        # y (b, D) in mode last, (b, D, L) in mode all -> (b, D, L') -> out_proj -> (b, L', d_model)
        n("Shape", ["y_scan"], ["y_bd"], start=0, end=2),
        n("Concat", ["y_bd", "c_m1"], ["y3_shape"], axis=0),
        n("Reshape", ["y_scan", "y3_shape"], ["y3"]),
        n("Transpose", ["y3"], ["y_t"], perm=[0, 2, 1]),
        n("Transpose", ["out_proj_weight"], ["w_out_t"], perm=[1, 0]),
        n("MatMul", ["y_t", "w_out_t"], ["y"]),
    ]
    return bodies.m4r_function(
        OP_NAME,
        INPUTS,
        ["y"],
        nodes,
        opset,
        "m4r::MambaMixer: the fused Mamba block (see m4r_export/onnx/fused.py)",
        {"mode": "all", "d_inner": 1, "x_proj_split": [1, 1, 1], "conv_pads": [0, 0, 0, 0, 0, 0]},
        calls_m4r_ops=True,
    )
