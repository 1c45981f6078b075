"""Docs that match behaviour (issue 22.6): measured tables are generated from the bench JSON committed
beside them (scripts/doc_tables.py), and help texts say what the code does."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from m4r_export.cli import main
from m4r_export.verify import bench_streaming as bs

ROOT = Path(__file__).resolve().parents[1]


def _doc_tables() -> Any:
    spec = importlib.util.spec_from_file_location("doc_tables", ROOT / "scripts" / "doc_tables.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_streaming_table_is_the_committed_bench_json() -> None:
    tables = _doc_tables()
    readme = (ROOT / "README.md").read_text()
    assert "<!-- table:streaming -->" in readme  # the table is generated, not typed
    for doc in tables.DOCS:
        text = doc.read_text()
        assert tables.regenerate(text) == text, f"{doc}: run python scripts/doc_tables.py"
    result = json.loads((ROOT / "docs" / "bench" / "streaming.json").read_text())
    got = {(p["batch"], p["history"]) for p in result["points"]}
    assert {(1, 200), (1, 1000), (256, 200), (256, 1000)} <= got
    assert result["threads"] == 1 and result["precision"] == "fp32"


def test_summary_table_renders_every_point() -> None:
    point = {"batch": 1, "history": 200, "reencode": {"p50_ms": 1.8412}, "step": {"p50_ms": 0.2651}}
    point["speedup"] = 1.8412 / 0.2651
    table = bs.summary_table({"points": [point]})
    assert table.splitlines()[-1] == "| 1 | 200 | 1.84 | 0.265 | 6.9x |"


def test_bench_help_states_the_real_thread_default() -> None:
    out = " ".join(CliRunner().invoke(main, ["bench", "--help"]).output.split())
    assert "CPU threads for every backend (default: 1," in out and "cores this process may use" not in out
