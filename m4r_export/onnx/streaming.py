"""``m4r export --streaming``: ``init.onnx`` and ``step.onnx`` beside the serving graph.

* ``init.onnx``: ``item_seq, item_seq_len`` -> the head's outputs + every state after ``len - 1``
  (:class:`~m4r_export.serving.StreamingInit`). One pass over the history: the SSM state comes
  from the closed form ``h = sum_s exp(A * sum_{s<r<=last} dt_r) dt_s u_s B_s`` written in standard
  ONNX ops (the last layer reads its output from that ``h``, so a one-layer model's init has no
  ``SelectiveScan`` node at all; earlier layers keep the node, ``mode="all"``, for their
  per-position outputs). The op contract of ``m4r::SelectiveScan`` is unchanged, so the TensorRT
  plugin and the CPU kernels need nothing new.
* ``step.onnx``: ``item_id [batch]`` + states -> head outputs + new states
  (:class:`~m4r_export.serving.StreamingStep`): standard ONNX ops only, no scan node.

Both are checked like the serving graph: ``onnx.checker`` and a parity run on ONNX Runtime (init
on a prefix, step over the rest, compared with the PyTorch ServingModel on the full histories);
the export fails, writing nothing, when it is off.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..errors import M4RError
from ..model import Mamba4Rec
from ..serving import (
    EXCLUDE_INPUT,
    HEAD_OUTPUTS,
    ROLE_EXCLUDE,
    ROLE_HEAD,
    ROLE_ITEM_IDS,
    ROLE_LENGTHS,
    STEP_ITEM,
    ServingModel,
    StreamingInit,
    StreamingStep,
    state_names,
)
from . import bodies
from .export import (
    SCAN_BACKEND,
    TOLERANCES,
    ExportOptions,
    compare_outputs,
    export_program,
    half_model,
    ort_session,
    sample_inputs,
)
from .manifest import MANIFEST_FORMAT, io_spec

FILE_NAMES = {"fp32": ("init.onnx", "step.onnx"), "fp16": ("init.fp16.onnx", "step.fp16.onnx")}
STREAMING_FORMAT_VERSION = 1


def _modules(model: Mamba4Rec, opts: ExportOptions, fp16: bool) -> tuple[StreamingInit, StreamingStep]:
    """``--fused``: the step's mixers become ``m4r::MambaMixerStep`` nodes (init keeps its graph)."""
    m = half_model(model) if fp16 else copy.deepcopy(model).eval()
    m.set_scan_backend(SCAN_BACKEND)
    serving = ServingModel(m, opts.head, opts.k, False, opts.exclude_items, opts.topk_chunk)
    step_serving = serving
    if opts.fused:
        from .fused_step import fuse_step_mixers

        ms = copy.deepcopy(m)
        fuse_step_mixers(ms)
        step_serving = ServingModel(ms, opts.head, opts.k, False, opts.exclude_items, opts.topk_chunk)
    return StreamingInit(serving), StreamingStep(step_serving)


def _state_examples(model: Mamba4Rec, batch: int) -> list[torch.Tensor]:
    cfg = model.config
    d_inner = cfg.expand * cfg.hidden_size
    g = torch.Generator().manual_seed(1)
    out: list[torch.Tensor] = []
    for _ in range(cfg.num_layers):
        out.append(torch.randn(batch, d_inner, cfg.d_conv - 1, generator=g))
        out.append(torch.randn(batch, d_inner, cfg.d_state, generator=g))
    out.append(torch.randn(batch, cfg.hidden_size, generator=g))
    return out


def _export(
    module: torch.nn.Module,
    args: tuple[Any, ...],
    names_in: list[str],
    names_out: list[str],
    dynamic: tuple[Any, ...],
    opset: int,
) -> Any:
    return export_program(
        module, args, names_in, names_out, dynamic, opset, what="torch.onnx.export of a streaming graph"
    )


def _finalize(proto: Any, kind: str, opts: ExportOptions, fp16: bool) -> None:
    """Attach the SelectiveScan function when the graph has the node; name dims; metadata."""
    import onnx
    from onnx import helper

    from . import fused_step

    ops = {n.op_type for n in proto.graph.node if n.domain == bodies.DOMAIN}
    if ops:
        imports = {o.domain: o for o in proto.opset_import}
        if bodies.DOMAIN not in imports:
            proto.opset_import.append(helper.make_opsetid(bodies.DOMAIN, bodies.OP_VERSION))
        del proto.functions[:]
    if bodies.OP_NAME in ops:
        proto.functions.append(bodies.make_function(opts.body, opts.opset, io_float16=fp16))
    if fused_step.OP_NAME in ops:
        proto.functions.append(fused_step.make_step_function(opts.opset))
    for vi in [*proto.graph.input, *proto.graph.output]:
        dims = vi.type.tensor_type.shape.dim
        dims[0].dim_param = "batch"
        if vi.name == "item_seq":
            dims[1].dim_param = "seq"
    meta = {
        "m4r.format": MANIFEST_FORMAT,
        "m4r.tool_version": __version__,
        "m4r.streaming": kind,
        "m4r.head": opts.head,
        "m4r.k": str(opts.k) if opts.head == "topk" else "",
        "m4r.precision": "fp16" if fp16 else "fp32",
    }
    del proto.metadata_props[:]
    for key, value in meta.items():
        proto.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    proto.producer_name = "m4r-export"
    proto.producer_version = __version__
    proto.doc_string = (
        f"Mamba4Rec streaming {kind} graph, head={opts.head}; see the manifest's 'streaming' section."
    )


def trace_streaming(model: Mamba4Rec, opts: ExportOptions, fp16: bool = False) -> tuple[Any, Any]:
    """-> (init ModelProto, step ModelProto), checked with ``onnx.checker``."""
    import onnx

    init, step = _modules(model, opts, fp16)
    heads = list(HEAD_OUTPUTS[opts.head])
    states = state_names(model.config.num_layers)
    names = list(opts.input_names)
    excl = EXCLUDE_INPUT in names
    batch = torch.export.Dim("batch", min=1)
    seq = torch.export.Dim("seq", min=1)
    ex_dims = {0: batch, 1: torch.export.Dim("exclude", min=1)}
    args = sample_inputs(model.n_items, opts.max_seq_len, excl)
    init_proto = _export(
        init,
        args,
        names,
        heads + [s[1] for s in states],
        ({0: batch, 1: seq}, {0: batch}, *([ex_dims] if excl else [])),
        opts.opset,
    )
    rest = [*(args[2:] if excl else ()), *_state_examples(model, 3)]
    step_proto = _export(
        step,
        (torch.tensor([1, 0, model.n_items - 1]), *rest),
        [STEP_ITEM, *([EXCLUDE_INPUT] if excl else []), *(s[0] for s in states)],
        heads + [s[1] for s in states],
        # forward(item_id, *inputs): exclude_items (when taken) then the states
        ({0: batch}, tuple(ex_dims if excl and i == 0 else {0: batch} for i in range(len(rest)))),
        opts.opset,
    )
    for kind, proto in (("init", init_proto), ("step", step_proto)):
        _finalize(proto, kind, opts, fp16)
        onnx.checker.check_model(proto, full_check=True)
    from .fused_step import OP_NAME as STEP_OP

    step_ops = {n.op_type for n in step_proto.graph.node if n.domain == bodies.DOMAIN}
    if step_ops - {STEP_OP} or (STEP_OP in step_ops) != opts.fused:
        raise M4RError(
            f"step.onnx must use standard ONNX ops{' and m4r::MambaMixerStep' if opts.fused else ''} only, "
            f"but it has m4r nodes {sorted(step_ops)} (a bug)"
        )
    return init_proto, step_proto


# ------------------------------------------------------------------------------------ manifest


def streaming_manifest(
    model: Mamba4Rec, opts: ExportOptions, protos: dict[str, tuple[Any, Any]]
) -> dict[str, Any]:
    """The manifest's ``streaming`` section: files per precision, and every tensor with its role."""
    cfg = model.config
    states = state_names(cfg.num_layers)
    by_output = {s[1]: s for s in states}
    by_input = {s[0]: s for s in states}
    heads = set(HEAD_OUTPUTS[opts.head])
    init_proto, step_proto = protos["fp32"]

    def annotate(spec: dict[str, Any], table: dict[str, tuple[str, str, str, int | None]]) -> dict[str, Any]:
        name = spec["name"]
        if name in table:
            _, _, role, layer = table[name]
            return {**spec, "role": role, "layer": layer}
        if name in heads:
            return {**spec, "role": ROLE_HEAD, "layer": None}
        roles = {
            "item_seq": ROLE_ITEM_IDS,
            STEP_ITEM: ROLE_ITEM_IDS,
            "item_seq_len": ROLE_LENGTHS,
            EXCLUDE_INPUT: ROLE_EXCLUDE,
        }
        if name not in roles:
            raise M4RError(f"streaming graph tensor {name!r} has no role (a bug)")
        return {**spec, "role": roles[name], "layer": None}

    graphs: dict[str, Any] = {}
    for kind, proto in (("init", init_proto), ("step", step_proto)):
        ins, outs = io_spec(proto)
        graphs[kind] = {
            "inputs": [annotate(s, by_input) for s in ins],
            "outputs": [annotate(s, by_output) for s in outs],
        }
    return {
        "format_version": STREAMING_FORMAT_VERSION,
        "files": {p: {"init": FILE_NAMES[p][0], "step": FILE_NAMES[p][1]} for p in protos},
        # m4r export --fused: one m4r::MambaMixerStep node per mixer in step.onnx (its function body is the
        # standard-op step, so the file runs without the library; libm4r_ort_ops.so runs the fused kernel)
        "fused_step": {"used": opts.fused, "name": "MambaMixerStep", "version": 1},
        "init": graphs["init"],
        "step": graphs["step"],
        "states": [
            {"step_input": i, "output": o, "role": role, "layer": layer} for i, o, role, layer in states
        ],
        "semantics": {
            "init": "item_seq/item_seq_len as for model.onnx (same head outputs); the states are those "
            "after position item_seq_len-1; a row with item_seq_len <= 0 gets the empty state (zeros)",
            "step": "item_id int64 [batch]: one new item per row, fed with the previous call's "
            "'<state>_out' tensors as '<state>' inputs; ids outside [1, n_items) (0 included) are "
            "skipped: that row's states and outputs stay as they were",
            "exactness": "init on a history then step over further items gives the outputs of a full "
            "re-encode of the whole history (no max_seq_len limit: a streamed history longer than "
            "max_seq_len equals a full re-encode of all of it, not of its most recent max_seq_len items)",
            "precision": "states are fp32 in every precision variant",
            "user_state": "the user representation after the last accepted event (lets a skipped "
            "event return unchanged outputs)",
            "exclude_items": "ranking heads: int64 [batch, E] items never ranked in this call's outputs "
            "(as for model.onnx; 0 = none); not kept in the state, send it with every call",
        },
    }


# -------------------------------------------------------------------------------------- parity


def _stream_parity_data(n_items: int, max_seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Prefix histories (ragged, one empty row) and 4 further events per row (one skipped id)."""
    rng = np.random.default_rng(0)
    L = max(2, min(max_seq_len, 12))
    batch = 6
    seq = rng.integers(1, max(2, n_items), size=(batch, L)).astype(np.int64)
    lengths = np.array([L, 1, 0, max(1, L // 2), L, 2], dtype=np.int64)
    events = rng.integers(1, max(2, n_items), size=(4, batch)).astype(np.int64)
    events[1, 0] = n_items + 3  # skipped
    events[2, 1] = 0  # skipped (no event)
    return seq, lengths, events


def measure_streaming_parity(
    model: Mamba4Rec, opts: ExportOptions, init_bytes: bytes, step_bytes: bytes, precision: str
) -> dict[str, Any]:
    """ORT init + steps against the fp32 PyTorch ServingModel on the full histories."""
    reference = copy.deepcopy(model).eval()
    reference.set_scan_backend("fast")
    serving = ServingModel(reference, opts.head, opts.k, False, opts.exclude_items, opts.topk_chunk)
    table = model.item_embedding.weight.detach().numpy() if opts.head == "embedding" else None
    n_heads = len(HEAD_OUTPUTS[opts.head])
    states = state_names(model.config.num_layers)
    init_sess, step_sess = ort_session(init_bytes), ort_session(step_bytes)
    seq, lengths, events = _stream_parity_data(model.n_items, opts.max_seq_len)
    histories = [list(r[: max(0, n)]) for r, n in zip(seq.tolist(), lengths.tolist(), strict=True)]
    excl = serving.exclude_items
    exclude = np.random.default_rng(1).integers(0, model.n_items, size=(len(seq), 3)).astype(np.int64)
    extra = {EXCLUDE_INPUT: exclude} if excl else {}
    outs = init_sess.run(None, {"item_seq": seq, "item_seq_len": lengths, **extra})
    tol = TOLERANCES[precision]
    max_diff, overlaps = 0.0, list[float]()
    for ids in events:
        feeds = {STEP_ITEM: ids, **extra, **{s[0]: o for s, o in zip(states, outs[n_heads:], strict=True)}}
        outs = step_sess.run(None, feeds)
        for h, i in zip(histories, ids.tolist(), strict=True):
            if 1 <= i < model.n_items:
                h.append(i)
        width = max(len(h) for h in histories)
        full = np.zeros((len(histories), width), dtype=np.int64)
        for r, h in enumerate(histories):
            full[r, : len(h)] = h
        with torch.no_grad():
            ref_t = serving(
                torch.from_numpy(full),
                torch.tensor([len(h) for h in histories]),
                torch.from_numpy(exclude) if excl else None,
            )
        ref = {n: t.numpy() for n, t in zip(serving.output_names, ref_t, strict=True)}
        got = dict(zip(serving.output_names, outs[:n_heads], strict=True))
        d, ov = compare_outputs(ref, got, opts.head, table)
        max_diff, overlaps = max(max_diff, d), [*overlaps, ov]
    top10 = float(np.mean(overlaps))
    atol = 1e-5 if precision == "fp32" else tol.atol
    ok = bool(np.isfinite(max_diff)) and top10 >= tol.min_top10_overlap
    if precision == "fp32":
        ok &= max_diff <= atol
    return {
        "max_abs_diff": max_diff,
        "top10_overlap": round(top10, 6),
        "atol": atol if precision == "fp32" else None,
        "min_top10_overlap": tol.min_top10_overlap,
        "inputs": "seed 0: 6 ragged prefixes (one empty), 4 steps each incl. an out-of-range id and a 0; "
        "3 random exclude_items per row where the head takes them",
        "reference": "ServingModel fp32 on the full histories (skipped ids left out)",
        "passed": ok,
    }
