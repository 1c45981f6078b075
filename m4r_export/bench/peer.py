"""The peer benchmark: m4r's ONNX artifacts timed beside a same-size SASRec exported with torch.onnx.

SASRec is what a user would deploy instead of Mamba4Rec. :class:`SASRec` has RecBole's shape and
computation (item + position embedding, LayerNorm, dropout; ``n_layers`` post-LN transformer blocks
with ``n_heads``-head causal self-attention, additive -10000 mask on padding and the future, FFN with
GELU; the output at ``item_seq_len - 1``; scores = output @ item table^T). Random weights: latency
does not depend on the values. It is exported with ``torch.onnx.export`` (the dynamo exporter, dynamic
batch and seq), as a new user would, and run on plain ONNX Runtime.

Every export is timed with the custom-op library (``<label> ops``) when one is given, and the first one also
on plain ONNX Runtime (``<label> body``: the function bodies; a fused file's bodies inline to the same
standard ops). Per thread count, every session is created once (without ONNX Runtime's memory arena); per
(batch, seq) point every variant gets one warm-up call, then the variants take turns (one call each per
round) so that a noisy neighbour slows them alike, and the p50 of each is reported with the ratio SASRec
p50 / variant p50 (> 1: m4r is faster). All rows are full-length histories. SASRec's attention holds ``batch x
heads x seq x seq`` fp32 scores per layer (2 GB at 256 x 1000); a batch whose scores would exceed
``sasrec_max_bytes`` runs as consecutive row chunks inside one timed call (the same total work, recorded per
point as ``sasrec_chunks``).

An export with ``model.int8.onnx`` (``m4r export --int8``) adds ``<label>
int8`` (with the library when given).

Streaming: for every export with ``step.onnx`` (with ``--fused``, its MambaMixerStep nodes run the fused
kernel in ``<label> step ops``), one new event per row:
``step.onnx`` on the states of an L-item history (``init.onnx`` beforehand, untimed) beside SASRec
re-encoding the L+1 items and m4r's ``model.onnx`` re-encoding them, interleaved the same way. With the
library, ``<label> push ops`` is the same step through the product's Python helper,
``StreamingSession.push`` (ids checked, exclude zeros, the step bound once: m4r_export/streaming_binding.py).

The runtime floor (``ort floor (1 node)``, on unless ``floor=False``): at every point a one-node graph
(Identity) is timed beside the same SASRec call, in a round of its own, so that the table shows what ONNX
Runtime itself costs per call at that point, cold or warm; SASRec / floor is the largest ratio any ONNX
Runtime model could reach there.
"""

from __future__ import annotations

import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import __version__
from ..errors import UsageError
from ..onnx.int8 import INT8_FILE

DEFAULT_BATCHES = (1, 256)
DEFAULT_SEQS = (50, 200, 1000)
DEFAULT_THREADS = (1, 2)
MIN_RUNS = 3
#: largest attention-score tensor (bytes, one layer) SASRec computes in one call; bigger batches run in chunks
SASREC_MAX_BYTES = 128 * 2**20


# ------------------------------------------------------------------------------------------ SASRec


class _Block(nn.Module):
    """RecBole's TransformerLayer: MultiHeadAttention (post-LN) then FeedForward (post-LN)."""

    def __init__(self, hidden: int, heads: int, inner: int, eps: float = 1e-12) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.query, self.key, self.value = (nn.Linear(hidden, hidden) for _ in range(3))
        self.dense = nn.Linear(hidden, hidden)
        self.attn_norm = nn.LayerNorm(hidden, eps=eps)
        self.w_1, self.w_2 = nn.Linear(hidden, inner), nn.Linear(inner, hidden)
        self.ffn_norm = nn.LayerNorm(hidden, eps=eps)
        self.drop = nn.Dropout(0.5)

    def _split(self, x: Tensor) -> Tensor:
        b, s, _ = x.shape
        return x.view(b, s, self.heads, self.head_dim).permute(0, 2, 1, 3)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        q, k, v = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim) + mask
        probs = self.drop(torch.softmax(scores, dim=-1))
        ctx = torch.matmul(probs, v).permute(0, 2, 1, 3).reshape(x.shape)
        x = self.attn_norm(self.drop(self.dense(ctx)) + x)
        h = self.w_2(F.gelu(self.w_1(x)))
        return self.ffn_norm(self.drop(h) + x)


class SASRec(nn.Module):
    """RecBole-shaped SASRec returning scores over the whole item table (row 0, padding, included)."""

    def __init__(
        self, n_items: int, max_len: int, hidden: int = 64, heads: int = 2, inner: int = 256, layers: int = 2
    ) -> None:
        super().__init__()
        self.item_embedding = nn.Embedding(n_items, hidden, padding_idx=0)
        self.position_embedding = nn.Embedding(max_len, hidden)
        self.norm = nn.LayerNorm(hidden, eps=1e-12)
        self.drop = nn.Dropout(0.5)
        self.blocks = nn.ModuleList(_Block(hidden, heads, inner) for _ in range(layers))

    def forward(self, item_seq: Tensor, item_seq_len: Tensor) -> Tensor:
        seq_len = item_seq.shape[1]
        pos = torch.arange(seq_len, device=item_seq.device)
        x = self.drop(self.norm(self.item_embedding(item_seq) + self.position_embedding(pos)[None]))
        causal = torch.tril(torch.ones(seq_len, seq_len, dtype=torch.bool, device=item_seq.device))
        keep = (item_seq != 0)[:, None, None, :] & causal[None, None]
        mask = torch.where(keep, 0.0, -10000.0)
        for block in self.blocks:
            x = block(x, mask)
        last = x[torch.arange(x.shape[0], device=x.device), item_seq_len - 1]
        return last @ self.item_embedding.weight.t()


def export_sasrec(n_items: int, max_len: int, seed: int = 0) -> tuple[bytes, SASRec]:
    """SASRec with random weights, exported by ``torch.onnx.export`` (dynamic batch and seq)."""
    from ..onnx.export import export_program

    torch.manual_seed(seed)
    model = SASRec(n_items, max_len).eval()
    max_len = max(max_len, 5)
    width = min(8, max_len)  # traced width: inside the dynamic range, unlike batch (3)
    args = (torch.randint(1, n_items, (3, width)), torch.tensor([width, 2, 1]))
    batch, seq = torch.export.Dim("batch", min=1), torch.export.Dim("seq", min=2, max=max_len)
    proto = export_program(
        model,
        args,
        ["item_seq", "item_seq_len"],
        ["scores"],
        {"item_seq": {0: batch, 1: seq}, "item_seq_len": {0: batch}},
        opset=20,
        what="torch.onnx.export of SASRec",
    )
    return proto.SerializeToString(), model


# ------------------------------------------------------------------------------------------ timing


@dataclass
class Variant:
    """One timed thing: a name and a call that runs one batch."""

    name: str
    call: Callable[[], Any]


def _session(model: bytes, threads: int, ort_ops: Path | None) -> Any:
    """A CPU session with ONNX Runtime's defaults (the memory arena on: without it SASRec's large attention
    buffers pay a page-fault penalty). Sessions live for one point only: a run that kept every variant's
    arena until the end reached 11 GB at batch 256 x seq 1000 and was OOM-killed."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    if ort_ops is not None:
        from ..onnx.ort_ops import register_ort_ops

        register_ort_ops(so, ort_ops)
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def _feeds(sess: Any, item_seq: np.ndarray, lengths: np.ndarray) -> dict[str, np.ndarray]:
    feeds = {"item_seq": item_seq, "item_seq_len": lengths}
    if "exclude_items" in {i.name for i in sess.get_inputs()}:
        feeds["exclude_items"] = np.zeros((len(item_seq), 1), np.int64)  # nothing excluded
    return feeds


def step_feeds(sess: Any, item_ids: np.ndarray, states: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Feeds of ``step.onnx``: one new item per row on ``states``, nothing excluded."""
    feeds = {"item_id": np.ascontiguousarray(item_ids, dtype=np.int64), **states}
    if "exclude_items" in {i.name for i in sess.get_inputs()}:
        feeds["exclude_items"] = np.zeros((len(item_ids), 1), np.int64)
    return feeds


def sasrec_chunk_rows(batch: int, seq: int, heads: int = 2, max_bytes: int = SASREC_MAX_BYTES) -> int:
    """Rows per SASRec call so that one layer's attention scores stay under ``max_bytes``."""
    return max(1, min(batch, max_bytes // max(1, heads * seq * seq * 4)))


def _sasrec_call(sess: Any, item_seq: np.ndarray, lengths: np.ndarray) -> tuple[Callable[[], Any], int]:
    rows = sasrec_chunk_rows(len(item_seq), item_seq.shape[1])
    parts = [(item_seq[i : i + rows], lengths[i : i + rows]) for i in range(0, len(item_seq), rows)]
    return (lambda: [sess.run(None, {"item_seq": s, "item_seq_len": n}) for s, n in parts]), len(parts)


#: the runtime-floor variant: a one-node graph timed beside SASRec like the others (see :func:`floor_session`)
FLOOR = "ort floor (1 node)"


def floor_session(threads: int) -> Any:
    """A session on one Identity node (int64 [batch, n] in and out) with the benchmark's options.

    Its time is ONNX Runtime's own per-call cost (feeds in, one kernel, the output back), the least any
    ONNX model pays; timed after SASRec's call like the others, its cold figure is what refilling the
    caches costs the runtime itself, whatever the model does. SASRec p50 / floor p50 is therefore the
    largest ratio any ONNX Runtime model could reach at that point."""
    from onnx import TensorProto, helper

    io = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "n"]) for n in ("x", "y")]
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "floor", io[:1], io[1:])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)
    return _session(model.SerializeToString(), threads, None)


def time_floor(
    sasrec: Callable[[], Any], floor: Any, x: np.ndarray, repeats: int, budget_s: float, consecutive: int
) -> dict[str, float]:
    """The floor's figures at one point: SASRec's call and the one-node graph on ``x``, in turns as the
    point's own variants were (a separate round so that its call does not warm the runtime for them)."""
    feeds = {"x": np.ascontiguousarray(x, dtype=np.int64)}
    res = time_round_robin(
        [Variant("sasrec", sasrec), Variant(FLOOR, partial(floor.run, None, feeds))],
        repeats,
        budget_s,
        consecutive=consecutive,
    )
    return res[FLOOR]


def time_round_robin(
    variants: list[Variant], repeats: int, budget_s: float, warmup: int = 1, consecutive: int = 1
) -> dict[str, dict[str, float]]:
    """p50/mean/min ms per variant over rounds; each round makes ``consecutive`` timed calls of each
    variant in turn. 1 (the default): calls interleaved one by one, so every call finds the caches
    holding the previous variant's data; more: all but the first call of a turn find their own
    weights warm, as in a server that runs one model."""
    t0 = time.perf_counter()
    for _ in range(max(1, warmup)):
        for v in variants:
            v.call()
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    cpu: dict[str, list[float]] = {v.name: [] for v in variants}
    for i in range(repeats):
        if i >= MIN_RUNS and time.perf_counter() - t0 > budget_s:
            break
        for v in variants:
            for _ in range(consecutive):
                c, p = time.perf_counter(), time.process_time()
                v.call()
                times[v.name].append((time.perf_counter() - c) * 1000.0)
                cpu[v.name].append((time.process_time() - p) * 1000.0)
    return {
        name: {
            "p50_ms": float(np.percentile(ms, 50)),
            "mean_ms": float(np.mean(ms)),
            "min_ms": float(np.min(ms)),
            # process CPU time per call (all threads): on a loaded machine the wall time includes waiting
            # for a core; with 1 thread the CPU time is the latency an idle core would give
            "cpu_p50_ms": float(np.percentile(cpu[name], 50)),
            "runs": len(ms),
        }
        for name, ms in times.items()
    }


# ------------------------------------------------------------------------------------------ the run


@dataclass(frozen=True)
class M4RExport:
    """An ``m4r export`` directory to time, under ``label``."""

    label: str
    directory: Path

    @property
    def manifest(self) -> dict[str, Any]:
        from ..integrity import check_artifact_files

        return check_artifact_files(self.directory)


def _m4r_variants(
    exports: list[M4RExport],
    threads: int,
    ort_ops: Path | None,
    file: str = "model.onnx",
    with_int8: bool = True,
) -> list[tuple[str, Any]]:
    out = []
    for i, e in enumerate(exports):
        blob = (e.directory / file).read_bytes()
        if i == 0 or ort_ops is None:  # a fused file's body inlines to the same standard ops: timed once
            out.append((f"{e.label} body", _session(blob, threads, None)))
        if ort_ops is not None:
            out.append((f"{e.label} ops", _session(blob, threads, ort_ops)))
        int8 = e.directory / INT8_FILE
        if with_int8 and int8.is_file():  # m4r export --int8: timed with the library when there is one
            out.append((f"{e.label} int8", _session(int8.read_bytes(), threads, ort_ops)))
    return out


def run_peer_bench(
    exports: list[M4RExport],
    *,
    ort_ops: Path | None,
    batches: tuple[int, ...] | list[int] = DEFAULT_BATCHES,
    seqs: tuple[int, ...] | list[int] = DEFAULT_SEQS,
    threads: tuple[int, ...] | list[int] = DEFAULT_THREADS,
    streaming: bool = True,
    repeats: int = 50,
    seconds_per_point: float = 10.0,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    consecutive: int = 1,
    floor: bool = True,
) -> dict[str, Any]:
    """Time SASRec and every export (function body, and native ops when ``ort_ops``) over the grid.

    ``consecutive``: timed calls of one variant in a row per round (see :func:`time_round_robin`);
    ``floor``: time ONNX Runtime's own per-call cost at every point too (:func:`floor_session`)."""
    if consecutive < 1:
        raise UsageError(f"consecutive={consecutive}: must be >= 1")
    if not exports:
        raise UsageError("pass at least one m4r export directory")
    manifests = [e.manifest for e in exports]
    n_items = int(manifests[0]["model"]["n_items"])
    if any(int(m["model"]["n_items"]) != n_items for m in manifests):
        raise UsageError("the exports have different item counts; time exports of one model")
    say = progress or (lambda _m: None)
    sasrec_bytes, _ = export_sasrec(n_items, max(seqs) + 2, seed)
    rng = np.random.default_rng(seed)
    grid: list[dict[str, Any]] = []
    stream: list[dict[str, Any]] = []
    for nt in threads:
        for batch in sorted(set(batches)):
            for seq in sorted(set(seqs)):
                sas = _session(sasrec_bytes, nt, None)
                m4r = _m4r_variants(exports, nt, ort_ops)
                item_seq = rng.integers(1, n_items, size=(batch, seq)).astype(np.int64)
                lengths = np.full(batch, seq, np.int64)
                sas_call, chunks = _sasrec_call(sas, item_seq, lengths)
                variants = [Variant("sasrec", sas_call)]
                for name, sess in m4r:
                    f = _feeds(sess, item_seq, lengths)
                    variants.append(Variant(name, partial(sess.run, None, f)))
                res = time_round_robin(variants, repeats, seconds_per_point, consecutive=consecutive)
                if floor:
                    res[FLOOR] = time_floor(
                        sas_call, floor_session(nt), item_seq, repeats, seconds_per_point / 2, consecutive
                    )
                del variants, sas, m4r  # this point's sessions and their arenas
                point = {"threads": nt, "batch": batch, "seq": seq, "sasrec_chunks": chunks, "results": res}
                grid.append(point)
                say(_point_line(point))
        if streaming:
            stream.extend(
                _streaming_points(
                    exports,
                    manifests,
                    sasrec_bytes,
                    nt,
                    ort_ops,
                    batches,
                    seqs,
                    rng,
                    repeats,
                    seconds_per_point,
                    say,
                    consecutive,
                    floor,
                )
            )
    import onnxruntime

    return {
        "tool_version": __version__,
        "what": "p50 ms per call for the whole batch, full-length rows; sasrec/x = SASRec p50 / x p50",
        "consecutive": consecutive,
        "timing": _timing_words(consecutive),
        "sasrec": "RecBole shape: 2 blocks, 2 heads, hidden 64, inner 256, causal, scores over the item "
        "table; random weights; torch.onnx.export (dynamo), plain ONNX Runtime",
        "exports": {e.label: str(e.directory) for e in exports},
        "ort_ops": str(ort_ops) if ort_ops else None,
        "n_items": n_items,
        "runtime": f"onnxruntime {onnxruntime.__version__} CPUExecutionProvider",
        "grid": grid,
        "streaming": stream,
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
            "processor": platform.processor(),
            "loadavg": list(os.getloadavg()),
        },
    }


def _streaming_points(
    exports: list[M4RExport],
    manifests: list[dict[str, Any]],
    sasrec_bytes: bytes,
    nt: int,
    ort_ops: Path | None,
    batches: Any,
    seqs: Any,
    rng: np.random.Generator,
    repeats: int,
    budget: float,
    say: Callable[[str], None],
    consecutive: int = 1,
    floor: bool = True,
) -> list[dict[str, Any]]:
    from ..streaming import StreamingSession
    from ..verify.bench_streaming import init_states

    points = []
    timed: set[str] = set()
    for e, man in zip(exports, manifests, strict=True):
        spec = man.get("streaming")
        if not spec or "fp32" not in spec["files"]:
            continue
        files = spec["files"]["fp32"]
        step_sha = man["files"][files["step"]]["sha256"]
        if step_sha in timed:  # the same step.onnx already timed (e.g. two exports of one model)
            continue
        timed.add(step_sha)
        init = _session((e.directory / files["init"]).read_bytes(), nt, ort_ops)
        step_blob = (e.directory / files["step"]).read_bytes()
        n_items = int(man["model"]["n_items"])
        for batch in sorted(set(batches)):
            for seq in sorted(set(seqs)):
                sas = _session(sasrec_bytes, nt, None)
                steps = [(f"{e.label} step body", _session(step_blob, nt, None))]
                if ort_ops is not None:
                    steps.append((f"{e.label} step ops", _session(step_blob, nt, ort_ops)))
                full = _m4r_variants([e], nt, ort_ops, with_int8=False)[-1]
                history = rng.integers(1, n_items, size=(batch, seq + 1)).astype(np.int64)
                states = init_states(init, history[:, :seq], np.full(batch, seq, np.int64), man)
                lengths = np.full(batch, seq + 1, np.int64)
                sas_call, chunks = _sasrec_call(sas, history, lengths)
                variants = [Variant("sasrec re-encode", sas_call)]
                ff = _feeds(full[1], history, lengths)
                variants.append(Variant(f"{full[0]} re-encode", partial(full[1].run, None, ff)))
                for name, sess in steps:
                    feeds = step_feeds(sess, history[:, seq], states)
                    variants.append(Variant(name, partial(sess.run, None, feeds)))
                pusher = None
                if ort_ops is not None:  # the product's helper: StreamingSession.push (bound step)
                    pusher = StreamingSession(e.directory, threads=nt, ort_ops=ort_ops)
                    pusher.load_states(states)
                    push_ids = history[:, seq].copy()
                    variants.append(Variant(f"{e.label} push ops", partial(pusher.push, push_ids)))
                res = time_round_robin(variants, repeats, budget, consecutive=consecutive)
                if floor:  # fed the new events, (batch, 1)
                    res[FLOOR] = time_floor(
                        sas_call, floor_session(nt), history[:, seq:], repeats, budget / 2, consecutive
                    )
                del variants, sas, steps, full, pusher  # this point's sessions and their arenas
                point = {
                    "threads": nt,
                    "batch": batch,
                    "history": seq,
                    "sasrec_chunks": chunks,
                    "results": res,
                }
                points.append(point)
                say(_point_line(point))
    return points


# ------------------------------------------------------------------------------------------ report


def _timing_words(consecutive: int) -> str:
    if consecutive == 1:
        return "calls interleaved one by one (each call after another model's: caches cold)"
    return f"{consecutive} consecutive calls per variant per round (a model's own weights warm)"


def _point_line(p: dict[str, Any]) -> str:
    res = p["results"]
    ref = next(v["p50_ms"] for k, v in res.items() if k.startswith("sasrec"))
    where = f"batch {p['batch']} x {'history' if 'history' in p else 'seq'} {p.get('seq', p.get('history'))}"
    cpu = next(v["cpu_p50_ms"] for k, v in res.items() if k.startswith("sasrec"))
    cells = ", ".join(
        f"{k} {v['p50_ms']:.3f} ms ({ref / v['p50_ms']:.2f}x; cpu {v['cpu_p50_ms']:.3f} ms, "
        f"{cpu / max(v['cpu_p50_ms'], 1e-9):.2f}x)"
        for k, v in res.items()
    )
    return f"{p['threads']} thread(s), {where}: {cells}"


def render_tables(result: dict[str, Any]) -> str:
    """Markdown: one table for the grid, one for streaming; columns = variants, ratio vs SASRec."""
    out = []
    tables = (
        ("re-encode (model.onnx): p50 wall ms per call", "grid", "seq", "p50_ms"),
        ("re-encode (model.onnx): p50 process CPU ms per call", "grid", "seq", "cpu_p50_ms"),
        ("streaming: p50 wall ms per call", "streaming", "history", "p50_ms"),
        ("streaming: p50 process CPU ms per call", "streaming", "history", "cpu_p50_ms"),
    )
    for title, key, dim, metric in tables:
        groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        for p in result[key]:
            groups.setdefault(tuple(p["results"]), []).append(p)
        for names_t, points in groups.items():
            out.append(_table(title, dim, metric, list(names_t), points))
    env = result["environment"]
    out.append(
        f"{result['runtime']}; {env['processor'] or env['machine']}, {env['cpu_count']} CPUs; "
        f"load average at the end {env['loadavg'][0]:.2f}; timing: "
        f"{result.get('timing', _timing_words(1))}; SASRec: {result['sasrec']}"
    )
    return "\n\n".join(out)


def _table(title: str, dim: str, metric: str, names: list[str], points: list[dict[str, Any]]) -> str:
    ref = names[0]
    head = (
        f"| threads | batch | {dim} | "
        + " | ".join(names)
        + " | "
        + " | ".join(f"{ref.split()[0]}/{n}" for n in names[1:])
        + " |"
    )
    sep = "|---:" * (3 + 2 * len(names) - 1) + "|"
    rows = []
    for p in points:
        r = p["results"]
        cells = [f"{r[n][metric]:.3f}" for n in names]
        ratios = [f"{r[ref][metric] / max(r[n][metric], 1e-9):.2f}x" for n in names[1:]]
        chunk = f" ({p['sasrec_chunks']} chunks)" if p["sasrec_chunks"] > 1 else ""
        rows.append(
            f"| {p['threads']} | {p['batch']}{chunk} | {p[dim]} | " + " | ".join(cells + ratios) + " |"
        )
    return f"### {title}\n\n{head}\n{sep}\n" + "\n".join(rows)
