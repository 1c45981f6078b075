"""The Mamba block, with mamba-ssm's parameter names, shapes and initialisation.

A checkpoint of ``mamba_ssm.Mamba`` (the reference Mamba4Rec builds on it) loads into this module
with ``strict=True``. The forward pass is the same math as mamba-ssm's unfused path; the scan
goes through :func:`m4r_export.model.scan.selective_scan`, so it runs on CPU, and on GPU uses
mamba-ssm's / causal-conv1d's kernels when they are installed.

``forward(x, lengths, last_only=True)`` is the serving shortcut: the scan returns only each row's
state read-out at ``lengths - 1`` and ``out_proj`` runs on one row per sequence.

Streaming (design.md, "Streaming state"): the recurrent state after position t is the conv input
window (the last ``d_conv - 1`` conv inputs, zeros before the first position) and the SSM state
``h`` (fp32). :meth:`Mamba.forward_with_state` returns them beside the output in one pass (closed
form, no stepping), :meth:`Mamba.step` advances them by one position.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .scan import last_index, last_state, selective_scan, state_step


def _causal_conv1d_fn() -> Callable[..., Tensor] | None:
    try:
        from causal_conv1d import causal_conv1d_fn
    except Exception:
        return None
    return causal_conv1d_fn


class Mamba(nn.Module):
    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        scan_backend: str = "auto",
    ) -> None:
        super().__init__()
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.scan_backend = scan_backend

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias)
        self.conv1d = nn.Conv1d(
            self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1, bias=conv_bias
        )
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)

        # dt_proj: weight ~ U(-r^-0.5, r^-0.5) * scale; bias = softplus^-1(dt), dt log-uniform.
        dt_init_std = self.dt_rank**-0.5 * dt_scale
        nn.init.uniform_(self.dt_proj.weight, -dt_init_std, dt_init_std)
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.dt_proj.bias._no_reinit = True  # type: ignore[attr-defined]

        # S4D-real initialisation: A = -[1..N] for every channel, stored as log.
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.A_log._no_weight_decay = True  # type: ignore[attr-defined]
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self.D._no_weight_decay = True  # type: ignore[attr-defined]
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)

    def _conv(self, x: Tensor) -> Tensor:
        """Causal depthwise conv + SiLU on (batch, d_inner, L)."""
        fn = _causal_conv1d_fn() if x.is_cuda else None
        if fn is not None:
            w = self.conv1d.weight.squeeze(1)
            return fn(x, w, self.conv1d.bias, activation="silu")
        return F.silu(self.conv1d(x)[..., : x.shape[-1]])

    def _project(self, hidden_states: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """-> conv input x, conv output u, z, dt before bias (b, d_inner, L); B, C (b, L, N)."""
        xz = self.in_proj(hidden_states).transpose(1, 2)  # (b, 2*d_inner, L)
        x, z = xz.chunk(2, dim=1)
        u = self._conv(x)
        x_dbl = self.x_proj(u.transpose(1, 2))  # (b, L, dt_rank + 2N)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight).transpose(1, 2)  # bias is applied inside the scan
        return x, u, z, dt, B, C

    def forward(
        self, hidden_states: Tensor, lengths: Tensor | None = None, last_only: bool = False
    ) -> Tensor:
        """(batch, L, d_model) -> (batch, L, d_model), or (batch, d_model) at ``lengths - 1``."""
        _, x, z, dt, B, C = self._project(hidden_states)
        return self._scan_out(x, z, dt, B, C, lengths, last_only)

    def _scan_out(
        self, x: Tensor, z: Tensor, dt: Tensor, B: Tensor, C: Tensor, lengths: Tensor | None, last_only: bool
    ) -> Tensor:
        seq_len = x.shape[-1]
        A = -torch.exp(self.A_log.float())
        y = selective_scan(
            x,
            dt,
            A,
            B.transpose(1, 2),
            C.transpose(1, 2),
            self.D.float(),
            z=z,
            delta_bias=self.dt_proj.bias.float(),
            delta_softplus=True,
            lengths=lengths,
            mode="last" if last_only else "all",
            backend=self.scan_backend,
        )
        if last_only:
            return self.out_proj(y)  # (b, d_model)
        assert y.shape[-1] == seq_len
        return self.out_proj(y.transpose(1, 2))

    def _dt(self, dt: Tensor) -> Tensor:
        return F.softplus(dt.float() + self.dt_proj.bias.float().view(-1, *([1] * (dt.dim() - 2))))

    def _read_out(self, h: Tensor, C: Tensor, u: Tensor, z: Tensor) -> Tensor:
        """y = (C . h + D u) * silu(z) for one position: h (b, D, N) fp32, C (b, N), u/z (b, D)."""
        y = (h * C.float()[:, None, :]).sum(-1) + self.D.float() * u.float()
        return (y * F.silu(z.float())).to(u.dtype)

    def forward_with_state(
        self, hidden_states: Tensor, lengths: Tensor | None, last_only: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`forward` plus the state after position ``lengths - 1``, in one pass.

        Returns ``(out, conv_state (b, d_inner, d_conv-1) in the input dtype, h (b, d_inner, N) fp32)``.
        With ``last_only`` the read-out at ``lengths - 1`` comes from ``h`` itself (no scan call);
        otherwise every position's output comes from the scan and ``h`` from the closed form.
        """
        batch, seq_len = hidden_states.shape[:2]
        idx = last_index(lengths, batch, seq_len, hidden_states.device)
        x, u, z, dt, B, C = self._project(hidden_states)
        # conv window: conv inputs at positions idx-d_conv+2 .. idx (zeros before position 0)
        width = self.d_conv - 1
        padded = F.pad(x, (width, 0))
        cols = (idx[:, None] + 1 + torch.arange(width, device=x.device)[None, :])[:, None, :]
        conv_state = padded.gather(2, cols.expand(batch, x.shape[1], width))
        A = -torch.exp(self.A_log.float())
        h = last_state(self._dt(dt), u, A, B.transpose(1, 2), idx)
        if last_only:
            rows = torch.arange(batch, device=x.device)
            y = self._read_out(h, C[rows, idx], u[rows, :, idx], z[rows, :, idx])
            return self.out_proj(y), conv_state, h
        return self._scan_out(u, z, dt, B, C, lengths, False), conv_state, h

    def step(self, hidden: Tensor, conv_state: Tensor, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One new position: hidden (b, d_model) + state -> (out (b, d_model), conv_state', h').

        Exactly the computation of :meth:`forward` at that position given the state of the
        history before it (``conv_state`` is cast to the input dtype, ``h`` stays fp32).
        """
        xz = self.in_proj(hidden)
        x, z = xz.chunk(2, dim=-1)  # (b, d_inner)
        window = torch.cat([conv_state.to(x.dtype), x.unsqueeze(-1)], dim=-1)  # (b, d_inner, d_conv)
        u = (window * self.conv1d.weight[:, 0, :]).sum(-1)
        if self.conv1d.bias is not None:
            u = u + self.conv1d.bias
        u = F.silu(u)
        x_dbl = self.x_proj(u)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = self._dt(F.linear(dt, self.dt_proj.weight))
        h = state_step(h, dt, u, -torch.exp(self.A_log.float()), B)
        return self.out_proj(self._read_out(h, C, u, z)), window[:, :, 1:], h


def gather_last(x: Tensor, lengths: Tensor | None) -> Tensor:
    """(batch, L, H) -> (batch, H) at position clamp(lengths, 1, L) - 1."""
    idx = last_index(lengths, x.shape[0], x.shape[1], x.device)
    return x[torch.arange(x.shape[0], device=x.device), idx]
