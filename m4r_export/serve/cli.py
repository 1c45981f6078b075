"""``m4r triton``: write a Triton model repository from an export directory."""

from __future__ import annotations

from pathlib import Path

import click

from .repository import BACKENDS, TritonOptions, write_repository


@click.command("triton")
@click.option(
    "--artifacts",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Output directory of `m4r export` (its manifest.json and checksums are checked).",
)
@click.option("--repo", "repo", type=click.Path(path_type=Path), required=True, help="Repository to write.")
@click.option("--backend", type=click.Choice(BACKENDS), default="python", show_default=True)
@click.option("--name", default=None, help="Model name (default: m4r_<head>).")
@click.option("--max-batch", type=int, default=64, show_default=True)
@click.option("--instances", type=int, default=1, show_default=True, help="Model instances per device.")
@click.option(
    "--kind",
    type=click.Choice(["cpu", "gpu"]),
    default=None,
    help="Instance kind (default: gpu for tensorrt/onnxruntime, cpu for python).",
)
@click.option("--max-queue-delay-us", type=int, default=500, show_default=True, help="Dynamic batcher delay.")
@click.option("--with-tokens", is_flag=True, help="Add an ensemble that takes and returns raw item tokens.")
@click.option(
    "--ort-ops",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Native ONNX Runtime custom-op library to name in the onnxruntime config (model_operations).",
)
@click.option(
    "--plugin",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="libm4r_trt_plugin_static.so for --backend tensorrt (default: $M4R_TRT_PLUGIN_STATIC or the "
    "`m4r build-plugin` output).",
)
@click.option(
    "--engine", default=None, help="Engine file in --artifacts (default: the manifest's, model.plan)."
)
@click.option(
    "--streaming",
    is_flag=True,
    help="Stateful model on Triton's sequence batcher from an `m4r export --streaming` export "
    "(see docs/triton.md).",
)
@click.option(
    "--sequence-idle-us",
    type=int,
    default=60_000_000,
    show_default=True,
    help="--streaming: a sequence idle this long is reclaimed with its state.",
)
@click.option(
    "--max-sequences",
    type=int,
    default=1024,
    show_default=True,
    help="--streaming --backend python: sequences in flight at once (more wait for a free one).",
)
@click.option(
    "--max-request-events",
    type=int,
    default=262_144,
    show_default=True,
    help="--streaming --backend python: the most item ids one request may carry (START history or new "
    "events); larger requests get an error. Memory per request is bounded whatever this is.",
)
@click.option(
    "--ann",
    is_flag=True,
    help="From an `m4r export --head embedding --ann ...` export: one Python-backend model m4r_ann that "
    "computes the user vector and searches the item index, returning topk_scores/topk_items (approximate; "
    "see docs/triton.md).",
)
@click.option("--k", type=int, default=10, show_default=True, help="--ann: items per answer.")
@click.option(
    "--max-exclude",
    type=int,
    default=4096,
    show_default=True,
    help="--ann: the most distinct exclude_items one row may carry (the search over-fetches by that many).",
)
def triton(
    artifacts: Path,
    repo: Path,
    backend: str,
    name: str | None,
    max_batch: int,
    instances: int,
    kind: str | None,
    max_queue_delay_us: int,
    with_tokens: bool,
    ort_ops: Path | None,
    plugin: Path | None,
    engine: str | None,
    streaming: bool,
    sequence_idle_us: int,
    max_sequences: int,
    max_request_events: int,
    ann: bool,
    k: int,
    max_exclude: int,
) -> None:
    """Write a Triton model repository (configs checked against Triton's schema, written atomically)."""
    opts = TritonOptions(
        backend=backend,
        name=name,
        max_batch=max_batch,
        instances=instances,
        kind=kind,
        max_queue_delay_us=max_queue_delay_us,
        with_tokens=with_tokens,
        ort_ops=ort_ops,
        plugin=plugin,
        engine=engine,
        streaming=streaming,
        sequence_idle_us=sequence_idle_us,
        max_sequences=max_sequences,
        max_request_events=max_request_events,
        ann=ann,
        k=k,
        max_exclude=max_exclude,
    )
    out = write_repository(artifacts, repo, opts)
    models = sorted(p.parent.name for p in out.glob("*/config.pbtxt"))
    click.echo(f"wrote {out} ({backend}): {', '.join(models)}; see {out / 'README.md'}")
