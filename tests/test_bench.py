"""m4r bench on a tiny artifact: grid, statistics, side-by-side ratios, linear fit, budget, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from m4r_export.checkpoint import save_checkpoint
from m4r_export.cli import main
from m4r_export.verify import bench_markdown, run_bench
from m4r_export.verify.bench import MIN_RUNS, fit_linear, percentile, runs_needed
from m4r_export.verify.testing import tiny_model, trace_onnx


@pytest.fixture(scope="module")
def art(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bench")
    model = tiny_model(40)
    save_checkpoint(root / "model.pt", model, None)
    return trace_onnx(model, root / "a", head="scores", max_seq_len=16)


@pytest.fixture(scope="module")
def static_art(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trace_onnx(tiny_model(40), tmp_path_factory.mktemp("static"), max_seq_len=16, static_seq=True)


def test_fit_linear_recovers_slope_and_flags_quadratic_growth() -> None:
    seqs = [50, 200, 1000]
    slope, intercept, r2, exponent = fit_linear(seqs, [2.0 + 0.01 * s for s in seqs])
    assert slope == pytest.approx(0.01) and intercept == pytest.approx(2.0) and r2 == pytest.approx(1.0)
    assert exponent < 1.0
    _, _, r2_q, exponent_q = fit_linear(seqs, [1e-4 * s * s for s in seqs])
    assert exponent_q == pytest.approx(2.0, abs=1e-6)
    assert r2_q < 0.999


def test_run_bench_grid_side_by_side(art: Path) -> None:
    res = run_bench(art, batches=[1, 4], seqs=[4, 8, 16], warmup=1, repeats=4, max_seconds=20)
    assert {p.backend for p in res.points} == {"ort-cpu", "pytorch"}
    assert len(res.points) == 2 * 2 * 3
    for p in res.points:
        assert MIN_RUNS <= p.runs <= 4
        assert 0 < p.min_ms <= p.p50_ms
        assert p.p90_ms is None and p.p99_ms is None  # 4 runs cannot tell p90/p99 from noise
        assert p.throughput == pytest.approx(p.batch / (p.p50_ms / 1000))
        assert p.mem_kind in ("rss-growth", "n/a")
    assert res.threads == 1
    ratios = res.ratios()
    assert len(ratios) == 6 and all(r["speedup"] > 0 for r in ratios)
    fits = {(f.backend, f.batch) for f in res.fits}
    assert fits == {("ort-cpu", 1), ("ort-cpu", 4), ("pytorch", 1), ("pytorch", 4)}
    assert "random weights" in res.reference_weights  # no --ckpt: manifest config
    assert any("p99 is n/a where a point has fewer than 500 runs" in n for n in res.notes)
    md = bench_markdown(res)
    latency, sweep = md.split("\n\n")
    assert latency.count("\n") == 1 + 12 and "| ort-cpu | 4 | 16 |" in latency
    assert "| n/a | n/a |" in latency
    assert sweep.count("\n") == 2 + 4 and "| pytorch | 1 | 4, 8, 16 |" in sweep


def test_budget_and_width_limit(static_art: Path) -> None:
    # seq 40 exceeds the static width 16 of this artifact: both sides get the most recent 16 items
    res = run_bench(static_art, batches=[2], seqs=[40], warmup=0, repeats=50, max_seconds=1e-6)
    assert all(p.runs == MIN_RUNS for p in res.points)  # budget spent: stop at the minimum
    assert all(p.effective_seq == 16 for p in res.points)
    assert any("most recent" in n for n in res.notes)
    assert res.fits == []  # one length: no sweep


def test_cli_bench_json_and_markdown(art: Path, tmp_path: Path) -> None:
    ckpt = art.parent.parent / "model.pt"
    res = CliRunner().invoke(
        main,
        ["bench", "--artifact", str(art), "--ckpt", str(ckpt), "--batch", "1", "2", "--seq", "4", "8",
         "--repeats", "3", "--warmup", "1", "--max-seconds", "10", "--json", str(tmp_path / "b.json"),
         "--markdown", str(tmp_path / "b.md")],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "b.json").read_text())
    assert len(data["points"]) == 8 and data["threads"] == 1
    assert data["reference_weights"].startswith("checkpoint")
    # two lengths: a line through two points always has R^2 = 1, so there is no fit, and a note says why
    assert data["linearity"] == []
    assert any("needs >= 3 lengths, got 2" in n for n in data["notes"])
    assert "needs >= 3 lengths" in " ".join(res.output.split())
    assert "sequence-length sweep" not in res.output
    assert "speed-up vs PyTorch" in (tmp_path / "b.md").read_text()


def test_bench_usage_errors(art: Path, tmp_path: Path) -> None:
    bare = tmp_path / "model.onnx"
    bare.write_bytes(art.read_bytes())  # no manifest, no --ckpt: no way to build the reference
    res = CliRunner().invoke(main, ["bench", "--artifact", str(bare), "--batch", "1", "--seq", "4"])
    assert res.exit_code == 2 and "--ckpt" in res.output
    res = CliRunner().invoke(main, ["bench", "--artifact", str(art), "--batch", "0"])
    assert res.exit_code == 2
    res = CliRunner().invoke(main, ["bench", "--artifact", str(tmp_path / "nope.onnx")])
    assert res.exit_code == 2 and "does not exist" in res.output


def test_percentiles_need_enough_runs() -> None:
    assert (runs_needed(50), runs_needed(90), runs_needed(99)) == (10, 50, 500)
    assert percentile(np.arange(49.0), 90) is None
    assert percentile(np.arange(50.0), 90) == pytest.approx(np.percentile(np.arange(50.0), 90))
    assert percentile(np.arange(499.0), 99) is None and percentile(np.arange(500.0), 99) is not None


def test_cheap_points_run_enough_calls_for_p99_by_default(art: Path) -> None:
    res = run_bench(
        art, batches=[1], seqs=[4], warmup=0, max_seconds=60, backends=["ort-cpu"], reference=False
    )
    (point,) = res.points
    assert point.runs == 500  # the default repeats: p99 has 5 calls beyond it
    assert point.p50_ms <= point.p90_ms <= point.p99_ms  # type: ignore[operator]


def test_bench_plot_lines_need_three_lengths(art: Path, tmp_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from m4r_export.verify.report import plot_bench, plot_bench_figure

    res = run_bench(art, batches=[1, 2], seqs=[4, 8, 16], warmup=0, repeats=3, max_seconds=5)
    fig = plot_bench_figure(res)
    assert len(fig.axes) == 2  # one panel per batch
    for ax in fig.axes:
        assert ax.get_xlabel() == "sequence length (items)"
        assert sorted(len(line.get_xdata()) for line in ax.get_lines()) == [3, 3]  # one line per backend
    out = plot_bench(res, tmp_path / "lat.png")
    assert out.read_bytes()[:4] == b"\x89PNG"

    two = run_bench(art, batches=[1, 2], seqs=[4, 8], warmup=0, repeats=3, max_seconds=5)
    fig = plot_bench_figure(two)
    (ax,) = fig.axes
    assert ax.get_lines() == []  # no line through two lengths: one bar per backend and grid point
    assert len(ax.patches) == 2 * 2 * 2
    assert "needs >= 3 lengths" in ax.get_title()
    assert plot_bench(two, tmp_path / "bars.png").read_bytes()[:4] == b"\x89PNG"
