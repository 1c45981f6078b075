"""The fused streaming step: one ``m4r::MambaMixerStep`` node per Mamba mixer in ``step.onnx``
(``m4r export --fused --streaming``).

The node covers one new position of a Mamba mixer given its state: in_proj -> conv step on the window ->
SiLU -> x_proj -> dt_proj -> softplus -> ``h' = exp(dt A) h + dt u B`` -> ``(C . h' + D u) silu(z)`` ->
out_proj (plugins/selectiveScanPlugin/README-MambaMixerStep.md). Its model-local function body is the
standard-op subgraph of the unfused step (no scan node), so ``step.onnx`` runs without any library exactly
as before, and ``libm4r_ort_ops.so`` registers a fused CPU kernel for the node.

    MambaMixerStep(hidden, conv_state, ssm_state, in_proj_weight, conv_weight, conv_bias, x_proj_weight,
                   dt_proj_weight, dt_bias, A, D, out_proj_weight) -> (y, conv_state_out, ssm_state_out)
      attributes: x_proj_split (ints [dt_rank, d_state, d_state])

``hidden`` (batch, d_model) T; ``conv_state`` (batch, d_inner, d_conv - 1) and ``ssm_state`` (batch,
d_inner, d_state) fp32 (as in the manifest: states are fp32 in every precision; the conv state is computed
in T); weights as for ``m4r::MambaMixer``. ``y`` (batch, d_model) T; the new states fp32.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import AttributeProto, TensorProto, helper, numpy_helper
from torch import Tensor, nn

from ..model.mamba import Mamba
from . import bodies
from .fused import MIXER_WEIGHTS, _ref

OP_NAME = "MambaMixerStep"
INPUTS = ("hidden", "conv_state", "ssm_state", *MIXER_WEIGHTS)
OUTPUTS = ("y", "conv_state_out", "ssm_state_out")


class FusedStepMixer(nn.Module):
    """Wraps a :class:`~m4r_export.model.mamba.Mamba`: eager calls run it, an ONNX trace of
    :meth:`step` emits one ``m4r::MambaMixerStep`` node."""

    def __init__(self, mamba: Mamba) -> None:
        super().__init__()
        self.inner = mamba

    def forward(self, hidden: Tensor, lengths: Tensor | None = None, last_only: bool = False) -> Tensor:
        return self.inner(hidden, lengths, last_only=last_only)

    def step(self, hidden: Tensor, conv_state: Tensor, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        m = self.inner
        if not (torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()):
            return m.step(hidden, conv_state, h)
        if m.in_proj.bias is not None or m.out_proj.bias is not None or m.conv1d.bias is None:
            raise ValueError("the MambaMixerStep op needs bias=False in/out projections and a conv bias")
        batch = hidden.shape[0]
        inputs: list[Tensor | None] = [
            hidden,
            conv_state.float(),
            h.float(),
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
        y, conv, ssm = torch.onnx.ops.symbolic_multi_out(
            f"{bodies.DOMAIN}::{OP_NAME}",
            inputs,
            {"x_proj_split": [int(m.dt_rank), int(m.d_state), int(m.d_state)]},
            dtypes=[hidden.dtype, torch.float32, torch.float32],
            shapes=[
                [batch, int(m.out_proj.weight.shape[0])],
                [batch, int(m.d_inner), int(m.d_conv) - 1],
                [batch, int(m.d_inner), int(m.d_state)],
            ],
            version=bodies.OP_VERSION,
        )
        return y, conv, ssm


def fuse_step_mixers(model: nn.Module) -> None:
    """Replace every layer's ``mamba`` module of ``model`` (an export copy) by a :class:`FusedStepMixer`."""
    for layer in model.mamba_layers:  # type: ignore[union-attr]
        if isinstance(layer.mamba, Mamba):
            layer.mamba = FusedStepMixer(layer.mamba)


def make_step_function(opset: int = 20) -> onnx.FunctionProto:
    """FunctionProto ``m4r::MambaMixerStep``: the unfused step in standard ops (type-generic in T).

    Same math and order as :meth:`m4r_export.model.mamba.Mamba.step`: the conv window and u in T, dt, the
    state and the read-out in fp32, the gated output cast back to T before out_proj.
    """

    def const(name: str, values: list[int] | float) -> onnx.NodeProto:
        dtype = np.float32 if isinstance(values, float) else np.int64
        v = np.array(values, dtype=dtype)
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(v, name))

    n = helper.make_node
    f32 = TensorProto.FLOAT
    split_const = _ref(n("Constant", [], ["split_sizes"]), "value_ints", "x_proj_split", AttributeProto.INTS)
    nodes = [
        const("ax1", [1]),
        const("ax2", [2]),
        const("one", [1]),
        const("big", [2**62]),
        const("exp_min", -80.0),
        const("sp_threshold", 20.0),
        split_const,
        # in_proj; x, z (b, d_inner)
        n("Transpose", ["in_proj_weight"], ["w_in_t"], perm=[1, 0]),
        n("MatMul", ["hidden", "w_in_t"], ["xz"]),
        n("Split", ["xz"], ["x", "z"], axis=1, num_outputs=2),
        # conv step: window = [conv_state (cast to T), x] (b, d_inner, d_conv); u = silu(sum(window * w) + b)
        n("CastLike", ["conv_state", "hidden"], ["conv_t"]),
        n("Unsqueeze", ["x", "ax2"], ["x3"]),
        n("Concat", ["conv_t", "x3"], ["window"], axis=2),
        n("Squeeze", ["conv_weight", "ax1"], ["conv_w2"]),
        n("Mul", ["window", "conv_w2"], ["win_w"]),
        n("ReduceSum", ["win_w", "ax2"], ["conv_sum"], keepdims=0),
        n("Add", ["conv_sum", "conv_bias"], ["u_pre"]),
        n("Sigmoid", ["u_pre"], ["u_sig"]),
        n("Mul", ["u_pre", "u_sig"], ["u"]),
        n("Slice", ["window", "one", "big", "ax2"], ["conv_next"]),
        n("Cast", ["conv_next"], ["conv_state_out"], to=f32),
        # x_proj -> dt_low, B, C; dt = softplus(dt_low @ dt_proj^T + dt_bias) in fp32 (PyTorch's threshold 20)
        n("Transpose", ["x_proj_weight"], ["w_x_t"], perm=[1, 0]),
        n("MatMul", ["u", "w_x_t"], ["x_dbl"]),
        n("Split", ["x_dbl", "split_sizes"], ["dt_low", "Bm", "Cm"], axis=1),
        n("Transpose", ["dt_proj_weight"], ["w_dt_t"], perm=[1, 0]),
        n("MatMul", ["dt_low", "w_dt_t"], ["dt_lin"]),
        n("Cast", ["dt_lin"], ["dt_lin_f"], to=f32),
        n("Add", ["dt_lin_f", "dt_bias"], ["dt_pre"]),
        n("Softplus", ["dt_pre"], ["dt_soft"]),
        n("Greater", ["dt_pre", "sp_threshold"], ["dt_big"]),
        n("Where", ["dt_big", "dt_pre", "dt_soft"], ["dt"]),
        # h' = exp(max(dt A, -80)) h + (dt u) B, fp32
        n("Cast", ["u"], ["u_f"], to=f32),
        n("Unsqueeze", ["dt", "ax2"], ["dt3"]),
        n("Mul", ["dt3", "A"], ["dtA"]),
        n("Max", ["dtA", "exp_min"], ["dtA_c"]),
        n("Exp", ["dtA_c"], ["dA"]),
        n("Mul", ["dA", "ssm_state"], ["dA_h"]),
        n("Mul", ["dt", "u_f"], ["dtu"]),
        n("Unsqueeze", ["dtu", "ax2"], ["dtu3"]),
        n("Cast", ["Bm"], ["B_f"], to=f32),
        n("Unsqueeze", ["B_f", "ax1"], ["B3"]),
        n("Mul", ["dtu3", "B3"], ["dBu"]),
        n("Add", ["dA_h", "dBu"], ["ssm_state_out"]),
        # y = (C . h' + D u) * silu(z) -> T -> out_proj
        n("Cast", ["Cm"], ["C_f"], to=f32),
        n("Unsqueeze", ["C_f", "ax1"], ["C3"]),
        n("Mul", ["ssm_state_out", "C3"], ["hC"]),
        n("ReduceSum", ["hC", "ax2"], ["y_ssm"], keepdims=0),
        n("Mul", ["D", "u_f"], ["Du"]),
        n("Add", ["y_ssm", "Du"], ["y_d"]),
        n("Cast", ["z"], ["z_f"], to=f32),
        n("Sigmoid", ["z_f"], ["z_sig"]),
        n("Mul", ["z_f", "z_sig"], ["z_act"]),
        n("Mul", ["y_d", "z_act"], ["y_gated_f"]),
        n("CastLike", ["y_gated_f", "hidden"], ["y_gated"]),
        n("Transpose", ["out_proj_weight"], ["w_out_t"], perm=[1, 0]),
        n("MatMul", ["y_gated", "w_out_t"], ["y"]),
    ]
    return bodies.m4r_function(
        OP_NAME,
        INPUTS,
        OUTPUTS,
        nodes,
        opset,
        "m4r::MambaMixerStep: one streaming step of a Mamba mixer (m4r_export/onnx/fused_step.py)",
        {"x_proj_split": [1, 1, 1]},
    )
