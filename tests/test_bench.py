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
from m4r_export.verify.bench import MIN_RUNS, fit_linear
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
        assert 0 < p.min_ms <= p.p50_ms <= p.p90_ms <= p.p99_ms
        assert p.throughput == pytest.approx(p.batch / (p.p50_ms / 1000))
        assert p.mem_kind in ("rss-growth", "n/a")
    assert res.threads == 1
    ratios = res.ratios()
    assert len(ratios) == 6 and all(r["speedup"] > 0 for r in ratios)
    fits = {(f.backend, f.batch) for f in res.fits}
    assert fits == {("ort-cpu", 1), ("ort-cpu", 4), ("pytorch", 1), ("pytorch", 4)}
    assert "random weights" in res.reference_weights  # no --ckpt: manifest config
    md = bench_markdown(res)
    latency, sweep = md.split("\n\n")
    assert latency.count("\n") == 1 + 12 and "| ort-cpu | 4 | 16 |" in latency
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
    assert {f["backend"] for f in data["linearity"]} == {"ort-cpu", "pytorch"}
    assert "speed-up vs PyTorch" in (tmp_path / "b.md").read_text()
    assert "sequence-length sweep" in res.output


def test_bench_usage_errors(art: Path, tmp_path: Path) -> None:
    bare = tmp_path / "model.onnx"
    bare.write_bytes(art.read_bytes())  # no manifest, no --ckpt: no way to build the reference
    res = CliRunner().invoke(main, ["bench", "--artifact", str(bare), "--batch", "1", "--seq", "4"])
    assert res.exit_code == 2 and "--ckpt" in res.output
    res = CliRunner().invoke(main, ["bench", "--artifact", str(art), "--batch", "0"])
    assert res.exit_code == 2
    res = CliRunner().invoke(main, ["bench", "--artifact", str(tmp_path / "nope.onnx")])
    assert res.exit_code == 2 and "does not exist" in res.output


def test_bench_plot(art: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from m4r_export.verify.report import plot_bench

    res = run_bench(art, batches=[1], seqs=[4, 8], warmup=0, repeats=3, max_seconds=5)
    out = plot_bench(res, tmp_path / "lat.png")
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert np.isfinite([p.p50_ms for p in res.points]).all()
