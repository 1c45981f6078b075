"""What a deployed model computes: the serving heads on top of :class:`Mamba4Rec`.

One definition shared by every consumer: the ONNX exporter traces it, and ``m4r verify`` runs it
as the PyTorch reference, so "the artifact matches PyTorch" always means "matches this module".

Heads (inputs ``item_seq`` int64 [batch, seq], ``item_seq_len`` int64 [batch]):
  * ``scores``    -> ``scores`` float [batch, n_items]; item 0 (padding) is -inf.
  * ``topk``      -> ``topk_scores`` float [batch, K], ``topk_items`` int64 [batch, K], best first.
  * ``embedding`` -> ``user_embedding`` float [batch, hidden] (score = user_embedding @ table.T,
    with the item table shipped beside the model for ANN retrieval).
With ``exclude_history`` the items of each row's valid history (positions < length) are -inf too.
A row whose rankable items are fewer than K gets trailing entries with score -inf: those entries
are not recommendations (their item id is meaningless).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .errors import UsageError
from .model import Mamba4Rec

HEADS = ("scores", "topk", "embedding")
HEAD_OUTPUTS = {
    "scores": ("scores",),
    "topk": ("topk_scores", "topk_items"),
    "embedding": ("user_embedding",),
}
INPUT_NAMES = ("item_seq", "item_seq_len")


def check_k(k: int, n_items: int, option: str = "--k") -> None:
    """The one rule for K in every command (evaluate, export, verify) and head: 1 <= K <= rankable items.

    ``n_items`` counts padding (index 0), which is never ranked, so a model ranks ``n_items - 1``
    items. A larger K would report trivially perfect hit@K (evaluate) or pad the top-K with -inf.
    """
    rankable = n_items - 1
    if not 1 <= k <= rankable:
        raise UsageError(
            f"{option} {k}: the model ranks {rankable} items (index 0 is padding); "
            f"choose K between 1 and {rankable}"
        )


class ServingModel(nn.Module):
    def __init__(
        self, model: Mamba4Rec, head: str = "scores", k: int = 100, exclude_history: bool = False
    ) -> None:
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        if head == "topk":
            check_k(k, model.n_items, "k")
        self.model = model
        self.head = head
        self.k = k
        self.exclude_history = exclude_history
        self.eval()  # serving never runs dropout; torch.onnx.export restores this flag afterwards

    @property
    def output_names(self) -> tuple[str, ...]:
        return HEAD_OUTPUTS[self.head]

    def forward(self, item_seq: Tensor, item_seq_len: Tensor) -> tuple[Tensor, ...]:
        user = self.model(item_seq, item_seq_len)
        if self.head == "embedding":
            return (user,)
        scores = user @ self.model.item_embedding.weight.t()
        mask = torch.zeros_like(scores, dtype=torch.bool)
        mask[:, 0] = True
        if self.exclude_history:
            seq, lengths = self.model.sanitize(item_seq, item_seq_len)
            positions = torch.arange(seq.shape[1], device=seq.device)[None, :]
            history = torch.where(positions < lengths[:, None], seq, torch.zeros_like(seq))
            mask = mask.scatter(1, history, torch.ones_like(history, dtype=torch.bool))
        scores = scores.masked_fill(mask, float("-inf"))
        if self.head == "scores":
            return (scores,)
        top_scores, top_items = torch.topk(scores, self.k, dim=1)
        return (top_scores, top_items)
