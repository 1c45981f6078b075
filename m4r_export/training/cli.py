"""``m4r train`` and ``m4r evaluate``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ..data.cli import column_options, columns_from
from ..errors import UsageError

BACKENDS = ["auto", "fast", "native", "reference", "cuda"]

#: recipe keys with a `m4r train` option of their own (option -> (config key, type, help))
CONFIG_OPTIONS: dict[str, tuple[str, Any, str]] = {
    "--max-seq-len": ("max_seq_len", click.IntRange(min=1), "MAX_ITEM_LIST_LENGTH: items of history seen."),
    "--hidden-size": ("hidden_size", click.IntRange(min=1), "Embedding and model width."),
    "--num-layers": ("num_layers", click.IntRange(min=1), "Mamba layers."),
    "--d-state": ("d_state", click.IntRange(min=1), "SSM state size."),
    "--dropout": ("dropout_prob", click.FloatRange(0, 1, max_open=True), "dropout_prob."),
    "--lr-schedule": (
        "lr_schedule",
        click.Choice(["constant", "cosine", "linear"]),
        "lr_schedule: decay of the learning rate over --max-minutes (or the epochs).",
    ),
    "--weight-decay": ("weight_decay", click.FloatRange(min=0), "Adam weight decay."),
    "--stopping-step": ("stopping_step", click.IntRange(min=0), "Evaluations without improvement."),
    "--min-user-inter": ("min_user_inter", click.IntRange(min=0), "k-core: interactions per user."),
    "--min-item-inter": ("min_item_inter", click.IntRange(min=0), "k-core: interactions per item."),
    "--eval-batch-size": ("eval_batch_size", click.IntRange(min=1), "Users per evaluation batch."),
    "--sparse-embedding": (
        "sparse_embedding",
        click.Choice(["auto", "true", "false"]),
        "sparse_embedding: row-indexed item-table gradient + lazy Adam (auto: SAMPLED, >100K items).",
    ),
}


def _config_options(f: Any) -> Any:
    """One option per :data:`CONFIG_OPTIONS` entry; each overrides the recipe's key when given."""
    for opt, (key, kind, text) in reversed(CONFIG_OPTIONS.items()):
        f = click.option(opt, key, type=kind, default=None, help=f"Override {text}")(f)
    return f


@click.command("train")
@click.option(
    "--data", "data_path", required=True, type=click.Path(path_type=Path), help="Interaction file or folder."
)
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None, help="YAML recipe.")
@click.option(
    "--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Checkpoint to write."
)
@click.option("--epochs", type=click.IntRange(min=0), default=None, help="Override the recipe's epochs.")
@click.option(
    "--max-minutes",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Stop after this much training time.",
)
@click.option(
    "--device", type=click.Choice(["cpu", "cuda"]), default=None, help="Default: the recipe's (cpu)."
)
@click.option("--seed", type=int, default=None, help="Override the recipe's seed.")
@click.option("--scan-backend", type=click.Choice(BACKENDS), default=None, help="Default: auto.")
@click.option(
    "--batch-size", type=click.IntRange(min=1), default=None, help="Override train_batch_size (global)."
)
@click.option(
    "--lr", type=click.FloatRange(min=0, min_open=True), default=None, help="Override learning_rate."
)
@click.option(
    "--loss",
    "loss_type",
    type=click.Choice(["AUTO", "CE", "SAMPLED", "BPR"]),
    default=None,
    help="Override loss_type (AUTO: full CE up to 100,000 items, sampled softmax above).",
)
@click.option(
    "--objective",
    type=click.Choice(["every-position", "prefix"]),
    default=None,
    help="Override objective (default every-position; prefix = RecBole's one sample per target).",
)
@click.option("--resume", is_flag=True, help="Continue from the state file (--state).")
@click.option(
    "--state",
    "state_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Training state file (default: OUT.state), written after every epoch.",
)
@click.option(
    "--no-progress",
    is_flag=True,
    help="No progress bar on a terminal and no periodic lines elsewhere (per-epoch lines only).",
)
@click.option(
    "--threads", type=int, default=None, help="CPU threads per process (default: torch's, the core count)."
)
@click.option("--debug-dump", type=click.Path(path_type=Path), default=None, hidden=True)
@_config_options
@column_options
def train(
    data_path: Path,
    config_path: Path | None,
    out: Path,
    epochs: int | None,
    max_minutes: float | None,
    device: str | None,
    seed: int | None,
    scan_backend: str | None,
    batch_size: int | None,
    lr: float | None,
    loss_type: str | None,
    objective: str | None,
    resume: bool,
    state_path: Path | None,
    no_progress: bool,
    threads: int | None,
    debug_dump: Path | None,
    **more: Any,
) -> None:
    """Train Mamba4Rec on an interaction file; write the best epoch's checkpoint to OUT.

    Every option that names a recipe key overrides the recipe (--config, or the defaults).
    Runs unchanged under `torchrun --nproc_per_node N` (DistributedDataParallel; rank 0 writes).
    """
    import torch
    from rich.console import Console

    from ..data import load_dataset
    from .config import load_config
    from .distributed import shutdown_distributed
    from .trainer import Trainer

    cfg = load_config(
        config_path,
        epochs=epochs,
        max_minutes=max_minutes,
        device=device,
        seed=seed,
        scan_backend=scan_backend,
        train_batch_size=batch_size,
        learning_rate=lr,
        loss_type=loss_type,
        objective=objective,
        **{key: more.pop(key) for key, _, _ in CONFIG_OPTIONS.values()},
    )
    columns = columns_from(more).with_defaults(cfg.user_id_field, cfg.item_id_field, cfg.time_field)
    console = Console(stderr=True, soft_wrap=True)
    _set_threads(threads)
    try:
        ds = load_dataset(
            data_path,
            max_seq_len=cfg.max_seq_len,
            min_user_inter=cfg.min_user_inter,
            min_item_inter=cfg.min_item_inter,
            columns=columns,
        )
        trainer = Trainer(
            ds,
            cfg,
            out,
            data_path=str(data_path),
            state_path=state_path,
            progress=not no_progress,
            log=lambda m: console.print(m, highlight=False),
            debug_dump=debug_dump,
        )
        if trainer.info.is_main:
            console.print(ds.summary(), highlight=False)
            console.print(
                f"model: hidden {cfg.hidden_size}, {cfg.num_layers} layer(s), d_state {cfg.d_state}; "
                f"{trainer.loss_type} loss{_sparse_text(trainer)}, "
                f"{_objective_text(cfg, trainer)}, lr {cfg.learning_rate}, "
                f"scan backend {trainer.backend}, {trainer.info.world_size} process(es), "
                f"{torch.get_num_threads()} thread(s)",
                highlight=False,
            )
        result = trainer.run(resume=resume)
        if trainer.info.is_main:
            _print_train_result(result, out, cfg.valid_metric)
    finally:
        shutdown_distributed()


def _sparse_text(trainer: Any) -> str:
    return " (sparse item-table gradient, lazy Adam)" if trainer.sparse_embedding else ""


def _objective_text(cfg: Any, trainer: Any) -> str:
    if trainer.windows is None:
        return f"prefix objective, batch {cfg.train_batch_size} samples"
    return (
        f"every-position objective ({len(trainer.windows)} windows of <= {cfg.max_seq_len}, stride "
        f"{cfg.effective_stride()}), batch {cfg.train_batch_size} windows"
    )


def _print_train_result(result: Any, out: Path, valid_metric: str) -> None:
    from rich.console import Console

    from ..console import titled_table

    t = titled_table(f"best epoch {result.best_epoch} (by valid {valid_metric}) -> {out}")
    t.add_column("metric")
    t.add_column("valid", justify="right")
    t.add_column("test", justify="right")
    for k, v in result.best_valid.items():
        t.add_row(k, f"{v:.4f}", f"{result.best_test.get(k, float('nan')):.4f}")
    console = Console()
    console.print(t)
    console.print(
        f"{result.epochs_run} epoch(s) run this time (last epoch {result.last_epoch}), "
        f"stopped by {result.stopped}, "
        f"wall time {result.wall_seconds / 60:.1f} min",
        highlight=False,
        soft_wrap=True,  # off a terminal, never break the line mid-phrase at column 80
    )


@click.command("evaluate", context_settings={"ignore_unknown_options": False})
@click.option("--ckpt", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Checkpoint.")
@click.option("--data", "data_path", required=True, type=click.Path(path_type=Path), help="Interaction data.")
@click.option(
    "--k",
    "ks",
    multiple=True,
    default=None,
    metavar="K",
    help="Cut-offs: --k 10 20, --k 10 --k 20 or --k 10,20 (default 10).",
)
@click.argument("more_ks", nargs=-1, type=int, metavar="")
@click.option("--split", type=click.Choice(["test", "valid"]), default="test", show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option(
    "--baseline",
    type=click.Choice(["pop", "none"]),
    default="pop",
    show_default=True,
    help="Most-popular baseline.",
)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--batch-size", type=int, default=4096, show_default=True)
@click.option("--scan-backend", type=click.Choice(BACKENDS), default="auto", show_default=True)
@click.option("--max-seq-len", type=int, default=None, help="Default: the checkpoint's.")
@click.option("--min-user-inter", type=int, default=None, help="Default: the checkpoint's (5).")
@click.option("--min-item-inter", type=int, default=None, help="Default: the checkpoint's (5).")
@click.option("--threads", type=int, default=None, help="CPU threads (default: torch's, the core count).")
@click.option(
    "--exclude-history",
    is_flag=True,
    help="Never rank items the user interacted with before the target (the full history, not only the "
    "max-seq-len window): what a top-K artifact fed that history as exclude_items returns.",
)
@column_options
def evaluate(
    ckpt: Path,
    data_path: Path,
    ks: tuple[str, ...],
    more_ks: tuple[int, ...],
    split: str,
    json_path: Path | None,
    baseline: str,
    device: str,
    batch_size: int,
    scan_backend: str,
    max_seq_len: int | None,
    min_user_inter: int | None,
    min_item_inter: int | None,
    threads: int | None,
    exclude_history: bool,
    **cols: Any,
) -> None:
    """Full-ranking hit@K / ndcg@K / mrr@K of a checkpoint, beside the most-popular baseline.

    Padding is scored -inf; items in the user's history are not masked (RecBole's behaviour for
    sequential models) unless --exclude-history.
    """
    from rich.console import Console

    from ..console import titled_table
    from ..fileio import write_json_atomic
    from .evaluation import evaluate_checkpoint

    cut_offs = _parse_ks(ks, more_ks)
    _set_threads(threads)
    report = evaluate_checkpoint(
        ckpt,
        data_path,
        ks=cut_offs,
        split=split,
        baseline=baseline == "pop",
        device=device,
        batch_size=batch_size,
        scan_backend=scan_backend,
        max_seq_len=max_seq_len,
        min_user_inter=min_user_inter,
        min_item_inter=min_item_inter,
        exclude_history=exclude_history,
        columns=columns_from(cols),
    )
    masked = ", known history excluded" if exclude_history else ""
    title = f"{report.split} split, {report.rows} users, full ranking{masked} ({report.seconds:.1f} s)"
    t = titled_table(title)
    t.add_column("metric")
    t.add_column("model", justify="right")
    if report.baseline is not None:
        t.add_column("most popular", justify="right")
    for k, v in report.model.items():
        row = [k, f"{v:.4f}"]
        if report.baseline is not None:
            row.append(f"{report.baseline[k]:.4f}")
        t.add_row(*row)
    Console().print(t)
    if json_path is not None:
        write_json_atomic(json_path, report.to_json())


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        import torch

        if threads < 1:
            raise UsageError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)


def _parse_ks(ks: tuple[str, ...], more: tuple[int, ...]) -> list[int]:
    if more and not ks:
        raise UsageError(f"unexpected argument(s) {' '.join(map(str, more))}; cut-offs go after --k")
    values: list[int] = []
    for item in (*ks, *map(str, more)):
        for part in str(item).split(","):
            if not part.strip():
                continue
            try:
                k = int(part)
            except ValueError:
                raise UsageError(f"--k takes positive integers (e.g. --k 10 20), got {part!r}") from None
            if k < 1:
                raise UsageError(f"--k takes positive integers (e.g. --k 10 20), got {k}")
            values.append(k)
    return sorted(set(values)) or [10]
