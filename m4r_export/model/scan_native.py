"""The ``native`` scan backend: the optimised C++ CPU kernel through its C ABI (ctypes).

The kernel (``plugins/selectiveScanPlugin/selectiveScanCpuFast.{h,cpp}``, ``libm4r_scan_native.so``)
implements the ``m4r::SelectiveScan`` contract -- forward for fp32/fp16/bf16 tensors with fp32 state,
backward in fp32 -- vectorised and threaded (it uses ``torch.get_num_threads()`` threads). It differs
from the ``reference`` loop only by fp32 rounding.

The library is found at ``$M4R_SCAN_LIB``, else in the build cache that ``m4r build-native`` (CPU
only, seconds) or ``m4r build-plugin`` fills. ``auto`` picks this backend for CPU tensors whenever the
library is found; without it ``auto`` stays on ``fast``.
"""

from __future__ import annotations

import ctypes
import functools
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import M4RError, UsageError

SCAN_LIB_ENV = "M4R_SCAN_LIB"
SCAN_NATIVE_LIBRARY = "libm4r_scan_native.so"
#: M4R_SCAN_NATIVE_ABI_VERSION of selectiveScanCpuFast.h this module is written against.
ABI_VERSION = 1

_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_ERRORS = {1: "bad argument", 2: "out of memory", 3: "a thread could not be started"}


def find_scan_library() -> Path | None:
    """``$M4R_SCAN_LIB``, else the newest build in the cache; ``None`` when there is none.

    A set but wrong ``$M4R_SCAN_LIB`` is an error rather than a silent fallback to ``fast``.
    """
    value = os.environ.get(SCAN_LIB_ENV)
    if value:
        if not Path(value).is_file():
            raise UsageError(
                f"${SCAN_LIB_ENV}={value} does not exist; unset it or point it at a built "
                f"{SCAN_NATIVE_LIBRARY} (`m4r build-native` prints its path)"
            )
        return Path(value)
    from ..trt.native import default_build_dir

    try:
        dirs = [default_build_dir(cpu_only=True), default_build_dir()]
    except M4RError:  # no plugin sources (a broken install): nothing to find
        return None
    for d in dirs:
        if (d / "lib" / SCAN_NATIVE_LIBRARY).is_file():
            return d / "lib" / SCAN_NATIVE_LIBRARY
    return None


def open_scan_library(path: Path) -> ctypes.CDLL:
    """Load and check one library file; errors name the file, the cause and the fix."""
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        raise M4RError(
            f"cannot load {path}: {exc}; rebuild it for this machine with `m4r build-native`"
        ) from exc
    try:
        lib.m4r_scan_native_abi_version.restype = ctypes.c_int
        abi = lib.m4r_scan_native_abi_version()
    except AttributeError as exc:
        raise M4RError(f"{path} is not {SCAN_NATIVE_LIBRARY} (no m4r_scan_native_abi_version)") from exc
    if abi != ABI_VERSION:
        raise M4RError(
            f"{path} has C ABI version {abi}, this m4r-export needs {ABI_VERSION}; "
            "rebuild it with `m4r build-native`"
        )
    ptr, i32 = ctypes.c_void_p, ctypes.c_int32
    lib.m4r_scan_native_forward.restype = ctypes.c_int
    lib.m4r_scan_native_forward.argtypes = [ptr] * 9 + [i32] * 7 + [ptr, i32]
    lib.m4r_scan_native_backward_f32.restype = ctypes.c_int
    lib.m4r_scan_native_backward_f32.argtypes = [ptr] * 9 + [i32] * 6 + [ptr] * 9 + [i32]
    lib.m4r_scan_native_isa.restype = ctypes.c_char_p
    return lib


@functools.lru_cache(maxsize=1)
def load_scan_library() -> ctypes.CDLL | None:
    """The library of :func:`find_scan_library`, loaded once per process; ``None`` when not built."""
    path = find_scan_library()
    return None if path is None else open_scan_library(path)


def native_available() -> bool:
    """Whether ``auto`` may use the native backend. A cached library that fails to load only warns."""
    try:
        return load_scan_library() is not None
    except UsageError:
        raise
    except M4RError as exc:
        warnings.warn(f"scan backend 'native' unavailable, using 'fast': {exc}", stacklevel=2)
        return False


def _library() -> ctypes.CDLL:
    lib = load_scan_library()
    if lib is None:
        raise M4RError(
            f"scan backend 'native' needs {SCAN_NATIVE_LIBRARY}: build it with `m4r build-native` "
            f"(cmake + a C++ compiler, seconds) or set ${SCAN_LIB_ENV} to its path"
        )
    return lib


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise M4RError(f"native scan {what} failed: {_ERRORS.get(rc, f'error {rc}')}")


class _NativeScan(torch.autograd.Function):
    """y = SelectiveScan(...) by the C kernel; the backward recomputes the states in C (fp32)."""

    @staticmethod
    def forward(
        ctx: Any,
        u: Tensor,
        delta: Tensor,
        A: Tensor,
        B: Tensor,
        C: Tensor,
        D: Tensor | None,
        z: Tensor | None,
        delta_bias: Tensor | None,
        lengths: Tensor | None,
        softplus: bool,
        last: bool,
    ) -> Tensor:
        batch, dim, seq_len = u.shape
        y = u.new_empty((batch, dim) if last else (batch, dim, seq_len))
        rc = _library().m4r_scan_native_forward(
            *(_ptr(t) for t in (u, delta, A, B, C, D, z, delta_bias, lengths)),
            batch,
            dim,
            seq_len,
            A.shape[1],
            int(softplus),
            int(last),
            _DTYPES[u.dtype],
            y.data_ptr(),
            torch.get_num_threads(),
        )
        _check(rc, "forward")
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, lengths)
        ctx.flags = (softplus, last)
        return y

    @staticmethod
    def backward(ctx: Any, gy: Tensor) -> tuple[Tensor | None, ...]:
        u, delta, A, B, C, D, z, delta_bias, lengths = ctx.saved_tensors
        softplus, last = ctx.flags

        def f32(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.float().contiguous()

        # Bound to names: a temporary's pointer would dangle by the time C reads it.
        uf, deltaf, Bf, Cf, zf, gyf = (f32(t) for t in (u, delta, B, C, z, gy))
        assert uf is not None and deltaf is not None and Bf is not None and Cf is not None
        du, ddelta, dB, dC = (torch.empty_like(t) for t in (uf, deltaf, Bf, Cf))
        dA = torch.empty_like(A)
        dD = None if D is None else torch.empty_like(D)
        dz = None if zf is None else torch.empty_like(zf)
        dbias = None if delta_bias is None else torch.empty_like(delta_bias)
        batch, dim, seq_len = u.shape
        rc = _library().m4r_scan_native_backward_f32(
            *(_ptr(t) for t in (uf, deltaf, A, Bf, Cf, D, zf, delta_bias, lengths)),
            batch,
            dim,
            seq_len,
            A.shape[1],
            int(softplus),
            int(last),
            *(_ptr(t) for t in (gyf, du, ddelta, dA, dB, dC, dD, dz, dbias)),
            torch.get_num_threads(),
        )
        _check(rc, "backward")
        return (
            du.to(u.dtype),
            ddelta.to(delta.dtype),
            dA,
            dB.to(B.dtype),
            dC.to(C.dtype),
            dD,
            None if dz is None else dz.to(u.dtype),
            dbias,
            None,
            None,
            None,
        )


def selective_scan_native(
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
    """The scan by the native CPU kernel (same signature and semantics as ``selective_scan_ref``).

    fp32, fp16 and bf16 run as they are; other dtypes (float64) run in fp32, like the reference's state.
    """
    if mode not in ("all", "last"):
        raise ValueError(f"mode must be one of ('all', 'last'), got {mode!r}")
    if u.device.type != "cpu":
        raise M4RError(f"scan backend 'native' runs on CPU tensors, got {u.device}; use 'auto' or 'cuda'")
    if u.numel() == 0:  # batch 0 or L = 0: zeros of y's shape (scan.empty_scan_result; the C ABI needs >= 1)
        return u.new_zeros(u.shape[:2] if mode == "last" else u.shape)
    io = u.dtype if u.dtype in _DTYPES else torch.float32

    def cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
        return None if t is None else t.to(dtype).contiguous()

    last = mode == "last"
    y = _NativeScan.apply(
        cast(u, io),
        cast(delta, io),
        cast(A, torch.float32),
        cast(B, io),
        cast(C, io),
        cast(D, torch.float32),
        cast(z, io),
        cast(delta_bias, torch.float32),
        cast(lengths, torch.int32) if last else None,
        bool(delta_softplus),
        last,
    )
    return y.to(u.dtype)


def native_isa() -> str:
    """The instruction set of the loaded library's forward (``avx512``, ``avx2+fma`` or ``generic``)."""
    return str(_library().m4r_scan_native_isa().decode())
