"""``m4r bench`` on an export with an ANN index: exact top-K and the index timed side by side."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from m4r_export import ann
from m4r_export.bench import ann as bench_ann
from m4r_export.cli import main
from m4r_export.onnx.export import ExportOptions, export_artifacts
from m4r_export.verify.bench import run_bench
from m4r_export.verify.testing import tiny_model

N_ITEMS, MAX_SEQ = 500, 6


def _export_with_index(out: Path, **ann_options: Any) -> None:
    """The tiny model's embedding-head export with an ANN index (``ann=...`` and its knobs)."""
    opts = ExportOptions(head="embedding", max_seq_len=MAX_SEQ, **ann_options)
    export_artifacts(tiny_model(N_ITEMS, seed=4), out, opts, build_trt=False)


def test_exact_topk_merges_chunks_with_ties_and_skips_padding(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    table = rng.normal(size=(N_ITEMS, 8)).astype(np.float32)
    table[0] = 50.0  # padding would win every query
    table[[7, 130, 260, 261]] = table[300]  # ties across chunk boundaries: lower id first
    users = rng.normal(size=(9, 8)).astype(np.float32)
    users[0] = table[300]
    monkeypatch.setattr(bench_ann, "EXACT_CHUNK", 128)
    got = bench_ann.exact_topk(users, table, 7)
    scores = users @ table.T
    scores[:, 0] = -np.inf
    want = np.argsort(-scores, axis=1, kind="stable")[:, :7]
    np.testing.assert_array_equal(got, want)
    tied = [i for i in got[0].tolist() if i in (7, 130, 260, 261, 300)]
    assert tied == [7, 130, 260, 261, 300]  # all five equal scores kept, lower id first


@pytest.mark.parametrize("exhaustive", [True, False])
def test_bench_times_exact_and_ann_and_reports_recall(tmp_path: Path, exhaustive: bool) -> None:
    nlist = ann.lists_for(N_ITEMS, ann.AnnParams())
    out = tmp_path / "out"
    _export_with_index(out, ann="ivf", ann_nprobe=nlist if exhaustive else 1)
    result = run_bench(
        out / "model.onnx",
        batches=[1, 8],
        seqs=[MAX_SEQ],
        reference=False,
        repeats=5,
        max_seconds=4,
        threads=1,
    )
    a = result.to_dict()["ann"]
    assert a["kind"] == "ivf" and a["search_knob"] == {"nprobe": nlist if exhaustive else 1}
    assert [p["batch"] for p in a["points"]] == [1, 8]
    assert all(p["exact_p50_ms"] > 0 and p["ann_p50_ms"] > 0 for p in a["points"])
    if exhaustive:  # every list searched: the index is exact
        assert a["recall@10_mean"] == 1.0
    else:  # 1 list of ~89 on an untrained table misses most of the exact top-10
        assert a["recall@10_mean"] < 0.6


def test_cli_writes_the_ann_section(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _export_with_index(out, ann="hnsw")
    args = ["bench", "--artifact", str(out / "model.onnx"), "--batch", "1", "4", "--seq", str(MAX_SEQ)]
    res = CliRunner().invoke(
        main,
        [*args, "--no-reference", "--repeats", "5", "--threads", "1", "--json", str(tmp_path / "b.json")],
    )
    assert res.exit_code == 0, res.output
    assert "vs the hnsw index (ef_search 256); recall@10" in res.output
    a = json.loads((tmp_path / "b.json").read_text())["ann"]
    assert a["search_knob"] == {"ef_search": 256} and 0.0 <= a["recall@10_min"] <= a["recall@10_mean"] <= 1.0


def test_bench_reports_the_pq_index_and_its_knob(tmp_path: Path) -> None:
    """The default kind: k_factor 64 x K = 640 candidates >= the 499 items, so the re-ranking sees
    every item and the search is exact (recall 1.0) however coarse the 4-bit codes."""
    out = tmp_path / "out"
    _export_with_index(out, ann="pq")
    result = run_bench(
        out / "model.onnx", batches=[1], seqs=[MAX_SEQ], reference=False, repeats=3, max_seconds=2, threads=1
    )
    a = result.to_dict()["ann"]
    assert a["kind"] == "pq" and a["search_knob"] == {"k_factor": 64}
    assert a["params"] == {"pq_m": 8, "k_factor": 64, "refine": "fp32"}
    assert a["recall@10_mean"] == 1.0
