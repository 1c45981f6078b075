"""Sparse item-table updates for the sampled softmax: a row-indexed gradient and lazy Adam.

With the sampled softmax a training step reads only a few thousand rows of the item table (the
input histories, the batch's positives and the shared negatives), yet a dense gradient is a
table-sized tensor and dense Adam reads and writes the table and both of its moment tables every
step: the step's cost grows with the catalogue. ``sparse_embedding`` (auto = on with the sampled
loss above ``SAMPLED_SOFTMAX_ABOVE`` items) makes every one of those reads produce a sparse
(row-indexed) gradient and updates only the touched rows:

* the Mamba4Rec's ``item_embedding`` lookup runs with ``sparse=True`` (the module attribute: the
  parameter, its name ``item_embedding.weight`` and the checkpoint are unchanged), and
  :class:`~m4r_export.training.losses.SampledSoftmax` reads the positives' and the negatives' rows
  with ``F.embedding(..., sparse=True)``;
* :class:`SplitAdam` steps ``torch.optim.SparseAdam`` on the item table and ``torch.optim.Adam`` on
  every other parameter.

Semantics (docs/training.md): this is *lazy* Adam. A row's moments are updated only in the steps
that touch it, so an untouched row stays exactly where it is, whereas dense Adam keeps moving it
with its decaying momentum (its gradient is 0 there, its first moment is not). The first step, and
any step touching every row with a history of touching every row, are the same as dense Adam (up to
where ``eps`` enters: SparseAdam adds it before the bias correction). ``weight_decay`` (Adam's L2
term, added to the gradient) is applied to the touched rows only, for the same reason.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..errors import UsageError
from .config import SAMPLED_SOFTMAX_ABOVE

STATE_FORMAT = "m4r-split-adam"
CHOICES = ("auto", "true", "false")


def resolve_sparse_embedding(
    choice: str, loss_type: str, n_items: int, ddp_backend: str | None
) -> tuple[bool, str]:
    """``(on, reason)`` for the configured ``sparse_embedding`` choice and the resolved loss.

    ``auto`` is on with the sampled softmax above ``SAMPLED_SOFTMAX_ABOVE`` items (loss_type AUTO's
    threshold). Below it the dense table costs little, and lazy Adam trained Beauty (12K items)
    more slowly per epoch than Adam (docs/training.md). ``true`` with another loss is a usage error (full
    CE reads every row each step; BPR was not measured). Under NCCL (DDP on GPUs), which cannot all-reduce
    sparse tensors, it stays off; gloo (CPU DDP) can.
    """
    if choice == "false":
        return False, "sparse_embedding: false"
    if loss_type != "SAMPLED":
        if choice == "true":
            raise UsageError(
                f"sparse_embedding: true needs loss_type SAMPLED (the loss is {loss_type}, which scores "
                "every item or one random one); use loss_type SAMPLED or sparse_embedding: auto"
            )
        return False, f"{loss_type} loss"
    if choice == "auto" and n_items <= SAMPLED_SOFTMAX_ABOVE:
        return False, f"{n_items:,} items <= {SAMPLED_SOFTMAX_ABOVE:,}: dense item-table gradient and Adam"
    if ddp_backend == "nccl":
        return False, "DDP with NCCL cannot all-reduce sparse gradients: dense item-table gradient and Adam"
    return True, f"sparse_embedding: {choice} with the sampled softmax"


class SplitAdam:
    """Lazy Adam on the item table (SparseAdam) + Adam on every other parameter of ``model``.

    Quacks like the one optimizer the trainer used before: ``zero_grad``, ``step``,
    ``param_groups`` (both optimizers' groups, so learning-rate/weight-decay changes reach both),
    ``state_dict`` / ``load_state_dict``.
    """

    def __init__(self, model: nn.Module, table: Tensor, lr: float, weight_decay: float) -> None:
        rest = [p for p in model.parameters() if p is not table]
        self.table = table
        self.dense = torch.optim.Adam(rest, lr=lr, weight_decay=weight_decay)
        self.sparse = torch.optim.SparseAdam([table], lr=lr)
        self.sparse.param_groups[0]["weight_decay"] = weight_decay  # applied by step(), touched rows only

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.dense.param_groups + self.sparse.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.dense.zero_grad(set_to_none=set_to_none)
        self.sparse.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        grad = self.table.grad
        if grad is not None:
            if not grad.is_sparse:
                raise RuntimeError(
                    "the item table got a dense gradient with sparse_embedding on: some read of "
                    "item_embedding.weight in the training step is not a sparse lookup"
                )
            decay = float(self.sparse.param_groups[0].get("weight_decay", 0.0))
            if decay:
                self.table.grad = _with_decay(grad, self.table.detach(), decay)
        self.dense.step()
        self.sparse.step()

    def state_dict(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, "dense": self.dense.state_dict(), "sparse": self.sparse.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError("not a sparse-embedding (SplitAdam) optimizer state")
        self.dense.load_state_dict(state["dense"])
        self.sparse.load_state_dict(state["sparse"])


def _with_decay(grad: Tensor, weight: Tensor, decay: float) -> Tensor:
    """``grad + decay * weight`` on the rows ``grad`` touches (Adam's L2 term, lazily)."""
    g = grad.coalesce()
    rows = g.indices()[0]
    values = g.values() + decay * weight.index_select(0, rows)
    return torch.sparse_coo_tensor(g.indices(), values, g.shape, check_invariants=False, is_coalesced=True)


__all__ = ["CHOICES", "SplitAdam", "resolve_sparse_embedding"]
