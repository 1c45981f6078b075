"""Training losses over user representations ``hidden (N, H)`` and their targets ``(N,)``.

* :func:`chunked_cross_entropy` -- CE against every item-embedding row (row 0 included, as the
  reference), computed ``chunk`` rows at a time; the softmax is kept for the backward pass only
  when the whole batch has at most ``CE_KEEP_LOGITS`` (16M) logits, otherwise the backward pass
  recomputes it chunk by chunk, so no larger ``N x n_items`` matrix ever exists: peak extra memory
  is about ``(16M + 3 * chunk * n_items) * 4`` bytes (<= 136 MiB) whatever N is.
* :class:`SampledSoftmax` -- the positive plus ``num_negatives`` items drawn once per step (shared by
  every row) from a uniform or popularity distribution ``q``, with the logQ correction
  (``logit - log q(item)``, Jean et al. 2015; Yi et al. 2019) so that the softmax over the sample
  estimates the full softmax without the sampling bias. A negative equal to the row's positive is
  masked (an "accidental hit"). Cost per step: ``N x num_negatives``, independent of n_items apart
  from the embedding table and its optimizer state; with ``sparse = True`` the rows are read with
  ``F.embedding(..., sparse=True)``, so their gradient is row-indexed too (training/sparse.py).
* :func:`bpr_loss` -- one uniform negative per row (the reference's BPR).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

#: rows of logits computed at once by the chunked CE (bounds its memory; see the module docstring)
DEFAULT_CE_CHUNK = 2048
#: the chunk is also capped so that one chunk's logits hold at most this many floats (24 MiB fp32).
#: Why so small: glibc serves blocks above its mmap threshold (at most 32 MiB) with a fresh mmap that
#: is zero-filled page by page and unmapped again when freed. A 36 MiB logits chunk (Beauty, 747
#: targets x 12,101 items) cost 50 ms of kernel time per step that way, against 85 ms of arithmetic;
#: below the threshold the heap reuses the block and the kernel time drops to ~2 ms per step.
CE_CHUNK_LOGITS = 6 * 1024 * 1024
#: batches with at most this many logits keep their softmax for the backward pass (saves the
#: recomputation: ~25% of the step at 12K items); larger ones recompute it chunk by chunk
CE_KEEP_LOGITS = 16 * 1024 * 1024


def ce_chunk(n_items: int) -> int:
    """Rows per chunk: ``min(2048, 6M / n_items)`` (at least 1); peak ~3 chunks of fp32 logits."""
    return max(1, min(DEFAULT_CE_CHUNK, CE_CHUNK_LOGITS // max(1, n_items)))


class _ChunkedCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, target: Tensor, chunk: int) -> Tensor:
        acc = torch.promote_types(hidden.dtype, torch.float32)  # fp32 at least (fp16/bf16 inputs)
        n = hidden.shape[0]
        keep = n * weight.shape[0] <= CE_KEEP_LOGITS  # small enough: keep the softmax for backward
        losses = hidden.new_empty(n, dtype=acc)
        lse_all = hidden.new_empty(n, dtype=acc)
        probs: list[Tensor] = []
        for a in range(0, n, chunk):
            logits = (hidden[a : a + chunk] @ weight.t()).to(acc)
            logp = F.log_softmax(logits, dim=1)
            losses[a : a + chunk] = -logp.gather(1, target[a : a + chunk, None]).squeeze(1)
            lse_all[a : a + chunk] = logits[:, 0] - logp[:, 0]
            if keep:
                probs.append(logp.exp_())
        ctx.save_for_backward(hidden, weight, target, lse_all, *probs)
        ctx.chunk = chunk
        return losses

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        hidden, weight, target, lse_all, *probs = ctx.saved_tensors
        chunk = ctx.chunk
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        for i, a in enumerate(range(0, hidden.shape[0], chunk)):
            h = hidden[a : a + chunk]
            go = grad_out[a : a + chunk, None].to(lse_all.dtype)
            # d loss_i / d logits_i = softmax_i - onehot(target_i), scaled by the incoming gradient
            if probs:
                g = probs[i] * go
            else:  # recompute this chunk's softmax instead of having stored every chunk's
                g = torch.exp((h @ weight.t()).to(lse_all.dtype) - lse_all[a : a + chunk, None]).mul_(go)
            rows = torch.arange(h.shape[0], device=h.device)
            g[rows, target[a : a + chunk]] -= go[:, 0]
            g = g.to(hidden.dtype)
            if grad_h is not None:
                grad_h[a : a + chunk] = g @ weight
            if grad_w is not None:
                grad_w += g.t() @ h
        return grad_h, grad_w, None, None


def chunked_cross_entropy(
    hidden: Tensor, weight: Tensor, target: Tensor, chunk: int = DEFAULT_CE_CHUNK
) -> Tensor:
    """Per-row CE of ``hidden @ weight.T`` against ``target`` (reduction ``none``), memory-bounded."""
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0)
    return _ChunkedCE.apply(hidden, weight, target, max(1, int(chunk)))


def bpr_loss(hidden: Tensor, weight: Tensor, target: Tensor) -> Tensor:
    """Per-row BPR with one uniform negative in ``1..n_items-1`` that is never the target."""
    n = weight.shape[0]
    neg = torch.randint(1, n, target.shape, device=target.device)
    neg = torch.where(neg == target, (neg % (n - 1)) + 1, neg)
    pos_score = (hidden * weight[target]).sum(-1)
    neg_score = (hidden * weight[neg]).sum(-1)
    return -F.logsigmoid(pos_score - neg_score)


class SampledSoftmax:
    """Sampled softmax with logQ correction (module docstring); negatives shared per call."""

    def __init__(self, n_items: int, num_negatives: int, distribution: str, counts: np.ndarray | None = None):
        if n_items < 2:
            raise ValueError("sampled softmax needs at least one real item")
        self.num_negatives = int(num_negatives)
        self.distribution = distribution
        #: read the positives' and negatives' rows as sparse lookups (row-indexed gradient)
        self.sparse = False
        if distribution == "uniform":
            self.probs: Tensor | None = None
            self.log_q_uniform = -float(np.log(n_items - 1))
            self.n_items = n_items
        elif distribution == "popularity":
            if counts is None or counts.shape[0] != n_items:
                raise ValueError("popularity sampling needs the item counts (one per embedding row)")
            c = counts.astype(np.float64) + 1.0  # +1: every real item can be drawn
            c[0] = 0.0  # never the padding row
            probs = torch.from_numpy(c / c.sum()).float()
            self.probs = probs
            self.log_q = torch.log(probs.clamp_min(1e-30))
            #: cumulative distribution (fp64), searched per draw: torch.multinomial re-sums all n_items
            #: probabilities on every call (~30 ms per step at 10M items), this costs log2(n) per draw
            self.cdf = torch.from_numpy(np.cumsum(c / c.sum()))
            self.n_items = n_items
        else:
            raise ValueError(f"unknown negative distribution {distribution!r} (uniform or popularity)")

    def sample(self, device: torch.device) -> Tensor:
        if self.probs is None:
            return torch.randint(1, self.n_items, (self.num_negatives,), device=device)
        u = torch.rand(self.num_negatives, dtype=torch.float64) * self.cdf[-1]
        # the first row whose cumulative probability exceeds u: row 0 (probability 0) never qualifies
        idx = torch.searchsorted(self.cdf, u, right=True).clamp_(max=self.n_items - 1)
        return idx.to(device)

    def log_q_of(self, items: Tensor) -> Tensor:
        if self.probs is None:
            return torch.full(items.shape, self.log_q_uniform, device=items.device)
        return self.log_q.to(items.device)[items]

    def __call__(self, hidden: Tensor, weight: Tensor, target: Tensor) -> Tensor:
        """Per-row loss (reduction ``none``)."""
        neg = self.sample(hidden.device)
        if self.sparse:
            pos_w, neg_w = F.embedding(target, weight, sparse=True), F.embedding(neg, weight, sparse=True)
        else:
            pos_w, neg_w = weight[target], weight[neg]
        pos_logit = (hidden * pos_w).sum(-1) - self.log_q_of(target)
        neg_logit = hidden @ neg_w.t() - self.log_q_of(neg)[None, :]
        neg_logit = neg_logit.masked_fill(neg[None, :] == target[:, None], float("-inf"))
        logits = torch.cat([pos_logit[:, None], neg_logit], dim=1)
        return torch.logsumexp(logits, dim=1) - pos_logit


__all__ = ["DEFAULT_CE_CHUNK", "SampledSoftmax", "bpr_loss", "ce_chunk", "chunked_cross_entropy"]
