"""Interaction logs as users have them: CSV/TSV and Parquet with their own column names (issue 22.1)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from m4r_export.checkpoint import read_checkpoint
from m4r_export.cli import main
from m4r_export.data import load_dataset, synthetic_interactions, tables, write_inter_file
from m4r_export.data.tables import Columns, read_log
from m4r_export.errors import UsageError


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("logs")
    u, i, t = synthetic_interactions(n_users=60, n_items=25, seed=3)
    write_inter_file(root / "ref.inter", u, i, t)
    with open(root / "ratings.csv", "w") as fh:
        fh.write("uid,rating,movie,when\n")
        fh.writelines(f"{a},4,{b},{int(c)}\n" for a, b, c in zip(u, i, t, strict=True))
    table = pa.table(
        {
            "customer": [f"{x}" for x in u],
            "sku": np.asarray(i, dtype=np.int64),  # integer ids: read as their decimal tokens
            "ts": pa.array(np.asarray(t, dtype=np.int64) * 1_000_000, pa.timestamp("us")),
        }
    )
    pq.write_table(table, root / "log.parquet", row_group_size=200)  # several batches
    return {"root": root, "ref": root / "ref.inter", "csv": root / "ratings.csv", "pq": root / "log.parquet"}


def _cli(*args: object) -> tuple[int, str]:
    res = CliRunner().invoke(main, [str(a) for a in args])
    return res.exit_code, res.output


CSV_COLS = ("--user-col", "uid", "--item-col", "movie", "--time-col", "when")
PQ_COLS = ("--user-col", "customer", "--item-col", "sku", "--time-col", "ts")


def test_csv_and_parquet_read_exactly_like_the_inter_file(logs: dict[str, Path]) -> None:
    ref = load_dataset(logs["ref"], max_seq_len=10)
    pairs = ((logs["csv"], Columns.of(*CSV_COLS[1::2])), (logs["pq"], Columns.of(*PQ_COLS[1::2])))
    for path, cols in pairs:
        ds = load_dataset(path, max_seq_len=10, columns=cols)
        assert ds.item_tokens == ref.item_tokens and ds.user_tokens == ref.user_tokens
        np.testing.assert_array_equal(ds.test.item_seq, ref.test.item_seq)
        np.testing.assert_array_equal(ds.train.target, ref.train.target)


def test_csv_and_parquet_logs_through_stats_train_and_evaluate(logs: dict[str, Path], tmp_path: Path) -> None:
    """The closing note's must-show: other column names, through stats, train and evaluate."""
    for path, cols in ((logs["csv"], CSV_COLS), (logs["pq"], PQ_COLS)):
        code, out = _cli("data", "stats", path, *cols)
        assert code == 0, out
        assert "60" in out and "25" in out  # users, items
        ckpt = tmp_path / f"{path.stem}.pt"
        code, out = _cli(
            "train", "--data", path, *cols, "--out", ckpt, "--epochs", "1", "--max-seq-len", "10",
            "--hidden-size", "8", "--d-state", "4", "--batch-size", "256", "--scan-backend", "reference",
            "--no-progress",
        )  # fmt: skip
        assert code == 0, out
        assert read_checkpoint(ckpt).meta["max_seq_len"] == 10
        code, out = _cli("evaluate", "--ckpt", ckpt, "--data", path, *cols, "--baseline", "none")
        assert code == 0, out
        assert "hit@10" in out


def test_missing_column_names_what_was_found(logs: dict[str, Path]) -> None:
    code, out = _cli("data", "stats", logs["csv"], "--user-col", "uid")
    assert code == 2
    assert "no item column 'item_id' (--item-col)" in out and "no timestamp column 'timestamp'" in out
    assert "'uid', 'rating', 'movie', 'when' (split on comma)" in out
    assert "Traceback" not in out
    code, out = _cli("data", "stats", logs["pq"])
    assert code == 2 and "'customer', 'sku', 'ts' (Parquet schema)" in out


def test_comma_separated_inter_is_read_and_named_correctly(logs: dict[str, Path], tmp_path: Path) -> None:
    comma = tmp_path / "comma.inter"
    comma.write_text(logs["ref"].read_text().replace("\t", ","))
    assert load_dataset(comma).item_tokens == load_dataset(logs["ref"]).item_tokens
    bad = tmp_path / "bad.inter"
    bad.write_text(comma.read_text().replace("timestamp:float", "time:float", 1))
    code, out = _cli("data", "stats", bad)
    assert code == 2
    # names only what is missing, and the columns as split (not one comma-joined field)
    assert "no timestamp column 'timestamp'" in out and "item_id" not in out.split("found")[0]
    assert "'user_id:token', 'item_id:token', 'time:float' (split on comma)" in out


def test_delimiter_detected_or_given_and_config_field_names(tmp_path: Path) -> None:
    rows = [(f"u{k % 7}", f"i{k % 5}", float(k)) for k in range(70)]
    semi = tmp_path / "log.txt"
    semi.write_text("user;item;t\n" + "".join(f"{a};{b};{c}\n" for a, b, c in rows))
    inter = read_log(semi, Columns.of("user", "item", "t"))
    assert inter.users[:3] == ["u0", "u1", "u2"] and inter.timestamps[-1] == 69.0
    pipe = tmp_path / "log.psv"
    pipe.write_text("user|item|t\n" + "".join(f"{a}|{b}|{c}\n" for a, b, c in rows))
    assert read_log(pipe, Columns.of("user", "item", "t", delimiter="pipe")).items == inter.items
    recipe = tmp_path / "r.yaml"
    recipe.write_text("USER_ID_FIELD: user\nITEM_ID_FIELD: item\nTIME_FIELD: t\nhidden_size: 8\nd_state: 4\n")
    code, out = _cli(
        "train", "--data", semi, "--config", recipe, "--out", tmp_path / "m.pt", "--epochs", "0",
        "--min-user-inter", "1", "--min-item-inter", "1", "--no-progress",
    )  # fmt: skip
    assert code == 0, out


def test_bad_values_are_one_line_errors(tmp_path: Path) -> None:
    p = tmp_path / "dates.csv"
    p.write_text("user_id,item_id,timestamp\n1,2,2024-01-01\n")
    with pytest.raises(UsageError, match="as a comma-separated file.*timestamp column holds numbers"):
        read_log(p)
    p.write_text("user_id,item_id,timestamp\n1,2,\n")
    with pytest.raises(UsageError, match="data row 1: column 'timestamp' is empty"):
        read_log(p)
    with pytest.raises(UsageError, match="--delimiter must be one character"):
        Columns.of(delimiter="::")


def test_streaming_reads_in_bounded_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Small blocks (a large file in miniature): many batches, rows kept in file order, empties skipped."""
    monkeypatch.setattr(tables, "BLOCK_SIZE", 256)
    p = tmp_path / "big.csv"
    lines = [f"u{k % 13},i{k % 11},{k}\n" if k % 50 else f"u{k % 13},,{k}\n" for k in range(2000)]
    p.write_text("user_id,item_id,timestamp\n" + "".join(lines))
    inter = read_log(p)
    assert len(inter) == 2000 - 40 and inter.n_skipped == 40
    assert inter.users[:2] == ["u1", "u2"] and inter.timestamps[-1] == 1999.0


def test_convert_writes_a_recbole_inter(logs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "from_parquet.inter"
    code, text = _cli("data", "convert", logs["pq"], out, *PQ_COLS)
    assert code == 0, text
    assert out.read_text().splitlines()[0] == "user_id:token\titem_id:token\ttimestamp:float"
    assert out.read_text() == logs["ref"].read_text()
    code, text = _cli("data", "convert", logs["pq"], tmp_path / "x.csv", *PQ_COLS)
    assert code == 2 and "must end in .inter" in text
