"""TensorRT backend: plugin build and discovery, engine build, engine runner.

Nothing here imports ``tensorrt`` (or torch) at module import time: ``m4r export`` and the tests run on
machines without TensorRT, where :func:`try_build_engine` reports exactly why it skipped.

Modules:
  * :mod:`.env`     -- is a real TensorRT there (not just tensorrt-stubs)? is there a GPU?
  * :mod:`.native`  -- find the plugin sources, drive CMake, find the built libraries
  * :mod:`.engine`  -- ONNX -> strongly typed engine + JSON manifest; ``try_build_engine``
  * :mod:`.manifest`-- manifest contents and the compatibility / profile checks
  * :mod:`.runner`  -- ``TrtRunner.run(item_seq, item_seq_len) -> dict[str, np.ndarray]``
  * :mod:`.selftest`-- GPU self-check of the CUDA kernels (``scripts/gpu_check.sh``)
"""

from __future__ import annotations

from .engine import EngineBuildResult, ShapeProfile, build_engine, try_build_engine
from .env import gpu_unavailable_reason, tensorrt_unavailable_reason
from .native import build_native, find_plugin_library

__all__ = [
    "EngineBuildResult",
    "ShapeProfile",
    "build_engine",
    "build_native",
    "find_plugin_library",
    "gpu_unavailable_reason",
    "tensorrt_unavailable_reason",
    "try_build_engine",
]
