"""``m4r bench``: latency of an artifact next to the PyTorch reference, measured in the same run.

For every (batch, seq) point of the grid, every runner gets its warm-up calls and then the runners
take turns (round-robin, one call each per round), so that a noisy neighbour on a shared machine
slows every backend alike and the ratios stay meaningful. All runners use the same thread count.
Every row of a batch is a full-length history (``item_seq_len == seq``): the cost of a point is
the cost of serving ``batch`` users with ``seq`` items of history each.

Per point: p50/p90/p99/mean latency (ms per call), throughput (sequences/s at p50) and peak memory:
on CPU, the growth of the process's peak resident memory (VmHWM, reset through
``/proc/self/clear_refs``) during the first call at that shape, which includes arena growth; on
CUDA, torch's peak allocated memory (CUDA events time the PyTorch CUDA reference). Then, per
backend and batch, a least-squares fit ``p50 = intercept + slope * seq`` over the sequence sweep
with its R^2 and the log-log exponent: linear cost shows as R^2 ~ 1 and exponent <= 1.

Only what the data supports is reported: a percentile needs ``TAIL_RUNS`` timed calls beyond it
(p90: 50 runs, p99: 500; else it is ``None``, "n/a" in the table: with 20 runs, p99 is just the
maximum), and the sweep fit needs ``MIN_FIT_LENGTHS`` distinct lengths (two points always fit a
line exactly: R^2 = 1 says nothing).

Budget: ``max_seconds`` is shared evenly by the grid points; a point stops after ``repeats``
rounds or when its share is spent, but never before ``MIN_RUNS`` rounds (so a point whose single
call is slower than its share overruns: the budget is soft). Extra warm-up calls are skipped once
the share is spent.
"""

from __future__ import annotations

import copy
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..errors import UsageError
from .artifact import ArtifactInfo, load_artifact
from .runners import Runner, TorchRunner, default_backend, default_threads, make_runner

MIN_RUNS = 3
#: timed calls that must lie beyond a percentile before it is reported (p90: 50 runs, p99: 500)
TAIL_RUNS = 5
#: distinct sequence lengths a linear fit (and a latency-vs-length plot) needs
MIN_FIT_LENGTHS = 3
DEFAULT_REPEATS = 500
DEFAULT_BATCHES = (1, 32, 256)
DEFAULT_SEQS = (50, 200, 1000)


@dataclass
class BenchPoint:
    backend: str
    batch: int
    seq: int  # requested history length
    effective_seq: int  # after the backend's width limit (engine profile / static ONNX dim)
    runs: int
    warmup: int
    p50_ms: float
    p90_ms: float | None  # None: too few runs for this percentile (see TAIL_RUNS)
    p99_ms: float | None
    mean_ms: float
    min_ms: float
    throughput: float  # sequences per second at p50
    peak_mem_mib: float | None
    mem_kind: str  # "rss-growth" | "cuda-peak" | "n/a"


@dataclass
class LinearFit:
    backend: str
    batch: int
    seqs: list[int]
    slope_ms_per_1k: float  # p50 milliseconds per 1000 items of history
    intercept_ms: float
    r2: float
    loglog_exponent: float


@dataclass
class BenchResult:
    artifact: ArtifactInfo
    backends: list[dict[str, Any]]
    reference_weights: str
    threads: int
    points: list[BenchPoint]
    fits: list[LinearFit]
    max_seconds: float
    elapsed_s: float
    environment: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    #: embedding head with an ANN index: exact top-K vs the index (m4r_export.bench.ann), else None
    ann: dict[str, Any] | None = None

    def point(self, backend: str, batch: int, seq: int) -> BenchPoint | None:
        for p in self.points:
            if (p.backend, p.batch, p.seq) == (backend, batch, seq):
                return p
        return None

    def ratios(self, reference: str = "pytorch") -> list[dict[str, Any]]:
        """p50(reference) / p50(backend) per point: > 1 means the backend is faster."""
        rows = []
        for p in self.points:
            if p.backend == reference:
                continue
            ref = self.point(reference, p.batch, p.seq)
            if ref is not None and p.p50_ms > 0:
                rows.append(
                    {"backend": p.backend, "batch": p.batch, "seq": p.seq, "speedup": ref.p50_ms / p.p50_ms}
                )
        return rows

    def to_dict(self) -> dict[str, Any]:
        return {
            "tool": f"m4r-export {__version__}",
            "artifact": self.artifact.describe(),
            "backends": self.backends,
            "reference_weights": self.reference_weights,
            "threads": self.threads,
            "points": [asdict(p) for p in self.points],
            "speedup_vs_pytorch": self.ratios(),
            "linearity": [asdict(f) for f in self.fits],
            "max_seconds": self.max_seconds,
            "elapsed_s": self.elapsed_s,
            "environment": self.environment,
            "notes": self.notes,
            "ann": self.ann,
        }


# ------------------------------------------------------------------------------------------ memory


def _proc_status(field_name: str) -> float | None:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) / 1024.0  # kB -> MiB
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _release_free_heap() -> None:
    """Give freed heap pages back to the OS (glibc), so RSS growth is measured from a low baseline."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _first_call_memory(runner: Runner, seq: np.ndarray, lens: np.ndarray) -> tuple[float | None, str]:
    if runner.device == "cuda":
        runner.peak_memory_reset()
        runner.timed(seq, lens)
        return runner.peak_memory_mib(), "cuda-peak" if runner.peak_memory_mib() is not None else "n/a"
    _release_free_heap()
    can_reset = _reset_peak_rss()
    before = _proc_status("VmRSS")
    runner.timed(seq, lens)
    peak = _proc_status("VmHWM")
    if not can_reset or before is None or peak is None:
        return None, "n/a"
    return max(0.0, peak - before), "rss-growth"


# ------------------------------------------------------------------------------------------- fits


def runs_needed(q: float) -> int:
    """Timed calls needed to report the ``q``-th percentile (``TAIL_RUNS`` calls beyond it)."""
    return int(np.ceil(TAIL_RUNS * 100.0 / (100.0 - q) - 1e-9))


def percentile(ms: np.ndarray, q: float) -> float | None:
    """The ``q``-th percentile of ``ms``, or None when there are too few runs to tell it from noise."""
    return float(np.percentile(ms, q)) if len(ms) >= runs_needed(q) else None


def fit_linear(seqs: list[int], p50s: list[float]) -> tuple[float, float, float, float]:
    """(slope per item, intercept, R^2, log-log exponent) of p50 against seq."""
    x = np.asarray(seqs, dtype=np.float64)
    y = np.asarray(p50s, dtype=np.float64)
    slope, intercept = np.polyfit(x, y, 1)
    pred = intercept + slope * x
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float(((y - pred) ** 2).sum()) / ss_tot if ss_tot > 0 else 1.0
    exponent = float(np.polyfit(np.log(x), np.log(np.maximum(y, 1e-9)), 1)[0])
    return float(slope), float(intercept), r2, exponent


def _fits(points: list[BenchPoint]) -> list[LinearFit]:
    out = []
    keys = sorted({(p.backend, p.batch) for p in points})
    for backend, batch in keys:
        pts = sorted((p for p in points if (p.backend, p.batch) == (backend, batch)), key=lambda p: p.seq)
        seqs = [p.effective_seq for p in pts]
        if len(set(seqs)) < MIN_FIT_LENGTHS:
            continue
        slope, intercept, r2, exponent = fit_linear(seqs, [p.p50_ms for p in pts])
        out.append(LinearFit(backend, batch, seqs, slope * 1000.0, intercept, r2, exponent))
    return out


# ------------------------------------------------------------------------------------------- core


def _reference_model(art: ArtifactInfo, ckpt: str | Path | None) -> tuple[Any, str]:
    from ..model import Mamba4Rec, Mamba4RecConfig

    if ckpt is not None:
        from ..checkpoint import load_checkpoint

        return load_checkpoint(ckpt), f"checkpoint {ckpt}"
    if art.model_config is None:
        raise UsageError(
            f"{art.path}: no manifest.json with the model config beside it; pass --ckpt so that the "
            "PyTorch reference can be built"
        )
    config = Mamba4RecConfig.from_dict(art.model_config)
    return (
        Mamba4Rec.from_config(config).eval(),
        "random weights with the manifest's config (latency does not depend on weight values)",
    )


def run_bench(
    artifact: str | Path,
    *,
    ckpt: str | Path | None = None,
    batches: tuple[int, ...] | list[int] = DEFAULT_BATCHES,
    seqs: tuple[int, ...] | list[int] = DEFAULT_SEQS,
    backends: list[str] | None = None,
    reference: bool = True,
    warmup: int = 2,
    repeats: int = DEFAULT_REPEATS,
    max_seconds: float = 120.0,
    threads: int | None = None,
    scan_backend: str = "auto",
    reference_device: str = "cpu",
    seed: int = 0,
    progress: Any = None,
    ort_ops: Path | None = None,
    extra_scan_backends: tuple[str, ...] | list[str] = (),
    ann_k: int = 10,
) -> BenchResult:
    """Benchmark ``artifact`` (and the PyTorch reference) over the batch x seq grid.

    ``progress``, when given, is called with a one-line string after each grid point.
    ``ort_ops``: custom-op library for the ``ort-cpu-ops`` backend (the default backend when given).
    ``extra_scan_backends``: more PyTorch references timed beside ``scan_backend`` (named
    ``pytorch-<scan backend>``; ratios stay relative to the first, ``pytorch``).
    ``ann_k``: an embedding export with an ANN index also gets exact top-``ann_k`` and the index
    timed side by side at every batch size, with the index's recall@``ann_k`` (``result.ann``).
    """
    batches, seqs = sorted(set(batches)), sorted(set(seqs))
    for what, values in (("--batch", batches), ("--seq", seqs)):
        if not values or min(values) < 1:
            raise UsageError(f"{what} values must be positive integers, got {values}")
    if warmup < 0 or repeats < 1 or max_seconds <= 0:
        raise UsageError("need --warmup >= 0, --repeats >= 1 and --max-seconds > 0")
    art = load_artifact(artifact)
    threads = threads or default_threads()
    notes = list(art.notes)
    runners: list[Runner] = [
        make_runner(b, art, threads=threads, ort_ops=ort_ops)
        for b in backends or [default_backend(art, ort_ops)]
    ]
    ref_weights = "none"
    model: Any = None
    if reference:
        model, ref_weights = _reference_model(art, ckpt)
        ref = TorchRunner(
            model,
            art.head,
            art.k or 10,
            art.exclude_history,
            device=reference_device,
            scan_backend=scan_backend,
            threads=threads,
        )
        runners.append(ref)
        for extra in extra_scan_backends:
            other = TorchRunner(
                copy.deepcopy(model),
                art.head,
                art.k or 10,
                art.exclude_history,
                device=reference_device,
                scan_backend=extra,
                threads=threads,
            )
            other.name = f"{ref.name}-{extra}"
            runners.append(other)
    if art.model_config is not None and art.model_config.get("n_items"):
        n_items = int(art.model_config["n_items"])
    elif reference:
        n_items = int(model.n_items)
    else:
        raise UsageError(f"{art.path}: no manifest.json gives the number of items; pass --ckpt")
    if art.max_seq_len is not None and max(seqs) > art.max_seq_len:
        notes.append(
            f"seq > {art.max_seq_len} (the exported max_seq_len) is timed as given where the backend accepts "
            "it; serving keeps the most recent max_seq_len items"
        )
    rng = np.random.default_rng(seed)
    budget = max_seconds / (len(batches) * len(seqs))
    points: list[BenchPoint] = []
    start = time.perf_counter()
    for batch in batches:
        for seq in seqs:
            item_seq = rng.integers(1, n_items, size=(batch, seq)).astype(np.int64)
            item_seq_len = np.full(batch, seq, dtype=np.int64)
            # every runner sees the width the artifact backend accepts (same work on both sides)
            item_seq, item_seq_len = runners[0].adapt(item_seq, item_seq_len)
            t0 = time.perf_counter()
            mem = {}
            for r in runners:
                mem[r.name] = _first_call_memory(r, item_seq, item_seq_len)
            warm_done = 1  # the memory probe is the first warm-up call
            for _ in range(max(0, warmup - 1)):
                if time.perf_counter() - t0 > budget:
                    break  # one warm-up call is enough for a slow point
                for r in runners:
                    r.timed(item_seq, item_seq_len)
                warm_done += 1
            times: dict[str, list[float]] = {r.name: [] for r in runners}
            for i in range(repeats):
                if i >= MIN_RUNS and time.perf_counter() - t0 > budget:
                    break
                for r in runners:
                    times[r.name].append(r.timed(item_seq, item_seq_len))
            for r in runners:
                ms = np.asarray(times[r.name])
                p50 = float(np.percentile(ms, 50))
                points.append(
                    BenchPoint(
                        backend=r.name,
                        batch=batch,
                        seq=seq,
                        effective_seq=int(item_seq.shape[1]),
                        runs=len(ms),
                        warmup=warm_done,
                        p50_ms=p50,
                        p90_ms=percentile(ms, 90),
                        p99_ms=percentile(ms, 99),
                        mean_ms=float(ms.mean()),
                        min_ms=float(ms.min()),
                        throughput=batch / (p50 / 1000.0) if p50 > 0 else float("inf"),
                        peak_mem_mib=mem[r.name][0],
                        mem_kind=mem[r.name][1],
                    )
                )
            if progress is not None:
                progress(
                    f"batch {batch:>4} seq {seq:>5}: "
                    + ", ".join(
                        f"{r.name} {points[-len(runners) + j].p50_ms:.2f} ms" for j, r in enumerate(runners)
                    )
                )
    elapsed = time.perf_counter() - start
    lengths = len({p.effective_seq for p in points})
    if lengths < MIN_FIT_LENGTHS:
        notes.append(
            f"no sequence-length fit or latency-vs-length plot: it needs >= {MIN_FIT_LENGTHS} lengths, "
            f"got {lengths} (pass e.g. --seq 50 100 200)"
        )
    for q in (90, 99):
        short = [p for p in points if p.runs < runs_needed(q)]
        if short:
            notes.append(
                f"p{q} is n/a where a point has fewer than {runs_needed(q)} runs ({len(short)} of "
                f"{len(points)}; fewest {min(p.runs for p in short)}): raise --repeats / --max-seconds"
            )
    if any(p.effective_seq != p.seq for p in points):
        notes.append(
            "some sequence lengths exceed the backend's input width: the most recent items were kept"
        )
    from ..bench.ann import run_ann_bench

    ann = run_ann_bench(
        art,
        lambda s, n: runners[0].run(s, n)["user_embedding"],
        n_items,
        int(runners[0].adapt(np.ones((1, max(seqs)), np.int64), np.ones(1, np.int64))[0].shape[1]),
        batches=batches,
        k=ann_k,
        threads=threads,
        repeats=repeats,
        max_seconds=max_seconds / 4,
    )
    if ann is not None and progress is not None:
        progress(
            f"ANN ({ann['kind']}): recall@{ann_k} {ann[f'recall@{ann_k}_mean']:.3f}; "
            + ", ".join(
                f"batch {p['batch']}: exact {p['exact_p50_ms']:.2f} ms, ann {p['ann_p50_ms']:.2f} ms"
                for p in ann["points"]
            )
        )
    described = [r.describe() for r in runners]
    for r in runners:
        r.close()
    import onnxruntime
    import torch

    return BenchResult(
        artifact=art,
        backends=described,
        reference_weights=ref_weights,
        threads=threads,
        points=points,
        fits=_fits(points),
        max_seconds=max_seconds,
        elapsed_s=elapsed,
        environment={
            "python": platform.python_version(),
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
            "cpu_count": os.cpu_count(),
            "threads": threads,
            "machine": platform.machine(),
            "processor": platform.processor(),
        },
        notes=notes,
        ann=ann,
    )
