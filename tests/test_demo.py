"""End to end: `m4r demo --quick` runs every stage on CPU and leaves verifiable artifacts."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

from m4r_export.cli import main


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
