"""Scan backends agree with the reference loop, in values and gradients."""

from __future__ import annotations

import math

import pytest
import torch

from m4r_export.model.scan import scan_backends, selective_scan, selective_scan_fast, selective_scan_ref


def make_inputs(
    b: int, d: int, n: int, seq_len: int, seed: int = 0, scale_a: float = 5.0
) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(b, d, seq_len, generator=g, dtype=torch.float64)
    delta = torch.randn(b, d, seq_len, generator=g, dtype=torch.float64) * 0.5
    A = -(torch.rand(d, n, generator=g, dtype=torch.float64) * scale_a + 0.1)
    B = torch.randn(b, n, seq_len, generator=g, dtype=torch.float64)
    C = torch.randn(b, n, seq_len, generator=g, dtype=torch.float64)
    D = torch.randn(d, generator=g, dtype=torch.float64)
    z = torch.randn(b, d, seq_len, generator=g, dtype=torch.float64)
    delta_bias = torch.randn(d, generator=g, dtype=torch.float64) * 0.1
    return [u, delta, A, B, C, D, z, delta_bias]


SHAPES = [(1, 3, 4, 1), (2, 3, 4, 7), (3, 8, 5, 16), (40, 16, 8, 30)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", ["all", "last"])
def test_fast_matches_reference_values_and_gradients(shape: tuple[int, int, int, int], mode: str) -> None:
    b, d, n, seq_len = shape
    args = make_inputs(b, d, n, seq_len)
    lengths = torch.randint(1, seq_len + 1, (b,), generator=torch.Generator().manual_seed(1))
    outs, grads = [], []
    for fn in (selective_scan_ref, selective_scan_fast):
        leaves = [a.clone().requires_grad_(True) for a in args]
        y = fn(*leaves, delta_softplus=True, lengths=lengths, mode=mode)
        loss = (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum() + (y**2).sum()
        outs.append(y.detach())
        grads.append(torch.autograd.grad(loss, leaves))
    ref, fast = outs
    assert ref.shape == fast.shape == ((b, d, seq_len) if mode == "all" else (b, d))
    assert torch.allclose(ref, fast, rtol=1e-5, atol=1e-5), (ref - fast).abs().max()
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]
    for name, g_ref, g_fast in zip(names, *grads, strict=True):
        scale = g_ref.abs().max().clamp_min(1e-6)
        assert ((g_ref - g_fast).abs().max() / scale) < 1e-5, name


def test_last_mode_equals_gather_of_all_mode_with_per_row_lengths() -> None:
    args = make_inputs(5, 4, 3, 9)
    lengths = torch.tensor([1, 9, 4, 0, 50])  # 0 and > L are clamped to [1, L]
    full = selective_scan_ref(*args, delta_softplus=True, mode="all")
    idx = lengths.clamp(1, 9) - 1
    expected = full[torch.arange(5), :, idx]
    for fn in (selective_scan_ref, selective_scan_fast):
        got = fn(*args, delta_softplus=True, lengths=lengths, mode="last")
        assert torch.allclose(got, expected, atol=1e-5)


def test_padding_after_length_cannot_change_last_output() -> None:
    args = make_inputs(2, 4, 3, 10)
    lengths = torch.tensor([4, 6])
    y1 = selective_scan_fast(*args, delta_softplus=True, lengths=lengths, mode="last")
    noisy = [a.clone() for a in args]
    for i in (0, 1, 3, 4, 6):  # u, delta, B, C, z after each row's length
        noisy[i][0, ..., 4:] = 1e3
        noisy[i][1, ..., 6:] = -1e3
    y2 = selective_scan_fast(*noisy, delta_softplus=True, lengths=lengths, mode="last")
    assert torch.allclose(y1, y2)


@pytest.mark.parametrize("seq_len", [200, 1000])
def test_long_sequences_with_trained_ranges_stay_finite_and_exact(seq_len: int) -> None:
    # strongly decaying channels (|A| up to 60, dt up to ~3) underflow naive cumulative-product scans
    args = make_inputs(2, 4, 6, seq_len, scale_a=60.0)
    args[1] = args[1] * 4
    ref = selective_scan_ref(*args, delta_softplus=True, mode="all")
    for mode in ("all", "last"):
        fast = selective_scan_fast(*args, delta_softplus=True, mode=mode)
        assert torch.isfinite(fast).all()
        expected = ref if mode == "all" else ref[..., -1]
        assert torch.allclose(fast, expected, rtol=1e-4, atol=1e-4)


def test_fp32_and_fp16_inputs_keep_dtype() -> None:
    args = [a.float() for a in make_inputs(2, 3, 4, 5)]
    y32 = selective_scan(*args, delta_softplus=True, backend="fast")
    y16 = selective_scan(
        *[a.half() if a.dim() == 3 else a for a in args], delta_softplus=True, backend="fast"
    )
    assert y32.dtype == torch.float32 and y16.dtype == torch.float16
    assert torch.allclose(y16.float(), y32, atol=5e-2, rtol=5e-2)


def test_backend_choice() -> None:
    assert {"auto", "reference", "fast", "cuda", "native"} <= set(scan_backends())
    args = [a.float() for a in make_inputs(1, 2, 2, 3)]
    with pytest.raises(ValueError, match="unknown scan backend"):
        selective_scan(*args, backend="nope")
    with pytest.raises(RuntimeError, match="mamba-ssm"):
        selective_scan(*args, backend="cuda")  # CPU tensors: the CUDA kernel cannot run
    with pytest.raises(ValueError, match="mode"):
        selective_scan_ref(*args, mode="middle")


def _scan_by_hand(args: list[torch.Tensor], lengths: list[int]) -> list[list[float]]:
    """The selective scan at each row's last position, in plain Python floats (no shared helper):
    dt = softplus(delta + delta_bias); h = exp(dt A) h + dt B u; y = (C.h + D u) silu(z)."""
    u, delta, A, B, C, D, z, bias = (a.tolist() for a in args)
    out = []
    for b, length in enumerate(lengths):
        row = []
        for d in range(len(D)):
            h = [0.0] * len(A[d])
            for t in range(length):
                dt = math.log1p(math.exp(delta[b][d][t] + bias[d]))
                h = [
                    math.exp(dt * a) * h_n + dt * B[b][n][t] * u[b][d][t]
                    for n, (a, h_n) in enumerate(zip(A[d], h, strict=True))
                ]
            t = length - 1
            y = sum(C[b][n][t] * h[n] for n in range(len(h))) + D[d] * u[b][d][t]
            zz = z[b][d][t]
            row.append(y * zz / (1 + math.exp(-zz)))
        out.append(row)
    return out


def test_scans_match_a_hand_written_loop_with_a_mamba_sized_dt_bias() -> None:
    """dt_bias as mamba-ssm initialises it (softplus^-1 of 1e-3..0.1, i.e. about -2.3..-6.9): a
    bias dropped, or added after the softplus, changes delta by orders of magnitude."""
    args = make_inputs(2, 3, 4, 5, seed=7)
    dt = torch.tensor([1e-3, 1e-2, 1e-1], dtype=torch.float64)
    args[-1] = dt + torch.log(-torch.expm1(-dt))
    lengths = [5, 3]
    expected = torch.tensor(_scan_by_hand(args, lengths), dtype=torch.float64)
    for fn in (selective_scan_ref, selective_scan_fast):
        got = fn(*args, delta_softplus=True, lengths=torch.tensor(lengths), mode="last")
        err = (got - expected).abs().max()
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6), (fn.__name__, err)  # fp32 state
