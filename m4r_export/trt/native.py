"""The native libraries: where their sources are, how to build them, where the built files are.

Sources: ``plugins/`` (a standalone CMake project) sits next to the package in a clone; an installed
wheel ships the same tree as package data in ``m4r_export/_plugins``. Builds go to a cache directory
keyed by the sources, the target CUDA architectures and the nvcc version, so an upgraded package, another
GPU architecture or another CUDA toolkit never picks up a stale plugin.

Libraries (all in ``<build>/lib``):
  * ``libm4r_trt_plugin.so``        TensorRT plugin, dynamic entry points (loadLibrary, --dynamicPlugins)
  * ``libm4r_trt_plugin_static.so`` TensorRT plugin, registers itself at load (LD_PRELOAD, --staticPlugins)
  * ``libm4r_scan_cuda.so``         CUDA kernels with a C entry point (self-check)
  * ``libm4r_scan_cpu.so``          CPU reference with a C entry point (tests)
  * ``libm4r_ort_ops.so``           ONNX Runtime custom-op library (m4r_export.onnx.ort_ops)
  * ``libm4r_scan_native.so``       optimised CPU kernel, C ABI (the ``native`` scan backend)

``m4r build-native`` builds only the CPU libraries (no CUDA, seconds) into a cache directory of its
own, so that it never reconfigures the directory ``m4r build-plugin`` uses.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import M4RError, UsageError

PLUGIN_LIBRARY = "libm4r_trt_plugin.so"
PLUGIN_STATIC_LIBRARY = "libm4r_trt_plugin_static.so"
SCAN_CUDA_LIBRARY = "libm4r_scan_cuda.so"
SCAN_CPU_LIBRARY = "libm4r_scan_cpu.so"
SCAN_NATIVE_LIBRARY = "libm4r_scan_native.so"
ORT_OPS_LIBRARY = "libm4r_ort_ops.so"
PLUGIN_ENV = "M4R_TRT_PLUGIN"

_PACKAGE_DIR = Path(__file__).resolve().parent.parent


def source_dir() -> Path:
    """The plugins/ CMake project: shipped in the wheel, or next to the package in a clone."""
    candidates = [_PACKAGE_DIR / "_plugins", _PACKAGE_DIR.parent / "plugins"]
    for cand in candidates:
        if (cand / "CMakeLists.txt").is_file() and (cand / "cmake" / "M4RNative.cmake").is_file():
            return cand
    raise M4RError(
        "the plugin sources are missing (looked in " + ", ".join(str(c) for c in candidates) + "); "
        "reinstall m4r-export from a wheel that includes them, or run from a clone of the repository"
    )


def _sources_digest(src: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in src.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        h.update(str(path.relative_to(src)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def _nvcc_version() -> str:
    """``nvcc --version``'s release line (e.g. "release 13.0, V13.0.88"), or "no-nvcc"."""
    nvcc = os.environ.get("CUDACXX") or shutil.which("nvcc")
    if not nvcc:
        return "no-nvcc"
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return "no-nvcc"
    lines = [ln.strip() for ln in out.splitlines() if "release" in ln]
    return lines[-1] if lines else out.strip()[-80:]


def build_key(src: Path, cuda_archs: str | None) -> str:
    """Cache key of a build: sources + target CUDA architectures + nvcc version.

    A library built for sm_90 must not be reused on an sm_80 node sharing the cache ("no kernel image"
    at every enqueue), nor one built by another CUDA toolkit.
    """
    archs = ";".join(sorted(a for a in (cuda_archs or "default").replace(",", ";").split(";") if a))
    h = hashlib.sha256()
    h.update(_sources_digest(src).encode())
    h.update(b"\0archs=" + archs.encode() + b"\0nvcc=" + _nvcc_version().encode())
    return h.hexdigest()[:12]


def default_build_dir(cuda_archs: str | None = None, *, cpu_only: bool = False) -> Path:
    """``$M4R_CACHE_DIR`` (or ``~/.cache/m4r``) ``/native/<build_key(sources, cuda_archs, nvcc)>``, or
    ``/native-cpu/<sources hash>`` if cpu_only (no CUDA code: archs and nvcc do not matter).

    cuda_archs None: the CMake default list (75;80;86;87;89;90).
    """
    root = os.environ.get("M4R_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "m4r"
    )
    if cpu_only:
        return Path(root) / "native-cpu" / _sources_digest(source_dir())
    return Path(root) / "native" / build_key(source_dir(), cuda_archs)


@dataclass
class NativeBuild:
    build_dir: Path
    libraries: dict[str, Path] = field(default_factory=dict)
    log_path: Path | None = None

    @property
    def plugin(self) -> Path | None:
        return self.libraries.get(PLUGIN_LIBRARY)


def _check_tensorrt_root(root: Path) -> None:
    heads = [root / "include" / "NvInferRuntime.h", root / "NvInferRuntime.h"]
    if not any(h.is_file() for h in heads):
        raise UsageError(
            f"--tensorrt-root {root}: NvInferRuntime.h not found in {root}/include; point it at a TensorRT "
            "install or SDK (the folder holding include/ and lib/)"
        )


def _run(cmd: list[str], log_file: Path, echo: Callable[[str], None] | None) -> None:
    with open(log_file, "a", encoding="utf-8") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        tail: list[str] = []
        for line in proc.stdout:
            log.write(line)
            tail = (tail + [line.rstrip()])[-25:]
            if echo is not None:
                echo(line.rstrip())
        rc = proc.wait()
    if rc != 0:
        raise M4RError(
            f"`{' '.join(cmd[:3])} ...` failed (exit {rc}); full log: {log_file}\n" + "\n".join(tail)
        )


def _check_configured_for_plugin(out: Path, log_path: Path) -> None:
    """Raise, naming the missing piece, when CMake's configure step found no nvcc or TensorRT headers."""
    cache: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in (out / "CMakeCache.txt").read_text(encoding="utf-8", errors="replace").splitlines():
            key, sep, value = line.partition("=")
            if sep and not line.startswith(("#", "//")):
                cache[key.split(":")[0]] = value

    def missing(key: str) -> bool:
        return not cache.get(key) or cache[key].endswith("NOTFOUND")

    if missing("CMAKE_CUDA_COMPILER"):
        why = "nvcc was not found (put the CUDA toolkit's bin/ on PATH or set CUDACXX)"
    elif missing("TensorRT_INCLUDE_DIR"):
        why = (
            "the TensorRT headers (NvInferRuntime.h) were not found (pass --tensorrt-root or set "
            "TensorRT_ROOT to the folder holding include/)"
        )
    else:
        return
    raise M4RError(f"the TensorRT plugin cannot be built: {why}; nothing was compiled. CMake log: {log_path}")


def _forget_other_source_tree(out: Path, src: Path) -> None:
    """Drop CMake's cache when ``out`` was configured from another copy of the same sources.

    The cache directory is keyed by the sources' *content*, so a clone, a worktree and an installed
    wheel share it; CMake refuses a build tree configured from a different source path.
    """
    cache = out / "CMakeCache.txt"
    if not cache.is_file():
        return
    for line in cache.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("CMAKE_HOME_DIRECTORY:"):
            configured = line.split("=", 1)[-1].strip()
            if Path(configured).resolve() != src.resolve():
                cache.unlink()
                shutil.rmtree(out / "CMakeFiles", ignore_errors=True)
            return


def build_native(
    build_dir: Path | None = None,
    *,
    tensorrt_root: Path | None = None,
    onnxruntime_root: Path | None = None,
    cuda_archs: str | None = None,
    with_cuda: bool = True,
    build_tests: bool = False,
    require_plugin: bool = False,
    targets: list[str] | None = None,
    jobs: int | None = None,
    echo: Callable[[str], None] | None = None,
) -> NativeBuild:
    """Configure and build plugins/ with CMake; returns the built libraries.

    cuda_archs: CMAKE_CUDA_ARCHITECTURES, e.g. "89" or "80;86" (default: 75;80;86;87;89;90).
    require_plugin: raise, naming the missing piece, unless the TensorRT plugin was built.
    targets: CMake targets to build (default: all).
    """
    cmake = shutil.which("cmake")
    if cmake is None:
        raise M4RError("cmake not found on PATH; install CMake 3.18 or newer (e.g. pip install cmake)")
    if tensorrt_root is not None:
        _check_tensorrt_root(tensorrt_root)
    src = source_dir()
    out = (build_dir or default_build_dir(cuda_archs)).resolve()
    out.mkdir(parents=True, exist_ok=True)
    _forget_other_source_tree(out, src)
    log_path = out / "m4r-build.log"
    log_path.write_text("", encoding="utf-8")
    cfg = [cmake, "-S", str(src), "-B", str(out), "-DCMAKE_BUILD_TYPE=Release"]
    cfg.append(f"-DM4R_WITH_CUDA={'ON' if with_cuda else 'OFF'}")
    cfg.append(f"-DM4R_BUILD_TESTS={'ON' if build_tests else 'OFF'}")
    if tensorrt_root is not None:
        cfg.append(f"-DTensorRT_ROOT={tensorrt_root.resolve()}")
    if onnxruntime_root is not None:
        cfg.append(f"-DONNXRUNTIME_ROOT={onnxruntime_root.resolve()}")
    if cuda_archs:
        cfg.append(f"-DCMAKE_CUDA_ARCHITECTURES={cuda_archs}")
    _run(cfg, log_path, echo)
    if require_plugin:  # configure already knows: fail now, not after minutes of CUDA compilation
        _check_configured_for_plugin(out, log_path)
    build_cmd = [cmake, "--build", str(out), "-j", str(jobs or os.cpu_count() or 2)]
    for target in targets or []:
        build_cmd += ["--target", target]
    _run(build_cmd, log_path, echo)

    result = NativeBuild(out, log_path=log_path)
    for name in (
        PLUGIN_LIBRARY,
        PLUGIN_STATIC_LIBRARY,
        SCAN_CUDA_LIBRARY,
        SCAN_CPU_LIBRARY,
        SCAN_NATIVE_LIBRARY,
        ORT_OPS_LIBRARY,
    ):
        path = out / "lib" / name
        if path.is_file():
            result.libraries[name] = path
    if require_plugin and result.plugin is None:
        why = (
            "nvcc was not found (put the CUDA toolkit's bin/ on PATH or set CUDACXX)"
            if SCAN_CUDA_LIBRARY not in result.libraries
            else "the TensorRT headers were not found (pass --tensorrt-root or set TensorRT_ROOT)"
        )
        raise M4RError(f"the TensorRT plugin was not built: {why}; CMake log: {log_path}")
    return result


def find_library(
    name: str, explicit: Path | None = None, env_var: str | None = None, cuda_archs: str | None = None
) -> Path:
    """An explicit path, then $env_var, then the build directory for ``cuda_archs`` (then the one for the
    default architecture list); else a clear error."""
    if explicit is not None:
        if not explicit.is_file():
            raise UsageError(f"library {explicit} does not exist; pass the path of a built {name}")
        return explicit
    looked: list[str] = []
    if env_var:
        value = os.environ.get(env_var)
        if value:
            if Path(value).is_file():
                return Path(value)
            raise UsageError(f"${env_var}={value} does not exist; unset it or point it at a built {name}")
        looked.append(f"${env_var} (unset)")
    try:
        archs = [cuda_archs, None] if cuda_archs else [None]
        candidates = [default_build_dir(a) / "lib" / name for a in archs]
    except M4RError:
        candidates = []
    for candidate in candidates:
        if candidate.is_file():
            return candidate
        looked.append(str(candidate))
    raise M4RError(
        f"{name} not found (looked in: {', '.join(looked)}); build it with `m4r build-plugin` "
        f"(needs nvcc, cmake and the TensorRT headers) or pass its path"
    )


def find_plugin_library(explicit: Path | None = None, cuda_archs: str | None = None) -> Path:
    """The dynamic TensorRT plugin: explicit path, $M4R_TRT_PLUGIN, or the `m4r build-plugin` output
    (for ``cuda_archs``, e.g. "89", or for the default architecture list)."""
    return find_library(PLUGIN_LIBRARY, explicit, PLUGIN_ENV, cuda_archs)


def find_or_build_plugin(
    explicit: Path | None = None, *, cuda_archs: str | None = None, echo: Callable[[str], None] | None = None
) -> Path:
    """The plugin library; when it is nowhere to be found, build it into the default build directory.

    An explicit path is never replaced by a build. cuda_archs: e.g. "89" for the GPU at hand (one
    architecture builds in about a minute).
    """
    try:
        return find_plugin_library(explicit, cuda_archs)
    except UsageError:
        raise
    except M4RError as missing:
        if explicit is not None:
            raise
        try:
            build = build_native(cuda_archs=cuda_archs, require_plugin=True, echo=echo)
        except M4RError as exc:
            raise M4RError(f"{missing}; building it failed: {exc}") from exc
        assert build.plugin is not None  # require_plugin
        return build.plugin
