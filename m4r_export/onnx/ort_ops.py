"""The ONNX Runtime custom-op library ``libm4r_ort_ops.so``: finding, checking, loading, building it.

The library registers ``m4r::SelectiveScan`` (version 1) for ONNX Runtime's CPU execution provider. The
exported model is the same file either way: a session with the library runs the native kernel, a
session without it inlines the node's ONNX function body (standard ops). The library is built from
``plugins/`` (shipped in the wheel) against ONNX Runtime's C/C++ headers of API version N and then
needs onnxruntime >= 1.N in the process that loads it.

Where it is looked for (:func:`find_ort_ops_library`): an explicit path, ``$M4R_ORT_OPS``, then the
output of ``m4r build-ort-ops`` (the default native build directory).
"""

from __future__ import annotations

import ctypes
import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import M4RError, UsageError
from ..trt.native import ORT_OPS_LIBRARY

ORT_OPS_ENV = "M4R_ORT_OPS"
ONNXRUNTIME_ROOT_ENV = "ONNXRUNTIME_ROOT"

# ELF e_machine of the platforms ONNX Runtime wheels exist for
_ELF_MACHINES = {62: "x86_64", 183: "aarch64", 3: "i386", 40: "arm", 21: "ppc64", 22: "s390x"}
_HOST_MACHINE = {"amd64": "x86_64", "arm64": "aarch64"}


def _default_candidate() -> Path | None:
    from ..trt.native import default_build_dir

    try:
        return default_build_dir(cpu_only=True) / "lib" / ORT_OPS_LIBRARY
    except M4RError:  # no plugin sources in this install
        return None


def find_ort_ops_library(explicit: str | os.PathLike[str] | None = None) -> Path | None:
    """The custom-op library to load, or None when none is given or built.

    ``explicit`` (a path that must exist), else ``$M4R_ORT_OPS`` (must exist when set), else the
    ``m4r build-ort-ops`` output for the installed sources. Used by the Python session helpers,
    ``m4r verify``/``m4r bench`` and the Triton generator (``model_operations { op_library_filename }``).
    """
    if explicit is not None:
        path = Path(explicit)
        if not path.is_file():
            raise UsageError(
                f"--ort-ops {path}: no such file; pass the path of a built {ORT_OPS_LIBRARY} "
                "(`m4r build-ort-ops` prints it)"
            )
        return path.resolve()
    value = os.environ.get(ORT_OPS_ENV)
    if value:
        if not Path(value).is_file():
            raise UsageError(
                f"${ORT_OPS_ENV}={value} does not exist; unset it or point it at a built {ORT_OPS_LIBRARY}"
            )
        return Path(value).resolve()
    candidate = _default_candidate()
    return candidate if candidate is not None and candidate.is_file() else None


def require_ort_ops_library(explicit: str | os.PathLike[str] | None = None) -> Path:
    """:func:`find_ort_ops_library`, with an error saying how to build it when there is none."""
    found = find_ort_ops_library(explicit)
    if found is None:
        raise M4RError(
            f"{ORT_OPS_LIBRARY} not found (no --ort-ops, ${ORT_OPS_ENV} unset, nothing at "
            f"{_default_candidate()}); build it with `m4r build-ort-ops --onnxruntime-root DIR` "
            "or pass its path with --ort-ops"
        )
    return found


def _elf_machine(path: Path) -> str:
    head = path.read_bytes()[:20] if path.stat().st_size < 64 else path.open("rb").read(20)
    if head[:4] != b"\x7fELF" or len(head) < 20:
        raise UsageError(
            f"--ort-ops {path}: not a shared library (no ELF header); pass a built {ORT_OPS_LIBRARY}"
        )
    machine = int.from_bytes(head[18:20], "little" if head[5] == 1 else "big")
    return _ELF_MACHINES.get(machine, f"machine {machine}")


def _library_api_version(path: Path) -> int | None:
    """ORT_API_VERSION the library was built with (its own export); None if it does not say."""
    try:
        lib = ctypes.CDLL(str(path))
        fn = lib.m4r_ort_ops_api_version
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_int32
    return int(fn())


def check_ort_ops_library(path: Path) -> dict[str, Any]:
    """Check that ``path`` can be loaded by this process's onnxruntime; returns its description.

    Raises :class:`UsageError` for a file of another architecture or a non-library, and
    :class:`M4RError` when this onnxruntime is older than the headers the library was built with.
    """
    import onnxruntime as ort

    from ..fileio import sha256_file

    machine = _elf_machine(path)
    host = _HOST_MACHINE.get(platform.machine().lower(), platform.machine().lower())
    if machine != host:
        raise UsageError(
            f"--ort-ops {path}: built for {machine}, but this machine is {host}; rebuild it here with "
            "`m4r build-ort-ops`"
        )
    api = _library_api_version(path)
    runtime = tuple(int(p) for p in ort.__version__.split(".")[:2] if p.isdigit())
    if api is not None and len(runtime) == 2 and runtime[0] == 1 and runtime[1] < api:
        raise M4RError(
            f"{path} was built against ONNX Runtime API {api} headers and needs onnxruntime >= 1.{api}, but "
            f"onnxruntime {ort.__version__} is installed; upgrade onnxruntime or rebuild the library against "
            f"the headers of {ort.__version__} (`m4r build-ort-ops --onnxruntime-root DIR`)"
        )
    return {
        "path": str(path),
        "sha256": sha256_file(path),
        "api_version": api,
        "onnxruntime": ort.__version__,
    }


def register_ort_ops(session_options: Any, path: Path) -> dict[str, Any]:
    """Check ``path`` and register it with ``session_options``; returns its description for reports."""
    info = check_ort_ops_library(path)
    try:
        session_options.register_custom_ops_library(str(path))
    except Exception as exc:  # ORT raises its own exception types
        raise M4RError(f"ONNX Runtime could not load the custom-op library {path}: {exc}") from exc
    return info


def compute_calls(path: Path) -> int:
    """How many SelectiveScan nodes the library has executed in this process (0 if never loaded).

    The library ONNX Runtime loaded and the one ctypes opens here are the same object (same path),
    so this counter is the proof of which implementation ran.
    """
    lib = ctypes.CDLL(str(path))
    fn = lib.m4r_ort_ops_compute_calls
    fn.restype = ctypes.c_int64
    return int(fn())


def mixer_calls(path: Path) -> int | None:
    """How many fused MambaMixer nodes the library has executed in this process (None: a library without
    the fused op)."""
    lib = ctypes.CDLL(str(path))
    fn = getattr(lib, "m4r_ort_ops_mixer_calls", None)
    if fn is None:
        return None
    fn.restype = ctypes.c_int64
    return int(fn())


def topk_calls(path: Path) -> int | None:
    """How many ScoreTopK nodes the library has executed in this process (None: a library without the op)."""
    lib = ctypes.CDLL(str(path))
    fn = getattr(lib, "m4r_ort_ops_topk_calls", None)
    if fn is None:
        return None
    fn.restype = ctypes.c_int64
    return int(fn())


def mixer_step_calls(path: Path) -> int | None:
    """How many fused MambaMixerStep nodes (streaming step.onnx) the library has executed in this process
    (None: a library without the op)."""
    lib = ctypes.CDLL(str(path))
    fn = getattr(lib, "m4r_ort_ops_mixer_step_calls", None)
    if fn is None:
        return None
    fn.restype = ctypes.c_int64
    return int(fn())


def onnxruntime_root(explicit: Path | None) -> Path:
    """The folder with ONNX Runtime's C/C++ headers: explicit, then $ONNXRUNTIME_ROOT; checked."""
    root = explicit or (
        Path(os.environ[ONNXRUNTIME_ROOT_ENV]) if os.environ.get(ONNXRUNTIME_ROOT_ENV) else None
    )
    if root is None:
        raise UsageError(
            "ONNX Runtime's C/C++ headers are needed (they are not in the onnxruntime wheel): pass "
            "--onnxruntime-root DIR or set $ONNXRUNTIME_ROOT to an ONNX Runtime release folder (holding "
            "include/onnxruntime_cxx_api.h) or to the output of scripts/fetch_ort_headers.sh DIR"
        )
    if not any(
        (root / sub / "onnxruntime_cxx_api.h").is_file() for sub in ("include", "include/onnxruntime")
    ):
        raise UsageError(
            f"--onnxruntime-root {root}: include/onnxruntime_cxx_api.h not found; point it at an ONNX "
            "Runtime release folder or at the output of scripts/fetch_ort_headers.sh DIR"
        )
    return root


def build_ort_ops(
    build_dir: Path | None = None,
    *,
    onnxruntime_root_dir: Path | None = None,
    jobs: int | None = None,
    echo: Callable[[str], None] | None = None,
) -> Path:
    """Build ``libm4r_ort_ops.so`` from the shipped sources (CPU only, no CUDA needed); returns its path."""
    from ..trt.native import build_native, default_build_dir

    root = onnxruntime_root(onnxruntime_root_dir)
    build = build_native(
        build_dir or default_build_dir(cpu_only=True),
        with_cuda=False,
        onnxruntime_root=root,
        targets=[ORT_OPS_LIBRARY[3:-3]],
        jobs=jobs,
        echo=echo,
    )
    lib = build.libraries.get(ORT_OPS_LIBRARY)
    if lib is None:
        raise M4RError(
            f"{ORT_OPS_LIBRARY} was not built (CMake did not find the headers in {root}); "
            f"log: {build.log_path}"
        )
    return lib
