"""What an artifact is: its file, kind (ONNX model or TensorRT engine), serving head and precision.

The facts come from ``manifest.json`` written by ``m4r export`` beside the ONNX files (for an
engine: ``<engine>.json`` names the ONNX file it was built from, whose directory holds
``manifest.json``). Before anything else, :func:`m4r_export.onnx.manifest.open_artifact`
checks every file the manifest lists (sha256, size, required files, value types, no symlinks): a
mismatch raises :class:`~m4r_export.onnx.manifest.ArtifactIntegrityError` (exit code 3). The
model and the item table are then loaded from those checked open files (:meth:`ArtifactInfo.read`),
never re-opened by path, so a directory republished meanwhile cannot mix two exports. Without a
manifest the head is inferred from the graph's output names and the report says so.

The precision (which picks verify's default thresholds) always comes from the graph's own tensor
types, never from the manifest: editable metadata must not loosen a verdict.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import M4RError, UsageError
from ..onnx.manifest import (
    ITEM_TABLE,
    MANIFEST_NAME,
    ArtifactFiles,
    ArtifactIntegrityError,
    is_plain_name,
    open_artifact,
)
from ..serving import EXCLUDE_INPUT, HEAD_OUTPUTS

ONNX_SUFFIXES = (".onnx",)
ENGINE_SUFFIXES = (".plan", ".engine", ".trt")


@dataclass
class ArtifactInfo:
    path: Path
    kind: str  # "onnx" | "engine"
    head: str
    k: int | None
    exclude_history: bool
    max_seq_len: int | None
    precision: str  # "fp32" | "fp16" | "int8"
    model_config: dict[str, Any] | None = None
    manifest: dict[str, Any] | None = None
    onnx_path: Path | None = None  # the ONNX file (for an engine: the one it was built from)
    item_table: Path | None = None  # embedding head: the item table shipped beside the model
    exclude_items: bool = False  # the graph takes the exclude_items input (read from the graph)
    notes: list[str] = field(default_factory=list)
    #: the export directory opened and checked once (None without a manifest)
    files: ArtifactFiles | None = field(default=None, repr=False)

    def read(self, path: Path) -> bytes:
        """The bytes of a file of this artifact: the checked open file when the manifest lists it."""
        if self.files is not None and path.parent == self.files.directory:
            return self.files.read(path.name)
        return path.read_bytes()

    def ort_session(self, options: Any, providers: list[str]) -> Any:
        """An ONNX Runtime session of the ONNX file, from the bytes that were checked."""
        import onnxruntime as ort

        path = self.onnx_path or self.path
        if self.files is not None:
            from ..onnx.manifest import ort_session

            return ort_session(self.files, path.name, options, providers)
        return ort.InferenceSession(str(path), options, providers=providers)

    def describe(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "kind": self.kind,
            "head": self.head,
            "k": self.k,
            "exclude_history": self.exclude_history,
            "exclude_items": self.exclude_items,
            "max_seq_len": self.max_seq_len,
            "precision": self.precision,
            "onnx": str(self.onnx_path) if self.onnx_path else None,
            "item_table": str(self.item_table) if self.item_table else None,
            "notes": list(self.notes),
        }


def _onnx_facts(onnx_path: Path, data: bytes) -> tuple[list[str], dict[str, list[int | str]], str, list[str]]:
    """Output names, their shapes (dims as int or symbolic name), the graph's precision, inputs.

    Precision: "int8" when the graph has quantized GEMMs (m4r export --int8), "fp16" when any output or
    initializer is fp16, else "fp32"."""
    import onnx

    from ..onnx.int8 import is_int8

    if not data:
        raise M4RError(f"{onnx_path} is empty (0 bytes): the file is truncated or corrupt; re-export it")
    try:
        model = onnx.load_model_from_string(data)
    except Exception as exc:
        raise M4RError(f"{onnx_path} is not a readable ONNX model ({exc}); re-export it") from exc
    if not model.graph.output or not model.graph.node:  # protobuf parses many byte strings as "empty"
        raise M4RError(
            f"{onnx_path} is not a valid ONNX model (its graph has no nodes or outputs): the file is "
            "corrupt or not an ONNX model; re-export it"
        )
    fp16 = onnx.TensorProto.FLOAT16
    shapes: dict[str, list[int | str]] = {}
    is_fp16 = False
    for out in model.graph.output:
        dims = out.type.tensor_type.shape.dim
        shapes[out.name] = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims]
        is_fp16 |= out.type.tensor_type.elem_type == fp16
    is_fp16 |= any(init.data_type == fp16 for init in model.graph.initializer)
    precision = "int8" if is_int8({n.op_type for n in model.graph.node}) else "fp16" if is_fp16 else "fp32"
    return [o.name for o in model.graph.output], shapes, precision, [i.name for i in model.graph.input]


def _head_from_outputs(names: list[str], where: Path) -> str:
    for head, outs in HEAD_OUTPUTS.items():
        if set(outs) <= set(names):
            return head
    raise UsageError(
        f"{where}: outputs {names} match no serving head ({dict(HEAD_OUTPUTS)}); "
        "export the model with `m4r export`"
    )


def _find_item_table(directory: Path, manifest: dict[str, Any] | None) -> Path | None:
    candidates: list[str] = []
    files = (manifest or {}).get("files")
    if isinstance(files, dict):
        candidates += [str(v if isinstance(v, str) else v.get("path", "")) for v in files.values()]
        candidates += [str(k) for k in files]
    elif isinstance(files, list):
        candidates += [str(f if isinstance(f, str) else f.get("path", f.get("name", ""))) for f in files]
    candidates += ["item_table.npy", "items.npy", "item_embedding.npy"]
    for name in candidates:
        if name.endswith(".npy") and (directory / name).is_file():
            return directory / name
    return None


def streaming_graphs(directory: Path) -> set[str]:
    """File names of the streaming graphs (init/step of `m4r export --streaming`) in ``directory``."""
    import json

    try:
        manifest = json.loads((directory / MANIFEST_NAME).read_text(encoding="utf-8"))
        files = manifest["streaming"]["files"]
        names = {str(name) for per_precision in files.values() for name in per_precision.values()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        names = set()
    return names | {"init.onnx", "step.onnx", "init.fp16.onnx", "step.fp16.onnx"}


def _refuse_streaming(p: Path) -> None:
    if p.name in streaming_graphs(p.parent):
        raise UsageError(
            f"artifact {p} is a streaming graph (init/step of `m4r export --streaming`), which verify does "
            f"not compare: pass the serving graph {p.parent / 'model.onnx'} (same checkpoint). The export "
            "itself checked init + step against a full re-encode (manifest.json: streaming.parity); "
            "`m4r bench --streaming` times them"
        )


def load_artifact(path: str | Path) -> ArtifactInfo:
    """Read what ``verify``/``bench`` need to know about ``path`` (.onnx, or .plan/.engine)."""
    p = Path(path)
    if p.is_dir():
        streaming = streaming_graphs(p)
        found = sorted(
            f.name
            for f in p.iterdir()
            if f.suffix in (*ONNX_SUFFIXES, *ENGINE_SUFFIXES) and f.name not in streaming
        )
        hint = f"one of the files in it: {', '.join(found)}" if found else "DIR/model.onnx (m4r export)"
        raise UsageError(f"artifact {p} is a directory; --artifact takes a model file: pass {hint}")
    if not p.is_file():
        raise UsageError(f"artifact {p} does not exist; pass DIR/model.onnx (m4r export) or DIR/model.plan")
    _refuse_streaming(p)
    notes: list[str] = []
    if p.suffix in ENGINE_SUFFIXES:
        kind = "engine"
        from ..trt.manifest import read_manifest

        engine_manifest = read_manifest(p)
        onnx_name = (engine_manifest.get("onnx") or {}).get("file")
        if onnx_name is not None and not is_plain_name(onnx_name):
            raise ArtifactIntegrityError(
                f"engine {p}: its .plan.json names the ONNX file {onnx_name!r}, which is not a plain "
                "file name beside the engine; rebuild the engine with `m4r build-engine`"
            )
        onnx_path = p.parent / onnx_name if onnx_name else None
        if onnx_path is None or not onnx_path.is_file():
            raise UsageError(
                f"engine {p} was built from {onnx_name!r}, which is not beside it; keep the engine in the "
                "directory written by `m4r export` (verify reads its manifest.json)"
            )
    elif p.suffix in ONNX_SUFFIXES:
        kind, onnx_path = "onnx", p
    else:
        raise UsageError(
            f"artifact {p}: unknown file type {p.suffix!r}; pass an ONNX model (.onnx) or a TensorRT engine "
            f"({', '.join(ENGINE_SUFFIXES)})"
        )

    manifest_path = onnx_path.parent / MANIFEST_NAME
    files = open_artifact(onnx_path.parent) if os.path.lexists(manifest_path) else None
    manifest = files.manifest if files is not None else None
    if files is not None and onnx_path.name not in files.names:
        raise ArtifactIntegrityError(
            f"{onnx_path} is not listed in {manifest_path}: it is not part of that export; "
            "pass a model the manifest lists, or re-export"
        )
    data = files.read(onnx_path.name) if files is not None else onnx_path.read_bytes()
    out_names, out_shapes, precision, in_names = _onnx_facts(onnx_path, data)
    del data
    if manifest is None:
        notes.append(f"no manifest.json beside {onnx_path.name}: head inferred from the output names")
        head = _head_from_outputs(out_names, onnx_path)
        k: int | None = None
        if head == "topk":
            dim = out_shapes["topk_items"][-1]
            k = dim if isinstance(dim, int) and dim > 0 else None
        exclude_history, max_seq_len, config = False, None, None
    else:
        # types and ranges were checked by check_artifact_files
        head = str(manifest["head"])
        k = manifest.get("k")
        exclude_history = manifest["exclude_history"]
        max_seq_len = manifest["max_seq_len"]
        config = manifest["model"]
    missing = [n for n in HEAD_OUTPUTS.get(head, ()) if n not in out_names]
    if head not in HEAD_OUTPUTS or missing:
        raise UsageError(
            f"{onnx_path}: the manifest says head {head!r} but the graph outputs are {out_names}; "
            "the manifest does not belong to this model: re-export it"
        )
    item_table = None
    if head == "embedding":
        item_table = onnx_path.parent / ITEM_TABLE if files else _find_item_table(onnx_path.parent, None)
    return ArtifactInfo(
        path=p,
        kind=kind,
        head=head,
        k=k,
        exclude_history=exclude_history,
        max_seq_len=max_seq_len,
        precision=precision,
        model_config=config,
        manifest=manifest,
        onnx_path=onnx_path,
        item_table=item_table,
        exclude_items=EXCLUDE_INPUT in in_names,
        notes=notes,
        files=files,
    )
