"""``m4r verify`` and ``m4r bench``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ..data.cli import column_options, columns_from
from ..errors import M4RError, UsageError

#: options that take several values after one flag (``--batch 1 32 256``)
MULTI_VALUE = ("--batch", "--seq", "--backend", "--scan-backend")


class MultiValueCommand(click.Command):
    """Accept ``--opt a b c`` for the options in :data:`MULTI_VALUE` (rewritten to repeated flags)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        out: list[str] = []
        current: str | None = None
        got_value = False
        for arg in [*args, None]:
            if current is not None and arg is not None and not arg.startswith("-") and arg not in MULTI_VALUE:
                out += [current, arg]
                got_value = True
                continue
            if current is not None and not got_value:
                out.append(current)  # a flag without a value: click reports it
            current, got_value = (arg, False) if arg in MULTI_VALUE else (None, False)
            if arg is not None and current is None:
                out.append(arg)
        return super().parse_args(ctx, out)


def _threads_option(f: Any) -> Any:
    return click.option(
        "--threads",
        type=click.IntRange(min=1),
        default=None,
        help="CPU threads for every backend (default: 1, the number that stays comparable on a shared "
        "machine; pass --threads N for multi-threaded numbers).",
    )(f)


def _ort_ops_option(f: Any) -> Any:
    return click.option(
        "--ort-ops",
        type=click.Path(path_type=Path),
        default=None,
        help="libm4r_ort_ops.so for the backend ort-cpu-ops (the default ONNX backend when given; "
        "without it ort-cpu-ops uses $M4R_ORT_OPS or the `m4r build-ort-ops` output).",
    )(f)


def _write_json(path: Path | None, payload: dict[str, Any]) -> None:
    if path is not None:
        from ..fileio import write_json_atomic

        write_json_atomic(path, payload)
        click.echo(f"report written to {path}")


@click.command(cls=MultiValueCommand)
@click.option("--ckpt", type=click.Path(path_type=Path), required=True, help="Checkpoint (model.pt).")
@click.option(
    "--artifact",
    type=click.Path(path_type=Path),
    required=True,
    help="DIR/model.onnx, DIR/model.fp16.onnx or a TensorRT engine DIR/model.plan.",
)
@click.option(
    "--data",
    type=click.Path(path_type=Path),
    default=None,
    help="Dataset whose test users (and held-out items) to use; default: generated sequences.",
)
@click.option(
    "--users", type=click.IntRange(min=1), default=1000, show_default=True, help="Users to compare."
)
@click.option("--k", "k", type=click.IntRange(min=1), default=10, show_default=True, help="Top-K depth.")
@click.option(
    "--backend",
    "backends",
    multiple=True,
    help="Backend(s) to run the artifact on: ort-cpu, ort-cpu-ops (with libm4r_ort_ops.so), ort-cuda, "
    "ort-trt (ONNX), tensorrt (engine). Several allowed. Default: ort-cpu for ONNX (ort-cpu-ops with "
    "--ort-ops), tensorrt for engines.",
)
@click.option(
    "--json", "json_path", type=click.Path(path_type=Path), default=None, help="Write the report here."
)
@click.option(
    "--plot",
    type=click.Path(path_type=Path),
    default=None,
    help="Write a PNG histogram of per-user top-K overlap.",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True)
@click.option(
    "--max-seq-len",
    type=click.IntRange(min=1),
    default=None,
    help="History window (default: the artifact's max_seq_len).",
)
@click.option(
    "--scan-backend",
    default="auto",
    show_default=True,
    help="Scan of the PyTorch reference: auto (mamba-ssm on CUDA, else fast), fast, reference.",
)
@_threads_option
@_ort_ops_option
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--exclude",
    type=click.Choice(["auto", "none"]),
    default="auto",
    show_default=True,
    help="exclude_items fed to artifacts that take it: auto = each dataset user's full known history "
    "(as `m4r evaluate --exclude-history`), random lists for generated users; none = zeros.",
)
@click.option("--max-abs-error", type=float, default=None, help="Threshold: max |score difference|.")
@click.option("--max-rel-error", type=float, default=None, help="Threshold: max relative score error.")
@click.option("--min-overlap-mean", type=float, default=None, help="Threshold: mean top-K overlap.")
@click.option("--min-overlap-min", type=float, default=None, help="Threshold: worst user's top-K overlap.")
@click.option("--min-kendall-tau", type=float, default=None, help="Threshold: mean Kendall tau in top-K.")
@click.option("--min-rbo", type=float, default=None, help="Threshold: mean rank-biased overlap.")
@click.option("--max-ndcg-delta", type=float, default=None, help="Threshold: |ndcg@K difference|.")
@click.option("--max-hit-delta", type=float, default=None, help="Threshold: |hit@K difference|.")
@click.option(
    "--allow-other-checkpoint",
    is_flag=True,
    help="Compare even when --ckpt is not the checkpoint the artifact was exported from (its sha256 differs "
    "from the manifest's); the report notes it.",
)
@column_options
def verify(
    ckpt: Path,
    artifact: Path,
    data: Path | None,
    users: int,
    k: int,
    backends: tuple[str, ...],
    json_path: Path | None,
    plot: Path | None,
    batch_size: int,
    max_seq_len: int | None,
    scan_backend: str,
    threads: int | None,
    ort_ops: Path | None,
    seed: int,
    exclude: str,
    max_abs_error: float | None,
    max_rel_error: float | None,
    min_overlap_mean: float | None,
    min_overlap_min: float | None,
    min_kendall_tau: float | None,
    min_rbo: float | None,
    max_ndcg_delta: float | None,
    max_hit_delta: float | None,
    allow_other_checkpoint: bool,
    **cols: Any,
) -> None:
    """Check that an exported artifact ranks items like the PyTorch model.

    Exit code 0: parity holds; 1: a parity metric is out of bounds (the message names it);
    2: usage error; 3: the artifact's files do not match its manifest, or --ckpt is not the
    checkpoint it was exported from.
    """
    from .report import plot_verify, render_verify, require_matplotlib
    from .verify import run_verify

    if plot is not None:
        require_matplotlib()
    if data is not None and not data.exists():
        raise UsageError(f"--data {data} does not exist; pass a RecBole .inter file or MovieLens ratings")
    overrides = {
        "max_abs_error": max_abs_error,
        "max_rel_error": max_rel_error,
        "min_topk_overlap_mean": min_overlap_mean,
        "min_topk_overlap_min": min_overlap_min,
        "min_kendall_tau_mean": min_kendall_tau,
        "min_rbo_mean": min_rbo,
        "max_abs_ndcg_delta": max_ndcg_delta,
        "max_abs_hit_delta": max_hit_delta,
    }
    report = run_verify(
        ckpt,
        artifact,
        data=data,
        users=users,
        k=k,
        backends=list(backends) or None,
        threshold_overrides=overrides,
        batch_size=batch_size,
        threads=threads,
        scan_backend=scan_backend,
        max_seq_len=max_seq_len,
        seed=seed,
        ort_ops=ort_ops,
        exclude=exclude,
        allow_other_checkpoint=allow_other_checkpoint,
        columns=columns_from(cols),
        log=lambda line: click.echo(line, err=True),
    )
    render_verify(report)
    _write_json(json_path, report.to_dict())
    if plot is not None:
        click.echo(f"plot written to {plot_verify(report, plot)}")
    if not report.passed:
        raise M4RError(report.failure_message(), exit_code=1)


@click.command(cls=MultiValueCommand)
@click.option(
    "--artifact",
    type=click.Path(path_type=Path),
    required=True,
    help="DIR/model.onnx (or .fp16.onnx) or a TensorRT engine.",
)
@click.option(
    "--ckpt",
    type=click.Path(path_type=Path),
    default=None,
    help="Checkpoint for the PyTorch reference (default: the manifest's config, random weights).",
)
@click.option(
    "--batch",
    "batches",
    type=click.IntRange(min=1),
    multiple=True,
    help="Batch sizes (several after one flag). Default: 1 32 256.",
)
@click.option(
    "--seq",
    "seqs",
    type=click.IntRange(min=1),
    multiple=True,
    help="Sequence lengths (several after one flag). Default: 50 200 1000.",
)
@click.option("--backend", "backends", multiple=True, help="Artifact backend(s), as for verify.")
@click.option("--no-reference", is_flag=True, help="Do not time the PyTorch reference.")
@click.option("--reference-device", default="cpu", show_default=True, help="cpu or cuda.")
@click.option(
    "--scan-backend",
    "scan_backends",
    multiple=True,
    help="Scan of the PyTorch reference (default auto); several after one flag time one reference each "
    "(the first is `pytorch`, the others `pytorch-<name>`).",
)
@click.option(
    "--warmup", type=click.IntRange(min=0), default=2, show_default=True, help="Warm-up calls per point."
)
@click.option(
    "--repeats",
    type=click.IntRange(min=1),
    default=500,
    show_default=True,
    help="Timed calls per point and backend (fewer when the time budget runs out; at least 3). "
    "p90 is reported from 50 runs, p99 from 500.",
)
@click.option(
    "--max-seconds",
    type=click.FloatRange(min=0, min_open=True),
    default=120.0,
    show_default=True,
    help="Soft wall-clock budget of the whole grid.",
)
@_threads_option
@_ort_ops_option
@click.option(
    "--json", "json_path", type=click.Path(path_type=Path), default=None, help="Write results here."
)
@click.option(
    "--markdown", type=click.Path(path_type=Path), default=None, help="Write the table as Markdown."
)
@click.option(
    "--plot",
    type=click.Path(path_type=Path),
    default=None,
    help="Write a PNG of p50 latency: against sequence length with >= 3 lengths, else per grid point.",
)
@click.option(
    "--streaming",
    is_flag=True,
    help="Per-event latency of step.onnx against a full re-encode with model.onnx (ORT CPU); "
    "--artifact is the export directory of `m4r export --streaming`. Default: --batch 1 256.",
)
@click.option(
    "--precision",
    type=click.Choice(["fp32", "fp16"]),
    default="fp32",
    show_default=True,
    help="With --streaming: which graphs to time.",
)
def bench(
    artifact: Path,
    ckpt: Path | None,
    batches: tuple[int, ...],
    seqs: tuple[int, ...],
    backends: tuple[str, ...],
    no_reference: bool,
    reference_device: str,
    scan_backends: tuple[str, ...],
    warmup: int,
    repeats: int,
    max_seconds: float,
    threads: int | None,
    ort_ops: Path | None,
    json_path: Path | None,
    markdown: Path | None,
    plot: Path | None,
    streaming: bool,
    precision: str,
) -> None:
    """Latency of an artifact next to the PyTorch reference, with a sequence-length sweep.

    The artifact's files are checked against its manifest first (exit code 3 on a mismatch).
    """
    if streaming:
        from . import bench_streaming as bs

        click.echo(bs.TABLE_HEAD)  # once, then each row as it is measured, then the footer
        sresult = bs.run_streaming_bench(
            artifact,
            batches=list(batches) or list(bs.DEFAULT_BATCHES),
            seqs=list(seqs) or list(bs.DEFAULT_SEQS),
            precision=precision,
            threads=threads,
            warmup=warmup,
            repeats=repeats,
            max_seconds=max_seconds,
            progress=click.echo,
        )
        table = bs.render_table(sresult)
        click.echo(f"\n{bs.render_footer(sresult)}")
        _write_json(json_path, sresult)
        if markdown is not None:
            from ..fileio import write_text_atomic

            write_text_atomic(markdown, table + "\n")
        return
    from .bench import DEFAULT_BATCHES, DEFAULT_SEQS, run_bench
    from .report import bench_markdown, plot_bench, render_bench, require_matplotlib

    if plot is not None:
        require_matplotlib()
    result = run_bench(
        artifact,
        ckpt=ckpt,
        batches=list(batches) or list(DEFAULT_BATCHES),
        seqs=list(seqs) or list(DEFAULT_SEQS),
        backends=list(backends) or None,
        reference=not no_reference,
        warmup=warmup,
        repeats=repeats,
        max_seconds=max_seconds,
        threads=threads,
        scan_backend=(scan_backends or ("auto",))[0],
        extra_scan_backends=scan_backends[1:],
        reference_device=reference_device,
        progress=lambda line: click.echo(line, err=True),
        ort_ops=ort_ops,
    )
    render_bench(result)
    _write_json(json_path, result.to_dict())
    if markdown is not None:
        from ..fileio import write_text_atomic

        write_text_atomic(markdown, bench_markdown(result))
        click.echo(f"markdown table written to {markdown}")
    if plot is not None:
        click.echo(f"plot written to {plot_bench(result, plot)}")
