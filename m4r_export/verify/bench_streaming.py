"""``m4r bench --streaming``: one new event served by ``step.onnx`` vs a full re-encode with ``model.onnx``.

For each (batch, history length L) point: every row has a history of L items; a new event arrives
for every row. The re-encode path runs ``model.onnx`` on the L+1 items (what a stateless service
does per event); the streaming path runs ``step.onnx`` once on the states of the L-item history
(computed beforehand with ``init.onnx``, in row chunks, untimed). Both on ONNX Runtime CPU, same
thread count, timed in alternation (one call each per round) so that a noisy neighbour slows both
alike. Per point: p50/mean latency per call (= per event for the batch), events/s at p50, and the
speed-up (re-encode p50 / step p50). A point stops after ``repeats`` rounds or when its share of
``max_seconds`` is spent, never before ``MIN_RUNS`` rounds.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..errors import UsageError
from ..serving import state_names

MIN_RUNS = 3
DEFAULT_BATCHES = (1, 256)
DEFAULT_SEQS = (50, 200, 1000)


def _export_dir(path: Path) -> Path:
    d = path if path.is_dir() else path.parent
    if not (d / "manifest.json").is_file():
        raise UsageError(f"{path}: no manifest.json there; pass the directory of `m4r export --streaming`")
    return d


def init_states(
    init_sess: Any, item_seq: np.ndarray, lengths: np.ndarray, manifest: dict[str, Any]
) -> dict[str, np.ndarray]:
    """States after each row's history, by step-input name (init called in memory-bounded row chunks)."""
    from ..streaming import init_chunk_rows

    rows = init_chunk_rows(manifest["model"], item_seq.shape[1])
    names = [o.name for o in init_sess.get_outputs()]
    takes_exclude = "exclude_items" in {i.name for i in init_sess.get_inputs()}
    parts = []
    for i in range(0, item_seq.shape[0], rows):
        feeds = {"item_seq": item_seq[i : i + rows], "item_seq_len": lengths[i : i + rows]}
        if takes_exclude:
            feeds["exclude_items"] = np.zeros((len(feeds["item_seq"]), 1), np.int64)
        parts.append(init_sess.run(None, feeds))
    outs = dict(zip(names, [np.concatenate(c) for c in zip(*parts, strict=True)], strict=True))
    return {s["step_input"]: outs[s["output"]] for s in manifest["streaming"]["states"]}


def run_streaming_bench(
    artifact: str | os.PathLike[str],
    *,
    batches: list[int] | tuple[int, ...] = DEFAULT_BATCHES,
    seqs: list[int] | tuple[int, ...] = DEFAULT_SEQS,
    precision: str = "fp32",
    threads: int | None = None,
    warmup: int = 1,
    repeats: int = 20,
    max_seconds: float = 300.0,
    seed: int = 0,
    progress: Any = None,
) -> dict[str, Any]:
    from ..onnx.manifest import open_artifact

    d = _export_dir(Path(artifact))
    with open_artifact(d) as files:  # every listed file present with its sha256 (exit code 3 if not)
        return _bench(files, batches, seqs, precision, threads, warmup, repeats, max_seconds, seed, progress)


def _bench(
    files: Any,
    batches: list[int] | tuple[int, ...],
    seqs: list[int] | tuple[int, ...],
    precision: str,
    threads: int | None,
    warmup: int,
    repeats: int,
    max_seconds: float,
    seed: int,
    progress: Any,
) -> dict[str, Any]:
    from ..onnx.export import ort_session
    from .runners import default_threads

    d, manifest = files.directory, files.manifest
    spec = manifest.get("streaming")
    if spec is None:
        raise UsageError(
            f"{d}/manifest.json has no 'streaming' section: re-export with `m4r export --streaming`"
        )
    if precision not in spec["files"]:
        raise UsageError(
            f"--precision {precision}: the export has {', '.join(spec['files'])} streaming graphs"
        )
    model_file = "model.onnx" if precision == "fp32" else "model.fp16.onnx"
    threads = threads or default_threads()
    # from the checked open files: the bytes that were hashed (a republished directory cannot mix)
    full = ort_session((files, model_file), threads)
    init = ort_session((files, spec["files"][precision]["init"]), threads)
    step = ort_session((files, spec["files"][precision]["step"]), threads)
    n_items = int(manifest["model"]["n_items"])
    full_inputs = {i.name for i in full.get_inputs()}
    step_inputs = {i.name for i in step.get_inputs()}
    assert len(spec["states"]) == len(state_names(int(manifest["model"]["num_layers"])))
    rng = np.random.default_rng(seed)
    budget = max_seconds / (len(batches) * len(seqs))
    points: list[dict[str, Any]] = []
    start = time.perf_counter()
    for batch in sorted(set(batches)):
        for seq in sorted(set(seqs)):
            history = rng.integers(1, n_items, size=(batch, seq + 1)).astype(np.int64)
            states = init_states(init, history[:, :seq], np.full(batch, seq, np.int64), manifest)
            # ranking heads' exclude_items input: nothing to exclude, on both sides
            excl = {"exclude_items": np.zeros((batch, 1), np.int64)}
            full_feeds = {"item_seq": history, "item_seq_len": np.full(batch, seq + 1, np.int64)}
            full_feeds.update({k: v for k, v in excl.items() if k in full_inputs})
            step_feeds = {"item_id": history[:, seq].copy(), **states}
            step_feeds.update({k: v for k, v in excl.items() if k in step_inputs})
            calls = {"reencode": (full, full_feeds), "step": (step, step_feeds)}
            t0 = time.perf_counter()
            for _ in range(max(1, warmup)):
                for sess, feeds in calls.values():
                    sess.run(None, feeds)
            times: dict[str, list[float]] = {k: [] for k in calls}
            for i in range(repeats):
                if i >= MIN_RUNS and time.perf_counter() - t0 > budget:
                    break
                for name, (sess, feeds) in calls.items():
                    c = time.perf_counter()
                    sess.run(None, feeds)
                    times[name].append((time.perf_counter() - c) * 1000.0)
            point: dict[str, Any] = {"batch": batch, "history": seq, "runs": len(times["step"])}
            for name, ms in times.items():
                p50 = float(np.percentile(ms, 50))
                point[name] = {
                    "p50_ms": p50,
                    "mean_ms": float(np.mean(ms)),
                    "min_ms": float(np.min(ms)),
                    "events_per_s": batch / (p50 / 1000.0),
                }
            point["speedup"] = point["reencode"]["p50_ms"] / point["step"]["p50_ms"]
            points.append(point)
            if progress is not None:
                progress(format_point(point))
    import onnxruntime

    return {
        "tool_version": __version__,
        "artifact": str(d),
        "precision": precision,
        "runtime": f"onnxruntime {onnxruntime.__version__} CPUExecutionProvider",
        "threads": threads,
        "what": "per event: re-encode = model.onnx on history+1 items; step = step.onnx on the states "
        "of the history (init untimed); latency per call for the whole batch",
        "points": points,
        "elapsed_s": time.perf_counter() - start,
        "environment": {
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
            "processor": platform.processor(),
        },
    }


def format_point(p: dict[str, Any]) -> str:
    r, s = p["reencode"], p["step"]
    return (
        f"| {p['batch']:>5} | {p['history']:>7} | {r['p50_ms']:>12.3f} | {s['p50_ms']:>7.3f} | "
        f"{r['events_per_s']:>14.0f} | {s['events_per_s']:>9.0f} | {p['speedup']:>7.1f}x | {p['runs']:>4} |"
    )


TABLE_HEAD = (
    "| batch | history | re-encode ms | step ms | re-encode ev/s | step ev/s | speed-up | runs |\n"
    "|------:|--------:|-------------:|--------:|---------------:|----------:|---------:|-----:|"
)


def render_footer(result: dict[str, Any]) -> str:
    return (
        f"{result['runtime']}, {result['threads']} thread(s), {result['precision']}; "
        "p50 per call (one new event per row)"
    )


def render_table(result: dict[str, Any]) -> str:
    """The markdown table of ``result`` (what README's streaming table is generated from)."""
    rows = "\n".join(format_point(p) for p in result["points"])
    return f"{TABLE_HEAD}\n{rows}\n\n{render_footer(result)}"


def summary_table(result: dict[str, Any]) -> str:
    """README's streaming table (p50 per call; generated from a `m4r bench --streaming --json` report by
    scripts/doc_tables.py, and checked against it by tests/test_doc_tables.py)."""
    lines = [
        "| batch | history | re-encode ms | step ms | speed-up per event |",
        "|------:|--------:|-------------:|--------:|---------:|",
    ]
    for p in result["points"]:
        r, s = p["reencode"]["p50_ms"], p["step"]["p50_ms"]
        lines.append(f"| {p['batch']} | {p['history']} | {_ms(r)} | {_ms(s)} | {p['speedup']:.1f}x |")
    return "\n".join(lines)


def _ms(value: float) -> str:
    """Three significant digits (0.133, 1.84, 13.0, 890, 3562)."""
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}" if value >= 1 else f"{value:.3f}"
