"""PyTorch -> ONNX for the serving heads, with ``m4r::SelectiveScan`` as one node plus its function.

Pipeline (:func:`export_artifacts`, used by ``m4r export``):

1. Trace :class:`~m4r_export.serving.ServingModel` (the one definition of the heads) with the
   torch.export-based exporter, dynamic ``batch`` and ``seq``. During the trace the model's scan
   backend is ``onnx-export``, which emits the node with ``torch.onnx.ops.symbolic``; the last
   layer runs in ``mode="last"`` so everything after its scan works on one row per user.
2. Add the local function ``m4r::SelectiveScan`` (body from :mod:`.bodies`) so ONNX Runtime runs
   the file with no custom-op library, and TensorRT maps the node to the plugin.
3. ``onnx.checker.check_model(full_check=True)``.
4. Parity against the PyTorch module on generated inputs (fixed seed); the export fails when the
   stated tolerance is violated (like HuggingFace Optimum's export validation).
5. Publish the directory as one unit (:func:`m4r_export.fileio.publish_directory`): every file,
   ``manifest.json`` included, is staged in a fresh sibling directory that replaces ``--out-dir``
   with one rename, so a reader sees the previous export or this one, never a mix, and files of a
   previous export that this one does not list are gone.

``--fp16``: a second trace of a half-precision copy: weights and activations fp16, LayerNorm
computed in fp32, the scan's A/D/delta_bias fp32 and its state fp32 inside the op. Its outputs are
cast to fp32 so both files share one I/O signature (scores in the fp16 file carry fp16 precision).
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import io
import itertools
import logging
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import __version__
from ..errors import M4RError, UsageError
from ..model import Mamba4Rec, register_scan_backend
from ..model.scan import selective_scan_fast
from ..serving import EXCLUDE_INPUT, HEAD_OUTPUTS, HEADS, TOPK_CHUNK, ServingModel, check_k, input_names
from . import bodies
from .manifest import (
    ITEM_TABLE,
    ITEMS_FILE,
    ITEMS_FORMAT,
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    MANIFEST_VERSION,
    ArtifactFiles,
    file_entries,
    io_spec,
    manifest_bytes,
    previous_export,
)
from .manifest import ort_session as listed_session

SCAN_BACKEND = "onnx-export"
DEFAULT_OPSET = 20
#: opsets we export and test: >= 19 for the function body's string Equal; <= what onnx/ORT know
SUPPORTED_OPSETS = tuple(range(19, 24))


# ----------------------------------------------------------------------------- scan as one node


def _onnx_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    lengths: Tensor | None = None,
    mode: str = "all",
) -> Tensor:
    """Scan backend that emits ``m4r::SelectiveScan`` while exporting (eager: the exact fast scan)."""
    if not (torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()):
        return selective_scan_fast(u, delta, A, B, C, D, z, delta_bias, delta_softplus, lengths, mode)
    if D is None or z is None or delta_bias is None:
        raise ValueError("the SelectiveScan op needs D, z and delta_bias")
    batch, dim, seq_len = u.shape
    if lengths is None:
        lengths = torch.full((batch,), seq_len, dtype=torch.int32, device=u.device)
    shape = [batch, dim] if mode == "last" else [batch, dim, seq_len]
    return torch.onnx.ops.symbolic(
        f"{bodies.DOMAIN}::{bodies.OP_NAME}",
        [u, delta, A.float(), B, C, D.float(), z, delta_bias.float(), lengths.to(torch.int32)],
        {
            "delta_softplus": int(delta_softplus),
            "mode": mode,
            "plugin_namespace": bodies.PLUGIN_NAMESPACE,
            "plugin_version": bodies.PLUGIN_VERSION,
        },
        dtype=u.dtype,
        shape=shape,
        version=bodies.OP_VERSION,
    )


register_scan_backend(SCAN_BACKEND, _onnx_scan)


# ------------------------------------------------------------------------------------- fp16 copy


class _Fp32LayerNorm(nn.LayerNorm):
    """LayerNorm whose statistics and affine parameters stay fp32 in a half-precision model."""

    def forward(self, x: Tensor) -> Tensor:
        y = F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps)
        return y.to(x.dtype)


def half_model(model: Mamba4Rec) -> Mamba4Rec:
    """A copy in fp16 except LayerNorm (fp32 statistics and weights) and the scan's A_log/D/dt bias."""
    # the item table is converted on its own, so a big catalogue is never held twice in fp32
    table = model.item_embedding.weight
    placeholder = nn.Parameter(table.detach().half(), requires_grad=table.requires_grad)
    half = copy.deepcopy(model, memo={id(table): placeholder}).eval()
    half.item_tokens = model.item_tokens
    keep = {name: p.detach().clone() for name, p in half.named_parameters() if name.endswith(("A_log", ".D"))}
    keep.update(
        {name: p.detach().clone() for name, p in half.named_parameters() if name.endswith("dt_proj.bias")}
    )
    half.half()
    for module in list(half.modules()):
        if isinstance(module, nn.LayerNorm) and not isinstance(module, _Fp32LayerNorm):
            module.float()
            module.__class__ = _Fp32LayerNorm
    params = dict(half.named_parameters())
    for name, value in keep.items():
        params[name].data = value.float()
    return half


class _FloatOutputs(nn.Module):
    """Casts floating outputs to fp32 so the fp16 file has the fp32 file's I/O signature."""

    def __init__(self, inner: ServingModel) -> None:
        super().__init__()
        self.inner = inner

    def forward(
        self, item_seq: Tensor, item_seq_len: Tensor, exclude_items: Tensor | None = None
    ) -> tuple[Tensor, ...]:
        outs = self.inner(item_seq, item_seq_len, exclude_items)
        return tuple(o.float() if o.is_floating_point() else o for o in outs)


# ------------------------------------------------------------------------------------ the export


#: Largest K TensorRT's TopK layer accepts (ITopKLayer; TensorRT 10 and 11).
TENSORRT_MAX_TOPK = 3840
#: fp32 weights above this go to a side file (ONNX external data, ``model.onnx.data``): the graph
#: then never passes protobuf's 2 GB limit, and the export streams the weights to disk instead of
#: holding serialized copies of them (docs/onnx-export.md, "Large catalogues")
EXTERNAL_DATA_BYTES = 256 * 2**20


def uses_external_data(model: Mamba4Rec, opts: ExportOptions) -> bool:
    """Whether this export writes its weights as external data (forced, or above the threshold)."""
    weights = sum(p.numel() * 4 for p in model.parameters())
    return opts.external_data or weights > EXTERNAL_DATA_BYTES


def side_file(name: str) -> str:
    """The external-data file of ONNX file ``name`` (same directory; listed and hashed in the manifest)."""
    return f"{name}.data"


@contextlib.contextmanager
def scan_backend(model: Mamba4Rec, backend: str) -> Iterator[Mamba4Rec]:
    """``model`` with every layer on ``backend`` for the block, then as it was (no copy of the weights)."""
    layers = [m for m in model.modules() if hasattr(m, "scan_backend")]
    previous = [m.scan_backend for m in layers]
    training = model.training
    model.set_scan_backend(backend)
    model.eval()
    try:
        yield model
    finally:
        for m, b in zip(layers, previous, strict=True):
            m.scan_backend = b
        model.train(training)


@dataclass(frozen=True)
class ExportOptions:
    head: str = "scores"
    k: int = 100
    exclude_history: bool = False
    #: ranking heads take the ``exclude_items`` input (``m4r export --no-exclude-items`` drops it)
    exclude_items: bool = True
    max_seq_len: int = 50
    fp16: bool = False
    opset: int = DEFAULT_OPSET
    body: str = bodies.DEFAULT_BODY
    streaming: bool = False
    #: one m4r::MambaMixer node per Mamba mixer (m4r_export/onnx/fused.py) instead of its standard ops
    fused: bool = False
    #: also write model.int8.onnx (m4r_export/onnx/int8.py)
    int8: bool = False
    #: the topk head scores this many items at a time (serving.TOPK_CHUNK; memory batch x chunk)
    topk_chunk: int = TOPK_CHUNK
    #: the topk head is one m4r::ScoreTopK node (m4r_export/onnx/topk_op.py) whose function body is the
    #: chunked subgraph; libm4r_ort_ops.so runs it as a one-pass native kernel
    native_topk: bool = True
    #: weights in a side file ``<model>.data`` whatever the size (``m4r export --external-data``);
    #: they always are above :data:`EXTERNAL_DATA_BYTES`
    external_data: bool = False
    #: embedding head: also build an ANN index of the item table (m4r_export.ann.KINDS), or None
    ann: str | None = None
    #: ANN parameters (None: m4r_export.ann.AnnParams' defaults); nprobe / ef_search are the
    #: search-time recall/latency knob, stored in the manifest and used by every reader
    ann_nlist: int | None = None
    ann_nprobe: int | None = None
    ann_m: int | None = None
    ann_ef_construction: int | None = None
    ann_ef_search: int | None = None
    ann_pq_m: int | None = None
    ann_k_factor: int | None = None
    ann_refine: str | None = None

    def ann_params(self) -> Any:
        """The :class:`m4r_export.ann.AnnParams` of ``--ann`` and its ``--ann-*`` overrides."""
        from ..ann import AnnParams

        given = {
            "nlist": self.ann_nlist,
            "nprobe": self.ann_nprobe,
            "m": self.ann_m,
            "ef_construction": self.ann_ef_construction,
            "ef_search": self.ann_ef_search,
            "pq_m": self.ann_pq_m,
            "k_factor": self.ann_k_factor,
        }
        for key, value in given.items():
            if value is not None and value < (0 if key == "nlist" else 1):
                raise UsageError(f"--ann-{key.replace('_', '-')} {value}: must be >= 1")
        chosen: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
        if self.ann_refine is not None:
            chosen["refine"] = self.ann_refine
        return AnnParams(kind=self.ann or AnnParams.kind, **chosen)

    @property
    def input_names(self) -> tuple[str, ...]:
        return input_names(self.head, self.exclude_items)

    def validate(self, n_items: int, *, engine: bool = False, hidden: int | None = None) -> None:
        """engine: a TensorRT engine will be built from this export (--fp16 without --no-trt);
        hidden: the model's hidden size (checks the ANN parameters against it)."""
        if self.head not in HEADS:
            raise UsageError(f"--head {self.head!r}: choose one of {', '.join(HEADS)}")
        if self.head == "topk":
            check_k(self.k, n_items)
        if engine and self.head == "topk" and self.k > TENSORRT_MAX_TOPK:
            raise UsageError(
                f"--k {self.k}: TensorRT's TopK supports K <= {TENSORRT_MAX_TOPK}, and --fp16 builds a "
                f"TensorRT engine when TensorRT is there; choose --k <= {TENSORRT_MAX_TOPK} or pass --no-trt"
            )
        if self.ann is not None and self.head != "embedding":
            raise UsageError(
                f"--ann {self.ann}: an ANN index serves the embedding head's user vector; "
                "pass --head embedding"
            )
        params = self.ann_params()
        if self.ann is not None and hidden is not None:
            from ..ann import check as check_ann

            check_ann(params, n_items, hidden)
        if self.topk_chunk < 1:
            raise UsageError(f"--topk-chunk {self.topk_chunk}: must be >= 1 (default {TOPK_CHUNK})")
        if self.opset not in SUPPORTED_OPSETS:
            raise UsageError(
                f"--opset {self.opset} is not supported: m4r exports opsets {SUPPORTED_OPSETS[0]}.."
                f"{SUPPORTED_OPSETS[-1]} (the SelectiveScan function body needs opset >= 19); "
                f"the default is {DEFAULT_OPSET}"
            )
        from ..checkpoint import MAX_SEQ_LEN_LIMIT

        if not 1 <= self.max_seq_len <= MAX_SEQ_LEN_LIMIT:
            raise UsageError(f"--max-seq-len {self.max_seq_len}: must be in [1, {MAX_SEQ_LEN_LIMIT}]")
        if self.body not in bodies.BODIES:
            raise UsageError(f"--body {self.body!r}: choose one of {', '.join(bodies.BODIES)}")
        if self.streaming and self.exclude_history:
            raise UsageError(
                "--exclude-history cannot be combined with --streaming: the streaming state does not "
                "record which items were seen; export without --exclude-history and filter seen items "
                "in the client"
            )


def _serving_module(model: Mamba4Rec, opts: ExportOptions, fp16: bool) -> nn.Module:
    """The module to trace: ``model`` itself (fp32; no copy of its weights) or its fp16 copy."""
    m = half_model(model) if fp16 else model
    m.set_scan_backend(SCAN_BACKEND)
    if opts.fused:
        from .fused import fuse_mixers

        if m is model:  # fuse a copy of the modules that shares the weights: ``model`` stays as it was
            m = copy.deepcopy(model, memo={id(p): p for p in [*model.parameters(), *model.buffers()]})
        fuse_mixers(m)
    cls = ServingModel
    if opts.head == "topk" and opts.native_topk:
        from .topk_op import ScoreTopKServing

        cls = ScoreTopKServing
    serving = cls(m, opts.head, opts.k, opts.exclude_history, opts.exclude_items, opts.topk_chunk).eval()
    return _FloatOutputs(serving).eval() if fp16 else serving


def sample_inputs(n_items: int, max_seq_len: int, exclude_items: bool) -> tuple[Tensor, ...]:
    seq = max(2, min(max_seq_len, 8))
    g = torch.Generator().manual_seed(0)
    item_seq = torch.randint(1, max(2, n_items), (3, seq), generator=g)
    if not exclude_items:
        return item_seq, torch.tensor([seq, 2, 1])
    # a width unlike batch (3) and seq, so that the exporter keeps the three dims apart
    exclude = torch.randint(0, max(2, n_items), (3, seq + 3), generator=g)
    return item_seq, torch.tensor([seq, 2, 1]), exclude


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's progress prints and known-harmless warnings (torchvision, deprecations)."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


def export_program(
    module: nn.Module,
    args: tuple[Any, ...],
    input_names: list[str],
    output_names: list[str],
    dynamic: Any,
    opset: int,
    what: str = "torch.onnx.export",
) -> Any:
    """torch.onnx.export (dynamo) -> ModelProto (weights inside: for graphs under 2 GB)."""
    return export_ir(module, args, input_names, output_names, dynamic, opset, what).model_proto


def export_ir(
    module: nn.Module,
    args: tuple[Any, ...],
    input_names: list[str],
    output_names: list[str],
    dynamic: Any,
    opset: int,
    what: str = "torch.onnx.export",
) -> Any:
    """torch.onnx.export (dynamo) with the exporter's chatter captured; its log is shown on failure.

    Returns the ONNXProgram: its IR model refers to the module's tensors (no serialized copy yet).
    """
    sink = io.StringIO()
    try:
        with contextlib.redirect_stdout(sink), torch.no_grad(), _quiet_exporter():
            program = torch.onnx.export(
                module,
                args,
                dynamo=True,
                input_names=input_names,
                output_names=output_names,
                dynamic_shapes=dynamic,
                opset_version=opset,
                external_data=False,
                verbose=False,
            )
    except Exception as exc:  # an exporter failure is a bug or an unsupported model, not user error
        raise M4RError(
            f"{what} failed ({type(exc).__name__}: {str(exc)[:500]}); exporter log:\n"
            f"{sink.getvalue()[-2000:]}"
        ) from exc
    assert program is not None
    return program


def trace_onnx(
    model: Mamba4Rec,
    opts: ExportOptions,
    fp16: bool = False,
    path: Path | None = None,
) -> Any:
    """ServingModel -> ONNX ModelProto with the SelectiveScan node(s) and the local function.

    ``path``: write the file there with its weights as external data (:func:`side_file`), streamed
    tensor by tensor from the model's own tensors; the returned proto then refers to the side file
    (:func:`_inline_external_data` folds it into one self-contained file).
    """
    with scan_backend(model, SCAN_BACKEND):
        module = _serving_module(model, opts, fp16)
        try:
            proto = _trace(module, model.n_items, opts, fp16, path)
        finally:
            _release_copies(module, model)
    return proto


def _release_copies(module: nn.Module, model: Mamba4Rec) -> None:
    """Free the storage of every tensor of ``module`` that is not ``model``'s own (the fp16 copy).

    The exporter keeps references to the traced module's tensors after it returns (its graph's node
    metadata), which kept the fp16 item table alive for the rest of the export: half the fp32 table
    on top of the peak. Resizing the storage to zero frees it whatever still refers to it.
    """
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    for t in [*module.parameters(), *module.buffers()]:
        storage = t.untyped_storage()
        if storage.data_ptr() not in own and storage.nbytes() and storage.resizable():
            storage.resize_(0)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _inline_external_data(path: Path, proto: Any) -> None:
    """Rewrite ``path`` (written with external data in :func:`side_file`) as one self-contained file.

    Protobuf merges repeated occurrences of a message: the file is the model without its external
    initializers, then one ``ModelProto{graph{initializer: tensor}}`` record per removed tensor,
    whose ``raw_data`` is copied from the side file in 16 MiB pieces. ONNX Runtime and ``onnx.load``
    read the same model as one serialized in memory (initializers last), but no whole-graph copy
    (the proto plus its serialized bytes: 2x the weights) is ever held. Export parity then runs on
    this file.
    """
    import onnx

    side = path.with_name(side_file(path.name))
    skeleton = copy.deepcopy(proto)  # no weights: they are external
    graph = skeleton.graph
    moved = [t for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    keep = [t for t in graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    try:
        with open(side, "rb") as src, open(path, "wb") as dst:
            dst.write(skeleton.SerializeToString())
            for tensor in moved:
                info = {e.key: e.value for e in tensor.external_data}
                offset, length = int(info.get("offset", 0)), int(info["length"])
                head = onnx.TensorProto()
                head.CopyFrom(tensor)
                del head.external_data[:]
                head.data_location = onnx.TensorProto.DEFAULT
                meta = head.SerializeToString()
                raw = b"\x4a" + _varint(length)  # TensorProto.raw_data (field 9)
                size = len(meta) + len(raw) + length
                inner = b"\x2a" + _varint(size)  # GraphProto.initializer (field 5)
                dst.write(b"\x3a" + _varint(len(inner) + size) + inner + meta + raw)  # ModelProto.graph (7)
                src.seek(offset)
                left = length
                while left:
                    block = src.read(min(left, 1 << 24))
                    if not block:
                        raise M4RError(f"{side} ended early while inlining {tensor.name}")
                    dst.write(block)
                    left -= len(block)
        side.unlink()
    except OSError as exc:
        from ..fileio import write_error

        raise write_error(path, exc) from exc


def _trace(module: nn.Module, n_items: int, opts: ExportOptions, fp16: bool, path: Path | None) -> Any:
    import onnx
    import onnx_ir

    names = opts.input_names
    args = sample_inputs(n_items, opts.max_seq_len, EXCLUDE_INPUT in names)
    batch = torch.export.Dim("batch", min=1)
    seq = torch.export.Dim("seq", min=1, max=max(opts.max_seq_len, 2))
    dynamic: dict[str, Any] = {"item_seq": {0: batch, 1: seq}, "item_seq_len": {0: batch}}
    if EXCLUDE_INPUT in names:
        # traced with min 1; ONNX Runtime also runs E = 0 (tests/test_export.py checks it)
        dynamic[EXCLUDE_INPUT] = {0: batch, 1: torch.export.Dim("exclude", min=1)}
    program = export_ir(module, args, list(names), list(HEAD_OUTPUTS[opts.head]), dynamic, opts.opset)
    if path is None:
        proto = program.model_proto
        finalize_model(proto, opts, fp16)
        onnx.checker.check_model(proto, full_check=True)
        return proto
    onnx_ir.save(program.model, path, external_data=side_file(path.name))
    del program
    proto = onnx.load(path, load_external_data=False)
    finalize_model(proto, opts, fp16)
    onnx.save(proto, path)
    onnx.checker.check_model(str(path), full_check=True)
    return proto


def finalize_model(proto: Any, opts: ExportOptions, fp16: bool) -> None:
    """Attach the function, fix the op-set import, name the dynamic dims, add metadata."""
    import onnx
    from onnx import helper

    from . import fused, topk_op

    topks = [n for n in proto.graph.node if n.op_type == topk_op.OP_NAME and n.domain == bodies.DOMAIN]
    if opts.head == "topk" and opts.native_topk and len(topks) != 1:
        raise M4RError(f"the exported graph has {len(topks)} m4r::ScoreTopK nodes, expected 1 (a bug)")
    mixers = [n for n in proto.graph.node if n.op_type == fused.OP_NAME and n.domain == bodies.DOMAIN]
    if opts.fused and not mixers:
        raise M4RError("the exported graph has no m4r::MambaMixer node; the fused mixer was not used")
    scan_nodes = [n for n in proto.graph.node if n.op_type == bodies.OP_NAME and n.domain == bodies.DOMAIN]
    if not scan_nodes and not mixers:
        raise M4RError("the exported graph has no m4r::SelectiveScan node; the scan backend was not used")
    for n in scan_nodes:
        names = {a.name for a in n.attribute}
        missing = {"delta_softplus", "mode", "plugin_namespace", "plugin_version"} - names
        if missing or len(n.input) != len(bodies.INPUTS):
            raise M4RError(f"SelectiveScan node {n.name} is malformed (missing {sorted(missing)})")
    imports = {o.domain: o for o in proto.opset_import}
    if bodies.DOMAIN not in imports:
        proto.opset_import.append(helper.make_opsetid(bodies.DOMAIN, bodies.OP_VERSION))
    else:
        imports[bodies.DOMAIN].version = bodies.OP_VERSION
    del proto.functions[:]
    proto.functions.append(bodies.make_function(opts.body, opts.opset, io_float16=fp16))
    if mixers:
        proto.functions.append(fused.make_mixer_function(opts.opset, io_float16=fp16))
    if topks:
        proto.functions.append(topk_op.make_topk_function(topks[0], opts.opset))
    # dynamic dims: batch and seq on the inputs; batch on every output
    for vi in proto.graph.input:
        dims = vi.type.tensor_type.shape.dim
        dims[0].dim_param = "batch"
        if vi.name == "item_seq":
            dims[1].dim_param = "seq"
        if vi.name == EXCLUDE_INPUT:
            dims[1].dim_param = "exclude"
    for vi in proto.graph.output:
        vi.type.tensor_type.shape.dim[0].dim_param = "batch"
    meta = {
        "m4r.format": MANIFEST_FORMAT,
        "m4r.tool_version": __version__,
        "m4r.head": opts.head,
        "m4r.k": str(opts.k) if opts.head == "topk" else "",
        "m4r.exclude_history": str(int(opts.exclude_history)),
        "m4r.exclude_items": str(int(EXCLUDE_INPUT in opts.input_names)),
        "m4r.max_seq_len": str(opts.max_seq_len),
        "m4r.precision": "fp16" if fp16 else "fp32",
        "m4r.function_body": opts.body,
        "m4r.fused_mixer": str(int(bool(mixers))),
        "m4r.score_topk": str(int(bool(topks))),
        "m4r.input_semantics": "ids outside [0, n_items) -> 0; item_seq_len clamped to [1, seq]"
        + (
            "; exclude_items [batch, E]: ids in [1, n_items) are -inf, 0 and others ignored"
            if EXCLUDE_INPUT in opts.input_names
            else ""
        ),
    }
    del proto.metadata_props[:]
    for key, value in meta.items():
        proto.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    proto.producer_name = "m4r-export"
    proto.producer_version = __version__
    proto.doc_string = (
        f"Mamba4Rec serving graph, head={opts.head}; the selective scan is one m4r::SelectiveScan node "
        "(TensorRT plugin m4r/SelectiveScan v1) with a local ONNX function body."
    )


# -------------------------------------------------------------------------------------- parity


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float
    min_top10_overlap: float

    def to_json(self) -> dict[str, float]:
        return {"atol": self.atol, "rtol": self.rtol, "min_top10_overlap": self.min_top10_overlap}


TOLERANCES = {
    "fp32": Tolerance(atol=1e-4, rtol=1e-4, min_top10_overlap=0.99),
    "fp16": Tolerance(atol=5e-2, rtol=2e-2, min_top10_overlap=0.8),
    # int8 GEMMs move scores by up to ~0.2 on random histories (measured 0.19 on ML-100K's model); the
    # ranking gate is what matters: top-10 overlap on these synthetic inputs measured ~0.97
    "int8": Tolerance(atol=1.0, rtol=0.2, min_top10_overlap=0.9),
}

PARITY_INPUTS = (
    "seed 0: 32 rows at seq=max_seq_len with lengths uniform in [1, max_seq_len]; 8 rows at "
    "seq=min(7, max_seq_len) with edge cases (lengths 0, -1, > seq; ids -3 and >= n_items); 1 row at seq=1; "
    "exclude_items (ranking heads): E = 12, 3 and 1 per batch, ids uniform in [-2, n_items + 2) "
    "(0s, duplicates and out-of-range ids included)"
)


def parity_exclude(n_items: int, batch: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Random exclude lists [batch, width] with 0s, duplicates and ids outside [1, n_items)."""
    return rng.integers(-2, n_items + 2, size=(batch, width)).astype(np.int64)


def parity_inputs(n_items: int, max_seq_len: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    batches = []
    L = max_seq_len
    seq = rng.integers(1, max(2, n_items), size=(32, L))
    lengths = rng.integers(1, L + 1, size=32)
    batches.append((seq, lengths))
    s = min(7, L)
    seq = rng.integers(1, max(2, n_items), size=(8, s))
    seq[0, 0] = -3
    seq[1, s - 1] = n_items + 5
    lengths = np.array([s, s, 0, -1, s + 10, 1, max(1, s // 2), s])
    batches.append((seq, lengths))
    batches.append((rng.integers(1, max(2, n_items), size=(1, 1)), np.array([1])))
    return [(a.astype(np.int64), b.astype(np.int64)) for a, b in batches]


def _scores_from(outputs: dict[str, np.ndarray], head: str, table: np.ndarray | None) -> np.ndarray | None:
    if head == "scores":
        return outputs["scores"]
    if head == "embedding" and table is not None:
        s = outputs["user_embedding"].astype(np.float64) @ table.T.astype(np.float64)
        s[:, 0] = -np.inf
        return s
    return None


def _top10(scores: np.ndarray) -> np.ndarray:
    k = min(10, scores.shape[1] - 1)
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over rows of |set(a_row) & set(b_row)| / width."""
    if a.size == 0:
        return 1.0
    return float(
        np.mean([len(set(x) & set(y)) / len(x) for x, y in zip(a.tolist(), b.tolist(), strict=True)])
    )


def compare_outputs(
    ref: dict[str, np.ndarray], got: dict[str, np.ndarray], head: str, table: np.ndarray | None
) -> tuple[float, float]:
    """(max abs diff over finite reference values, mean top-10 overlap).

    Non-finite reference entries (masked items) must be exactly where the artifact has them;
    otherwise the difference is reported as infinite.
    """
    max_diff = 0.0
    for name, r in ref.items():
        g = got[name]
        if r.shape != g.shape:
            raise M4RError(f"output {name}: ONNX shape {g.shape} != PyTorch shape {r.shape}")
        if not np.issubdtype(r.dtype, np.floating):
            continue
        finite = np.isfinite(r)
        if not np.array_equal(finite, np.isfinite(g)) or not np.array_equal(r[~finite], g[~finite]):
            return float("inf"), 0.0
        if finite.any():
            d = np.abs(r[finite].astype(np.float64) - g[finite].astype(np.float64))
            max_diff = max(max_diff, float(d.max()))
    if head == "topk":
        k = min(10, ref["topk_items"].shape[1])
        return max_diff, overlap(ref["topk_items"][:, :k], got["topk_items"][:, :k])
    rs, gs = _scores_from(ref, head, table), _scores_from(got, head, table)
    ov = overlap(_top10(rs), _top10(gs)) if rs is not None and gs is not None else 1.0
    return max_diff, ov


def _within(ref: dict[str, np.ndarray], got: dict[str, np.ndarray], tol: Tolerance) -> bool:
    for name, r in ref.items():
        if not np.issubdtype(r.dtype, np.floating):
            continue
        finite = np.isfinite(r)
        d = np.abs(r[finite].astype(np.float64) - got[name][finite].astype(np.float64))
        if (d > tol.atol + tol.rtol * np.abs(r[finite])).any():
            return False
    return True


def flush_denormal_enabled() -> bool:
    """Whether this thread flushes denormals to zero (``torch.set_flush_denormal``)."""
    return bool((torch.tensor([1e-39]) * 1.0).item() == 0.0)


def ort_session(
    model: bytes | Path | tuple[ArtifactFiles, str],
    threads: int | None = None,
    ort_ops: Path | None = None,
    *,
    lean: bool = False,
) -> Any:
    """A CPU InferenceSession; keeps the calling thread's flush-to-zero setting.

    ``model``: the model's bytes, or (an opened export, a listed name): then its checked bytes and
    side files (:func:`m4r_export.onnx.manifest.ort_session`).

    ONNX Runtime's first session in a process clears the thread's FTZ/DAZ flags, which would make
    PyTorch's CPU scan 3-4x slower for the rest of the process (denormals); they are restored.
    ``ort_ops``: libm4r_ort_ops.so to load (SelectiveScan then runs the native kernel, not the
    function body); see :func:`m4r_export.onnx.ort_ops.find_ort_ops_library`.
    ``lean``: the export's parity session: no constant folding and no weight pre-packing, so
    ONNX Runtime holds the item table once instead of adding folded copies of its slices and
    transposes (a whole second table; the slices are then computed per call, one chunk at a time).
    Only ONNX Runtime's own rewrites are skipped: the graph computed is the exported one.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    extra: dict[str, Any] = {}
    if lean:
        so.add_session_config_entry("session.disable_prepacking", "1")
        extra["disabled_optimizers"] = ["ConstantFolding"]
    if ort_ops is not None:
        from .ort_ops import register_ort_ops

        register_ort_ops(so, ort_ops)
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    ftz = flush_denormal_enabled()
    if isinstance(model, tuple):
        sess = listed_session(*model, so)
    else:
        source = str(model) if isinstance(model, Path) else model  # a Path: external data beside it
        sess = ort.InferenceSession(source, so, providers=["CPUExecutionProvider"], **extra)
    if ftz and not flush_denormal_enabled():
        torch.set_flush_denormal(True)
    return sess


def torch_outputs(
    serving: ServingModel,
    item_seq: np.ndarray,
    item_seq_len: np.ndarray,
    exclude_items: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    excl = None if exclude_items is None else torch.from_numpy(exclude_items)
    with torch.no_grad():
        outs = serving(torch.from_numpy(item_seq), torch.from_numpy(item_seq_len), excl)
    return {n: o.numpy() for n, o in zip(serving.output_names, outs, strict=True)}


def measure_parity(
    model: Mamba4Rec, opts: ExportOptions, model_bytes: bytes | Path, precision: str
) -> dict[str, Any]:
    """Run the ONNX model (ORT CPU; bytes, or a file with its side file) and the PyTorch ServingModel."""
    with scan_backend(model, "fast") as reference:
        return _parity(model, reference, opts, model_bytes, precision)


def _parity(
    model: Mamba4Rec, reference: Mamba4Rec, opts: ExportOptions, model_bytes: bytes | Path, precision: str
) -> dict[str, Any]:
    serving = ServingModel(
        reference, opts.head, opts.k, opts.exclude_history, opts.exclude_items, opts.topk_chunk
    )
    table = model.item_embedding.weight.detach().numpy() if opts.head == "embedding" else None
    sess = _parity_session(model, model_bytes, precision)
    tol = TOLERANCES[precision]
    max_diff, overlaps, ok = 0.0, [], True
    rng = np.random.default_rng(1)
    batches = parity_inputs(model.n_items, opts.max_seq_len)
    for (item_seq, item_seq_len), width in zip(batches, (12, 3, 1), strict=True):
        feeds = {"item_seq": item_seq, "item_seq_len": item_seq_len}
        if serving.exclude_items:
            feeds[EXCLUDE_INPUT] = parity_exclude(model.n_items, len(item_seq), width, rng)
        ref = torch_outputs(serving, item_seq, item_seq_len, feeds.get(EXCLUDE_INPUT))
        got = dict(zip(serving.output_names, sess.run(None, feeds), strict=True))
        d, ov = compare_outputs(ref, got, opts.head, table)
        max_diff = max(max_diff, d)
        overlaps.append((ov, len(item_seq)))
        ok &= bool(np.isfinite(d)) and _within(ref, got, tol)
    top10 = sum(o * n for o, n in overlaps) / sum(n for _, n in overlaps)
    ok &= top10 >= tol.min_top10_overlap
    return {
        "max_abs_diff": max_diff,
        "top10_overlap": round(top10, 6),
        "tolerance": tol.to_json(),
        "inputs": PARITY_INPUTS,
        "reference": "m4r_export.serving.ServingModel, fp32, scan backend 'fast'",
        "runtime": "onnxruntime CPUExecutionProvider",
        "passed": bool(ok),
    }


def _parity_session(model: Mamba4Rec, source: bytes | Path, precision: str) -> Any:
    """The export's parity session (:func:`ort_session`, lean) on ``source``, holding the item table once.

    A file with a side file (the export always stages one): the fp32 item table is not read from the
    side file but passed in as the model's own weight, once the side file is checked to hold exactly
    those bytes; the other weights are read from the side file. ONNX Runtime copies initializers
    given with ``add_external_initializers`` but not run inputs, so the table becomes a graph input
    fed on every run (zero-copy): PyTorch and ONNX Runtime share one table instead of holding one
    each (the export's peak memory, issue 19). Everything else about the graph is unchanged.
    """
    weight = model.item_embedding.weight.detach()
    if not isinstance(source, Path) or precision != "fp32" or weight.dtype != torch.float32:
        return ort_session(source, lean=True)
    side = source.with_name(side_file(source.name))
    if not side.exists():
        return ort_session(source, lean=True)
    import onnx
    from onnx import helper
    from onnx.external_data_helper import load_external_data_for_tensor

    proto = onnx.load(source, load_external_data=False)
    table = weight.contiguous().numpy()
    shared = None
    for init in list(proto.graph.initializer):
        if init.data_location != onnx.TensorProto.EXTERNAL:
            continue
        is_table = list(init.dims) == list(table.shape) and init.data_type == onnx.TensorProto.FLOAT
        if shared is None and is_table:
            info = {e.key: e.value for e in init.external_data}
            _check_side_bytes(side, int(info.get("offset", 0)), int(info["length"]), table)
            shared = init.name
            proto.graph.initializer.remove(init)
            proto.graph.input.append(helper.make_tensor_value_info(shared, init.data_type, list(init.dims)))
        else:
            load_external_data_for_tensor(init, str(source.parent))
            del init.external_data[:]
            init.data_location = onnx.TensorProto.DEFAULT
    sess = ort_session(proto.SerializeToString(), lean=True)
    return sess if shared is None else _FedTable(sess, shared, table)


class _FedTable:
    """An InferenceSession whose item table is a graph input: every run feeds it (ONNX Runtime reads
    numpy inputs in place)."""

    def __init__(self, sess: Any, name: str, table: np.ndarray) -> None:
        self.sess, self.name, self.table = sess, name, table

    def run(self, outputs: Any, feeds: dict[str, np.ndarray]) -> Any:
        return self.sess.run(outputs, {**feeds, self.name: self.table})


def _check_side_bytes(side: Path, offset: int, length: int, table: np.ndarray) -> None:
    """Refuse to share ``table`` with the parity session unless ``side`` holds exactly its bytes there."""
    flat = table.reshape(-1).view(np.uint8).data
    if length != len(flat):
        raise M4RError(f"{side}: the item table is {length} bytes there, the model's is {len(flat)}")
    with open(side, "rb") as fh:
        fh.seek(offset)
        for start in range(0, length, 1 << 24):
            block = fh.read(min(1 << 24, length - start))
            if block != flat[start : start + len(block)]:
                where = f"offset {offset + start}"
                raise M4RError(f"{side}: the item table's bytes differ from the model's ({where})")


# --------------------------------------------------------------------------------------- writing


@dataclass
class ExportResult:
    out_dir: Path
    manifest: dict[str, Any]
    files: list[Path] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)


#: every character ``str.splitlines()`` splits on (readers disagree on all but \n; refuse them all)
LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"


#: items.txt is written this many tokens at a time (a 10M-item vocabulary as one string was 1.4 GiB)
ITEMS_CHUNK = 1 << 16


def _item_tokens(model: Mamba4Rec) -> Iterator[str]:
    """The vocabulary in index order: the checkpoint's tokens, or the indices themselves."""
    if model.item_tokens is not None:
        return iter(model.item_tokens)
    return itertools.chain(["[PAD]"], (str(i) for i in range(1, model.n_items)))


def check_item_tokens(model: Mamba4Rec) -> None:
    """Refuse a vocabulary that items.txt (one token per line) cannot hold, before any work is done."""
    tokens = model.item_tokens
    if tokens is None:
        return
    if len(tokens) != model.n_items:
        raise UsageError(
            f"checkpoint vocabulary has {len(tokens)} tokens but the model has {model.n_items} items"
        )
    for index, t in enumerate(tokens):
        bad = [c for c in t if c in LINE_BREAKS]
        if bad:
            raise UsageError(
                f"item token {t!r} (index {index}) contains the line-break character {bad[0]!r} "
                f"(U+{ord(bad[0]):04X}); items.txt holds one token per line, so tokens may not contain "
                "any character that str.splitlines() splits on: rename the item in the dataset"
            )


def write_items_file(model: Mamba4Rec, path: Path) -> None:
    """items.txt (format: :data:`m4r_export.integrity.ITEMS_FORMAT`), :data:`ITEMS_CHUNK` lines at a time.

    Memory stays bounded whatever the catalogue size (never the whole text, nor a list of every line).
    Call :func:`check_item_tokens` first: no token holds a line break.
    """
    from ..fileio import write_error

    tokens = _item_tokens(model)
    try:
        with open(path, "xb") as fh:
            while chunk := list(itertools.islice(tokens, ITEMS_CHUNK)):
                fh.write("".join(f"{t}\n" for t in chunk).encode("utf-8"))
    except OSError as exc:
        raise write_error(path, exc) from exc


def _all_finite(t: Tensor, chunk: int = 1 << 22) -> bool:
    """torch.isfinite(t).all() in slices: its temporaries for a 10M-item table were ~2x the table."""
    flat = t.detach().reshape(-1)
    return all(bool(torch.isfinite(flat[i : i + chunk]).all()) for i in range(0, flat.numel(), chunk))


def check_finite_weights(model: Mamba4Rec) -> None:
    """Refuse a model with NaN/Inf weights (a diverged training run), naming the tensors."""
    bad = [n for n, t in model.state_dict().items() if t.is_floating_point() and not _all_finite(t)]
    if bad:
        raise UsageError(
            f"the checkpoint has non-finite weights (NaN or Inf) in {len(bad)} tensor(s), "
            f"e.g. {', '.join(bad[:3])}: "
            "its training run diverged. Export an earlier checkpoint, or re-train with a lower learning_rate"
        )


def export_artifacts(
    model: Mamba4Rec,
    out_dir: str | os.PathLike[str],
    opts: ExportOptions,
    *,
    checkpoint_path: str | os.PathLike[str] | None = None,
    build_trt: bool = True,
    echo: Callable[[str], None] | None = None,
) -> ExportResult:
    """Export, check, measure parity, then write everything (see the module docstring)."""
    from ..fileio import ensure_writable_dir

    say = echo or (lambda _msg: None)
    opts.validate(model.n_items, engine=opts.fp16 and build_trt, hidden=model.config.hidden_size)
    out = Path(out_dir)
    ensure_writable_dir(out.absolute().parent)
    check_item_tokens(model)
    check_finite_weights(model)

    with tempfile.TemporaryDirectory(prefix=".m4r-export-", dir=out.absolute().parent) as tmp:
        return _export_in(model, out, opts, Path(tmp), checkpoint_path, build_trt, say)


def _export_in(
    model: Mamba4Rec,
    out: Path,
    opts: ExportOptions,
    tmp: Path,
    checkpoint_path: str | os.PathLike[str] | None,
    build_trt: bool,
    say: Callable[[str], None],
) -> ExportResult:
    """The export with ``tmp`` for files too large to hold in memory (external data), then published."""
    from ..fileio import publish_directory, sha256_file, write_error

    precisions = ["fp32", "fp16"] if opts.fp16 else ["fp32"]
    names = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}
    external = uses_external_data(model, opts)
    if external and opts.int8:
        raise UsageError(
            "--int8 with external data (weights above "
            f"{EXTERNAL_DATA_BYTES // 2**20} MiB, or --external-data) is not supported yet: drop --int8"
        )
    if external and opts.streaming:
        raise UsageError(
            "--streaming with external data (weights above "
            f"{EXTERNAL_DATA_BYTES // 2**20} MiB, or --external-data) is not supported yet: "
            "export the streaming graphs of a smaller catalogue, or drop --streaming"
        )
    specs: dict[str, Any] = {}
    blobs: dict[str, Path] = {}
    parity: dict[str, Any] = {}
    for precision in precisions:
        say(f"tracing the {opts.head} head ({precision}) ...")
        path = tmp / names[precision]
        # streamed to disk tensor by tensor either way: no serialized copy of the graph in memory
        try:
            proto = trace_onnx(model, opts, fp16=precision == "fp16", path=path)
        except OSError as exc:  # a full disk or a file-size limit while staging: name the output
            raise write_error(out / path.name, exc) from exc
        specs[precision] = io_spec(proto)
        # parity runs on this file and its side file; below the external-data threshold the published
        # file is the same graph with the side file's bytes copied in (_inline_external_data)
        say(f"checking parity with PyTorch ({precision}) ...")
        parity[precision] = measure_parity(model, opts, path, precision)
        if not parity[precision]["passed"]:
            p = parity[precision]
            raise M4RError(
                f"export parity check failed for {precision}: max abs diff {p['max_abs_diff']:.3g}, top-10 "
                f"overlap {p['top10_overlap']:.3f} (tolerance {p['tolerance']}); nothing was written. "
                "This is a bug in m4r export: please report it with the checkpoint's config"
            )
        if not external:
            _inline_external_data(path, proto)
        del proto
        blobs[precision] = path

    if opts.int8:
        from .int8 import quantize_int8

        say("quantizing the fp32 file to int8 (ONNX Runtime dynamic quantization) ...")
        _write_new(tmp / names["int8"], quantize_int8(blobs["fp32"].read_bytes()))  # no external data here
        blobs["int8"] = tmp / names["int8"]
        parity["int8"] = measure_parity(model, opts, blobs["int8"], "int8")
        if not parity["int8"]["passed"]:
            p = parity["int8"]
            raise M4RError(
                f"export parity check failed for int8: max abs diff {p['max_abs_diff']:.3g}, top-10 overlap "
                f"{p['top10_overlap']:.3f} (tolerance {p['tolerance']}); nothing was written. Export without "
                "--int8 (this model does not tolerate int8 weights)"
            )

    streams: dict[str, tuple[Any, Any]] = {}
    stream_blobs: dict[str, bytes] = {}
    stream_parity: dict[str, Any] = {}
    if opts.streaming:
        from .streaming import FILE_NAMES, measure_streaming_parity, trace_streaming

        for precision in precisions:
            say(f"tracing the streaming init/step graphs ({precision}) ...")
            streams[precision] = trace_streaming(model, opts, fp16=precision == "fp16")
            init_b, step_b = (p.SerializeToString() for p in streams[precision])
            stream_blobs.update({FILE_NAMES[precision][0]: init_b, FILE_NAMES[precision][1]: step_b})
            say(f"checking streaming parity with PyTorch ({precision}) ...")
            p = measure_streaming_parity(model, opts, init_b, step_b, precision)
            stream_parity[precision] = p
            if not p["passed"]:
                raise M4RError(
                    f"streaming parity check failed for {precision}: max abs diff {p['max_abs_diff']:.3g}, "
                    f"top-10 overlap {p['top10_overlap']:.3f}; nothing was written. This is a bug in m4r "
                    "export: please report it with the checkpoint's config"
                )

    # everything validated: collect every file (name -> bytes, or a file in tmp), publish them as one unit
    written = [*precisions, *(["int8"] if opts.int8 else [])]
    contents: dict[str, bytes | Path] = {names[p]: blobs[p] for p in written}
    notes: dict[str, dict[str, Any]] = {names[p]: {"precision": p} for p in written}
    if external:
        for p in precisions:
            side = side_file(names[p])
            contents[side] = tmp / side
            notes[names[p]]["external_data"] = [side]
            notes[side] = {"precision": p, "external_data_of": names[p]}
    write_items_file(model, tmp / ITEMS_FILE)
    contents[ITEMS_FILE] = tmp / ITEMS_FILE
    notes[ITEMS_FILE] = {"format": ITEMS_FORMAT}
    for name, blob in stream_blobs.items():
        contents[name] = blob
        notes[name] = {"precision": "fp16" if ".fp16." in name else "fp32"}
    ann: dict[str, Any] | None = None
    if opts.head == "embedding":
        table = model.item_embedding.weight.detach().float().numpy()
        np.save(tmp / ITEM_TABLE, table)  # straight to disk: no serialized copy of a big table
        contents[ITEM_TABLE] = tmp / ITEM_TABLE
        if opts.ann is not None:
            say(f"building the {opts.ann} ANN index ...")
            ann = _build_ann(table, opts.ann_params(), tmp)
            contents[ann["file"]] = tmp / ann["file"]
            notes[ann["file"]] = {"format": "faiss", "of": ITEM_TABLE}
        notes[ITEM_TABLE] = {
            "precision": "fp32",
            "shape": [model.n_items, model.config.hidden_size],
            "note": "row i = item index i; row 0 is padding and must never be returned; "
            "score = user_embedding @ table.T",
        }

    trt = {"status": "skipped", "reason": "no --fp16 file (TensorRT engines are built from model.fp16.onnx)"}
    if opts.fp16 and build_trt:
        with tempfile.TemporaryDirectory(prefix=".m4r-trt-", dir=out.absolute().parent) as trt_tmp:
            fp16 = Path(trt_tmp) / names["fp16"]
            try:
                os.link(tmp / names["fp16"], fp16)
                if external:  # the parser reads the side file beside the model file
                    os.link(tmp / side_file(names["fp16"]), Path(trt_tmp) / side_file(names["fp16"]))
            except OSError as exc:
                raise write_error(fp16, exc) from exc
            trt = _try_trt(fp16, Path(trt_tmp), opts)
            for produced in sorted(Path(trt_tmp).iterdir()):
                if produced.name not in (names["fp16"], side_file(names["fp16"])):
                    contents[produced.name] = produced.read_bytes()

    files = file_entries(contents, notes)
    inputs, outputs = specs["fp32"]
    ckpt: dict[str, Any] = {"path": None, "sha256": None}
    if checkpoint_path is not None:
        ckpt = {"path": str(Path(checkpoint_path).resolve()), "sha256": sha256_file(checkpoint_path)}

    manifest = {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "tool_version": __version__,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "checkpoint": ckpt,
        "model": model.config.to_dict(),
        "max_seq_len": opts.max_seq_len,
        "head": opts.head,
        "k": opts.k if opts.head == "topk" else None,
        "topk_chunk": max(opts.topk_chunk, opts.k) if opts.head == "topk" else None,
        "external_data": {
            "files": [side_file(names[p]) for p in precisions] if external else [],
            "threshold_bytes": EXTERNAL_DATA_BYTES,
            "forced": opts.external_data,
        },
        "exclude_history": opts.exclude_history,
        "exclude_items": EXCLUDE_INPUT in opts.input_names,
        "opset": opts.opset,
        "custom_op": {
            "domain": bodies.DOMAIN,
            "name": bodies.OP_NAME,
            "version": bodies.OP_VERSION,
            "plugin_namespace": bodies.PLUGIN_NAMESPACE,
            "plugin_version": bodies.PLUGIN_VERSION,
            "function_body": opts.body,
            # m4r export --fused: each Mamba mixer is one m4r::MambaMixer node (its function body holds
            # the standard ops and the SelectiveScan node); libm4r_ort_ops.so runs it as one kernel
            "fused_mixer": {"used": opts.fused, "name": "MambaMixer", "version": bodies.OP_VERSION},
            # --head topk: one m4r::ScoreTopK node (function body: the chunked TopK subgraph);
            # libm4r_ort_ops.so runs it as a one-pass native kernel (m4r export --no-native-topk: plain ops)
            "score_topk": {
                "used": opts.head == "topk" and opts.native_topk,
                "name": "ScoreTopK",
                "version": bodies.OP_VERSION,
            },
        },
        "inputs": inputs,
        "outputs": outputs,
        "input_semantics": {
            "item_seq": "int64 item indices, right-padded with 0, oldest first; "
            "ids outside [0, n_items) -> 0",
            "item_seq_len": "int64, clamped to [1, seq]; the user representation is read at item_seq_len - 1",
            "longer_histories": f"keep the most recent {opts.max_seq_len} items "
            "(m4r_export.onnx.truncate_inputs / histories_to_inputs)",
            **(
                {
                    EXCLUDE_INPUT: "int64 [batch, E], any E >= 0: items never ranked for that row (scores "
                    "-inf), in addition to exclude_history (which covers the input window only); 0 = no "
                    "item, ids outside [1, n_items) are ignored, duplicates are harmless; send zeros "
                    "[batch, 1] to exclude nothing (m4r_export.onnx.exclude_inputs pads ragged lists)"
                }
                if EXCLUDE_INPUT in opts.input_names
                else {}
            ),
        },
        "items_format": ITEMS_FORMAT,
        "files": files,
        "parity": parity,
        "tensorrt": trt,
    }
    if ann is not None:
        manifest["ann"] = ann
    if opts.streaming:
        from .streaming import streaming_manifest

        manifest["streaming"] = {**streaming_manifest(model, opts, streams), "parity": stream_parity}
    contents[MANIFEST_NAME] = manifest_bytes(manifest)
    publish_directory(out, contents, replaceable=previous_export)
    return ExportResult(out, manifest, [out / name for name in contents])


def _write_new(path: Path, data: bytes) -> None:
    """``data`` into a new file of the export's private temporary directory."""
    from ..fileio import write_error

    try:
        with open(path, "xb") as fh:
            fh.write(data)
    except OSError as exc:
        raise write_error(path, exc) from exc


def _build_ann(table: np.ndarray, params: Any, tmp: Path) -> dict[str, Any]:
    """Build and write the ANN index (m4r_export.ann); its manifest section."""
    import time

    import faiss

    from .. import ann as annmod

    t0 = time.perf_counter()
    index = annmod.build_index(table, params)
    seconds = time.perf_counter() - t0
    annmod.write_index(index, tmp / annmod.INDEX_FILE)
    spec = {**params.to_json(), "nlist": annmod.lists_for(len(table), params) if params.kind == "ivf" else 0}
    if params.kind == "pq":
        spec["pq_m"] = annmod.pq_m_for(table.shape[1], params)
    return {**spec, "file": annmod.INDEX_FILE, "faiss": faiss.__version__, "build_seconds": round(seconds, 1)}


def _try_trt(fp16_path: Path, out: Path, opts: ExportOptions) -> dict[str, Any]:
    """Build a TensorRT engine when TensorRT and a GPU are there (m4r_export.trt decides)."""
    try:
        from ..trt import ShapeProfile, try_build_engine
    except Exception as exc:  # the TensorRT package itself failed to import: report, do not fail
        return {"status": "skipped", "reason": f"m4r_export.trt unavailable ({exc})"}
    max_seq = max(opts.max_seq_len, 1)
    profile = ShapeProfile(min_seq=1, opt_seq=min(50, max_seq), max_seq=max_seq)
    try:
        result = try_build_engine(fp16_path, out, profile=profile)
    except M4RError as exc:
        return {"status": "failed", "reason": str(exc)}
    if result.built:
        return {
            "status": "built",
            "engine": result.engine_path.name if result.engine_path else None,
            "engine_manifest": result.manifest_path.name if result.manifest_path else None,
            "notes": list(result.notes),
        }
    return {"status": "skipped", "reason": result.reason}
