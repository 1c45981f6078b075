"""Mamba4Rec (arXiv 2403.03900) with the reference implementation's module and parameter names.

Semantics (design.md, "Model semantics"):
  * item id 0 is padding; sequences are right-padded; the user representation is the output at
    position ``len - 1``. Because every layer is causal, padding after it cannot change it.
  * embedding -> dropout -> LayerNorm, then per layer:
    Mamba -> dropout -> LayerNorm (+ residual only when num_layers > 1) -> FeedForward.
  * row 0 of the item embedding is an ordinary trained row (the reference re-initialises it), so
    every ranking masks item 0 with -inf.

Input handling shared by every backend (documented in README "Input semantics"):
  * item ids outside ``[0, n_items)`` are treated as padding (0);
  * ``item_seq_len`` is clamped to ``[1, seq_len]``.

For serving, :meth:`forward` runs the last layer with ``last_only=True``: its scan reads out one
state per row and everything after it (out_proj, FFN, LayerNorm) runs on ``batch`` rows instead of
``batch * seq_len``. The result is identical to computing all positions and gathering.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import Tensor, nn

from .mamba import Mamba, gather_last


@dataclass(frozen=True)
class Mamba4RecConfig:
    """Hyper-parameters; names follow the reference config.yaml. ``n_items`` counts padding (0)."""

    n_items: int
    hidden_size: int = 64
    num_layers: int = 1
    d_state: int = 32
    d_conv: int = 4
    expand: int = 2
    dropout_prob: float = 0.2

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Mamba4RecConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class FeedForward(nn.Module):
    def __init__(self, d_model: int, inner_size: int, dropout: float = 0.2) -> None:
        super().__init__()
        self.w_1 = nn.Linear(d_model, inner_size)
        self.w_2 = nn.Linear(inner_size, d_model)
        self.activation = nn.GELU()
        self.dropout = nn.Dropout(dropout)
        self.LayerNorm = nn.LayerNorm(d_model, eps=1e-12)

    def forward(self, x: Tensor) -> Tensor:
        h = self.dropout(self.activation(self.w_1(x)))
        h = self.dropout(self.w_2(h))
        return self.LayerNorm(h + x)


class MambaLayer(nn.Module):
    def __init__(
        self, d_model: int, d_state: int, d_conv: int, expand: int, dropout: float, num_layers: int
    ) -> None:
        super().__init__()
        self.num_layers = num_layers
        self.mamba = Mamba(d_model=d_model, d_state=d_state, d_conv=d_conv, expand=expand)
        self.dropout = nn.Dropout(dropout)
        self.LayerNorm = nn.LayerNorm(d_model, eps=1e-12)
        self.ffn = FeedForward(d_model=d_model, inner_size=d_model * 4, dropout=dropout)

    def forward(self, x: Tensor, lengths: Tensor | None = None, last_only: bool = False) -> Tensor:
        h = self.mamba(x, lengths, last_only=last_only)
        return self._finish(h, gather_last(x, lengths) if last_only else x)

    def _finish(self, h: Tensor, residual: Tensor) -> Tensor:
        if self.num_layers == 1:  # one Mamba layer: no residual (as the reference)
            h = self.LayerNorm(self.dropout(h))
        else:
            h = self.LayerNorm(self.dropout(h) + residual)
        return self.ffn(h)

    def forward_with_state(
        self, x: Tensor, lengths: Tensor, last_only: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`forward` plus the Mamba block's state after ``lengths - 1`` (conv window, h)."""
        h, conv_state, ssm_state = self.mamba.forward_with_state(x, lengths, last_only)
        return self._finish(h, gather_last(x, lengths) if last_only else x), conv_state, ssm_state

    def step(self, x: Tensor, conv_state: Tensor, ssm_state: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One new position x (batch, d_model) -> (output, conv_state', ssm_state')."""
        h, conv_state, ssm_state = self.mamba.step(x, conv_state, ssm_state)
        return self._finish(h, x), conv_state, ssm_state


class Mamba4Rec(nn.Module):
    def __init__(
        self,
        n_items: int,
        hidden_size: int = 64,
        num_layers: int = 1,
        d_state: int = 32,
        d_conv: int = 4,
        expand: int = 2,
        dropout_prob: float = 0.2,
    ) -> None:
        super().__init__()
        if n_items < 2:
            raise ValueError(f"n_items must count padding (0) plus at least one item, got {n_items}")
        self.config = Mamba4RecConfig(n_items, hidden_size, num_layers, d_state, d_conv, expand, dropout_prob)
        self.n_items = n_items
        self.item_embedding = nn.Embedding(n_items, hidden_size, padding_idx=0)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=1e-12)
        self.dropout = nn.Dropout(dropout_prob)
        self.mamba_layers = nn.ModuleList(
            MambaLayer(hidden_size, d_state, d_conv, expand, dropout_prob, num_layers)
            for _ in range(num_layers)
        )
        self.apply(self._init_weights)
        #: index -> raw item token (index 0 = "[PAD]"); filled from the dataset / checkpoint
        self.item_tokens: list[str] | None = None

    @classmethod
    def from_config(cls, config: Mamba4RecConfig) -> Mamba4Rec:
        return cls(**config.to_dict())

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """The reference re-initialises every Linear/Embedding (Mamba's included) after construction."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=0.02)
        elif isinstance(module, nn.LayerNorm):
            module.bias.data.zero_()
            module.weight.data.fill_(1.0)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()

    def set_scan_backend(self, backend: str) -> None:
        for module in self.modules():
            if isinstance(module, Mamba):
                module.scan_backend = backend

    def sanitize(self, item_seq: Tensor, item_seq_len: Tensor) -> tuple[Tensor, Tensor]:
        """Out-of-range ids -> 0 (padding); lengths clamped to [1, seq_len]."""
        in_range = (item_seq >= 0) & (item_seq < self.n_items)
        item_seq = torch.where(in_range, item_seq, 0)
        item_seq_len = item_seq_len.clamp(1, item_seq.shape[1])
        return item_seq, item_seq_len

    def forward(self, item_seq: Tensor, item_seq_len: Tensor) -> Tensor:
        """(batch, L) int ids, (batch,) lengths -> user representation (batch, hidden)."""
        item_seq, item_seq_len = self.sanitize(item_seq, item_seq_len)
        h = self.LayerNorm(self.dropout(self.item_embedding(item_seq)))
        last = len(self.mamba_layers) - 1
        for i, layer in enumerate(self.mamba_layers):
            h = layer(h, item_seq_len, last_only=(i == last))
        return h

    def encode_with_states(
        self, item_seq: Tensor, item_seq_len: Tensor
    ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """:meth:`forward` plus every layer's recurrent state after position ``len - 1``, in one pass.

        Returns ``(user (batch, hidden), conv_states, ssm_states)``: per layer the conv input window
        (batch, d_inner, d_conv - 1) in the model dtype and the SSM state (batch, d_inner, d_state)
        fp32. Same input semantics as :meth:`forward` (ids sanitized, lengths clamped).
        """
        item_seq, item_seq_len = self.sanitize(item_seq, item_seq_len)
        h = self.LayerNorm(self.dropout(self.item_embedding(item_seq)))
        last = len(self.mamba_layers) - 1
        convs: list[Tensor] = []
        ssms: list[Tensor] = []
        for i, layer in enumerate(self.mamba_layers):
            assert isinstance(layer, MambaLayer)
            h, conv, ssm = layer.forward_with_state(h, item_seq_len, last_only=(i == last))
            convs.append(conv)
            ssms.append(ssm)
        return h, convs, ssms

    def step(
        self, item_ids: Tensor, conv_states: list[Tensor], ssm_states: list[Tensor]
    ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """Append one item per row (batch,) to the histories the states summarise.

        Returns the user representation after it and the new states; equal to :meth:`forward` on
        the history extended by ``item_ids``. Ids must be valid (callers decide what to skip).
        """
        h = self.LayerNorm(self.dropout(self.item_embedding(item_ids)))
        convs: list[Tensor] = []
        ssms: list[Tensor] = []
        for layer, conv, ssm in zip(self.mamba_layers, conv_states, ssm_states, strict=True):
            assert isinstance(layer, MambaLayer)
            h, conv, ssm = layer.step(h, conv, ssm)
            convs.append(conv)
            ssms.append(ssm)
        return h, convs, ssms

    def hidden_states(self, item_seq: Tensor, item_seq_len: Tensor) -> Tensor:
        """Every position's output (batch, L, hidden), every layer unpruned: the output at position
        t is the user representation of the prefix ``item_seq[:, :t+1]`` (the model is causal)."""
        item_seq, item_seq_len = self.sanitize(item_seq, item_seq_len)
        h = self.LayerNorm(self.dropout(self.item_embedding(item_seq)))
        for layer in self.mamba_layers:
            h = layer(h, item_seq_len)
        return h

    def forward_all_positions(self, item_seq: Tensor, item_seq_len: Tensor) -> Tensor:
        """Unpruned forward (every position, every layer), then gather; for parity tests."""
        item_seq, item_seq_len = self.sanitize(item_seq, item_seq_len)
        h = self.LayerNorm(self.dropout(self.item_embedding(item_seq)))
        for layer in self.mamba_layers:
            h = layer(h)
        return gather_last(h, item_seq_len)

    def logits(self, item_seq: Tensor, item_seq_len: Tensor) -> Tensor:
        """Raw scores against every embedding row, item 0 included: the CE training objective."""
        return self.forward(item_seq, item_seq_len) @ self.item_embedding.weight.t()

    def full_sort_scores(self, item_seq: Tensor, item_seq_len: Tensor) -> Tensor:
        """Scores for ranking (batch, n_items); item 0 (padding) is -inf."""
        scores = self.logits(item_seq, item_seq_len)
        scores[:, 0] = float("-inf")
        return scores
