"""Export directory -> Triton model repository (``m4r triton``).

One export (its ``manifest.json`` is the single source of names, dtypes and shapes) becomes one
model for the chosen backend, plus, with ``with_tokens``, an ensemble that takes raw item tokens:

    <repo>/<name>/config.pbtxt, 1/model.{onnx,plan} (python: 1/model.py + 1/model.onnx)
    <repo>/<name>_tokens_pre, <name>_tokens_post   (Python models around the model)
    <repo>/<name>_tokens/config.pbtxt               (the ensemble clients call)
    <repo>/README.md                                (how to start a server on it)
    <repo>/plugins/libm4r_trt_plugin_static.so      (tensorrt: the SelectiveScan plugin)

Shapes: Triton's dynamic batcher only batches requests of equal shapes, so the history input is
fixed at the export's ``max_seq_len`` (clients right-pad; the token ensemble pads for them), and a
1-D ``[batch]`` input such as ``item_seq_len`` is sent as ``[batch, 1]`` and reshaped. Any other
input (for example an exclusion list, 0 = none) keeps a variable width; the Python backend makes
it optional and fills zeros. Every config is checked against Triton's schema, everything is
staged in a sibling directory, and only a complete repository is renamed into place.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import M4RError, UsageError
from ..fileio import ensure_writable_dir, write_error
from ..onnx.manifest import ArtifactFiles, open_artifact
from . import config as cfgmod
from .config import TensorSpec

BACKENDS = ("tensorrt", "onnxruntime", "python")
PLATFORMS = {"tensorrt": "tensorrt_plan", "onnxruntime": "onnxruntime_onnx"}
TOKENS_OUTPUT = "item_tokens"
UNKNOWN_OUTPUT = "unknown_tokens"
HISTORY_INPUT = "history"


@dataclass(frozen=True)
class TritonOptions:
    backend: str = "python"
    name: str | None = None
    max_batch: int = 64
    instances: int = 1
    kind: str | None = None  # default: gpu for tensorrt/onnxruntime, cpu for python
    max_queue_delay_us: int = 500
    with_tokens: bool = False
    ort_ops: Path | None = None  # native ONNX Runtime custom-op library (onnxruntime backend)
    plugin: Path | None = None  # TensorRT plugin library (tensorrt backend)
    engine: str | None = None  # TensorRT engine file in the export directory
    streaming: bool = False  # stateful model on the sequence batcher (serve/streaming.py)
    sequence_idle_us: int = 60_000_000  # max_sequence_idle_microseconds
    max_sequences: int = 1024  # python backend: sequences in flight (oldest max_candidate_sequences)
    max_request_events: int = 262_144  # python backend: events (item ids) one request may carry
    ann: bool = False  # user embedding + ANN index search (serve/ann.py)
    k: int = 10  # --ann: items per answer
    max_exclude: int = 4096  # --ann: distinct excluded items per row (the search over-fetches by that many)

    @property
    def device_kind(self) -> str:
        return self.kind or ("cpu" if self.backend == "python" else "gpu")

    def validate(self) -> None:
        if self.backend not in BACKENDS:
            raise UsageError(f"--backend {self.backend!r}: choose one of {', '.join(BACKENDS)}")
        if self.kind not in (None, "cpu", "gpu"):
            raise UsageError(f"--kind {self.kind!r}: choose cpu or gpu")
        if self.backend == "tensorrt" and self.device_kind == "cpu":
            raise UsageError(
                "--kind cpu with --backend tensorrt: TensorRT engines run on GPUs only; use --kind gpu"
            )
        if self.max_batch < 1:
            raise UsageError(f"--max-batch {self.max_batch}: must be >= 1")
        if self.instances < 1:
            raise UsageError(f"--instances {self.instances}: must be >= 1")
        if self.max_queue_delay_us < 0:
            raise UsageError(f"--max-queue-delay-us {self.max_queue_delay_us}: must be >= 0")
        if self.name is not None and (not self.name or "/" in self.name or self.name.startswith(".")):
            raise UsageError(f"--name {self.name!r}: use a plain directory name (letters, digits, _ or -)")
        if self.streaming and self.with_tokens:
            raise UsageError("--streaming with --with-tokens: the streaming model takes item ids; drop one")
        if self.sequence_idle_us < 1 or self.max_sequences < 1 or self.max_request_events < 1:
            raise UsageError("--sequence-idle-us, --max-sequences and --max-request-events must be >= 1")
        if self.ann and (self.backend != "python" or self.streaming):
            raise UsageError(
                "--ann runs the index search in Triton's Python backend: use --backend python, without "
                "--streaming"
            )
        if self.k < 1 or self.max_exclude < 0:
            raise UsageError(f"--k {self.k} / --max-exclude {self.max_exclude}: must be >= 1 / >= 0")
        if self.ort_ops is not None and self.backend != "onnxruntime":
            raise UsageError("--ort-ops only applies to --backend onnxruntime")


@dataclass
class RepositoryPlan:
    """Everything to write, computed and checked before the first byte is written."""

    configs: dict[str, str] = field(default_factory=dict)  # model name -> config.pbtxt text
    copies: dict[str, Path] = field(default_factory=dict)  # relative path -> source file
    texts: dict[str, str] = field(default_factory=dict)  # relative path -> text
    data: dict[str, bytes] = field(default_factory=dict)  # relative path -> bytes read and checked once
    dirs: list[str] = field(default_factory=list)  # empty directories (an ensemble's version folder)


def _core_inputs() -> tuple[str, ...]:
    """(history, lengths) input names; imported here so `m4r --help` does not import torch."""
    from ..serving import INPUT_NAMES

    return INPUT_NAMES


def _model_tensors(manifest: dict[str, Any], backend: str) -> tuple[list[TensorSpec], list[TensorSpec]]:
    INPUT_NAMES = _core_inputs()
    max_seq_len = int(manifest["max_seq_len"])
    inputs = []
    for spec in manifest["inputs"]:
        shape = list(spec["shape"])[1:]  # the batch dimension is implicit in Triton
        if spec["name"] == INPUT_NAMES[0]:
            dims = tuple(max_seq_len if isinstance(d, str) else int(d) for d in shape)
        else:
            dims = tuple(-1 if isinstance(d, str) else int(d) for d in shape)
        reshape: tuple[int, ...] | None = None
        if not dims:
            dims, reshape = (1,), ()
        # inputs beyond the two every model has (e.g. items to exclude, 0 = none) are optional where
        # our own code fills them in (Python backend); ONNX Runtime / TensorRT need them sent
        optional = spec["name"] not in INPUT_NAMES and backend == "python"
        inputs.append(TensorSpec(spec["name"], spec["dtype"], dims, reshape, optional))
    outputs = [
        TensorSpec(o["name"], o["dtype"], tuple(-1 if isinstance(d, str) else int(d) for d in o["shape"][1:]))
        for o in manifest["outputs"]
    ]
    return inputs, outputs


def _python_model_source(name: str) -> str:
    return resources.files("m4r_export.serve.python_models").joinpath(name).read_text(encoding="utf-8")


def plan_repository(artifacts: Path, opts: TritonOptions, manifest: dict[str, Any]) -> RepositoryPlan:
    opts.validate()
    for key in ("inputs", "outputs", "max_seq_len"):
        if key not in manifest:
            raise UsageError(f"{artifacts}/manifest.json has no {key!r}; re-export with `m4r export`")
    default = "m4r_ann" if opts.ann else f"m4r_{manifest.get('head', 'model')}"
    name = opts.name or default + ("_streaming" if opts.streaming else "")
    plan = RepositoryPlan()
    if opts.streaming:
        from .streaming import plan_streaming, streaming_readme

        plan_streaming(plan, artifacts, manifest, opts, name)
        plan.texts["README.md"] = streaming_readme(name, opts, manifest)
        return plan
    if opts.ann:
        from .ann import ann_tensors

        inputs, outputs = ann_tensors(manifest, artifacts, opts.k)
    else:
        inputs, outputs = _model_tensors(manifest, opts.backend)
    common: dict[str, Any] = {
        "name": name,
        "inputs": inputs,
        "outputs": outputs,
        "max_batch": opts.max_batch,
        "kind": opts.device_kind,
        "instances": opts.instances,
        "queue_delay_us": opts.max_queue_delay_us,
    }
    if opts.ann:
        from .ann import plan_ann_files

        params = {"k": str(opts.k), "max_exclude": str(opts.max_exclude)}
        cfg = cfgmod.model_config(backend="python", parameters=params, **common)
        plan_ann_files(plan, artifacts, manifest, name)
    elif opts.backend == "python":
        cfg = cfgmod.model_config(backend="python", parameters={"onnx_file": "model.onnx"}, **common)
        _copy_onnx(plan.copies, f"{name}/1", artifacts, manifest)
        plan.texts[f"{name}/1/model.py"] = _python_model_source("onnx_model.py")
    elif opts.backend == "onnxruntime":
        op_library = None
        library = _ort_ops_library(opts.ort_ops)
        if library is not None:
            op_library = f"../../ortops/{library.name}"  # relative to the version directory
            plan.copies[f"ortops/{library.name}"] = library
        cfg = cfgmod.model_config(platform=PLATFORMS["onnxruntime"], op_library=op_library, **common)
        _copy_onnx(plan.copies, f"{name}/1", artifacts, manifest)
    else:
        cfg = cfgmod.model_config(platform=PLATFORMS["tensorrt"], **common)
        plan.data[f"{name}/1/model.plan"] = _engine_file(artifacts, manifest, opts)
        plugin = _plugin_file(opts.plugin)
        plan.copies[f"plugins/{plugin.name}"] = plugin
    known = {name: cfg}
    plan.configs[name] = cfgmod.render(cfg)
    if opts.with_tokens:
        _plan_tokens(plan, artifacts, manifest, opts, name, (inputs, outputs), known)
    plan.texts["README.md"] = _readme(name, opts, manifest, plan)
    return plan


def _copy_onnx(copies: dict[str, Path], version_dir: str, artifacts: Path, manifest: dict[str, Any]) -> None:
    """model.onnx, and its external-data side file under the name the model refers to."""
    copies[f"{version_dir}/model.onnx"] = _onnx_file(artifacts, manifest)
    for side in manifest["files"]["model.onnx"].get("external_data") or []:  # plain names (checked)
        copies[f"{version_dir}/{side}"] = artifacts / side


def _onnx_file(artifacts: Path, manifest: dict[str, Any]) -> Path:
    if "model.onnx" not in manifest.get("files", {}):
        raise UsageError(f"{artifacts} has no model.onnx in its manifest; re-export with `m4r export`")
    return artifacts / "model.onnx"


def _ort_ops_library(explicit: Path | None) -> Path | None:
    """The native custom-op library: --ort-ops, else whatever the ortops discovery finds (or none)."""
    try:
        from ..onnx.ort_ops import find_ort_ops_library
    except ImportError:  # a tree without the discovery function: only an explicit path
        if explicit is not None and not explicit.is_file():
            raise UsageError(f"--ort-ops {explicit}: no such file; pass a built custom-op library") from None
        return explicit
    return find_ort_ops_library(explicit)


def read_engine(artifacts: Path, name: str, missing_hint: str) -> tuple[bytes, dict[str, Any]]:
    """An engine file in the export directory (a plain name, not a symlink), read once and checked
    against the sha256 in its ``<engine>.json``; -> (its bytes, that manifest)."""
    from ..onnx.manifest import is_plain_name
    from ..trt.manifest import read_manifest

    engine = artifacts / name
    if not is_plain_name(name):
        raise UsageError(f"--engine {name!r}: pass the name of an engine file in {artifacts}")
    try:
        fd = os.open(engine, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise UsageError(f"{engine} does not exist: {missing_hint}") from None
    except OSError as exc:
        raise UsageError(f"{engine}: cannot open it ({exc.strerror}); pass a regular engine file") from None
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UsageError(f"{engine} is not a regular file; pass an engine file")
        data = fh.read()
    meta = read_manifest(engine)
    if meta.get("engine_sha256") != hashlib.sha256(data).hexdigest():
        raise M4RError(f"{engine} does not match the sha256 in its manifest; rebuild the engine")
    return data, meta


def _engine_file(artifacts: Path, manifest: dict[str, Any], opts: TritonOptions) -> bytes:
    from ..trt.manifest import ShapeProfile

    name = opts.engine or (manifest.get("tensorrt") or {}).get("engine") or "model.plan"
    engine = artifacts / name
    data, meta = read_engine(
        artifacts,
        name,
        "--backend tensorrt needs an engine built on the serving GPU "
        f"(`m4r build-engine --onnx {artifacts}/model.fp16.onnx --out {artifacts} --max-seq "
        f"{manifest['max_seq_len']}`), or pass --engine NAME",
    )
    source = (meta.get("onnx") or {}).get("file")
    expected = (manifest["files"].get(source) or {}).get("sha256") if source else None
    if source and expected != (meta.get("onnx") or {}).get("sha256"):
        raise UsageError(
            f"{engine} was built from another {source} than the one in {artifacts}; rebuild the engine "
            "from this export"
        )
    profile = ShapeProfile.from_json(meta["profile"])
    L = int(manifest["max_seq_len"])
    if not profile.min_seq <= L <= profile.max_seq:
        raise UsageError(
            f"{engine}: its profile allows sequence lengths {profile.min_seq}..{profile.max_seq} but the "
            f"repository pads every request to max_seq_len {L}; rebuild with --max-seq {L}"
        )
    if profile.max_batch < opts.max_batch:
        raise UsageError(
            f"{engine}: its profile allows batches up to {profile.max_batch}; pass --max-batch "
            f"{profile.max_batch} or rebuild the engine with --max-batch {opts.max_batch}"
        )
    return data


def _plugin_file(explicit: Path | None) -> Path:
    from ..trt.native import PLUGIN_STATIC_LIBRARY, find_library

    return find_library(PLUGIN_STATIC_LIBRARY, explicit, "M4R_TRT_PLUGIN_STATIC")


def _plan_tokens(
    plan: RepositoryPlan,
    artifacts: Path,
    manifest: dict[str, Any],
    opts: TritonOptions,
    name: str,
    model_io: tuple[list[TensorSpec], list[TensorSpec]],
    known: dict[str, Any],
) -> None:
    """Preprocessing (tokens -> ids) and postprocessing (ids -> tokens) models and the ensemble."""
    model_inputs, model_outputs = model_io
    ids_output = next((o for o in model_outputs if o.dtype == "int64"), None)
    if ids_output is None:
        raise UsageError(
            f"--with-tokens maps item ids back to tokens, but the {manifest.get('head')!r} head returns no "
            "item ids; export with --head topk"
        )
    if "items.txt" not in manifest.get("files", {}):
        raise UsageError(f"{artifacts} has no items.txt in its manifest; re-export with `m4r export`")
    max_seq_len = int(manifest["max_seq_len"])
    pre, post, ens = f"{name}_tokens_pre", f"{name}_tokens_post", f"{name}_tokens"
    INPUT_NAMES = _core_inputs()
    history_name, length_name = INPUT_NAMES
    # extra model inputs (e.g. items to exclude) become optional token inputs of the ensemble
    extras = {f"{t.name}_tokens": t.name for t in model_inputs if t.name not in INPUT_NAMES}
    pre_inputs = [TensorSpec(HISTORY_INPUT, "object", (-1,))] + [
        TensorSpec(e, "object", (-1,), optional=True) for e in extras
    ]
    pre_outputs = [
        TensorSpec(history_name, "int64", (max_seq_len,)),
        TensorSpec(length_name, "int64", (1,)),
        TensorSpec(UNKNOWN_OUTPUT, "int64", (1,)),
    ] + [TensorSpec(m, "int64", (-1,)) for m in extras.values()]
    params = {
        "max_seq_len": str(max_seq_len),
        "history_input": HISTORY_INPUT,
        "item_seq_output": history_name,
        "length_output": length_name,
        "extra_inputs": json.dumps(extras),
    }
    small: dict[str, Any] = {"max_batch": opts.max_batch, "kind": "cpu", "instances": 1}
    pre_cfg = cfgmod.model_config(
        name=pre, inputs=pre_inputs, outputs=pre_outputs, backend="python", parameters=params, **small
    )
    tokens = TensorSpec(TOKENS_OUTPUT, "object", ids_output.dims)
    post_cfg = cfgmod.model_config(
        name=post,
        inputs=[TensorSpec(ids_output.name, "int64", ids_output.dims)],
        outputs=[tokens],
        backend="python",
        **small,
    )
    known.update({pre: pre_cfg, post: post_cfg})
    plan.configs[pre] = cfgmod.render(pre_cfg, known)
    plan.configs[post] = cfgmod.render(post_cfg, known)
    items = artifacts / "items.txt"
    plan.copies[f"{pre}/1/items.txt"] = items
    plan.copies[f"{post}/1/items.txt"] = items
    plan.texts[f"{pre}/1/model.py"] = _python_model_source("tokens_pre.py")
    plan.texts[f"{post}/1/model.py"] = _python_model_source("tokens_post.py")

    internal = {t.name: f"_{t.name}" for t in pre_outputs if t.name != UNKNOWN_OUTPUT}
    steps = [
        {
            "model_name": pre,
            "model_version": -1,
            "input_map": {t.name: t.name for t in pre_inputs},
            "output_map": {**internal, UNKNOWN_OUTPUT: UNKNOWN_OUTPUT},
        },
        {
            "model_name": name,
            "model_version": -1,
            "input_map": {t.name: internal[t.name] for t in model_inputs},
            "output_map": {o.name: (f"_{o.name}" if o is ids_output else o.name) for o in model_outputs},
        },
        {
            "model_name": post,
            "model_version": -1,
            "input_map": {ids_output.name: f"_{ids_output.name}"},
            "output_map": {TOKENS_OUTPUT: TOKENS_OUTPUT},
        },
    ]
    ens_outputs = [tokens, TensorSpec(UNKNOWN_OUTPUT, "int64", (1,))]
    ens_outputs += [o for o in model_outputs if o is not ids_output]
    ens_cfg = cfgmod.model_config(
        name=ens,
        inputs=pre_inputs,
        outputs=ens_outputs,
        platform="ensemble",
        max_batch=opts.max_batch,
        ensemble_steps=steps,
    )
    plan.configs[ens] = cfgmod.render(ens_cfg, known)
    plan.dirs.append(f"{ens}/1")


def _readme(name: str, opts: TritonOptions, manifest: dict[str, Any], plan: RepositoryPlan) -> str:
    from .readme import repository_readme

    return repository_readme(name, opts, manifest, sorted(plan.configs))


def write_repository(
    artifacts: str | os.PathLike[str], out: str | os.PathLike[str], opts: TritonOptions
) -> Path:
    """Check the export, plan and check every config, then write ``out`` atomically (see module doc).

    ``out`` must not exist or be an earlier m4r repository (marked by ``.m4r-triton``); it is
    replaced only after the new one is complete. Files of the export are copied from the bytes
    that were hashed (:func:`m4r_export.onnx.manifest.open_artifact`), never re-read by path.
    """
    src = Path(artifacts)
    if not src.is_dir():
        raise UsageError(f"--artifacts {src}: not a directory; pass the output directory of `m4r export`")
    with open_artifact(src) as files:
        plan = plan_repository(src, opts, files.manifest)
        target = Path(out)
        if target.exists() and not (target / MARKER).is_file():
            raise UsageError(
                f"--repo {target} exists and was not written by m4r triton; choose a new path or remove it"
            )
        parent = ensure_writable_dir(target.parent if str(target.parent) else Path("."))
        try:
            stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".staging", dir=parent))
        except OSError as exc:
            raise write_error(parent, exc) from exc
        try:
            plan.texts[MARKER] = json.dumps({"artifacts": str(src.resolve()), "backend": opts.backend})
            _write_plan(stage, target, plan, files, src)
            _swap_in(stage, target)
        except BaseException:
            with contextlib.suppress(OSError):
                shutil.rmtree(stage)
            raise
    return target


def _write_plan(stage: Path, target: Path, plan: RepositoryPlan, files: ArtifactFiles, src: Path) -> None:
    """Every planned file under ``stage`` (swapped in whole, so plain writes); a failed write names
    the file as it will be in ``target`` and the cause."""
    jobs: dict[str, str | bytes | Path | None] = {rel: None for rel in plan.dirs}  # None: a directory
    jobs.update({f"{m}/config.pbtxt": text for m, text in plan.configs.items()})
    jobs.update({**plan.texts, **plan.data, **plan.copies})
    for rel, item in jobs.items():
        data: bytes | None
        if isinstance(item, Path):
            listed = item.parent == src and item.name in files.names
            data = files.read(item.name) if listed else item.read_bytes()  # the bytes that were hashed
        else:
            data = item.encode("utf-8") if isinstance(item, str) else item
        try:
            _write_file(stage / rel, data)
        except OSError as exc:
            raise write_error(f"{target / rel} (staged in {stage})", exc) from exc


def _write_file(dest: Path, data: bytes | None) -> None:
    """``data`` into a new file ``dest`` (None: make the directory ``dest``)."""
    if data is None:
        dest.mkdir(parents=True, exist_ok=True)
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "xb") as fh:
        fh.write(data)


def _swap_in(stage: Path, target: Path) -> None:
    old = None
    try:
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
        os.replace(stage, target)
    except OSError as exc:
        raise write_error(target, exc) from exc
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


MARKER = ".m4r-triton"
