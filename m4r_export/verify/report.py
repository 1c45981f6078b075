"""Human output (rich tables), Markdown tables for docs, and optional PNG plots (matplotlib)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console

from ..console import titled_table
from ..errors import UsageError
from .bench import MIN_FIT_LENGTHS, BenchResult
from .verify import VerifyReport, overlap_histogram

PLOT_HINT = "matplotlib is a dependency of m4r-export: pip install matplotlib (or reinstall m4r-export)"


def require_matplotlib() -> None:
    """UsageError (before any work is done) when a plot was asked for but matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise UsageError(f"--plot needs matplotlib, which is not installed ({exc}); {PLOT_HINT}") from exc


def _console() -> Console:
    """A console that does not squeeze the tables to 80 columns when the output is a pipe or file."""
    console = Console()
    return console if console.is_terminal else Console(width=140)


def _mib(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1f}"


def _ms(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        if v != v:  # NaN
            return "nan"
        return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return str(v)


def render_verify(report: VerifyReport, console: Console | None = None) -> None:
    console = console or _console()
    art = report.artifact
    console.print(
        f"[bold]m4r verify[/bold] {art.path} ([cyan]{art.kind}[/cyan], head {art.head}, {art.precision}"
        f"{', exclude_history' if art.exclude_history else ''}) vs PyTorch ({report.reference.get('name')}, "
        f"scan {report.reference.get('scan_backend')})"
    )
    console.print(f"inputs: {report.inputs['source']}; K = {report.k}")
    for r in report.results:
        table = titled_table(f"{r.backend}: {'PASS' if r.passed else 'FAIL'} ({r.seconds:.2f} s)")
        table.add_column("metric")
        table.add_column("value", justify="right")
        table.add_column("threshold", justify="right")
        table.add_column("", justify="center")
        checked = {c.metric: c for c in r.checks}
        checked_raw = {c.metric.strip("|"): c for c in r.checks}
        shown = [
            "max_abs_error",
            "mean_abs_error",
            "max_rel_error",
            "mean_rel_error",
            "mask_mismatches",
            "nan",
            "pos_inf",
            "unexpected_neg_inf",
            "non_finite",
            "embedding_max_abs_error",
            "topk_items_out_of_range",
            "topk_overlap_mean",
            "topk_overlap_min",
            "topk_overlap_worst_user",
            "users_topk_identical",
            "kendall_tau_mean",
            "kendall_tau_min",
            "rbo_mean",
            "rbo_min",
        ]
        shown += [key for key in r.metrics if "@" in key]
        for key in shown:
            if key not in r.metrics:
                continue
            check = checked.get(key) or checked_raw.get(key)
            if check is None and key.endswith("_delta"):
                check = checked.get(f"|{key}|")
            mark = "" if check is None else ("[green]ok[/green]" if check.passed else "[red]FAIL[/red]")
            limit = "" if check is None else f"{check.op} {_fmt(check.threshold)}"
            if check is not None and check.metric.startswith("|"):
                limit = f"|x| {limit}"
            table.add_row(key, _fmt(r.metrics[key]), limit, mark)
        console.print(table)
        hist = overlap_histogram(r.overlap, report.k)
        console.print("top-K overlap per user: " + ", ".join(f"{k}: {v}" for k, v in hist.items()))
    console.print(f"thresholds: {report.threshold_source}")
    for note in report.notes:
        console.print(f"[yellow]note:[/yellow] {note}")
    if report.passed:
        console.print("[bold green]PASS[/bold green]: the artifact ranks items like the PyTorch model")
    else:
        console.print(f"[bold red]FAIL[/bold red]: {report.failure_message()}")


def _render_ann(console: Console, ann: dict[str, Any]) -> None:
    k = ann["k"]
    knob = ", ".join(f"{key} {value}" for key, value in ann["search_knob"].items())
    table = titled_table(
        f"top-{k} search of the user vectors: exact (whole table) vs the {ann['kind']} index ({knob}); "
        f"recall@{k} {ann[f'recall@{k}_mean']:.3f} (min {ann[f'recall@{k}_min']:.2f}) over "
        f"{ann['recall_users']} users, {ann['n_items']:,} items"
    )
    for col in ("batch", "runs", "exact p50 ms", "ann p50 ms", "exact / ann"):
        table.add_column(col, justify="right")
    for p in ann["points"]:
        table.add_row(
            str(p["batch"]),
            str(p["runs"]),
            f"{p['exact_p50_ms']:.3f}",
            f"{p['ann_p50_ms']:.3f}",
            f"{p['speedup']:.1f}x",
        )
    console.print(table)


def render_bench(result: BenchResult, console: Console | None = None) -> None:
    console = console or _console()
    art = result.artifact
    console.print(
        f"[bold]m4r bench[/bold] {art.path} ({art.kind}, head {art.head}, {art.precision}); "
        f"{result.threads} thread(s) for every backend; PyTorch reference: {result.reference_weights}"
    )
    table = titled_table("latency per call (ms), throughput (sequences/s), peak memory (MiB)")
    for col in ("backend", "batch", "seq", "runs", "p50", "p90", "p99", "seq/s", "mem", "vs pytorch"):
        table.add_column(col, justify="left" if col == "backend" else "right")
    speed = {(r["backend"], r["batch"], r["seq"]): r["speedup"] for r in result.ratios()}
    for p in sorted(result.points, key=lambda p: (p.batch, p.seq, p.backend != "pytorch", p.backend)):
        seq = str(p.seq) if p.seq == p.effective_seq else f"{p.seq}->{p.effective_seq}"
        ratio = speed.get((p.backend, p.batch, p.seq))
        table.add_row(
            p.backend,
            str(p.batch),
            seq,
            str(p.runs),
            f"{p.p50_ms:.3f}",
            _ms(p.p90_ms),
            _ms(p.p99_ms),
            f"{p.throughput:,.0f}",
            _mib(p.peak_mem_mib),
            "" if ratio is None else f"{ratio:.2f}x",
        )
    console.print(table)
    if result.ann is not None:
        _render_ann(console, result.ann)
    if result.fits:
        fit_table = titled_table("sequence-length sweep: p50 = intercept + slope * seq")
        for col in (
            "backend",
            "batch",
            "seqs",
            "slope (ms / 1k items)",
            "intercept (ms)",
            "R^2",
            "log-log exp.",
        ):
            fit_table.add_column(col, justify="left" if col == "backend" else "right")
        for f in result.fits:
            fit_table.add_row(
                f.backend,
                str(f.batch),
                ",".join(map(str, f.seqs)),
                f"{f.slope_ms_per_1k:.3f}",
                f"{f.intercept_ms:.3f}",
                f"{f.r2:.4f}",
                f"{f.loglog_exponent:.2f}",
            )
        console.print(fit_table)
    console.print(f"elapsed {result.elapsed_s:.1f} s (budget {result.max_seconds:.0f} s)")
    for note in result.notes:
        console.print(f"[yellow]note:[/yellow] {note}")


def bench_markdown(result: BenchResult) -> str:
    """The latency table as Markdown (for README / docs)."""
    speed = {(r["backend"], r["batch"], r["seq"]): r["speedup"] for r in result.ratios()}
    lines = [
        "| backend | batch | seq | p50 ms | p90 ms | p99 ms | seq/s | peak MiB | speed-up vs PyTorch |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in sorted(result.points, key=lambda p: (p.batch, p.seq, p.backend != "pytorch", p.backend)):
        ratio = speed.get((p.backend, p.batch, p.seq))
        lines.append(
            f"| {p.backend} | {p.batch} | {p.seq} | {p.p50_ms:.3f} | {_ms(p.p90_ms)} | {_ms(p.p99_ms)} | "
            f"{p.throughput:,.0f} | {_mib(p.peak_mem_mib)} | {'' if ratio is None else f'{ratio:.2f}x'} |"
        )
    if result.fits:
        lines += [
            "",
            "| backend | batch | seq sweep | slope (ms / 1k items) | intercept (ms) | R^2 | log-log exp. |",
            "|---|---:|---|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {f.backend} | {f.batch} | {', '.join(map(str, f.seqs))} | {f.slope_ms_per_1k:.1f} | "
            f"{f.intercept_ms:.1f} | {f.r2:.4f} | {f.loglog_exponent:.2f} |"
            for f in result.fits
        ]
    return "\n".join(lines) + "\n"


def plot_bench(result: BenchResult, path: str | Path) -> Path:
    """PNG of p50 latency per call (see :func:`plot_bench_figure`)."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plot_bench_figure(result)
    out = Path(path)
    _save(fig, out)
    plt.close(fig)
    return out


def plot_bench_figure(result: BenchResult) -> Any:
    """p50 latency against sequence length (one panel per batch, one line per backend) when the sweep
    has >= MIN_FIT_LENGTHS lengths; otherwise one bar per backend at each (batch, seq) point: a line
    through one or two lengths would suggest a trend the data does not show."""
    import matplotlib.pyplot as plt
    import numpy as np

    batches = sorted({p.batch for p in result.points})
    backends = sorted({p.backend for p in result.points})
    lengths = sorted({p.effective_seq for p in result.points})
    where = f"{result.artifact.path.name}, {result.threads} thread(s)"
    if len(lengths) >= MIN_FIT_LENGTHS:
        fig, axes = plt.subplots(1, len(batches), figsize=(4.2 * len(batches), 3.8), squeeze=False)
        for ax, batch in zip(axes[0], batches, strict=True):
            for backend in backends:
                pts = sorted(
                    (p for p in result.points if (p.backend, p.batch) == (backend, batch)),
                    key=lambda p: p.seq,
                )
                ax.plot([p.effective_seq for p in pts], [p.p50_ms for p in pts], marker="o", label=backend)
            ax.set_title(f"batch {batch}")
            ax.set_xlabel("sequence length (items)")
            ax.set_ylim(bottom=0)
            ax.grid(True, alpha=0.3)
        axes[0][0].set_ylabel("p50 latency per call (ms)")
        axes[0][0].legend(fontsize=8)
        fig.suptitle(f"m4r bench: {where}")
    else:
        grid = sorted({(p.batch, p.seq) for p in result.points})
        fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(grid) + 2.0), 4.2))
        width = 0.8 / max(1, len(backends))
        x = np.arange(len(grid))
        for i, backend in enumerate(backends):
            values = [getattr(result.point(backend, b, s), "p50_ms", np.nan) for b, s in grid]
            bars = ax.bar(x + (i - (len(backends) - 1) / 2) * width, values, width=width, label=backend)
            ax.bar_label(bars, fmt="%.3g", fontsize=7, padding=2)
        ax.set_xticks(x, [f"batch {b}\nseq {s}" for b, s in grid])
        ax.set_ylabel("p50 latency per call (ms)")
        values = [p.p50_ms for p in result.points if p.p50_ms > 0]
        if values and max(values) / min(values) > 30:
            ax.set_yscale("log")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(
            f"m4r bench: {where}\n(latency against length needs >= {MIN_FIT_LENGTHS} lengths)", fontsize=10
        )
    fig.tight_layout()
    return fig


def plot_verify(report: VerifyReport, path: str | Path) -> Path:
    """PNG: histogram of per-user top-K overlap, one bar group per backend."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4.5))
    k = report.k
    n = len(report.results)
    width = 0.8 / max(1, n)
    users = 0
    for i, r in enumerate(report.results):
        shared = np.rint(r.overlap * k).astype(int)
        users = len(shared)
        counts = np.bincount(shared, minlength=k + 1)
        bars = ax.bar(np.arange(k + 1) + (i - (n - 1) / 2) * width, counts, width=width, label=r.backend)
        ax.bar_label(bars, labels=[str(c) if c else "" for c in counts], fontsize=8, padding=2)
    ax.set_xticks(np.arange(k + 1) if k <= 20 else np.linspace(0, k, 11).round().astype(int))
    ax.set_xlabel(f"items of the PyTorch top-{k} that the artifact also returns (per user)")
    ax.set_ylabel("users (log scale)")
    ax.set_yscale("symlog")  # a handful of users off the top bar must stay visible next to hundreds
    ax.set_ylim(bottom=0, top=max(1, users) * 3)
    verdict = "PASS" if report.passed else "FAIL"
    ax.set_title(
        f"m4r verify: {report.artifact.path.name} ({report.artifact.precision}) vs PyTorch, "
        f"{users} users, K = {k}: {verdict}",
        fontsize=10,
    )
    ax.legend(loc="upper left")
    fig.tight_layout()
    out = Path(path)
    _save(fig, out)
    plt.close(fig)
    return out


def _save(fig: Any, out: Path) -> None:
    import io

    from ..fileio import write_bytes_atomic

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    write_bytes_atomic(out, buf.getvalue())
