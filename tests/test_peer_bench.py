"""The peer benchmark (m4r_export/bench/peer.py, benchmarks/peer_sasrec.py): SASRec's ONNX file computes
what the PyTorch SASRec computes, and a run times every variant at every point."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_ort_ops import N_ITEMS, lib, tiny_model  # noqa: F401  (lib: the library fixture)

from m4r_export.bench import peer
from m4r_export.onnx import export as ex


def _export(out: Path, **opts: Any) -> Path:
    """The tiny one-layer model exported with the scores head at max_seq_len 8."""
    ex.export_artifacts(
        tiny_model(num_layers=1), out, ex.ExportOptions(head="scores", max_seq_len=8, **opts), build_trt=False
    )
    return out


def _bench(art: Path, ort_ops: Path | None, batches: list[int], budget: float, **kw: Any) -> dict[str, Any]:
    """run_peer_bench on one export at seq 4, 1 thread, 3 rounds at most."""
    return peer.run_peer_bench(
        [peer.M4RExport("m4r", art)],
        ort_ops=ort_ops,
        batches=batches,
        seqs=[4],
        threads=[1],
        repeats=3,
        seconds_per_point=budget,
        **kw,
    )


def test_sasrec_onnx_matches_pytorch_with_padding_and_ragged_lengths() -> None:
    torch.set_num_threads(1)
    blob, model = peer.export_sasrec(N_ITEMS, max_len=30)
    sess = ex.ort_session(blob, 1)
    rng = np.random.default_rng(0)
    seq = rng.integers(1, N_ITEMS, (4, 20)).astype(np.int64)
    lengths = np.array([20, 7, 1, 13], dtype=np.int64)
    seq[1, 7:] = 0  # right padding
    got = sess.run(None, {"item_seq": seq, "item_seq_len": lengths})[0]
    with torch.no_grad():
        want = model(torch.from_numpy(seq), torch.from_numpy(lengths)).numpy()
    assert got.shape == (4, N_ITEMS)
    assert float(np.abs(got - want).max()) <= 1e-4 * max(1.0, float(np.abs(want).max()))
    # causal: a row's output must not depend on items after its last position
    seq2 = seq.copy()
    seq2[2, 1:] = 1
    again = sess.run(None, {"item_seq": seq2, "item_seq_len": lengths})[0]
    assert np.allclose(again[2], got[2], atol=1e-5)


def test_consecutive_calls_run_in_turns_and_are_all_timed() -> None:
    order: list[str] = []
    variants = [peer.Variant(n, lambda n=n: order.append(n)) for n in ("a", "b")]
    res = peer.time_round_robin(variants, repeats=4, budget_s=60.0, warmup=1, consecutive=3)
    assert order == ["a", "b"] + (["a"] * 3 + ["b"] * 3) * 4  # warm-up, then 4 rounds of turns
    assert res["a"]["runs"] == res["b"]["runs"] == 12
    order.clear()
    peer.time_round_robin(variants, repeats=2, budget_s=60.0, warmup=1)
    assert order == ["a", "b"] * 3  # the default: one call each, interleaved


def test_chunk_rows_bound_the_attention_scores() -> None:
    assert peer.sasrec_chunk_rows(256, 50) == 256
    rows = peer.sasrec_chunk_rows(256, 1000)
    assert rows * 2 * 1000 * 1000 * 4 <= peer.SASREC_MAX_BYTES < (rows + 1) * 2 * 1000 * 1000 * 4


def test_run_times_sasrec_and_every_variant(tmp_path: Path) -> None:
    result = _bench(_export(tmp_path / "art", streaming=True), None, [1, 3], 0.5)
    assert [(p["batch"], p["seq"]) for p in result["grid"]] == [(1, 4), (3, 4)]
    assert all(set(p["results"]) == {"sasrec", "m4r body", peer.FLOOR} for p in result["grid"])
    assert all(
        r["runs"] >= peer.MIN_RUNS and r["cpu_p50_ms"] >= 0
        for p in result["grid"]
        for r in p["results"].values()
    )
    assert [set(p["results"]) for p in result["streaming"]][0] == {
        "sasrec re-encode",
        "m4r body re-encode",
        "m4r step body",
        peer.FLOOR,
    }
    table = peer.render_tables(result)
    assert "sasrec/m4r body" in table and "streaming" in table


def test_streaming_with_the_library_times_the_fused_step_and_the_helper_push(
    tmp_path: Path,
    lib: Path,  # noqa: F811
) -> None:
    art = _export(tmp_path / "art", streaming=True, fused=True)
    result = _bench(art, lib, [2], 0.5)
    (point,) = result["streaming"]
    assert set(point["results"]) == {
        "sasrec re-encode",
        "m4r ops re-encode",
        "m4r step body",
        "m4r step ops",
        "m4r push ops",
        peer.FLOOR,
    }
    assert all(r["runs"] >= peer.MIN_RUNS for r in point["results"].values())
    again = _bench(art, lib, [1], 0.2, floor=False)
    assert (
        peer.FLOOR not in again["grid"][0]["results"] and peer.FLOOR not in again["streaming"][0]["results"]
    )


def test_the_floor_is_one_identity_node_timed_after_sasrec() -> None:
    sess = peer.floor_session(1)
    x = np.arange(6, dtype=np.int64).reshape(2, 3)
    (y,) = sess.run(None, {"x": x})
    assert np.array_equal(y, x) and len(sess.get_inputs()) == 1
    order: list[str] = []
    fake = type("S", (), {"run": lambda self, out, feeds: order.append("floor")})()
    res = peer.time_floor(lambda: order.append("sasrec"), fake, x, repeats=3, budget_s=60.0, consecutive=2)
    assert order == ["sasrec", "floor"] + (["sasrec"] * 2 + ["floor"] * 2) * 3
    assert res["runs"] == 6


@pytest.mark.parametrize("bad", ["nolabel", "x=/nonexistent"])
def test_script_refuses_a_bad_export_argument(bad: str) -> None:
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "benchmarks/peer_sasrec.py", "--export", bad],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2 and proc.stdout.startswith("Error: --export")


def test_cold_bench_times_the_step_and_the_floor_after_each_previous_call(
    tmp_path: Path,
    lib: Path,  # noqa: F811
) -> None:
    from m4r_export.bench import cold

    art = _export(tmp_path / "art", streaming=True, fused=True)
    result = cold.run_cold_bench(art, ort_ops=lib, history=6, calls=10, flush_mb=[1])
    assert [r["previous"] for r in result["rows"]] == ["none", "sasrec re-encode", "numpy pass 1 MB"]
    assert all(r["step_ms"] > 0 and r["floor_ms"] > 0 for r in result["rows"])
    table = cold.render_cold(result)
    assert "| sasrec re-encode |" in table and "history 6" in table
    plain = _export(tmp_path / "plain")
    with pytest.raises(cold.UsageError, match="step.onnx"):
        cold.run_cold_bench(plain, ort_ops=None)
