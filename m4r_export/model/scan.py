"""The selective scan: one function, several backends.

``selective_scan`` has mamba-ssm's ``selective_scan_fn`` signature plus the two serving extras
of the ``m4r::SelectiveScan`` op contract (design.md): per-row ``lengths`` and ``mode``.

Shapes (channel-first, like mamba-ssm)::

    u, delta, z : (batch, D, L)     A : (D, N) fp32 (= -exp(A_log))     D, delta_bias : (D,)
    B, C        : (batch, N, L)     lengths : (batch,) int, clamped to [1, L]

Semantics, per position t (state h is (batch, D, N), fp32)::

    dt = softplus(delta + delta_bias)          (softplus only if delta_softplus)
    h  = exp(dt * A) * h + dt * u * B[:, :, t]
    y  = (h * C[:, :, t]).sum(N) + D * u;  y = y * silu(z)

mode="all" returns y for every position (batch, D, L); mode="last" returns y at position
``lengths - 1`` (batch, D); with lengths omitted, the last position. An empty problem (batch 0
or L = 0) gives zeros of the output's shape: at L = 0, mode="last" returns zeros (batch, D), the
empty history's zero state having no position to read out (every backend, the ONNX function
body, the custom-op library and the TensorRT plugin alike: plugins/selectiveScanPlugin/README.md).

Backends:
  * ``reference`` -- a plain loop over time; defines the semantics; slow.
  * ``fast``      -- pure PyTorch, exact (no approximation) and numerically safe for any L:
      - mode="last": closed form. ``h_last = sum_s exp(A * sum_{s<r<=last} dt_r) dt_s u_s B_s``.
        Every exponent is <= 0 (A < 0, dt >= 0), so nothing overflows whatever L or the trained
        parameter ranges; it is a handful of vectorised tensor ops with autograd.
      - mode="all": a custom autograd Function that runs the recurrence in place without
        recording a graph per step, and a hand-written backward (reverse recurrence).
  * ``cuda``      -- mamba-ssm's fused kernel (only when mamba_ssm is installed and inputs are on
    CUDA).
  * ``native``    -- the optimised C++ CPU kernel (forward and backward) through its C ABI, when
    ``libm4r_scan_native.so`` is built (``m4r build-native``); see :mod:`.scan_native`.
``auto`` picks ``cuda`` when possible, else ``native`` on CPU when its library is found, else
``fast``. Other modules may add backends with
:func:`register_scan_backend` (the ONNX exporter registers one that emits the custom op).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from .scan_native import native_available, selective_scan_native

SCAN_MODES = ("all", "last")


class ScanFn(Protocol):
    def __call__(
        self,
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
    ) -> Tensor: ...


def last_index(lengths: Tensor | None, batch: int, seq_len: int, device: torch.device) -> Tensor:
    """Index of each row's last valid position: ``clamp(lengths, 1, L) - 1`` (int64, (batch,))."""
    if lengths is None:
        return torch.full((batch,), seq_len - 1, dtype=torch.long, device=device)
    return lengths.to(device=device, dtype=torch.long).clamp(1, seq_len) - 1


def empty_scan_result(u: Tensor, mode: str) -> Tensor | None:
    """The defined output when there is nothing to scan (batch 0 or L = 0): zeros; else None."""
    if u.numel() != 0:
        return None
    return u.new_zeros(u.shape[:2] if mode == "last" else u.shape)


def _prepare_dt(delta: Tensor, delta_bias: Tensor | None, delta_softplus: bool) -> Tensor:
    dt = delta.float()
    if delta_bias is not None:
        dt = dt + delta_bias.float()[:, None]
    return F.softplus(dt) if delta_softplus else dt


def _gather_last(x: Tensor, idx: Tensor) -> Tensor:
    """x (batch, D, L) -> x[b, :, idx[b]] (batch, D)."""
    return x.gather(2, idx.view(-1, 1, 1).expand(x.shape[0], x.shape[1], 1)).squeeze(2)


def _finish(y: Tensor, u: Tensor, D: Tensor | None, z: Tensor | None) -> Tensor:
    """Apply the D skip connection and the SiLU(z) gate; y, u, z are aligned (fp32 math)."""
    if D is not None:
        y = y + u.float() * D.float().view(-1, *([1] * (u.dim() - 2)))
    if z is not None:
        y = y * F.silu(z.float())
    return y


def selective_scan_ref(
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
    """Reference semantics: a sequential loop over time, fp32 state. Output dtype = u.dtype."""
    if mode not in SCAN_MODES:
        raise ValueError(f"mode must be one of {SCAN_MODES}, got {mode!r}")
    if (empty := empty_scan_result(u, mode)) is not None:
        return empty
    batch, dim, seq_len = u.shape
    dt = _prepare_dt(delta, delta_bias, delta_softplus)
    Af, Bf, Cf, uf = A.float(), B.float(), C.float(), u.float()
    h = u.new_zeros((batch, dim, A.shape[1]), dtype=torch.float32)
    ys = []
    for t in range(seq_len):
        dA = torch.exp(dt[:, :, t, None] * Af)
        h = dA * h + (dt[:, :, t] * uf[:, :, t])[:, :, None] * Bf[:, None, :, t]
        ys.append((h * Cf[:, None, :, t]).sum(-1))
    y = torch.stack(ys, dim=2)
    y = _finish(y, u, D, z)
    if mode == "last":
        y = _gather_last(y, last_index(lengths, batch, seq_len, u.device))
    return y.to(u.dtype)


#: exp() arguments below this are clamped: exp(-80) = 1.8e-35 is zero for every fp32 sum it enters,
#: while vectorised exp (PyTorch's and ONNX Runtime's alike) takes a slow path on underflowing
#: arguments (measured 40x slower per element below about -87).
EXP_CLAMP = -80.0


def _exp_decay(x: Tensor) -> Tensor:
    """exp of a decay exponent (x <= 0), in place on the temporary ``x``."""
    return x.clamp_(min=EXP_CLAMP).exp_()


def _row_chunks(batch: int, bytes_per_row: int, target_bytes: int) -> list[slice]:
    """Split the batch so each chunk's (rows, D, L, N) temporaries stay near ``target_bytes``.

    Working on cache-sized chunks matters more on CPU than anything else here: a full
    (batch, D, L, N) fp32 tensor is hundreds of MB, and allocating and streaming it through
    memory costs more than the arithmetic.
    """
    rows = max(1, min(batch, target_bytes // max(1, bytes_per_row)))
    return [slice(i, min(i + rows, batch)) for i in range(0, batch, rows)]


def _states(dA: Tensor, dtu: Tensor, B: Tensor) -> Tensor:
    """All states h_t (rows, D, L, N) of the recurrence h_t = dA_t h_{t-1} + dtu_t B_t, in place."""
    H = dtu.unsqueeze(-1) * B.transpose(1, 2)[:, None]
    for t in range(1, H.shape[2]):
        H[:, :, t].addcmul_(dA[:, :, t], H[:, :, t - 1])
    return H


class _ScanAll(torch.autograd.Function):
    """Core recurrence y_t = C_t . h_t, h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t (fp32).

    Works on batch chunks and keeps no (batch, D, L, N) tensor alive between forward and
    backward: the backward recomputes a chunk's states, runs the adjoint recurrence
    g_{t-1} = exp(dt_t A) g_t + C_{t-1} dy_{t-1}, and forms the gradients with reductions.
    """

    CHUNK_BYTES = 32 << 20

    @staticmethod
    def forward(ctx: Any, dt: Tensor, u: Tensor, A: Tensor, B: Tensor, C: Tensor) -> Tensor:
        batch, dim, seq_len = u.shape
        y = u.new_empty((batch, dim, seq_len))
        for rows in _row_chunks(batch, dim * seq_len * A.shape[1] * 4, _ScanAll.CHUNK_BYTES):
            dA = _exp_decay(dt[rows].unsqueeze(-1) * A[None, :, None, :])
            H = _states(dA, dt[rows] * u[rows], B[rows])
            y[rows] = torch.einsum("bdln,bnl->bdl", H, C[rows])
        ctx.save_for_backward(dt, u, A, B, C)
        return y

    @staticmethod
    def backward(ctx: Any, gy: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        dt, u, A, B, C = ctx.saved_tensors
        batch, dim, seq_len = u.shape
        gy = gy.contiguous()
        g_dt, g_u, gB, gC = (
            torch.empty_like(dt),
            torch.empty_like(u),
            torch.empty_like(B),
            torch.empty_like(C),
        )
        gA = torch.zeros_like(A)
        for rows in _row_chunks(batch, dim * seq_len * A.shape[1] * 4, _ScanAll.CHUNK_BYTES):
            dtc, uc, Bc, Cc, gyc = dt[rows], u[rows], B[rows], C[rows], gy[rows]
            dtu = dtc * uc
            dA = _exp_decay(dtc.unsqueeze(-1) * A[None, :, None, :])
            H = _states(dA, dtu, Bc)
            gC[rows] = torch.einsum("bdl,bdln->bnl", gyc, H)
            G = gyc.unsqueeze(-1) * Cc.transpose(1, 2)[:, None]  # becomes dL/dh_t
            for t in range(seq_len - 2, -1, -1):
                G[:, :, t].addcmul_(dA[:, :, t + 1], G[:, :, t + 1])
            g_dtu = torch.einsum("bdln,bnl->bdl", G, Bc)  # input term h_t += dtu_t B_t
            gB[rows] = torch.einsum("bdln,bdl->bnl", G, dtu)
            # decay term h_t = exp(dt_t A) h_{t-1}: dL/d(dt_t A) = G_t h_{t-1} dA_t (0 at t = 0)
            G[:, :, 0] = 0
            G[:, :, 1:].mul_(H[:, :, :-1]).mul_(dA[:, :, 1:])
            gA += torch.einsum("bdln,bdl->dn", G, dtc)
            g_dt[rows] = torch.einsum("bdln,dn->bdl", G, A) + g_dtu * uc
            g_u[rows] = g_dtu * dtc
        return g_dt, g_u, gA, gB, gC


class _ScanLast(torch.autograd.Function):
    """y[b, d] = sum_{l, n} exp(A[d, n] * decay[b, d, l]) * dtu[b, d, l] * BC[b, n, l].

    The closed form of mode="last" (decay = dt summed after l up to the last valid position,
    BC = B_l * C_last). Chunked over the batch with a hand-written backward for the same reason
    as :class:`_ScanAll`: backward recomputes the exp() weights chunk by chunk, which measured
    as fast as keeping them (a full-size buffer costs as much in page faults and copies as the
    exps it saves) at constant memory. Contractions are written as multiply + reduce over an
    axis, which avoids the permute copies a general einsum makes.
    """

    CHUNK_BYTES = 4 << 20

    @staticmethod
    def forward(ctx: Any, decay: Tensor, dtu: Tensor, A: Tensor, BC: Tensor) -> Tensor:
        batch, dim, seq_len = dtu.shape
        S = torch.empty_like(dtu)  # S[b, d, l] = sum_n W * BC
        for rows in _row_chunks(batch, dim * seq_len * A.shape[1] * 4, _ScanLast.CHUNK_BYTES):
            W = _exp_decay(decay[rows].unsqueeze(-1) * A[None, :, None, :])  # (b, d, l, n), <= 1
            S[rows] = W.mul_(BC[rows].transpose(1, 2)[:, None]).sum(-1)
        ctx.save_for_backward(decay, dtu, A, BC, S)
        return (S * dtu).sum(-1)

    @staticmethod
    def backward(ctx: Any, gy: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        decay, dtu, A, BC, S = ctx.saved_tensors
        batch, dim, seq_len = dtu.shape
        gw = gy.unsqueeze(-1) * dtu  # dL/d(sum_n W*BC) at (b, d, l)
        g_decay, g_BC = torch.empty_like(decay), torch.empty_like(BC)
        gA = torch.zeros_like(A)
        for rows in _row_chunks(batch, dim * seq_len * A.shape[1] * 4, _ScanLast.CHUNK_BYTES):
            W = _exp_decay(decay[rows].unsqueeze(-1) * A[None, :, None, :])
            gwc = gw[rows].unsqueeze(-1)
            g_BC[rows] = (W * gwc).sum(1).transpose(1, 2)  # sum over d -> (b, l, n) -> (b, n, l)
            W.mul_(BC[rows].transpose(1, 2)[:, None])  # W * BC; d/d(decay*A) of it is itself
            g_decay[rows] = gw[rows] * (W * A[None, :, None, :]).sum(-1)
            gA += (W * (gwc * decay[rows].unsqueeze(-1))).sum((0, 2))
        return g_decay, gy.unsqueeze(-1) * S, gA, g_BC


def _scan_all_fast(dt: Tensor, u: Tensor, A: Tensor, B: Tensor, C: Tensor) -> Tensor:
    return _ScanAll.apply(dt, u.float(), A.float(), B.float(), C.float())


def _scan_last_fast(dt: Tensor, u: Tensor, A: Tensor, B: Tensor, C: Tensor, idx: Tensor) -> Tensor:
    """Closed form of C_last . h_last with only non-positive exponents (see module docstring)."""
    seq_len = u.shape[2]
    valid = torch.arange(seq_len, device=u.device)[None, :] <= idx[:, None]  # (b, l)
    dt_valid = dt * valid[:, None, :]
    # decay[s] = sum_{s < r <= last} dt_r: an exclusive reverse cumulative sum. Summed from the end
    # (not as total - cumsum, which cancels catastrophically in fp32 for long sequences).
    shifted = F.pad(dt_valid[..., 1:], (0, 1))
    decay = shifted.flip(-1).cumsum(-1).flip(-1)
    C_last = C.float().gather(2, idx.view(-1, 1, 1).expand(C.shape[0], C.shape[1], 1))  # (b, n, 1)
    BC = B.float() * C_last  # (b, n, l)
    return _ScanLast.apply(decay, dt_valid * u.float(), A.float(), BC)


def last_state(dt: Tensor, u: Tensor, A: Tensor, B: Tensor, idx: Tensor) -> Tensor:
    """The SSM state ``h`` (batch, D, N) fp32 after position ``idx`` (batch,), in one pass.

    ``dt`` is the prepared step size (after bias and softplus), ``u`` (batch, D, L), ``B``
    (batch, N, L). The closed form of the mode="last" scan before its read-out with ``C``:
    ``h = sum_{s <= idx} exp(A * sum_{s<r<=idx} dt_r) * dt_s * u_s * B_s``, every exponent <= 0.
    Plain out-of-place tensor ops (it is traced into ONNX by the streaming export); it builds a
    (batch, D, L, N) temporary, so callers with long histories should work in batch chunks.
    """
    seq_len = u.shape[2]
    valid = torch.arange(seq_len, device=u.device)[None, :] <= idx[:, None]  # (b, l)
    dt_valid = dt.float() * valid[:, None, :]
    decay = F.pad(dt_valid[..., 1:], (0, 1)).flip(-1).cumsum(-1).flip(-1)  # exclusive reverse cumsum
    weights = torch.exp(torch.clamp(decay.unsqueeze(-1) * A.float()[None, :, None, :], min=EXP_CLAMP))
    dBu = (dt_valid * u.float()).unsqueeze(-1) * B.float().transpose(1, 2)[:, None]  # (b, D, L, N)
    return (weights * dBu).sum(2)


def state_step(h: Tensor, dt: Tensor, u: Tensor, A: Tensor, B: Tensor) -> Tensor:
    """One step of the recurrence: ``h' = exp(dt A) h + dt u B`` with h (batch, D, N) fp32.

    ``dt``, ``u`` (batch, D); ``B`` (batch, N). Exponents are clamped as in every other form.
    """
    dA = torch.exp(torch.clamp(dt.float().unsqueeze(-1) * A.float()[None], min=EXP_CLAMP))
    return dA * h + (dt.float() * u.float()).unsqueeze(-1) * B.float()[:, None, :]


def selective_scan_fast(
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
    """Exact pure-PyTorch scan for training and CPU inference (see module docstring)."""
    if mode not in SCAN_MODES:
        raise ValueError(f"mode must be one of {SCAN_MODES}, got {mode!r}")
    if (empty := empty_scan_result(u, mode)) is not None:
        return empty
    batch, _, seq_len = u.shape
    dt = _prepare_dt(delta, delta_bias, delta_softplus)
    # A = -inf as the most negative float: decays clamp like the loop's, and the closed form's 0 * A is 0
    A = A.float().clamp(min=torch.finfo(torch.float32).min)
    if mode == "all":
        y = _finish(_scan_all_fast(dt, u, A, B, C), u, D, z)
        return y.to(u.dtype)
    idx = last_index(lengths, batch, seq_len, u.device)
    y = _scan_last_fast(dt, u, A, B, C, idx)
    y = _finish(y, _gather_last(u, idx), D, None if z is None else _gather_last(z, idx))
    return y.to(u.dtype)


def _mamba_ssm_fn() -> Callable[..., Tensor] | None:
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception:  # not installed, or installed without its CUDA extension
        return None
    return selective_scan_fn


def selective_scan_cuda(
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
    """mamba-ssm's fused CUDA kernel; mode="last" gathers from its full output."""
    if (empty := empty_scan_result(u, mode)) is not None:
        return empty
    fn = _mamba_ssm_fn()
    if fn is None or not u.is_cuda:
        raise RuntimeError(
            "scan backend 'cuda' needs mamba-ssm (pip install 'm4r-export[gpu]') and CUDA tensors"
        )
    y = fn(u, delta, A, B, C, D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus)
    if mode == "last":
        y = _gather_last(y, last_index(lengths, u.shape[0], u.shape[2], u.device))
    return y


_BACKENDS: dict[str, ScanFn] = {
    "reference": selective_scan_ref,
    "fast": selective_scan_fast,
    "cuda": selective_scan_cuda,
    "native": selective_scan_native,
}


def register_scan_backend(name: str, fn: ScanFn) -> None:
    """Add (or replace) a backend, e.g. one that emits an ONNX custom op during export."""
    _BACKENDS[name] = fn


def scan_backends() -> list[str]:
    return ["auto", *sorted(_BACKENDS)]


def resolve_backend(name: str, device: torch.device) -> str:
    if name == "auto":
        if device.type == "cuda" and _mamba_ssm_fn() is not None:
            return "cuda"
        return "native" if device.type == "cpu" and native_available() else "fast"
    if name not in _BACKENDS:
        raise ValueError(f"unknown scan backend {name!r}; choose one of {scan_backends()}")
    return name


def selective_scan(
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
    backend: str = "auto",
) -> Tensor:
    """Dispatch to a scan backend (``auto``: see :func:`resolve_backend`)."""
    fn = _BACKENDS[resolve_backend(backend, u.device)]
    return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, lengths, mode)
