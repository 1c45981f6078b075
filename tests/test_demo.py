"""End to end: `m4r demo --quick` runs every stage on CPU and leaves verifiable artifacts."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

from m4r_export.cli import main
from m4r_export.demo import demo_steps


def test_demo_plots_and_bounds_its_slow_steps(tmp_path: Path) -> None:
    steps = {args[0]: args for args in demo_steps(tmp_path, quick=False)}
    verify_fp16 = steps["verify"]  # the last verify step: the fp16 file
    assert verify_fp16[verify_fp16.index("--plot") + 1] == str(tmp_path / "parity.fp16.png")
    bench = steps["bench"]
    assert bench[bench.index("--plot") + 1] == str(tmp_path / "latency.png")
    seqs = bench[bench.index("--seq") + 1 : bench.index("--max-seconds")]
    assert len(seqs) >= 3  # fewer lengths cannot be fitted or plotted as a curve
    # the two steps whose work grows on a slow machine have time limits (see the module docstring)
    assert float(steps["train"][steps["train"].index("--max-minutes") + 1]) > 0
    assert float(bench[bench.index("--max-seconds") + 1]) > 0


@pytest.mark.slow
def test_quick_demo_trains_exports_and_verifies(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = CliRunner().invoke(main, ["demo", "--quick", "--out-dir", str(out)])
    assert result.exit_code == 0, result.output
    evaluation = json.loads((out / "evaluate.json").read_text())
    # the synthetic data has sequential structure: the model must beat most-popular clearly
    assert evaluation["hit@10"] > evaluation["baseline"]["hit@10"] + 0.2
    for precision in ("fp32", "fp16"):
        report = json.loads((out / f"verify.{precision}.json").read_text())
        assert report["passed"] is True
    model = onnx.load(out / "export" / "model.onnx")
    assert [n.op_type for n in model.graph.node if n.domain == "m4r"] == ["SelectiveScan"]
    bench = json.loads((out / "bench.json").read_text())
    assert bench["points"], "bench measured nothing"
    assert bench["linearity"], "the demo's sweep has >= 3 lengths, so it is fitted and plotted as lines"
    for png in ("latency.png", "parity.fp16.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG", png
    assert "latency.png" in result.output
