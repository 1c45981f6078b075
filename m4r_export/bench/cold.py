"""What a cold cache costs one batch-1 call: the streaming step and a one-node graph after different calls.

The peer benchmark (:mod:`.peer`) reports a "cold" figure: each call right after the other model's. This
module takes that figure apart. For one export with ``step.onnx``, it times the step (with the custom-op
library when one is given) and :func:`.peer.floor_session` (ONNX Runtime's own per-call cost) right after
each of these previous calls:

* ``none``: the same call again (everything warm);
* ``sasrec re-encode``: SASRec (:func:`.peer.export_sasrec`) re-encoding the history plus the event, as in
  the peer benchmark's cold mode;
* ``numpy pass N MB``: one in-place pass over an N MB array; it evicts data only (no other code runs), N
  chosen below and above the caches (e.g. 1 and 4 MB: L2 and part of L3; 32 MB: all of L3 here).

The step minus its ``none`` figure is what refilling the caches costs it after that call; the floor's
share of it is the runtime's (Python binding, ONNX Runtime's run path), the rest the model's own code and
data (weights, item table, states). Each (previous call, target) pair runs ``calls`` times in a row, the
median of all but the first tenth reported.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..errors import UsageError
from .peer import _session, export_sasrec, floor_session, step_feeds

DEFAULT_FLUSH_MB = (1, 4, 32)


def _median_after(prev: Callable[[], Any], call: Callable[[], Any], calls: int) -> float:
    """Median ms of ``call`` when each is preceded by ``prev`` (first tenth dropped as warm-up)."""
    times = []
    for _ in range(calls):
        prev()
        t = time.perf_counter()
        call()
        times.append((time.perf_counter() - t) * 1000.0)
    return float(np.median(times[calls // 10 :]))


def _step_feeds(directory: Path, manifest: dict[str, Any], ort_ops: Path | None, history: np.ndarray) -> Any:
    from ..verify.bench_streaming import init_states

    files = manifest["streaming"]["files"]["fp32"]
    init = _session((directory / files["init"]).read_bytes(), 1, ort_ops)
    seq = history.shape[1] - 1
    states = init_states(init, history[:, :seq], np.full(len(history), seq, np.int64), manifest)
    step = _session((directory / files["step"]).read_bytes(), 1, ort_ops)
    return step, step_feeds(step, history[:, seq], states)


def run_cold_bench(
    directory: Path,
    *,
    ort_ops: Path | None,
    history: int = 200,
    calls: int = 400,
    flush_mb: tuple[int, ...] | list[int] = DEFAULT_FLUSH_MB,
    seed: int = 0,
) -> dict[str, Any]:
    """Step and floor p50 after each previous call (1 thread, batch 1); see the module docstring."""
    from ..integrity import check_artifact_files

    manifest = check_artifact_files(directory)
    if not manifest.get("streaming") or "fp32" not in manifest["streaming"]["files"]:
        raise UsageError(f"{directory}: no fp32 step.onnx there; export with `m4r export --streaming`")
    if history < 1 or calls < 10:
        raise UsageError(f"history={history}, calls={calls}: need history >= 1 and calls >= 10")
    n_items = int(manifest["model"]["n_items"])
    events = np.random.default_rng(seed).integers(1, n_items, size=(1, history + 1)).astype(np.int64)
    step, feeds = _step_feeds(directory, manifest, ort_ops, events)
    sas = _session(export_sasrec(n_items, history + 3, seed)[0], 1, None)
    sas_feeds = {"item_seq": events, "item_seq_len": np.array([history + 1], np.int64)}
    floor, floor_feeds = floor_session(1), {"x": events[:, history:].copy()}
    previous: dict[str, Callable[[], Any]] = {"none": lambda: None}
    previous["sasrec re-encode"] = partial(sas.run, None, sas_feeds)
    for mb in flush_mb:
        buf = np.ones(mb * 2**18, np.float32)
        previous[f"numpy pass {mb} MB"] = partial(np.add, buf, 1.0, out=buf)
    rows = []
    for name, prev in previous.items():
        step_ms = _median_after(prev, partial(step.run, None, feeds), calls)
        floor_ms = _median_after(prev, partial(floor.run, None, floor_feeds), calls)
        rows.append({"previous": name, "step_ms": step_ms, "floor_ms": floor_ms})
    import onnxruntime

    return {
        "tool_version": __version__,
        "export": str(directory),
        "ort_ops": str(ort_ops) if ort_ops else None,
        "history": history,
        "calls": calls,
        "what": "median ms of one batch-1 call right after the previous call named in each row; 1 thread",
        "runtime": f"onnxruntime {onnxruntime.__version__} CPUExecutionProvider",
        "rows": rows,
        "environment": {
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "loadavg": list(os.getloadavg()),
        },
    }


def render_cold(result: dict[str, Any]) -> str:
    """Markdown table: per previous call, step and floor ms and what each adds over the warm row."""
    base = next(r for r in result["rows"] if r["previous"] == "none")
    lines = [
        f"### batch-1 step at history {result['history']} after another call (median ms, 1 thread)",
        "",
        "| previous call | step.onnx | + over warm | ort floor (1 node) | + over warm |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['previous']} | {r['step_ms']:.4f} | {r['step_ms'] - base['step_ms']:+.4f} | "
            f"{r['floor_ms']:.4f} | {r['floor_ms'] - base['floor_ms']:+.4f} |"
        )
    env = result["environment"]
    lines.append("")
    lines.append(
        f"{result['runtime']}; {env['processor']}, {env['cpu_count']} CPUs; load {env['loadavg'][0]:.2f}"
    )
    return "\n".join(lines)
