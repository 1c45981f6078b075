"""A strict fake of the ``tensorrt`` module (the real one cannot be installed here), for the engine build
and :class:`TrtRunner` paths.

Strict where real TensorRT fails, so that tests catch the mistakes it would:
  * every call is recorded in ``calls["order"]``;
  * ``OnnxParser.parse_from_file`` refuses a file with a ``SelectiveScan`` node unless the plugin library was
    loaded first (onnx-tensorrt then tries the op's function body and fails);
  * ``Runtime.deserialize_cuda_engine`` returns None for a plugin engine when no plugin library is loaded;
  * ``IExecutionContext.set_input_shape`` refuses shapes outside the optimization profile;
  * ``execute_async_v3`` refuses the legacy default stream (0), unset shapes or addresses, and output
    buffers whose shape or dtype is not the engine's; it then writes outputs computed from the inputs.
The engine "plan" is JSON naming the profile and whether the network used the plugin. Device buffers are
host torch tensors registered by :class:`HostDevice` (the runner's device plumbing in tests).
"""

from __future__ import annotations

import contextlib
import enum
import json
import types
from collections.abc import Iterator
from typing import Any

import torch

TOP_K = 3  # outputs of the fake engine: top_items int32 [batch, K], top_scores float32 [batch, K]


class Severity(enum.IntEnum):
    INTERNAL_ERROR = 0
    ERROR = 1
    WARNING = 2
    INFO = 3
    VERBOSE = 4


class DataType(enum.Enum):
    FLOAT = "float32"
    HALF = "float16"
    BF16 = "bfloat16"
    INT32 = "int32"
    INT64 = "int64"
    INT8 = "int8"
    BOOL = "bool"


class TensorIOMode(enum.Enum):
    INPUT = 1
    OUTPUT = 2


_OUTPUTS = {"top_items": (DataType.INT32, torch.int32), "top_scores": (DataType.FLOAT, torch.float32)}


class HostDevice:
    """Stands in for m4r_export.trt.runner.CudaDevice: host tensors, registered by address."""

    buffers: dict[int, torch.Tensor] = {}
    STREAM = 0x5EED

    def __init__(self, index: int) -> None:
        self.index = index
        self.synced = 0

    def scope(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def _keep(self, t: torch.Tensor) -> torch.Tensor:
        HostDevice.buffers[t.data_ptr()] = t
        return t

    def upload(self, host: torch.Tensor) -> torch.Tensor:
        return self._keep(host.clone().contiguous())

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return self._keep(torch.full(shape, -7, dtype=dtype))

    def stream_handle(self) -> int:
        return self.STREAM

    def synchronize(self) -> None:
        self.synced += 1


def fake_tensorrt(calls: dict[str, Any], version: str = "10.8.0.43") -> types.ModuleType:
    """A fresh fake module; ``calls`` receives what it was asked to do (``calls["order"]``: call names)."""
    trt = types.ModuleType("tensorrt")
    order: list[str] = calls.setdefault("order", [])
    loaded: list[str] = calls.setdefault("loaded_libraries", [])

    def log(logger: Any, severity: Severity, msg: str) -> None:
        logger.log(severity, msg)

    class ILogger:
        Severity = Severity

        def __init__(self) -> None:
            pass

    class Network:
        def __init__(self) -> None:
            self.names: list[str] = []  # set by the parse: calls["inputs"], default a ranking head's three
            self.num_inputs = 0
            self.uses_plugin = False

        def get_input(self, i: int) -> types.SimpleNamespace:
            return types.SimpleNamespace(name=self.names[i])

    class Profile:
        def __init__(self) -> None:
            self.shapes: dict[str, tuple[Any, Any, Any]] = {}

        def set_shape(self, name: str, lo: Any, opt: Any, hi: Any) -> None:
            order.append("profile.set_shape")
            self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))
            calls.setdefault("shapes", {})[name] = self.shapes[name]

    class TimingCache:
        def __init__(self, data: bytes) -> None:
            self.data = data

        def serialize(self) -> bytes:
            return b"CACHE:" + calls.get("gpu_tag", b"fake")

    class Config:
        builder_optimization_level = 3

        def __init__(self) -> None:
            self.profiles: list[Profile] = []
            self.cache: TimingCache | None = None

        def set_memory_pool_limit(self, pool: Any, size: int) -> None:
            calls["workspace"] = size

        def add_optimization_profile(self, p: Profile) -> int:
            self.profiles.append(p)
            return len(self.profiles) - 1

        def create_timing_cache(self, data: bytes) -> TimingCache:
            order.append("config.create_timing_cache")
            calls.setdefault("timing_cache_in", data)
            return TimingCache(data)

        def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
            order.append("config.set_timing_cache")
            # a cache written on another GPU is rejected unless mismatches are ignored
            ours = cache.data in (b"", b"CACHE:" + calls.get("gpu_tag", b"fake"))
            if not (ours or ignore_mismatch):
                return False
            self.cache = cache
            return True

    class Builder:
        def __init__(self, logger: ILogger) -> None:
            order.append("Builder")
            self.logger = logger

        def create_network(self, flags: int) -> Network:
            calls["network_flags"] = flags
            return Network()

        def create_builder_config(self) -> Config:
            calls["config"] = Config()
            return calls["config"]

        def create_optimization_profile(self) -> Profile:
            return Profile()

        def build_serialized_network(self, network: Network, config: Config) -> bytes | None:
            order.append("builder.build_serialized_network")
            if network.num_inputs == 0 or len(config.profiles) != 1:
                log(self.logger, Severity.ERROR, "network not parsed or no optimization profile")
                return None
            if set(config.profiles[0].shapes) != set(network.names):
                log(self.logger, Severity.ERROR, f"profile {sorted(config.profiles[0].shapes)} != inputs")
                return None
            plan = {"fake_engine": 1, "plugin": network.uses_plugin, "profile": config.profiles[0].shapes}
            return json.dumps(plan).encode()

    class OnnxParser:
        def __init__(self, network: Network, logger: ILogger) -> None:
            self.network = network
            self.logger = logger
            self.errors: list[str] = []

        @property
        def num_errors(self) -> int:
            return len(self.errors)

        def get_error(self, i: int) -> str:
            return self.errors[i]

        def parse_from_file(self, path: str) -> bool:
            order.append("parser.parse_from_file")
            calls["parsed"] = path
            with open(path, "rb") as f:
                data = f.read()
            if b"SelectiveScan" in data:
                if not loaded:
                    # what onnx-tensorrt does without a registered creator: import the function body
                    msg = "no creator m4r::SelectiveScan; the function body's string If cannot be imported"
                    self.errors.append(msg)
                    return False
                self.network.uses_plugin = True
            self.network.names = list(calls.get("inputs", ["item_seq", "item_seq_len", "exclude_items"]))
            self.network.num_inputs = len(self.network.names)
            return True

    class Registry:
        def __init__(self) -> None:
            self.all_creators: list[Any] = []

        def load_library(self, path: str) -> object | None:
            order.append("registry.load_library")
            calls["loaded"] = path
            if calls.get("plugin_load_fails"):
                return None
            loaded.append(path)
            self.all_creators.append(types.SimpleNamespace(name="SelectiveScan", plugin_namespace="m4r"))
            return object()

    class Context:
        def __init__(self, engine: Engine) -> None:
            self.engine = engine
            self.shapes: dict[str, tuple[int, ...]] = {}
            self.addresses: dict[str, int] = {}

        def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
            order.append(f"context.set_input_shape:{name}")
            lo, _, hi = self.engine.profile[name]
            if len(shape) != len(lo) or not all(a <= s <= b for a, s, b in zip(lo, shape, hi, strict=True)):
                log(self.engine.logger, Severity.ERROR, f"{name}: shape {shape} outside profile [{lo}, {hi}]")
                return False
            self.shapes[name] = tuple(shape)
            return True

        def set_tensor_address(self, name: str, ptr: int) -> bool:
            self.addresses[name] = ptr
            return True

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            if name in self.shapes:
                return self.shapes[name]
            if "item_seq" not in self.shapes:
                return (-1, TOP_K)  # what TensorRT reports before the input shapes are known
            return (self.shapes["item_seq"][0], TOP_K)

        def execute_async_v3(self, stream: int) -> bool:
            order.append("context.execute_async_v3")
            calls["stream"] = stream
            if stream == 0:
                log(self.engine.logger, Severity.ERROR, "legacy default stream: refused by the strict fake")
                return False
            names = self.engine.names
            if set(self.addresses) != set(names) or set(self.shapes) != set(self.engine.inputs):
                log(self.engine.logger, Severity.ERROR, "missing input shape or tensor address")
                return False
            bufs = {n: HostDevice.buffers.get(self.addresses[n]) for n in names}
            seq, lens = bufs["item_seq"], bufs["item_seq_len"]
            for name in self.engine.inputs:
                buf = bufs[name]
                if buf is None or tuple(buf.shape) != self.shapes[name] or buf.dtype != torch.int64:
                    log(self.engine.logger, Severity.ERROR, f"{name}: input buffer does not match its shape")
                    return False
            assert seq is not None and lens is not None
            for name, (_, dtype) in _OUTPUTS.items():
                out = bufs[name]
                want = self.get_tensor_shape(name)
                if out is None or tuple(out.shape) != want or out.dtype != dtype:
                    got = None if out is None else (tuple(out.shape), out.dtype)
                    msg = f"{name}: buffer {got}, engine needs {want} {dtype}"
                    log(self.engine.logger, Severity.ERROR, msg)
                    return False
            # outputs derived from the inputs: last valid item + j (+ 1000 * first excluded item), length + j
            last = seq[torch.arange(seq.shape[0]), lens.clamp(1, seq.shape[1]) - 1]
            excl = bufs.get("exclude_items")
            if excl is not None:
                last = last + 1000 * excl[:, 0]
            j = torch.arange(TOP_K)
            bufs["top_items"].copy_((last[:, None] + j).to(torch.int32))
            bufs["top_scores"].copy_((lens[:, None] + j).to(torch.float32))
            return True

    class Engine:
        def __init__(self, plan: dict[str, Any], logger: Any) -> None:
            self.profile = {k: tuple(tuple(x) for x in v) for k, v in plan["profile"].items()}
            self.logger = logger
            self.inputs = list(self.profile)
            self.names = [*self.inputs, *(_OUTPUTS)]
            self.num_io_tensors = len(self.names)

        def get_tensor_name(self, i: int) -> str:
            return self.names[i]

        def get_tensor_mode(self, name: str) -> TensorIOMode:
            return TensorIOMode.OUTPUT if name in _OUTPUTS else TensorIOMode.INPUT

        def get_tensor_dtype(self, name: str) -> DataType:
            return _OUTPUTS[name][0] if name in _OUTPUTS else DataType.INT64

        def create_execution_context(self) -> Context:
            order.append("engine.create_execution_context")
            return Context(self)

    class Runtime:
        def __init__(self, logger: Any) -> None:
            self.logger = logger

        def deserialize_cuda_engine(self, data: bytes) -> Engine | None:
            order.append("runtime.deserialize_cuda_engine")
            plan = json.loads(data)
            if plan["plugin"] and not loaded:
                log(self.logger, Severity.ERROR, "Cannot find plugin creator m4r::SelectiveScan version 1")
                return None
            return Engine(plan, self.logger)

    registry = Registry()
    trt.get_plugin_registry = lambda: registry  # type: ignore[attr-defined]
    trt.__version__ = version  # type: ignore[attr-defined]
    for name, obj in {
        "ILogger": ILogger,
        "Builder": Builder,
        "OnnxParser": OnnxParser,
        "Runtime": Runtime,
        "Dims": tuple,
        "DataType": DataType,
        "TensorIOMode": TensorIOMode,
        "NetworkDefinitionCreationFlag": types.SimpleNamespace(STRONGLY_TYPED=1),
        "MemoryPoolType": types.SimpleNamespace(WORKSPACE=0),
    }.items():
        setattr(trt, name, obj)
    return trt


@contextlib.contextmanager
def no_buffers() -> Iterator[None]:
    """Forget the registered host buffers afterwards (they are keyed by address)."""
    try:
        yield
    finally:
        HostDevice.buffers.clear()
