"""The ``topk`` head as one ``m4r::ScoreTopK`` node (plugins/selectiveScanPlugin/README-ScoreTopK.md).

    ScoreTopK(user (batch, d) T, table (n_items, d) T, exclude (batch, E) int64)
        -> topk_scores (batch, k) T, topk_items (batch, k) int64
      attributes: k, topk_chunk, n_items (ints)

Semantics are those of :meth:`ServingModel._chunked_topk`: item 0 and every ``exclude`` id in
``[1, n_items)`` are -inf (0, out-of-range and duplicate ids are harmless), the result is the first K
items in the order (score descending, item id ascending), the -inf tail of a row with fewer than K
rankable items included. The node's model-local function body is that chunked subgraph in standard ops
(one Gemm + mask + TopK per ``topk_chunk`` items, one merging TopK), so the file runs without any
library (ONNX Runtime inlines the body; TensorRT sees standard TopK nodes within its K limit), and
``libm4r_ort_ops.so`` registers a one-pass native kernel for the node (fp16 tables read as fp16).
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import Tensor

from ..serving import ServingModel
from . import bodies

OP_NAME = "ScoreTopK"
INPUTS = ("user", "table", "exclude")
OUTPUTS = ("topk_scores", "topk_items")


class ScoreTopKServing(ServingModel):
    """:class:`ServingModel` whose ``topk`` head traces to one ``m4r::ScoreTopK`` node (eager: unchanged)."""

    def _chunked_topk(
        self, user: Tensor, history: Tensor | None, exclude_items: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        if not (torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()):
            return super()._chunked_topk(user, history, exclude_items)
        table = self.model.item_embedding.weight
        ids = [t.to(torch.int64) for t in (history, exclude_items) if t is not None]
        if not ids:  # no exclude input: one "nothing" column (0 is ignored)
            ids = [torch.zeros((user.shape[0], 1), dtype=torch.int64, device=user.device)]
        exclude = torch.cat(ids, dim=1) if len(ids) > 1 else ids[0]
        batch = user.shape[0]
        scores, items = torch.onnx.ops.symbolic_multi_out(
            f"{bodies.DOMAIN}::{OP_NAME}",
            [user, table.to(user.dtype), exclude],
            {"k": int(self.k), "topk_chunk": int(self.topk_chunk), "n_items": int(table.shape[0])},
            dtypes=[user.dtype, torch.int64],
            shapes=[[batch, self.k], [batch, self.k]],
            version=bodies.OP_VERSION,
        )
        return scores, items


def _attr(node: onnx.NodeProto, name: str) -> int:
    for a in node.attribute:
        if a.name == name:
            return int(a.i)
    raise ValueError(f"ScoreTopK node {node.name} has no attribute {name}")


def make_topk_function(node: onnx.NodeProto, opset: int) -> onnx.FunctionProto:
    """FunctionProto ``m4r::ScoreTopK`` for this node's k / topk_chunk / n_items: the chunked subgraph.

    Per chunk [start, stop): Gemm(user, table[start:stop]^T), a (batch, width + 1) bool mask scattered from
    the exclude ids that fall in the chunk (others go to the spare last column; item 0 always masked in the
    first chunk), Where(mask, -inf), TopK(min(k, width)), ids + start; then Concat + TopK(k) + GatherElements.
    Candidates are concatenated in item order, so ties still come out lowest item id first. Type-generic in
    T (-inf through CastLike); static sizes are constants (the file's own catalogue).
    """
    k, chunk, n_items = _attr(node, "k"), _attr(node, "topk_chunk"), _attr(node, "n_items")
    n = helper.make_node
    nodes: list[onnx.NodeProto] = []

    def const(name: str, value: np.ndarray) -> str:
        nodes.append(n("Constant", [], [name], value=numpy_helper.from_array(value, name)))
        return name

    i64 = lambda *v: np.array(v, dtype=np.int64)  # noqa: E731
    const("c0", i64(0))
    const("c0v", i64(0))
    const("c_ax0", i64(0))
    const("c_ax1", i64(1))
    const("c_one", i64(1))
    const("c_zero_col", np.zeros((1, 1), dtype=np.int64))
    const("c_true", np.array(True))
    const("c_ninf", np.array(-np.inf, dtype=np.float32))
    nodes.append(n("CastLike", ["c_ninf", "user"], ["ninf"]))
    nodes.append(n("Shape", ["user"], ["batch"], start=0, end=1))
    nodes.append(n("Concat", ["batch", "c_one"], ["col_shape"], axis=0))
    nodes.append(n("Expand", ["c_zero_col", "col_shape"], ["zero_col"]))
    false = helper.make_tensor("v", onnx.TensorProto.BOOL, [1], [False])
    part_scores, part_items = [], []
    for c, start in enumerate(range(0, n_items, chunk)):
        stop = min(n_items, start + chunk)
        width = stop - start
        p = f"c{c}_"
        const(p + "start", i64(start))
        const(p + "starts", i64(start))
        const(p + "stops", i64(stop))
        const(p + "width", i64(width))
        const(p + "wv", i64(width))
        const(p + "w1", i64(width + 1))
        const(p + "k", i64(min(k, width)))
        nodes += [
            n("Slice", ["table", p + "starts", p + "stops", "c_ax0"], [p + "tbl"]),
            n("Gemm", ["user", p + "tbl"], [p + "scores"], transB=1),
            n("Sub", ["exclude", p + "start"], [p + "loc"]),
            n("GreaterOrEqual", [p + "loc", "c0"], [p + "ge"]),
            n("Less", [p + "loc", p + "width"], [p + "lt"]),
            n("And", [p + "ge", p + "lt"], [p + "in"]),
            n("Where", [p + "in", p + "loc", p + "width"], [p + "idx0"]),
        ]
        idx = p + "idx0"
        if start == 0:  # item 0 (padding) is always masked
            nodes.append(n("Concat", [idx, "zero_col"], [p + "idx"], axis=1))
            idx = p + "idx"
        nodes += [
            n("Concat", ["batch", p + "w1"], [p + "mshape"], axis=0),
            n("ConstantOfShape", [p + "mshape"], [p + "zeros"], value=false),
            n("Shape", [idx], [p + "ishape"]),
            n("Expand", ["c_true", p + "ishape"], [p + "ones"]),
            n("ScatterElements", [p + "zeros", idx, p + "ones"], [p + "mfull"], axis=1),
            n("Slice", [p + "mfull", "c0v", p + "wv", "c_ax1"], [p + "mask"]),
            n("Where", [p + "mask", "ninf", p + "scores"], [p + "masked"]),
            n("TopK", [p + "masked", p + "k"], [p + "top", p + "ids"], axis=1),
        ]
        ids = p + "ids"
        if start > 0:
            nodes.append(n("Add", [ids, p + "start"], [p + "items"]))
            ids = p + "items"
        part_scores.append(p + "top")
        part_items.append(ids)
    if len(part_scores) == 1:
        nodes += [
            n("Identity", [part_scores[0]], ["topk_scores"]),
            n("Identity", [part_items[0]], ["topk_items"]),
        ]
    else:
        const("k_all", i64(k))
        nodes += [
            n("Concat", part_scores, ["all_scores"], axis=1),
            n("Concat", part_items, ["all_items"], axis=1),
            n("TopK", ["all_scores", "k_all"], ["topk_scores", "where"], axis=1),
            n("GatherElements", ["all_items", "where"], ["topk_items"], axis=1),
        ]
    return bodies.m4r_function(
        OP_NAME,
        INPUTS,
        OUTPUTS,
        nodes,
        opset,
        "m4r::ScoreTopK: exact chunked top-K scoring (see m4r_export/onnx/topk_op.py)",
        {"k": k, "topk_chunk": chunk, "n_items": n_items},
    )
