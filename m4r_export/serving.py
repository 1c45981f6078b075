"""What a deployed model computes: the serving heads on top of :class:`Mamba4Rec`.

One definition shared by every consumer: the ONNX exporter traces it, and ``m4r verify`` runs it
as the PyTorch reference, so "the artifact matches PyTorch" always means "matches this module".

Inputs: ``item_seq`` int64 [batch, seq], ``item_seq_len`` int64 [batch], and for the ranking heads
(``scores``, ``topk``) unless built with ``exclude_items=False``: ``exclude_items`` int64 [batch, E]
(E >= 0, any width): items never to rank for that row (histories, business rules, out of stock).
Entries 0 (padding: "no item") and ids outside ``[1, n_items)`` are ignored, duplicates are harmless.
A caller with nothing to exclude sends zeros ``[batch, 1]``.

Heads:
  * ``scores``    -> ``scores`` float [batch, n_items]; item 0 (padding) is -inf.
  * ``topk``      -> ``topk_scores`` float [batch, K], ``topk_items`` int64 [batch, K], best first.
  * ``embedding`` -> ``user_embedding`` float [batch, hidden] (score = user_embedding @ table.T,
    with the item table shipped beside the model for ANN retrieval).
With ``exclude_history`` the items of each row's valid history (positions < length, i.e. only the
input window) are -inf too; ``exclude_items`` masks any further items (e.g. the full history).
A row whose rankable items are fewer than K gets trailing entries with score -inf: those entries
are not recommendations (their item id is meaningless).

Chunked top-K (``topk_chunk``, default :data:`TOPK_CHUNK`): the ``topk`` head scores the catalogue
``topk_chunk`` items at a time (masking each chunk with only the ids that fall in it), keeps each
chunk's top-K, and merges the partial lists with one more TopK. Memory is then batch x chunk,
never batch x n_items, and the result is the unchunked top-K exactly: ONNX's TopK breaks ties by
the lower index, candidates are concatenated in item order, so equal scores still come out lowest
item id first (tests/test_topk_chunked.py checks it with planted ties and exclude lists). The ONNX
export writes this head as one ``m4r::ScoreTopK`` node whose function body is this chunked subgraph
(m4r_export/onnx/topk_op.py; libm4r_ort_ops.so runs the node as a one-pass native kernel).

Streaming (design.md, "Streaming state"; docs/streaming.md): :class:`StreamingInit` is the head
plus every layer's recurrent state after the history, :class:`StreamingStep` folds one new item
per row into those states and returns the head's outputs for the longer history.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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
EXCLUDE_INPUT = "exclude_items"
RANKING_HEADS = ("scores", "topk")
#: items scored at a time by the ``topk`` head (see the module docstring); chunks never hold fewer than K
TOPK_CHUNK = 65536


def input_names(head: str, exclude_items: bool = True) -> tuple[str, ...]:
    """The graph inputs of a serving head: ``exclude_items`` only on ranking heads that take it."""
    return (*INPUT_NAMES, EXCLUDE_INPUT) if exclude_items and head in RANKING_HEADS else INPUT_NAMES


def _valid_ids(ids: Tensor, n_items: int) -> Tensor:
    """Ids outside [0, n_items) -> 0: column 0 (padding) is -inf anyway, so "no item" and invalid ids
    are ignored."""
    return torch.where((ids >= 0) & (ids < n_items), ids, 0)


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
        self,
        model: Mamba4Rec,
        head: str = "scores",
        k: int = 100,
        exclude_history: bool = False,
        exclude_items: bool = True,
        topk_chunk: int = TOPK_CHUNK,
    ) -> None:
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        if head == "topk":
            check_k(k, model.n_items, "k")
        self.model = model
        self.head = head
        self.k = k
        if topk_chunk < 1:
            raise ValueError(f"topk_chunk must be >= 1, got {topk_chunk}")
        self.topk_chunk = max(topk_chunk, k)
        self.exclude_history = exclude_history
        #: whether the ranking heads take the ``exclude_items`` input (never the embedding head)
        self.exclude_items = exclude_items and head in RANKING_HEADS
        self.eval()  # serving never runs dropout; torch.onnx.export restores this flag afterwards

    @property
    def output_names(self) -> tuple[str, ...]:
        return HEAD_OUTPUTS[self.head]

    @property
    def input_names(self) -> tuple[str, ...]:
        return input_names(self.head, self.exclude_items)

    def forward(
        self, item_seq: Tensor, item_seq_len: Tensor, exclude_items: Tensor | None = None
    ) -> tuple[Tensor, ...]:
        """``exclude_items`` [batch, E] (ranking heads built with ``exclude_items=True``; None = none)."""
        user = self.model(item_seq, item_seq_len)
        history = None
        if self.exclude_history and self.head != "embedding":
            seq, lengths = self.model.sanitize(item_seq, item_seq_len)
            positions = torch.arange(seq.shape[1], device=seq.device)[None, :]
            history = torch.where(positions < lengths[:, None], seq, 0)
        return self.heads(user, history, exclude_items)

    def heads(
        self, user: Tensor, history: Tensor | None = None, exclude_items: Tensor | None = None
    ) -> tuple[Tensor, ...]:
        """The head's outputs from the user representation; ``history``/``exclude_items`` ids are -inf."""
        if self.head == "embedding":
            return (user,)
        if exclude_items is not None and not self.exclude_items:
            raise ValueError(f"this {self.head} head was built without the exclude_items input")
        if self.head == "topk":
            return self._chunked_topk(user, history, exclude_items)
        # fp32 scores whatever the model's precision (an fp16 model's outputs are fp32 anyway; ONNX Runtime's
        # CPU then computes the fp16 GEMM in fp32 and never rounds the scores to fp16)
        scores = (user @ self.model.item_embedding.weight.t()).float()
        # item 0 (padding) and every listed id -> -inf in ONE scatter (no boolean mask): the exported
        # graph is a handful of nodes (issue 21: per-node cost at batch 1). Item 0 is a column of zeros
        # padded in front of the listed ids (one Pad node; ids are validated once, after the Concat).
        listed = [ids for ids in (history, exclude_items) if ids is not None]
        if not listed:
            index = torch.zeros_like(scores[:, :1], dtype=torch.long)
        else:
            ids = torch.cat(listed, dim=1) if len(listed) > 1 else listed[0]
            index = F.pad(_valid_ids(ids, scores.shape[1]), (1, 0))
        return (scores.scatter(1, index, float("-inf")),)

    def _chunked_topk(
        self, user: Tensor, history: Tensor | None, exclude_items: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """Top-K over the catalogue, ``topk_chunk`` items at a time, partial lists merged in item order."""
        tracing = torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling() or torch.jit.is_tracing()
        if not tracing and not torch.is_grad_enabled():
            return self._chunked_topk_eager(user, history, exclude_items)
        table = self.model.item_embedding.weight
        n_items = table.shape[0]
        ids = [t for t in (history, exclude_items) if t is not None]
        part_scores, part_items = [], []
        for start in range(0, n_items, self.topk_chunk):
            stop = min(n_items, start + self.topk_chunk)
            scores = F.linear(user, table[start:stop])  # [batch, chunk]
            mask = _chunk_mask(scores, ids, start, stop)
            scores = scores.masked_fill(mask, float("-inf"))
            top_scores, top_items = torch.topk(scores, min(self.k, stop - start))
            part_scores.append(top_scores)
            part_items.append(top_items + start)
        return _merge_partials(part_scores, part_items, self.k)

    def _chunked_topk_eager(
        self, user: Tensor, history: Tensor | None, exclude_items: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """:meth:`_chunked_topk` run eagerly (what the export is traced from is the chunked graph above).

        The same chunks and TopK calls, but every full chunk is scored into one reused buffer and the
        listed ids are set to -inf in place: no batch x chunk tensor is allocated per chunk. With one per
        chunk, glibc kept freed chunks resident, about batch x n_items floats in all (1.3 GiB at 10M
        items and batch 32: most of the PyTorch side of export parity and `m4r verify` at that size).
        """
        table = self.model.item_embedding.weight
        n_items, batch = table.shape[0], user.shape[0]
        rows, cols = _listed_ids([t for t in (history, exclude_items) if t is not None], batch, user.device)
        buffer: Tensor | None = None
        part_scores, part_items = [], []
        for start in range(0, n_items, self.topk_chunk):
            stop = min(n_items, start + self.topk_chunk)
            if stop - start == self.topk_chunk:
                if buffer is None:
                    buffer = user.new_empty((batch, self.topk_chunk), dtype=torch.result_type(user, table))
                scores = torch.mm(user, table[start:stop].t(), out=buffer)
            else:
                scores = torch.mm(user, table[start:stop].t())
            if start == 0:
                scores[:, 0] = float("-inf")  # item 0: padding
            inside = (cols >= start) & (cols < stop)
            scores[rows[inside], cols[inside] - start] = float("-inf")
            top_scores, top_items = torch.topk(scores, min(self.k, stop - start))
            part_scores.append(top_scores)
            part_items.append(top_items + start)
        return _merge_partials(part_scores, part_items, self.k)


def _merge_partials(part_scores: list[Tensor], part_items: list[Tensor], k: int) -> tuple[Tensor, Tensor]:
    """The top-K of the chunks' top-K lists (concatenated in item order, so ties keep the lower id)."""
    if len(part_scores) == 1:
        return part_scores[0], part_items[0]
    merged_scores, where = torch.topk(torch.cat(part_scores, dim=1), k, dim=1)
    return merged_scores, torch.gather(torch.cat(part_items, dim=1), 1, where)


def _listed_ids(id_lists: list[Tensor], batch: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(row, item id) of every listed id, flattened: ``id_lists`` are [batch, E] tensors."""
    rows = [torch.arange(batch, device=device)[:, None].expand(ids.shape).reshape(-1) for ids in id_lists]
    cols = [ids.reshape(-1) for ids in id_lists]
    empty = torch.zeros(0, dtype=torch.long, device=device)
    return (torch.cat(rows) if rows else empty), (torch.cat(cols) if cols else empty)


def _chunk_mask(scores: Tensor, id_lists: list[Tensor], start: int, stop: int) -> Tensor:
    """Mask [batch, stop - start] of items ``start..stop-1``: padding (item 0) and every listed id.

    Ids outside the chunk (other chunks, 0 = none, invalid ids) go to a spare last column that is
    dropped, so each chunk's mask costs batch x chunk whatever the catalogue size.
    """
    width = stop - start
    mask = torch.zeros((scores.shape[0], width + 1), dtype=torch.bool, device=scores.device)
    if start == 0:
        mask[:, 0] = True
    for ids in id_lists:
        local = ids - start
        inside = (local >= 0) & (local < width)
        local = torch.where(inside, local, torch.full_like(local, width))
        mask = mask.scatter(1, local, torch.ones_like(local, dtype=torch.bool))
    return mask[:, :width]


# ------------------------------------------------------------------------------------ streaming

#: role names of the streaming graphs' tensors (the manifest's ``streaming`` section uses them)
ROLE_ITEM_IDS, ROLE_LENGTHS, ROLE_HEAD = "item_ids", "lengths", "head_output"
ROLE_CONV, ROLE_SSM, ROLE_USER = "conv_state", "ssm_state", "user_state"
ROLE_EXCLUDE = "exclude_items"
STEP_ITEM = "item_id"


def state_names(num_layers: int) -> list[tuple[str, str, str, int | None]]:
    """``(step input name, output name in init and step, role, layer)`` of every state tensor, in order.

    Per layer the conv window and the SSM state; then ``user_state``, the user representation after
    the last accepted event (so that a step whose item is skipped can return unchanged outputs).
    """
    out: list[tuple[str, str, str, int | None]] = []
    for i in range(num_layers):
        out += [(f"conv_state_{i}", f"conv_state_{i}_out", ROLE_CONV, i)]
        out += [(f"ssm_state_{i}", f"ssm_state_{i}_out", ROLE_SSM, i)]
    out.append(("user_state", "user_state_out", ROLE_USER, None))
    return out


def _interleave(convs: list[Tensor], ssms: list[Tensor]) -> list[Tensor]:
    return [t.float() for pair in zip(convs, ssms, strict=True) for t in pair]


class StreamingInit(nn.Module):
    """``(item_seq, item_seq_len) -> (*head outputs, *states)``: the serving head plus the states.

    Head outputs equal :class:`ServingModel`'s on the same inputs (same input semantics). States
    are those after position ``len - 1`` (fp32), except that a row with ``item_seq_len <= 0`` gets
    the empty state (all zeros: no event yet), so stepping from it equals a re-encode of only the
    stepped items. Floating outputs are fp32 (an fp16 model's included).
    """

    def __init__(self, serving: ServingModel) -> None:
        super().__init__()
        if serving.exclude_history:
            raise ValueError("streaming graphs do not support exclude_history")
        self.serving = serving
        self.eval()

    def forward(
        self, item_seq: Tensor, item_seq_len: Tensor, exclude_items: Tensor | None = None
    ) -> tuple[Tensor, ...]:
        model = self.serving.model
        user, convs, ssms = model.encode_with_states(item_seq, item_seq_len)
        empty = (item_seq_len <= 0)[:, None, None]
        states = [torch.where(empty, torch.zeros_like(t), t) for t in _interleave(convs, ssms)]
        heads = self.serving.heads(user, None, exclude_items)
        outs = tuple(o.float() if o.is_floating_point() else o for o in heads)
        return (*outs, *states, user.float())


class StreamingStep(nn.Module):
    """``(item_id, [exclude_items], *states) -> (*head outputs, *states')``: one new item per row.

    ``item_id`` int64 [batch]; ``exclude_items`` int64 [batch, E] as for :class:`ServingModel`
    (ranking heads built with it; it masks only this call's outputs, nothing is kept). An id
    outside ``[1, n_items)`` (0 = padding = "no event" included) is skipped: that row's states are
    returned unchanged and its outputs are those of the history without it. Otherwise the outputs
    equal :class:`ServingModel`'s on the history extended by the item, whatever the history's
    length (states have no length limit).
    """

    def __init__(self, serving: ServingModel) -> None:
        super().__init__()
        if serving.exclude_history:
            raise ValueError("streaming graphs do not support exclude_history")
        self.serving = serving
        self.eval()

    def forward(self, item_id: Tensor, *inputs: Tensor) -> tuple[Tensor, ...]:
        """``inputs``: ``exclude_items`` first when the head takes it, then the states in order."""
        model = self.serving.model
        exclude = inputs[0] if self.serving.exclude_items else None
        states = inputs[1:] if self.serving.exclude_items else inputs
        n_layers = len(model.mamba_layers)
        if len(states) != 2 * n_layers + 1:
            raise ValueError(f"expected {2 * n_layers + 1} state tensors, got {len(states)}")
        convs, ssms, user_state = list(states[0:-1:2]), list(states[1:-1:2]), states[-1]
        valid = (item_id >= 1) & (item_id < model.n_items)
        ids = torch.where(valid, item_id, 0)
        user, new_convs, new_ssms = model.step(ids, convs, ssms)
        keep = valid[:, None, None]
        new_states = [
            torch.where(keep, new, old)
            for new, old in zip(_interleave(new_convs, new_ssms), _interleave(convs, ssms), strict=True)
        ]
        user = torch.where(valid[:, None], user, user_state.to(user.dtype))
        heads = self.serving.heads(user, None, exclude)
        outs = tuple(o.float() if o.is_floating_point() else o for o in heads)
        return (*outs, *new_states, user.float())
