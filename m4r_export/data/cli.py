"""``m4r data``: download MovieLens, inspect interaction files, write synthetic data."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from .download import MOVIELENS, default_cache_dir

F = TypeVar("F", bound=Callable[..., Any])


def column_options(f: F) -> F:
    """``--user-col``, ``--item-col``, ``--time-col``, ``--delimiter`` (read with :func:`columns_from`)."""
    opts = [
        click.option("--user-col", default=None, help="Column holding user ids (default user_id)."),
        click.option("--item-col", default=None, help="Column holding item ids (default item_id)."),
        click.option("--time-col", default=None, help="Column holding timestamps (default timestamp)."),
        click.option(
            "--delimiter",
            default=None,
            help="CSV/TSV delimiter: one character, or tab/comma/semicolon/pipe (default: detected).",
        ),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def columns_from(kwargs: dict[str, Any]) -> Any:
    """Pop the :func:`column_options` values from ``kwargs``; a :class:`~m4r_export.data.tables.Columns`."""
    from .tables import Columns

    return Columns.of(
        kwargs.pop("user_col"), kwargs.pop("item_col"), kwargs.pop("time_col"), kwargs.pop("delimiter")
    )


@click.group("data")
def data() -> None:
    """Get and inspect interaction data (RecBole .inter, MovieLens, synthetic)."""


@data.command("download")
@click.argument("name", type=click.Choice(sorted(MOVIELENS)))
@click.option(
    "--dest",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Cache directory (default: $M4R_CACHE, $XDG_CACHE_HOME/m4r or ~/.cache/m4r).",
)
@click.option(
    "--archive",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Use an already downloaded zip instead of the network (still sha256-checked).",
)
@click.option(
    "--url", default=None, help="Download from this mirror URL (checked against the official sha256)."
)
@click.option("--force", is_flag=True, help="Convert again even if the .inter file exists.")
def download(name: str, dest: Path | None, archive: Path | None, url: str | None, force: bool) -> None:
    """Download a MovieLens dataset, verify its sha256, convert it to a RecBole .inter file.

    Prints the path of the .inter file (pass it to `m4r train --data`).
    """
    from .download import download_movielens

    spec = MOVIELENS[name]
    root = dest if dest is not None else default_cache_dir()
    if archive is None and not (root / spec.dirname / f"{spec.dirname}.inter").exists():
        click.echo(f"downloading {url or spec.url} ({spec.size / 1e6:.1f} MB) ...", err=True)
    out = download_movielens(name, dest, archive=archive, url=url, force=force)
    click.echo(str(out))


@data.command("stats")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--max-seq-len", type=int, default=50, show_default=True)
@click.option("--min-user-inter", type=int, default=5, show_default=True)
@click.option("--min-item-inter", type=int, default=5, show_default=True)
@column_options
def stats(path: Path, max_seq_len: int, min_user_inter: int, min_item_inter: int, **cols: Any) -> None:
    """Print users, items, interactions and split sizes of PATH after filtering.

    PATH: a RecBole .inter file, MovieLens u.data/ratings.dat, a CSV/TSV or Parquet log, or a folder.
    """
    import numpy as np
    from rich.console import Console

    from ..console import titled_table
    from .protocol import load_dataset

    ds = load_dataset(
        path,
        max_seq_len=max_seq_len,
        min_user_inter=min_user_inter,
        min_item_inter=min_item_inter,
        columns=columns_from(cols),
    )
    users, items, n = ds.n_users - 1, ds.n_items - 1, ds.n_interactions
    all_users = np.concatenate([ds.train.user, ds.valid.user, ds.test.user])
    per_user = np.bincount(all_users, minlength=ds.n_users)[1:] + 1  # samples + the first interaction
    table = titled_table(f"{ds.source} ({min_user_inter}/{min_item_inter}-core, max_seq_len {max_seq_len})")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    table.add_row("users", f"{users:,}")
    table.add_row("items", f"{items:,}")
    table.add_row("interactions", f"{n:,}")
    table.add_row("density", f"{n / max(users * items, 1):.4%}")
    table.add_row("interactions per user (median)", f"{np.median(per_user):.0f}")
    table.add_row("train samples", f"{len(ds.train):,}")
    table.add_row("valid samples", f"{len(ds.valid):,}")
    table.add_row("test samples", f"{len(ds.test):,}")
    table.add_row("load time", f"{ds.load_seconds:.2f} s")
    Console().print(table)


@data.command("convert")
@click.argument("path", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@column_options
def convert(path: Path, out: Path, **cols: Any) -> None:
    """Write PATH (CSV/TSV, Parquet, MovieLens, .inter) as a RecBole .inter file OUT.

    Rows keep their order; only the user, item and timestamp columns are written, as user_id:token,
    item_id:token, timestamp:float.
    """
    from .tables import read_log, write_inter

    if out.suffix != ".inter":
        from ..errors import UsageError

        raise UsageError(f"output {out} must end in .inter (RecBole finds atomic files by suffix)")
    inter = read_log(path, columns_from(cols))
    write_inter(out, inter)
    skipped = f", skipped {inter.n_skipped} row(s) with an empty user or item" if inter.n_skipped else ""
    click.echo(f"wrote {len(inter):,} interactions from {inter.source} to {out}{skipped}")


@data.command("synthetic")
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--users", "n_users", type=int, default=300, show_default=True)
@click.option("--items", "n_items", type=int, default=120, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--large/--small",
    default=None,
    help="--large: the streaming generator for big catalogues (bounded memory, Zipf popularity, "
    "successor walks; m4r_export.data.synthetic_large); --small: the demo generator (cycles, held in "
    "memory). Default: --large from 100,000 items or users.",
)
def synthetic(out: Path, n_users: int, n_items: int, seed: int, large: bool | None) -> None:
    """Write a synthetic RecBole .inter file with learnable sequential structure."""
    if large or (large is None and max(n_users, n_items) >= 100_000):
        from .synthetic_large import write_large_synthetic

        rows = write_large_synthetic(out, n_users, n_items, seed)
        click.echo(f"wrote {rows} interactions ({n_users} users, {n_items} items) to {out}")
        return
    from .synthetic import synthetic_interactions, write_inter_file

    users, items, ts = synthetic_interactions(n_users=n_users, n_items=n_items, seed=seed)
    write_inter_file(out, users, items, ts)
    click.echo(f"wrote {len(users)} interactions ({n_users} users, {n_items} items) to {out}")
