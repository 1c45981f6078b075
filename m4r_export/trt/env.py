"""What this machine offers: a real TensorRT Python package, and CUDA GPUs.

``import tensorrt`` succeeding proves nothing: with tensorrt-stubs installed (the type-checking setup)
it imports as an empty namespace package. A real installation is recognised by ``tensorrt.Builder``.
GPUs are queried through the CUDA driver API with ctypes, so that the answer does not depend on
whether torch was built with CUDA.
"""

from __future__ import annotations

import ctypes
import importlib
from dataclasses import dataclass
from types import ModuleType

from ..errors import M4RError

INSTALL_HINT = "install TensorRT 10.8 or newer with its Python bindings (e.g. pip install tensorrt)"
#: Oldest TensorRT m4r supports. Before 10.7 onnx-tensorrt imports a node's ONNX local function instead of a
#: registered plugin, and fails on the SelectiveScan body's string `If` far from the cause; 10.8 is the
#: oldest release the plugin is compiled against (scripts/check_trt_headers.sh).
MIN_TENSORRT = (10, 8)


def version_problem(version: str) -> str | None:
    """None when TensorRT ``version`` (e.g. "10.8.0.43") is supported, otherwise why not."""
    try:
        found = tuple(int(p) for p in version.split(".")[:2])
    except ValueError:
        return f"cannot read the TensorRT version {version!r}; {INSTALL_HINT}"
    if len(found) < 2 or found < MIN_TENSORRT:
        need = ".".join(map(str, MIN_TENSORRT))
        return (
            f"TensorRT {version} is too old: m4r needs TensorRT >= {need} (older releases import the "
            f"SelectiveScan node's ONNX function body instead of the plugin, which TensorRT cannot run); "
            f"{INSTALL_HINT}"
        )
    return None


def _import_tensorrt() -> tuple[ModuleType | None, str | None]:
    try:
        trt = importlib.import_module("tensorrt")
    except ImportError as exc:
        return None, f"the tensorrt Python package is not installed ({exc}); {INSTALL_HINT}"
    except Exception as exc:  # a broken install raises anything from its __init__
        return None, f"importing tensorrt failed ({type(exc).__name__}: {exc}); {INSTALL_HINT}"
    if not hasattr(trt, "Builder"):
        where = ", ".join(getattr(trt, "__path__", None) or [str(getattr(trt, "__file__", "?"))])
        return None, (
            f"'tensorrt' at {where} is only type stubs or a "
            f"placeholder (tensorrt.Builder is missing); {INSTALL_HINT}"
        )
    problem = version_problem(str(getattr(trt, "__version__", "unknown")))
    if problem is not None:
        return None, problem
    return trt, None


def tensorrt_unavailable_reason() -> str | None:
    """None when a usable TensorRT Python package is importable, otherwise why not."""
    return _import_tensorrt()[1]


def load_tensorrt() -> ModuleType:
    """The real ``tensorrt`` module (>= 10.8), or an M4RError saying why it is unusable."""
    trt, reason = _import_tensorrt()
    if trt is None:
        raise M4RError(f"TensorRT is unavailable: {reason}")
    return trt


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    compute_capability: str  # "8.9"


# CUdevice_attribute values from cuda.h (stable since CUDA 2.x).
_CC_MAJOR = 75
_CC_MINOR = 76


def _cuda_driver() -> tuple[ctypes.CDLL | None, str | None]:
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            return ctypes.CDLL(name), None
        except OSError:
            continue
    return (
        None,
        "no NVIDIA driver found (libcuda.so.1 cannot be loaded); TensorRT needs an NVIDIA GPU and driver",
    )


def list_gpus() -> tuple[list[GpuInfo], str | None]:
    """GPUs visible to the CUDA driver, or an empty list and the reason there are none."""
    cuda, reason = _cuda_driver()
    if cuda is None:
        return [], reason
    rc = cuda.cuInit(0)
    if rc != 0:
        return (
            [],
            f"the CUDA driver failed to initialise (cuInit error {rc}); "
            "check the driver and CUDA_VISIBLE_DEVICES",
        )
    count = ctypes.c_int(0)
    rc = cuda.cuDeviceGetCount(ctypes.byref(count))
    if rc != 0 or count.value == 0:
        return [], "the CUDA driver reports no GPU (check CUDA_VISIBLE_DEVICES)"
    gpus = []
    for i in range(count.value):
        dev = ctypes.c_int(0)
        cuda.cuDeviceGet(ctypes.byref(dev), i)
        name = ctypes.create_string_buffer(256)
        cuda.cuDeviceGetName(name, 256, dev)
        major, minor = ctypes.c_int(0), ctypes.c_int(0)
        cuda.cuDeviceGetAttribute(ctypes.byref(major), _CC_MAJOR, dev)
        cuda.cuDeviceGetAttribute(ctypes.byref(minor), _CC_MINOR, dev)
        gpus.append(GpuInfo(i, name.value.decode(errors="replace"), f"{major.value}.{minor.value}"))
    return gpus, None


def gpu_unavailable_reason() -> str | None:
    """None when at least one CUDA GPU is visible, otherwise why not."""
    gpus, reason = list_gpus()
    return None if gpus else reason
