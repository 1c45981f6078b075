"""The ``native`` scan backend (the C++ CPU kernel through ctypes) against the reference loop.

Forward and every gradient are compared with ``selective_scan_ref`` and its autograd in fp32 (the kernel
is fp32, so ``gradcheck`` in float64 cannot apply): tolerances are a few fp32 ulps of the output scale.
Skipped, with the reason, when ``libm4r_scan_native.so`` is not built (``m4r build-native``), unless
$M4R_REQUIRE_NATIVE_SCAN=1 (CI, which builds it), where a missing library is a failure.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from m4r_export.errors import M4RError, UsageError
from m4r_export.model import Mamba4Rec, scan_native
from m4r_export.model.scan import resolve_backend, selective_scan, selective_scan_ref
from m4r_export.onnx.export import flush_denormal_enabled

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


@pytest.fixture(scope="module", autouse=True)
def native_lib() -> None:
    scan_native.load_scan_library.cache_clear()
    try:
        missing = None if scan_native.load_scan_library() is not None else "is not built"
    except M4RError as exc:
        missing = f"does not load: {exc}"
    if missing is not None:
        why = f"libm4r_scan_native.so {missing}: run `m4r build-native` or set $M4R_SCAN_LIB"
        if os.environ.get("M4R_REQUIRE_NATIVE_SCAN") == "1":
            pytest.fail(why)
        pytest.skip(why)


def _inputs(
    batch: int, dim: int, seq_len: int, d_state: int, *, optionals: bool = True, seed: int = 0
) -> dict[str, torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    return {
        "u": r(batch, dim, seq_len),
        "delta": r(batch, dim, seq_len) * 0.5 - 2.0,  # softplus -> dt ~ 0.1, as trained models have
        "A": -torch.exp(r(dim, d_state) * 0.5) * 2.0,
        "B": r(batch, d_state, seq_len),
        "C": r(batch, d_state, seq_len),
        "D": r(dim) if optionals else None,
        "z": r(batch, dim, seq_len) if optionals else None,
        "delta_bias": r(dim) * 0.3 if optionals else None,
    }


def _ragged(batch: int, seq_len: int) -> torch.Tensor:
    # full, 1, middle, 0 and too long (both clamped by the op)
    choices = [seq_len, 1, seq_len // 2 + 1, 0, seq_len + 7]
    return torch.tensor([choices[i % len(choices)] for i in range(batch)])


def _both(
    ins: dict[str, torch.Tensor | None], mode: str, lengths: torch.Tensor | None, softplus: bool = True
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor], list[str]]:
    """Outputs and gradients (for a random dy) of the reference and the native backend."""
    leaves = {k: v.clone().requires_grad_() for k, v in ins.items() if v is not None}
    args = [leaves.get(k) for k in NAMES]
    y_ref = selective_scan_ref(*args, delta_softplus=softplus, lengths=lengths, mode=mode)
    y_nat = selective_scan(*args, delta_softplus=softplus, lengths=lengths, mode=mode, backend="native")
    gy = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(1))
    names = list(leaves)
    g_ref = list(torch.autograd.grad(y_ref, list(leaves.values()), gy))
    g_nat = list(torch.autograd.grad(y_nat, list(leaves.values()), gy))
    return y_ref, y_nat, g_ref, g_nat, names


def _assert_close_scaled(got: torch.Tensor, want: torch.Tensor, rel: float, what: str) -> None:
    scale = want.abs().max().clamp_min(1e-3)
    err = (got.float() - want.float()).abs().max()
    assert err <= rel * scale, f"{what}: max error {err:.3g} > {rel:g} x scale {scale:.3g}"


@pytest.mark.parametrize("mode", ["all", "last"])
@pytest.mark.parametrize("seq_len", [1, 50, 200])
def test_forward_matches_reference(mode: str, seq_len: int) -> None:
    ins = _inputs(5, 20, seq_len, 16, seed=seq_len)
    y_ref, y_nat, *_ = _both(ins, mode, _ragged(5, seq_len))
    assert y_nat.shape == y_ref.shape and y_nat.dtype == torch.float32
    _assert_close_scaled(y_nat, y_ref, 1e-6, f"y ({mode}, L={seq_len})")


@pytest.mark.parametrize("mode", ["all", "last"])
def test_gradients_match_reference_at_L200(mode: str) -> None:
    """All eight gradients, fp32, L = 200 and d_state 32 (few channels: the reference loop is slow)."""
    ins = _inputs(2, 10, 200, 32, seed=3)
    y_ref, y_nat, g_ref, g_nat, names = _both(ins, mode, _ragged(2, 200))
    _assert_close_scaled(y_nat, y_ref, 1e-6, "y")
    for name, a, b in zip(names, g_nat, g_ref, strict=True):
        _assert_close_scaled(a, b, 2e-6, f"d{name} ({mode})")


@pytest.mark.parametrize("optionals", [True, False])
@pytest.mark.parametrize("mode", ["all", "last"])
@pytest.mark.parametrize("threaded", [False, True])
def test_small_shapes_and_null_optionals(
    mode: str, optionals: bool, threaded: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Channel counts off the vector width, batch 1 and 7, no D/z/bias. threaded: every call split over
    threads (by channel blocks for batch 1, by rows for batch 7)."""
    if threaded:
        monkeypatch.setenv("M4R_SCAN_GRAIN", "1")
    for batch, dim, seq_len, d_state in [(1, 19, 7, 3), (7, 5, 4, 1), (2, 8, 1, 4)]:
        ins = _inputs(batch, dim, seq_len, d_state, optionals=optionals, seed=dim)
        y_ref, y_nat, g_ref, g_nat, names = _both(ins, mode, _ragged(batch, seq_len), softplus=optionals)
        _assert_close_scaled(y_nat, y_ref, 1e-6, f"y {batch}x{dim}x{seq_len}")
        for name, a, b in zip(names, g_nat, g_ref, strict=True):
            _assert_close_scaled(a, b, 2e-6, f"d{name} {batch}x{dim}x{seq_len}x{d_state} ({mode})")


@pytest.mark.parametrize("flush", [False, True])
def test_denormals_flushed_and_callers_setting_kept(flush: bool) -> None:
    """Inputs whose every state update is denormal (dt*u*B ~ 1e-40): the kernel flushes them inside the
    call (all outputs 0, within FLT_MIN of the unflushed reference) and leaves the calling thread's
    flush-denormal setting as it was, off or on."""
    ins = _inputs(2, 9, 20, 4, optionals=False, seed=4)
    ins["u"] = ins["u"] * 1e-30  # type: ignore[operator]
    ins["B"] = ins["B"] * 1e-9  # type: ignore[operator]
    args = [ins[k] for k in NAMES]
    before = flush_denormal_enabled()  # an earlier test may have left it on
    try:
        torch.set_flush_denormal(False)
        y_ref = selective_scan_ref(*args, delta_softplus=True, mode="all")
        torch.set_flush_denormal(flush)
        y = selective_scan(*args, delta_softplus=True, mode="all", backend="native")
        kept = flush_denormal_enabled() == flush
        torch.set_flush_denormal(False)  # inspect denormals without DAZ (which reads them as 0)
        ref_nonzero, nonzero = int(torch.count_nonzero(y_ref)), int(torch.count_nonzero(y))
        err = float((y - y_ref).abs().max())
    finally:
        torch.set_flush_denormal(before)
    assert kept, "the caller's flush-denormal setting changed"
    assert ref_nonzero > y_ref.numel() // 2  # denormal, not flushed, in the reference
    assert nonzero == 0
    assert 0.0 < err < 1.2e-38


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_io(dtype: torch.dtype) -> None:
    """fp16/bf16 tensors in and out, fp32 state: equal to the reference on the same inputs up to one
    rounding of the output; gradients come back in the input dtype."""
    ins = {
        k: (v.to(dtype) if k in ("u", "delta", "B", "C", "z") else v)
        for k, v in _inputs(4, 16, 50, 8).items()
    }
    for mode in ("all", "last"):
        y_ref, y_nat, g_ref, g_nat, names = _both(ins, mode, _ragged(4, 50))
        assert y_nat.dtype == dtype
        eps = torch.finfo(dtype).eps
        _assert_close_scaled(y_nat, y_ref, 2 * eps, f"y {dtype} ({mode})")
        for name, a, b in zip(names, g_nat, g_ref, strict=True):
            assert a.dtype == b.dtype, name
            _assert_close_scaled(a, b, 4 * eps, f"d{name} {dtype} ({mode})")


def test_model_training_step_matches_fast() -> None:
    """A tiny Mamba4Rec: the same loss and parameter gradients with the native scan as with ``fast``."""
    torch.manual_seed(0)
    model = Mamba4Rec(60, hidden_size=16, num_layers=2, d_state=8, dropout_prob=0.0)
    seq = torch.randint(1, 60, (6, 12))
    lens = torch.tensor([12, 3, 1, 7, 12, 5])
    tgt = torch.randint(1, 60, (6,))
    grads = {}
    for backend in ("fast", "native"):
        model.zero_grad(set_to_none=True)
        model.set_scan_backend(backend)
        loss = torch.nn.functional.cross_entropy(model.logits(seq, lens), tgt)
        loss.backward()
        grads[backend] = (
            loss.detach(),
            {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
        )
    assert torch.allclose(grads["native"][0], grads["fast"][0], rtol=1e-5, atol=1e-6)
    assert grads["native"][1].keys() == grads["fast"][1].keys()
    for name, g in grads["native"][1].items():
        _assert_close_scaled(g, grads["fast"][1][name], 1e-4, name)


def test_auto_picks_native_on_cpu() -> None:
    assert resolve_backend("auto", torch.device("cpu")) == "native"
    assert scan_native.native_isa() in ("avx512", "avx2+fma", "generic")


def test_library_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A wrong $M4R_SCAN_LIB is an error naming it (no silent fallback); a non-library cannot load."""
    try:
        monkeypatch.setenv(scan_native.SCAN_LIB_ENV, "/nonexistent/libm4r_scan_native.so")
        scan_native.load_scan_library.cache_clear()
        with pytest.raises(UsageError, match="M4R_SCAN_LIB=/nonexistent"):
            resolve_backend("auto", torch.device("cpu"))
        bogus = tmp_path / "libbogus.so"
        bogus.write_text("not a shared library")
        with pytest.raises(M4RError, match="cannot load .*libbogus.so.*m4r build-native"):
            scan_native.open_scan_library(bogus)
        with pytest.raises(M4RError, match="native' runs on CPU tensors"):
            scan_native.selective_scan_native(*(torch.zeros(1, 1, 1, device="meta") for _ in range(5)))
    finally:
        monkeypatch.undo()
        scan_native.load_scan_library.cache_clear()
