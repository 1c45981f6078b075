"""ONNX -> TensorRT engine (strongly typed), with a JSON manifest; and the export hook.

Precision comes from the ONNX graph itself (model.fp16.onnx is fp16-typed with fp32 islands): the network
is built strongly typed, which TensorRT 11 always does and TensorRT 10 does with the STRONGLY_TYPED flag.
The SelectiveScan nodes map to the m4r plugin, which must be loaded: TensorRT cannot import the node's
ONNX function body (it picks the scan mode with a string comparison, and TensorRT has no string tensors).
"""

from __future__ import annotations

import collections
import datetime as _dt
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import M4RError, UsageError
from ..fileio import sha256_file, write_bytes_atomic, write_json_atomic
from .env import gpu_unavailable_reason, list_gpus, load_tensorrt, tensorrt_unavailable_reason
from .manifest import EXCLUDE_INPUT, INPUT_NAMES, MANIFEST_FORMAT, ShapeProfile, manifest_path_for
from .native import find_or_build_plugin, find_plugin_library

if TYPE_CHECKING:
    import tensorrt

__all__ = ["EngineBuildResult", "ShapeProfile", "build_engine", "try_build_engine"]


#: Messages a logger keeps (the latest): enough to quote in an error, bounded for long-lived runners.
LOG_KEEP = 200


def make_logger(min_severity: str = "WARNING", keep: int = LOG_KEEP) -> tensorrt.ILogger:
    """A TensorRT logger that also keeps the last ``keep`` messages, so that errors can quote what
    TensorRT said without a runner's log growing for its whole lifetime."""
    import tensorrt as trt

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.messages: collections.deque[str] = collections.deque(maxlen=keep)
            self._min = getattr(trt.ILogger.Severity, min_severity)

        def log(self, severity: tensorrt.ILogger.Severity, msg: str) -> None:
            if int(severity) <= int(self._min):  # lower value = more severe
                self.messages.append(f"[{severity.name}] {msg}")

    logger: tensorrt.ILogger = _Logger()
    return logger


def logged(logger: tensorrt.ILogger, last: int = 8) -> str:
    msgs = list(getattr(logger, "messages", []))
    return ("\nTensorRT said:\n  " + "\n  ".join(msgs[-last:])) if msgs else ""


def _plugin_registered(registry: tensorrt.IPluginRegistry) -> bool:
    # Scan the list instead of get_creator(): a failed lookup logs an error through TensorRT's logger.
    try:
        creators = registry.all_creators
    except Exception:  # the bindings raise on creator kinds they do not know
        return False
    for creator in creators:
        name = getattr(creator, "name", None)
        namespace = getattr(creator, "plugin_namespace", None)
        if name == "SelectiveScan" and namespace == "m4r":
            return True
    return False


def load_plugin_library(path: Path, logger: tensorrt.ILogger) -> None:
    """Register the plugin library's creators (IPluginRegistry::loadLibrary via getCreators)."""
    import tensorrt as trt

    registry: tensorrt.IPluginRegistry = trt.get_plugin_registry()
    if _plugin_registered(registry):
        return  # already loaded in this process (earlier call, or the LD_PRELOADed static variant)
    try:
        handle = registry.load_library(str(path))
    except Exception as exc:  # the bindings raise on some failures and return None on others
        handle, why = None, f" ({exc})"
    else:
        why = ""
    if handle is None:
        raise M4RError(
            f"TensorRT could not load the plugin library {path}{why}; rebuild it for this TensorRT and CUDA "
            f"with `m4r build-plugin`{logged(logger)}"
        )


def _network_flags() -> int:
    import tensorrt as trt

    # TensorRT 11: networks are always strongly typed (the flag is deprecated); 10.x: request it.
    if int(trt.__version__.split(".")[0]) >= 11:
        return 0
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


class PluginUnavailable(M4RError):
    """The SelectiveScan plugin library could not be found or built."""


def build_engine(
    onnx_path: Path,
    engine_path: Path,
    *,
    profile: ShapeProfile | None = None,
    plugin_library: Path | None = None,
    build_plugin: bool = True,
    timing_cache: Path | None = None,
    optimization_level: int = 3,
    workspace_mib: int | None = None,
) -> dict[str, Any]:
    """Build and write ``engine_path`` and its manifest; returns the manifest. Needs TensorRT and a GPU.

    The plugin: ``plugin_library``, else $M4R_TRT_PLUGIN or the `m4r build-plugin` output, else (with
    ``build_plugin``) built now for this GPU. Without it: :class:`PluginUnavailable`.
    """
    load_tensorrt()  # a clear error when TensorRT is absent or only stubs; then the typed import below
    import tensorrt as trt

    gpus, why = list_gpus()
    if not gpus:
        raise M4RError(f"cannot build a TensorRT engine: {why}")
    profile = profile or ShapeProfile()
    profile.validate()
    if not 0 <= optimization_level <= 5:
        raise UsageError(f"--opt-level {optimization_level}: TensorRT accepts 0..5 (default 3)")
    if not onnx_path.is_file():
        raise UsageError(f"ONNX file {onnx_path} does not exist; run `m4r export` first")

    logger = make_logger()
    notes: list[str] = []
    try:
        if build_plugin:  # for this GPU's architecture only: about a minute
            archs = gpus[0].compute_capability.replace(".", "")
            plugin_path = find_or_build_plugin(plugin_library, cuda_archs=archs)
        else:
            plugin_path = find_plugin_library(plugin_library, gpus[0].compute_capability.replace(".", ""))
    except UsageError:
        raise
    except M4RError as exc:
        raise PluginUnavailable(
            f"the m4r SelectiveScan plugin is required and unavailable ({exc}); TensorRT cannot import the "
            "op's ONNX function body. Build the plugin with `m4r build-plugin` (needs cmake, nvcc and the "
            "TensorRT headers) or pass --plugin"
        ) from exc
    load_plugin_library(plugin_path, logger)

    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags())
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "\n  ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise M4RError(f"TensorRT could not parse {onnx_path}:\n  {errors}{logged(logger)}")
    names = {network.get_input(i).name for i in range(network.num_inputs)}
    if names not in (set(INPUT_NAMES), {*INPUT_NAMES, EXCLUDE_INPUT}):
        raise UsageError(
            f"{onnx_path} has inputs {sorted(names)}; m4r engines expect {list(INPUT_NAMES)} "
            f"(and {EXCLUDE_INPUT} for ranking heads); export the model with `m4r export`"
        )

    config = builder.create_builder_config()
    config.builder_optimization_level = optimization_level
    if workspace_mib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    opt_profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile.input_shapes().items():
        if name not in names:
            continue  # exclude_items: only ranking heads exported with it
        opt_profile.set_shape(name, trt.Dims(list(lo)), trt.Dims(list(opt)), trt.Dims(list(hi)))
    config.add_optimization_profile(opt_profile)

    cache = _load_timing_cache(config, timing_cache, notes)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise M4RError(f"TensorRT failed to build an engine from {onnx_path}{logged(logger, 15)}")
    write_bytes_atomic(engine_path, bytes(memoryview(serialized)))
    if timing_cache is not None and cache is not None:
        write_bytes_atomic(timing_cache, bytes(memoryview(cache.serialize())))

    gpu = gpus[0]
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "engine": engine_path.name,
        "engine_sha256": sha256_file(engine_path),
        "onnx": {"file": onnx_path.name, "sha256": sha256_file(onnx_path)},
        "tensorrt_version": trt.__version__,
        "gpu": {"name": gpu.name, "compute_capability": gpu.compute_capability},
        "profile": profile.to_json(),
        "strongly_typed": True,
        "builder_optimization_level": optimization_level,
        "plugin": {"library": plugin_path.name, "sha256": sha256_file(plugin_path)},
        "notes": notes,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    write_json_atomic(manifest_path_for(engine_path), manifest)
    return manifest


def _load_timing_cache(
    config: tensorrt.IBuilderConfig, path: Path | None, notes: list[str]
) -> tensorrt.ITimingCache | None:
    """Reuse (and later update) a timing cache file: rebuilds for the same GPU skip most tactic timing.

    TensorRT rejects a cache from another GPU or TensorRT version (set_timing_cache returns False); then
    the build starts from a fresh cache, which replaces the file afterwards, and a note says so.
    """
    if path is None:
        return None
    data = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(data)
    if config.set_timing_cache(cache, ignore_mismatch=False):
        return cache
    note = (
        f"timing cache {path} was rejected by TensorRT (built on another GPU or TensorRT version); "
        "started a fresh one, which replaces it after this build"
    )
    warnings.warn(note, stacklevel=3)
    notes.append(note)
    cache = config.create_timing_cache(b"")
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        raise M4RError(f"TensorRT refused a fresh timing cache; build without --timing-cache {path}")
    return cache


@dataclass
class EngineBuildResult:
    """Outcome of :func:`try_build_engine`: ``built`` or ``skipped`` (with the exact reason)."""

    status: str
    reason: str = ""
    engine_path: Path | None = None
    manifest_path: Path | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def built(self) -> bool:
        return self.status == "built"

    @property
    def message(self) -> str:
        if self.built:
            return f"TensorRT engine: {self.engine_path}" + "".join(f"\n  note: {n}" for n in self.notes)
        return f"skipped: {self.reason}"


def try_build_engine(
    onnx_path: Path,
    out_dir: Path,
    *,
    engine_name: str = "model.plan",
    profile: ShapeProfile | None = None,
    plugin_library: Path | None = None,
    build_plugin: bool = True,
    timing_cache: Path | None = None,
    optimization_level: int = 3,
) -> EngineBuildResult:
    """Build ``out_dir/engine_name`` when TensorRT and a GPU are present; otherwise report why not.

    Called by ``m4r export`` after it wrote model.fp16.onnx. A missing TensorRT or GPU is not an error
    (status "skipped"), nor is a plugin that can be neither found nor built (the reason says how to get
    it); a failure while building with TensorRT, a GPU and the plugin present raises M4RError.
    """
    reason = tensorrt_unavailable_reason()
    if reason is None:
        reason = gpu_unavailable_reason()
    if reason is not None:
        return EngineBuildResult("skipped", reason=f"no TensorRT engine built: {reason}")
    engine_path = Path(out_dir) / engine_name
    try:
        manifest = build_engine(
            Path(onnx_path),
            engine_path,
            profile=profile,
            plugin_library=plugin_library,
            build_plugin=build_plugin,
            timing_cache=timing_cache,
            optimization_level=optimization_level,
        )
    except PluginUnavailable as exc:
        return EngineBuildResult("skipped", reason=f"no TensorRT engine built: {exc}")
    return EngineBuildResult(
        "built",
        engine_path=engine_path,
        manifest_path=manifest_path_for(engine_path),
        notes=list(manifest["notes"]),
    )
