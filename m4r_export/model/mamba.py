"""The Mamba block, with mamba-ssm's parameter names, shapes and initialisation.

A checkpoint of ``mamba_ssm.Mamba`` (the reference Mamba4Rec builds on it) loads into this module
with ``strict=True``. The forward pass is the same math as mamba-ssm's unfused path; the scan
goes through :func:`m4r_export.model.scan.selective_scan`, so it runs on CPU, and on GPU uses
mamba-ssm's / causal-conv1d's kernels when they are installed.

``forward(x, lengths, last_only=True)`` is the serving shortcut: the scan returns only each row's
state read-out at ``lengths - 1`` and ``out_proj`` runs on one row per sequence.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .scan import last_index, selective_scan


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

    def forward(
        self, hidden_states: Tensor, lengths: Tensor | None = None, last_only: bool = False
    ) -> Tensor:
        """(batch, L, d_model) -> (batch, L, d_model), or (batch, d_model) at ``lengths - 1``."""
        seq_len = hidden_states.shape[1]
        xz = self.in_proj(hidden_states).transpose(1, 2)  # (b, 2*d_inner, L)
        x, z = xz.chunk(2, dim=1)
        x = self._conv(x)
        x_dbl = self.x_proj(x.transpose(1, 2))  # (b, L, dt_rank + 2N)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight).transpose(1, 2)  # bias is applied inside the scan
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


def gather_last(x: Tensor, lengths: Tensor | None) -> Tensor:
    """(batch, L, H) -> (batch, H) at position clamp(lengths, 1, L) - 1."""
    idx = last_index(lengths, x.shape[0], x.shape[1], x.device)
    return x[torch.arange(x.shape[0], device=x.device), idx]
