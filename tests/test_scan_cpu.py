"""The C++ CPU reference of SelectiveScan (libm4r_scan_cpu.so, ctypes) against the PyTorch reference.

The CPU reference shares its per-step math with the CUDA kernels (plugins/selectiveScanPlugin/
selectiveScanMath.h), so agreeing with ``selective_scan_ref`` here is what ties the TensorRT plugin to
the model's semantics. The library comes from $M4R_SCAN_CPU_LIB (ctest sets it) or is built with CMake
(CPU only, a few seconds) into a temporary directory.
"""

from __future__ import annotations

import ctypes
import os
import shutil

import numpy as np
import pytest
import torch

from m4r_export.model.scan import selective_scan_ref

_F32P = ctypes.POINTER(ctypes.c_float)
_I32P = ctypes.POINTER(ctypes.c_int32)


@pytest.fixture(scope="module")
def scan_lib(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    path = os.environ.get("M4R_SCAN_CPU_LIB")
    if not path:
        if shutil.which("cmake") is None or shutil.which("c++") is None and shutil.which("g++") is None:
            pytest.skip("cmake and a C++ compiler are needed to build libm4r_scan_cpu.so")
        from m4r_export.trt.native import SCAN_CPU_LIBRARY, build_native

        build = build_native(tmp_path_factory.mktemp("native"), with_cuda=False, build_tests=False)
        path = str(build.libraries[SCAN_CPU_LIBRARY])
    lib = ctypes.CDLL(path)
    lib.m4r_scan_cpu_f32.restype = ctypes.c_int
    lib.m4r_scan_cpu_f32.argtypes = [_F32P] * 8 + [_I32P] + [ctypes.c_int32] * 6 + [_F32P]
    lib.m4r_scan_cpu_version.restype = ctypes.c_char_p
    return lib


def _ptr(a: np.ndarray | None, kind: type = _F32P) -> ctypes._Pointer | None:
    return None if a is None else a.ctypes.data_as(kind)


def cpu_scan(
    lib: ctypes.CDLL,
    t: dict[str, torch.Tensor | None],
    *,
    softplus: bool,
    mode: str,
    lengths: torch.Tensor | None,
) -> np.ndarray:
    arr = {k: None if v is None else np.ascontiguousarray(v.float().numpy()) for k, v in t.items()}
    u = arr["u"]
    assert u is not None and arr["A"] is not None
    batch, dim, seqlen = u.shape
    dstate = arr["A"].shape[1]
    lens = None if lengths is None else np.ascontiguousarray(lengths.numpy().astype(np.int32))
    y = np.full((batch, dim) if mode == "last" else (batch, dim, seqlen), np.nan, dtype=np.float32)
    rc = lib.m4r_scan_cpu_f32(
        *(_ptr(arr[k]) for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")),
        _ptr(lens, _I32P),
        batch,
        dim,
        seqlen,
        dstate,
        int(softplus),
        int(mode == "last"),
        _ptr(y),
    )
    assert rc == 0
    return y


def random_inputs(
    batch: int, dim: int, seqlen: int, dstate: int, seed: int
) -> dict[str, torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    return {
        "u": r(batch, dim, seqlen),
        "delta": r(batch, dim, seqlen, scale=0.5),
        "A": -torch.exp(r(dim, dstate, scale=0.5)),
        "B": r(batch, dstate, seqlen),
        "C": r(batch, dstate, seqlen),
        "D": r(dim),
        "z": r(batch, dim, seqlen),
        "delta_bias": r(dim, scale=0.3),
    }


def torch_ref(
    t: dict[str, torch.Tensor | None], *, softplus: bool, mode: str, lengths: torch.Tensor | None
) -> np.ndarray:
    y = selective_scan_ref(
        t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["z"], t["delta_bias"],  # type: ignore[arg-type]
        delta_softplus=softplus, lengths=lengths, mode=mode,
    )  # fmt: skip
    return y.float().numpy()


def test_library_reports_contract_version(scan_lib: ctypes.CDLL) -> None:
    assert scan_lib.m4r_scan_cpu_version() == b"1"


@pytest.mark.parametrize("mode", ["all", "last"])
@pytest.mark.parametrize("softplus", [True, False])
@pytest.mark.parametrize(
    ("batch", "dim", "seqlen", "dstate"), [(3, 8, 13, 16), (2, 5, 1, 4), (1, 33, 40, 64)]
)
def test_matches_pytorch_reference(
    scan_lib: ctypes.CDLL, batch: int, dim: int, seqlen: int, dstate: int, softplus: bool, mode: str
) -> None:
    t = random_inputs(batch, dim, seqlen, dstate, seed=batch * 100 + seqlen)
    if not softplus:
        t["delta"] = t["delta"].abs()  # type: ignore[union-attr]  # dt >= 0 as in the model
    # lengths: 0 and > L are clamped to [1, L]; mode "all" ignores them (causal)
    lengths = torch.tensor([0, seqlen + 4, max(1, seqlen // 2)][:batch], dtype=torch.int32)
    got = cpu_scan(scan_lib, t, softplus=softplus, mode=mode, lengths=lengths)
    want = torch_ref(t, softplus=softplus, mode=mode, lengths=lengths)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_last_equals_all_at_each_rows_last_position(scan_lib: ctypes.CDLL) -> None:
    t = random_inputs(4, 6, 11, 8, seed=7)
    lengths = torch.tensor([1, 11, 5, 3], dtype=torch.int32)
    full = cpu_scan(scan_lib, t, softplus=True, mode="all", lengths=None)
    last = cpu_scan(scan_lib, t, softplus=True, mode="last", lengths=lengths)
    np.testing.assert_array_equal(last, full[np.arange(4), :, lengths.numpy() - 1])


def test_optional_inputs_absent(scan_lib: ctypes.CDLL) -> None:
    """No D, z or delta_bias and no lengths: the reference's defaults (no skip, no gate, last = L-1)."""
    t = random_inputs(2, 4, 9, 8, seed=3)
    t["D"] = t["z"] = t["delta_bias"] = None
    for mode in ("all", "last"):
        got = cpu_scan(scan_lib, t, softplus=True, mode=mode, lengths=None)
        np.testing.assert_allclose(
            got, torch_ref(t, softplus=True, mode=mode, lengths=None), rtol=2e-5, atol=2e-5
        )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_use_fp32_state(scan_lib: ctypes.CDLL, dtype: torch.dtype) -> None:
    """fp16/bf16 I/O: inputs rounded to the I/O type, state and accumulation in fp32 (op contract)."""
    t = random_inputs(2, 8, 64, 16, seed=11)
    for k in ("u", "delta", "B", "C", "z"):
        t[k] = t[k].to(dtype)  # type: ignore[union-attr]
    got = cpu_scan(scan_lib, t, softplus=True, mode="all", lengths=None)
    want = torch_ref(t, softplus=True, mode="all", lengths=None)  # output rounded to dtype
    tol = 1e-2 if dtype == torch.float16 else 4e-2
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


def test_bad_arguments_are_rejected(scan_lib: ctypes.CDLL) -> None:
    y = np.zeros(4, dtype=np.float32)
    x = np.zeros(4, dtype=np.float32)
    rc = scan_lib.m4r_scan_cpu_f32(
        None, _ptr(x), _ptr(x), _ptr(x), _ptr(x), None, None, None, None, 1, 1, 1, 1, 1, 0, _ptr(y)
    )
    assert rc == 1
    rc = scan_lib.m4r_scan_cpu_f32(*([_ptr(x)] * 8), None, 1, 1, 0, 1, 1, 0, _ptr(y))
    assert rc == 1
