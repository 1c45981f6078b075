"""``m4r bench-train`` on a toy size: the table, the JSON, the interleaving and the budget."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from click.testing import CliRunner

from m4r_export.cli import main
from m4r_export.training.bench import run_benchmark


def test_bench_train_json_and_table(tmp_path: Path) -> None:
    out = tmp_path / "b.json"
    args = ["bench-train", "--seq-len", "4", "--seq-len", "6", "--batch", "4", "--n-items", "30"]
    res = CliRunner().invoke(main, [*args, "--repeats", "2", "--quiet", "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert "reference+ftz" in res.output and "fast+ftz" in res.output
    rep = json.loads(out.read_text())
    rows = rep["results"]
    assert [(r["seq_len"], r["variant"]) for r in rows] == [
        (L, v) for L in (4, 6) for v in ("reference", "reference+ftz", "fast+ftz")
    ]
    for r in rows:
        assert r["steps_timed"] == 2 and r["median_cpu_s"] > 0 and r["median_wall_s"] > 0
        assert r["speedup_vs_reference_cpu"] > 0
    assert rows[0]["speedup_vs_reference_cpu"] == 1.0
    assert torch.set_flush_denormal(False) in (True, False)  # left off afterwards


def test_budget_bounds_repeats() -> None:
    rep = run_benchmark(
        lengths=[4], variants=["fast+ftz", "reference"], batch=2, n_items=20, repeats=50, budget_s=0
    )
    assert all(r["steps_timed"] == 1 for r in rep["results"])  # one timed step each, then the budget stops
    assert (torch.tensor([1e-39]) * 1.0).item() != 0.0  # flush-denormal restored to off


def test_every_position_variant_counts_every_target() -> None:
    rep = run_benchmark(lengths=[5], variants=["fast+ftz", "every-position"], batch=3, n_items=20, repeats=1)
    by = {r["variant"]: r for r in rep["results"]}
    assert by["fast+ftz"]["targets_per_step"] == 3 and by["every-position"]["targets_per_step"] == 15
    ep = by["every-position"]
    assert ep["samples_per_s_wall"] == 15 / ep["median_wall_s"]
