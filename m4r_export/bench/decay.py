"""How much of a long history the last Mamba layer still depends on: an oracle estimate of a truncated scan.

The last layer is read at the last position only, and its state there is
``h[L-1] = sum_t exp(A * (dt[t+1] + ... + dt[L-1])) * dt[t] u[t] B[t]``: a contribution fades by
``exp(A dt)`` per later position. Starting the scan at ``t0`` from a zero state instead of at 0 changes
the scan's output ``y[L-1, d]`` (before the gate and out_proj) by exactly
``sum_n C[L-1, n] exp(A[d, n] S[t0, d]) h[t0-1, d, n]`` with ``S[t0] = dt[t0] + ... + dt[L-1]``. For each
row and channel this module finds the shortest window ``L - t0`` whose dropped part changes ``y`` by at
most ``tol``, from the true states. It is an oracle: a kernel would have to bound ``h[t0-1]`` without
computing it (from the weights and the input's magnitude), so its windows would be longer. What it
reports is therefore the most such a truncation could save at that tolerance:

* ``projection_rows``: the share of positions whose in_proj / conv / x_proj would still run (the longest
  window over a row's channels, averaged over rows);
* ``scan_work_blocks``: the share of state updates when channels are scanned in blocks of ``lanes``
  (the AVX-512 kernel's 16), each block from the longest window among its channels, channels in their
  stored order; ``scan_work_sorted``: the same with channels sorted by their static decay rate
  ``softplus(dt_bias) * min |A|`` (a permutation the exporter could apply).

m4r does not truncate: its kernels compute the exact scan. This estimate informs the decision whether a
kernel should (docs/ort-custom-ops.md, the peer benchmark's 1 x 1000 point).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..model.mamba4rec import Mamba4Rec


def last_layer_inputs(model: Mamba4Rec, item_seq: Tensor) -> Tensor:
    """The last Mamba layer's input (batch, L, hidden) for full-length rows, as the model computes it."""
    lengths = torch.full((item_seq.shape[0],), item_seq.shape[1], dtype=torch.long)
    h = model.LayerNorm(model.item_embedding(item_seq))
    for layer in model.mamba_layers[:-1]:
        h = layer(h, lengths, last_only=False)
    return h


class ScanTerms(NamedTuple):
    """One Mamba block's scan on one input, in fp64 (see :func:`scan_terms`)."""

    A: Tensor  #: (D, N)
    dt: Tensor  #: (b, D, L), after bias and softplus
    states: Tensor  #: (b, D, L, N), h after each position
    c_last: Tensor  #: (b, N), C at the last position
    drive: Tensor  #: (b, D, L), dt |u| max_n |B|: the most one position can add to any state of a channel


def scan_terms(mamba: Any, x: Tensor) -> ScanTerms:
    """The terms of the last-position read-out of one Mamba block on input x, by the recurrence in fp64."""
    _, u, _, dt_low, B, C = mamba._project(x)
    A = -torch.exp(mamba.A_log.double())
    dt = F.softplus(dt_low.double() + mamba.dt_proj.bias.double()[None, :, None])
    u, B = u.double(), B.double()
    h = torch.zeros(x.shape[0], A.shape[0], A.shape[1], dtype=torch.float64)
    states = []
    for t in range(x.shape[1]):
        h = torch.exp(dt[:, :, t, None] * A) * h + (dt[:, :, t] * u[:, :, t])[:, :, None] * B[:, t, None, :]
        states.append(h)
    drive = dt * u.abs() * B.abs().amax(2)[:, None, :]
    return ScanTerms(A, dt, torch.stack(states, 2), C[:, -1].double(), drive)


def _suffix_sums(v: Tensor) -> Tensor:
    """out[..., t] = v[..., t] + ... + v[..., L-1]."""
    return torch.flip(torch.cumsum(torch.flip(v, [-1]), -1), [-1])


def dropped_part(s: ScanTerms) -> Tensor:
    """|change of y[L-1]| (b, D, L) when the scan starts at t0 = 0 .. L-1 from a zero state (0 at t0 = 0)."""
    S = _suffix_sums(s.dt)  # S[:, :, t0] = dt[t0] + ... + dt[L-1]
    decay = torch.exp(s.A[None, :, None, :] * S[:, :, 1:, None])  # for t0 = 1 .. L-1
    part = (decay * s.states[:, :, :-1, :] * s.c_last[:, None, None, :]).sum(-1).abs()
    return torch.cat([torch.zeros_like(part[:, :, :1]), part], 2)


def dropped_bound(s: ScanTerms) -> Tensor:
    """An upper bound on :func:`dropped_part` (b, D, L) that a kernel could compute from its projections in
    O(L x d_inner), without the states: every state of channel d decays at least as slowly as the slowest,
    ``a[d] = max_n A[d, n]`` (with the kernel's clamp of ``dt A`` at -80), and grows at most by ``drive``, so
    ``|h[t, d, n]| <= hb[t, d] = exp(max(a dt[t], -80)) hb[t-1, d] + drive[t, d]`` and the dropped part is at
    most ``exp(sum over s >= t0 of max(a dt[s], -80)) hb[t0-1, d] sum_n |C[L-1, n]|``."""
    log_decay = torch.clamp(s.dt * s.A.amax(1)[None, :, None], min=-80.0)  # (b, D, L), <= 0
    hb = torch.zeros_like(s.dt[:, :, 0])
    bounds = []
    for t in range(s.dt.shape[2]):
        hb = torch.exp(log_decay[:, :, t]) * hb + s.drive[:, :, t]
        bounds.append(hb)
    hb_all = torch.stack(bounds, 2)
    part = (
        torch.exp(_suffix_sums(log_decay)[:, :, 1:])
        * hb_all[:, :, :-1]
        * s.c_last.abs().sum(1)[:, None, None]
    )
    return torch.cat([torch.zeros_like(part[:, :, :1]), part], 2)


def windows(dropped: Tensor, tol: float) -> Tensor:
    """(b, D) shortest window L - t0 whose dropped part is <= tol (t0 = 0, the whole row, always is)."""
    L = dropped.shape[2]
    ok = dropped <= tol
    t = torch.arange(L).expand_as(ok)
    return L - torch.where(ok, t, torch.zeros_like(t)).amax(2)


def work_shares(win: Tensor, order: Tensor, seq: int, lanes: int = 16) -> dict[str, float]:
    """Shares of the full rows' work (``seq`` positions) left with these windows (module docstring)."""
    b, d = win.shape
    full = float(seq)

    def blocks(w: Tensor) -> float:
        pad = (-d) % lanes
        w = F.pad(w, (0, pad))
        return float(w.view(b, -1, lanes).amax(2).sum(1).double().mean() / (full * ((d + pad) // lanes)))

    return {
        "projection_rows": float(win.amax(1).double().mean() / full),
        "scan_work_blocks": blocks(win),
        "scan_work_sorted": blocks(win[:, order]),
    }


def _quantiles(win: Tensor) -> dict[str, float]:
    q = np.quantile(win.numpy(), [0.1, 0.5, 0.9, 1.0])
    return dict(zip(("p10", "p50", "p90", "max"), q.tolist(), strict=True))


def run_decay_estimate(
    model: Mamba4Rec, *, seq: int = 1000, rows: int = 8, tols: tuple[float, ...] = (1e-7, 1e-9), seed: int = 0
) -> dict[str, Any]:
    """Per tolerance, the oracle's windows and work shares and those of :func:`dropped_bound` (whose
    projections cover every row: the bound needs them), on ``rows`` random full-length histories."""
    gen = torch.Generator().manual_seed(seed)
    item_seq = torch.randint(1, model.n_items, (rows, seq), generator=gen)
    model = model.eval()
    with torch.no_grad():
        mamba: Any = model.mamba_layers[-1].mamba
        terms = scan_terms(mamba, last_layer_inputs(model, item_seq))
        dropped, bound = dropped_part(terms), dropped_bound(terms)
        rate = F.softplus(mamba.dt_proj.bias.double()) * (-terms.A).amin(1)
        order = torch.argsort(rate)
        out = []
        for tol in tols:
            oracle, bounded = windows(dropped, tol), windows(bound, tol)
            out.append(
                {
                    "tol": tol,
                    "window_quantiles": _quantiles(oracle),
                    **work_shares(oracle, order, seq),
                    "bound": {"window_quantiles": _quantiles(bounded), **work_shares(bounded, order, seq)},
                }
            )
    return {"seq": seq, "rows": rows, "layers": len(model.mamba_layers), "results": out}


def render_decay(result: dict[str, Any]) -> str:
    lines = [
        f"### truncating the last layer's scan, seq {result['seq']}, {result['rows']} random rows",
        "",
        "| tol on y | estimate | window p10 / p50 / p90 / max | projections | scan, 16 lanes | sorted |",
        "|---:|---|---|---:|---:|---:|",
    ]
    for r in result["results"]:
        for name, e in (("oracle", r), ("bound", r["bound"])):
            q = e["window_quantiles"]
            rows = 1.0 if name == "bound" else e["projection_rows"]
            win = " / ".join(f"{q[k]:.0f}" for k in ("p10", "p50", "p90", "max"))
            lines.append(
                f"| {r['tol']:g} | {name} | {win} | {rows:.2f} | "
                f"{e['scan_work_blocks']:.2f} | {e['scan_work_sorted']:.2f} |"
            )
    return "\n".join(lines)
