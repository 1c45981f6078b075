"""Run a TensorRT engine built by :mod:`.engine`: ``TrtRunner(engine).run(item_seq, item_seq_len)``.

Device buffers come from torch (a CUDA build of torch is required to run engines from Python); the
engine's manifest is checked first so that a wrong TensorRT version, GPU, plugin build or input shape
fails with a message that names the fix instead of a TensorRT deserialisation error. The runner enqueues
on its own CUDA stream (not the legacy default stream, on which TensorRT adds device synchronisations).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import M4RError, UsageError
from ..fileio import sha256_file
from .engine import load_plugin_library, logged, make_logger
from .env import list_gpus, load_tensorrt
from .manifest import (
    EXCLUDE_INPUT,
    INPUT_NAMES,
    ShapeProfile,
    check_engine_compatible,
    check_inputs_in_profile,
    read_manifest,
)
from .native import find_plugin_library

if TYPE_CHECKING:
    import tensorrt
    import torch


def _torch_dtype(trt_dtype: tensorrt.DataType) -> torch.dtype:
    import tensorrt as trt
    import torch

    table = {
        trt.DataType.FLOAT: torch.float32,
        trt.DataType.HALF: torch.float16,
        trt.DataType.BF16: torch.bfloat16,
        trt.DataType.INT32: torch.int32,
        trt.DataType.INT64: torch.int64,
        trt.DataType.INT8: torch.int8,
        trt.DataType.BOOL: torch.bool,
    }
    if trt_dtype not in table:
        raise M4RError(f"engine output type {trt_dtype} is not supported by the m4r runner")
    return table[trt_dtype]


class CudaDevice:
    """Device buffers and the stream of a runner, through torch. Tests substitute a host version."""

    def __init__(self, index: int) -> None:
        import torch

        if not torch.cuda.is_available():
            raise M4RError(
                "running a TensorRT engine from Python needs a CUDA build of torch "
                "(pip install torch --index-url https://download.pytorch.org/whl/cu128)"
            )
        self.device = torch.device("cuda", index)
        self.stream = torch.cuda.Stream(self.device)  # the runner's own stream

    def scope(self) -> Any:
        import torch

        return torch.cuda.device(self.device)

    def upload(self, host: torch.Tensor) -> torch.Tensor:
        import torch

        with torch.cuda.stream(self.stream):
            return host.to(self.device).contiguous()

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        import torch

        with torch.cuda.stream(self.stream):
            return torch.empty(shape, dtype=dtype, device=self.device)

    def stream_handle(self) -> int:
        return int(self.stream.cuda_stream)

    def synchronize(self) -> None:
        self.stream.synchronize()


class TrtRunner:
    """One engine, one execution context, on GPU ``device``. Not thread-safe (one context)."""

    name = "tensorrt"

    def __init__(
        self,
        engine_path: Path,
        *,
        plugin_library: Path | None = None,
        device: int = 0,
        engine_bytes: bytes | None = None,
    ) -> None:
        """engine_bytes: the engine's bytes as already read and checked (else read from engine_path)."""
        load_tensorrt()
        import tensorrt as trt

        self.engine_path = Path(engine_path)
        if not self.engine_path.is_file():
            raise UsageError(f"engine {self.engine_path} does not exist; build it with `m4r build-engine`")
        manifest = read_manifest(self.engine_path)
        gpus, why = list_gpus()
        if device >= len(gpus):
            raise M4RError(f"GPU {device} is not available ({why or f'{len(gpus)} GPU(s) visible'})")
        self.warnings = check_engine_compatible(
            manifest, self.engine_path, trt.__version__, gpus[device].name, gpus[device].compute_capability
        )
        self.profile = ShapeProfile.from_json(manifest["profile"])
        self._dev = CudaDevice(device)
        self._logger = make_logger()
        if manifest.get("plugin") is not None:
            self._load_plugin(manifest["plugin"], plugin_library, gpus[device].compute_capability)

        self._runtime = trt.Runtime(self._logger)
        with self._dev.scope():
            data = engine_bytes if engine_bytes is not None else self.engine_path.read_bytes()
            engine = self._runtime.deserialize_cuda_engine(data)
            if engine is None:
                raise M4RError(
                    f"TensorRT could not deserialise {self.engine_path}; rebuild it with `m4r build-engine` "
                    f"on this machine{logged(self._logger)}"
                )
            self._engine: tensorrt.ICudaEngine = engine
            self._context: tensorrt.IExecutionContext = engine.create_execution_context()
        self._names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.output_names = [n for n in self._names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        #: the engine takes exclude_items [batch, E] (E within the profile, >= 1)
        self.takes_exclude = EXCLUDE_INPUT in self._names

    def _load_plugin(self, recorded: dict[str, Any], explicit: Path | None, compute_capability: str) -> None:
        """Load the plugin the engine was built with: same file contents (sha256) as the manifest records."""
        try:
            library = find_plugin_library(explicit, compute_capability.replace(".", ""))
        except M4RError as exc:
            raise M4RError(
                f"engine {self.engine_path} uses the m4r SelectiveScan plugin "
                f"({recorded['library']}), but it cannot be found: {exc}"
            ) from exc
        want = recorded.get("sha256")
        got = sha256_file(library)
        if want and got != want:
            raise M4RError(
                f"plugin {library} (sha256 {got[:12]}) is not the build engine {self.engine_path} was made "
                f"with (sha256 {str(want)[:12]}); pass that library with --plugin or rebuild the engine with "
                "`m4r build-engine` against this one"
            )
        load_plugin_library(library, self._logger)

    def run(
        self, item_seq: np.ndarray, item_seq_len: np.ndarray, exclude_items: np.ndarray | None = None
    ) -> dict[str, np.ndarray]:
        """item_seq int [batch, seq] (right-padded with 0), item_seq_len int [batch] -> outputs by name.

        ``exclude_items`` int [batch, E] for engines that take it (None: zeros [batch, 1], nothing).
        """
        import torch

        item_seq = np.asarray(item_seq)
        item_seq_len = np.asarray(item_seq_len)
        if item_seq.ndim != 2 or item_seq_len.shape != (item_seq.shape[0],):
            raise UsageError(
                f"expected item_seq [batch, seq] and item_seq_len [batch], got shapes {item_seq.shape} "
                f"and {item_seq_len.shape}"
            )
        if not (np.issubdtype(item_seq.dtype, np.integer) and np.issubdtype(item_seq_len.dtype, np.integer)):
            raise UsageError(
                f"item_seq and item_seq_len must be integers, got {item_seq.dtype}, {item_seq_len.dtype}"
            )
        batch, seq = item_seq.shape
        exclude = None
        if self.takes_exclude:
            exclude = np.zeros((batch, 1), np.int64) if exclude_items is None else np.asarray(exclude_items)
            if exclude.ndim != 2 or exclude.shape[0] != batch or not np.issubdtype(exclude.dtype, np.integer):
                raise UsageError(f"exclude_items must be integers [batch={batch}, E], got {exclude.shape}")
        elif exclude_items is not None:
            raise UsageError(f"engine {self.engine_path} has no exclude_items input (exported without it)")
        check_inputs_in_profile(self.profile, batch, seq, None if exclude is None else exclude.shape[1])

        feeds = {
            INPUT_NAMES[0]: torch.from_numpy(item_seq.astype(np.int64)),
            INPUT_NAMES[1]: torch.from_numpy(item_seq_len.astype(np.int64)),
        }
        if exclude is not None:
            feeds[EXCLUDE_INPUT] = torch.from_numpy(exclude.astype(np.int64))
        ctx = self._context
        dev = self._dev
        buffers: dict[str, Any] = {}
        with dev.scope():
            for name, host in feeds.items():
                buf = dev.upload(host)
                buffers[name] = buf
                if not ctx.set_input_shape(name, tuple(buf.shape)):
                    raise M4RError(
                        f"TensorRT rejected shape {tuple(buf.shape)} for {name}{logged(self._logger)}"
                    )
                ctx.set_tensor_address(name, buf.data_ptr())
            for name in self.output_names:
                # sized from the engine's output shape for these inputs, never from an input's shape
                dims = ctx.get_tensor_shape(name)
                shape = tuple(dims[i] for i in range(len(dims)))
                out = dev.empty(shape, _torch_dtype(self._engine.get_tensor_dtype(name)))
                buffers[name] = out
                ctx.set_tensor_address(name, out.data_ptr())
            if not ctx.execute_async_v3(dev.stream_handle()):
                raise M4RError(f"TensorRT inference failed{logged(self._logger)}")
            dev.synchronize()
        return {name: buffers[name].cpu().numpy() for name in self.output_names}
