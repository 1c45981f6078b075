"""The ``topk`` head as one ``m4r::ScoreTopK`` node (m4r_export/onnx/topk_op.py): ONNX Runtime with
libm4r_ort_ops.so (the native one-pass kernel; its counter ``m4r_ort_ops_topk_calls`` proves it ran), ONNX
Runtime without it (the node's function body: the chunked subgraph) and the PyTorch ServingModel agree,
ties (lower item id first), exclude lists (duplicates, 0, out-of-range ids) and the -inf tail of a row with
fewer rankable items than K included, in fp32 and fp16 files. The library: as in tests/test_ort_ops.py."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from test_ort_ops import lib, ort_recommend, tiny_model  # noqa: F401  (fixtures)
from test_topk_chunked import CHUNK, N_ITEMS, K, inputs, reference_topk, tied_model

from m4r_export.checkpoint import save_checkpoint
from m4r_export.cli import main
from m4r_export.onnx import export as ex
from m4r_export.onnx.ort_ops import topk_calls
from m4r_export.onnx.topk_op import ScoreTopKServing
from m4r_export.serving import ServingModel


@pytest.fixture(scope="module")
def ops(lib: Path) -> Path:  # noqa: F811
    return lib


def _run(proto: Any, library: Path | None, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    sess = ex.ort_session(proto.SerializeToString(), threads=2, ort_ops=library)
    names = {i.name for i in sess.get_inputs()}
    scores, items = sess.run(None, {k: v for k, v in feeds.items() if k in names})
    return scores, items


def _feeds() -> dict[str, np.ndarray]:
    seq, lens, exclude = inputs()
    exclude[3, :3] = [5, 5, 0]  # duplicates and "none"
    return {"item_seq": seq, "item_seq_len": lens, "exclude_items": exclude}


@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16"])
def test_native_op_and_function_body_match_pytorch(ops: Path, fp16: bool) -> None:
    model = tied_model()
    opts = ex.ExportOptions(head="topk", k=K, max_seq_len=9, topk_chunk=CHUNK)
    proto = ex.trace_onnx(model, opts, fp16=fp16)
    nodes = [n for n in proto.graph.node if (n.domain, n.op_type) == ("m4r", "ScoreTopK")]
    assert len(nodes) == 1 and not [n for n in proto.graph.node if n.op_type == "TopK"]
    body = next(f for f in proto.functions if f.name == "ScoreTopK")
    assert sum(n.op_type == "TopK" for n in body.node) == -(-N_ITEMS // CHUNK) + 1  # chunks + merge
    # TensorRT imports this body (no ScoreTopK plugin): standard ops only, no If, no string tensors
    assert all(n.domain == "" and n.op_type != "If" for n in body.node)
    assert not [a for n in body.node for a in n.attribute if a.type in (3, 8)]  # STRING, STRINGS
    onnx.checker.check_model(proto, full_check=True)
    feeds = _feeds()
    before = topk_calls(ops)
    native = _run(proto, ops, feeds)
    assert topk_calls(ops) == (before or 0) + 1  # the native kernel ran, not the body
    fallback = _run(proto, None, feeds)
    ref_scores, ref_items = reference_topk(model, *(feeds[n] for n in opts.input_names))
    finite = np.isfinite(ref_scores)
    tol = 2e-2 if fp16 else 1e-5
    for name, (scores, items) in (("native", native), ("body", fallback)):
        assert scores.dtype == np.float32 and items.dtype == np.int64 and items.shape == ref_items.shape
        np.testing.assert_allclose(scores[finite], ref_scores[finite], rtol=tol, atol=tol, err_msg=name)
        np.testing.assert_array_equal(np.where(finite, items, -1), np.where(finite, ref_items, -1), name)
        assert np.isneginf(scores[~finite]).all(), name
    # the -inf tail (row 5 ranks 2 items) is defined: lowest non-rankable ids, exactly as the body returns it
    np.testing.assert_array_equal(native[1], fallback[1])
    # fp16: the native op returns fp16 scores; ONNX Runtime's CPU run of the body drops the fp16 round trip
    # (fp32 Gemm -> Cast fp16 -> Cast fp32 pairs are removed), so its scores differ by < half an fp16 ulp
    tail_tol = 1e-3 if fp16 else 1e-6
    np.testing.assert_allclose(native[0], fallback[0], rtol=tail_tol, atol=tail_tol)
    assert list(native[1][5]) == [40, 2, 0, 1, 3, 4]


def test_heads_without_exclude_input_and_with_exclude_history(ops: Path) -> None:
    model = tied_model()
    feeds = _feeds()
    for opts in (
        ex.ExportOptions(head="topk", k=K, max_seq_len=9, topk_chunk=CHUNK, exclude_items=False),
        ex.ExportOptions(head="topk", k=K, max_seq_len=9, topk_chunk=CHUNK, exclude_history=True),
    ):
        proto = ex.trace_onnx(model, opts)
        native, fallback = _run(proto, ops, feeds), _run(proto, None, feeds)
        # the reference: PyTorch's masked score rows (the scores head), stable sort: ties lower id first
        serving = ServingModel(model, "scores", K, opts.exclude_history, opts.exclude_items, CHUNK)
        with torch.no_grad():
            rows = serving(*[torch.from_numpy(feeds[n]) for n in opts.input_names])[0].numpy()
        order = np.argsort(-rows, axis=1, kind="stable")[:, :K]
        want_scores, want_items = np.take_along_axis(rows, order, axis=1), order
        finite = np.isfinite(want_scores)
        for got in (native, fallback):
            np.testing.assert_allclose(got[0], want_scores, rtol=1e-5, atol=1e-5)
            np.testing.assert_array_equal(np.where(finite, got[1], -1), np.where(finite, want_items, -1))
        np.testing.assert_array_equal(native[1], fallback[1])


def test_eager_module_is_the_serving_model() -> None:
    model = tied_model()
    seq, lens, exclude = (torch.from_numpy(a) for a in inputs())
    with torch.no_grad():
        a = ScoreTopKServing(model, "topk", K, topk_chunk=CHUNK)(seq, lens, exclude)
        b = ServingModel(model, "topk", K, topk_chunk=CHUNK)(seq, lens, exclude)
    torch.testing.assert_close(a, b)


@pytest.fixture(scope="module")
def topk_exports(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint and its topk exports: DIR/True (ScoreTopK node, the default) and DIR/False (plain ops)."""
    model = tiny_model(num_layers=1)  # no planted ties: the export's own parity check compares top-10 sets
    out = tmp_path_factory.mktemp("topk")
    save_checkpoint(out / "model.pt", model, model.item_tokens, {"max_seq_len": 9})
    for native in (True, False):
        opts = ex.ExportOptions(head="topk", k=K, max_seq_len=9, topk_chunk=CHUNK, native_topk=native)
        ex.export_artifacts(model, out / str(native), opts, build_trt=False)
    return out


def test_no_native_topk_writes_plain_ops_and_the_manifest_says_which(topk_exports: Path) -> None:
    for native in (True, False):
        manifest = json.loads((topk_exports / str(native) / "manifest.json").read_text())
        assert manifest["custom_op"]["score_topk"]["used"] is native
        proto = onnx.load(topk_exports / str(native) / "model.onnx")
        assert any(n.op_type == "ScoreTopK" for n in proto.graph.node) is native
        assert any(f.name == "ScoreTopK" for f in proto.functions) is native


def test_verify_with_the_library_passes_and_reports_the_native_op(
    ops: Path, topk_exports: Path, tmp_path: Path
) -> None:
    res = CliRunner().invoke(
        main,
        ["verify", "--ckpt", str(topk_exports / "model.pt"), "--artifact",
         str(topk_exports / "True" / "model.onnx"), "--users", "16", "--k", str(K), "--ort-ops", str(ops),
         "--json", str(tmp_path / "v.json")],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    result = json.loads((tmp_path / "v.json").read_text())["results"][0]
    assert result["backend"] == "ort-cpu-ops" and result["runner"]["ort_ops"]["topk_calls"] > 0


@pytest.mark.parametrize("with_library", [True, False])
def test_ort_recommend_runs_the_topk_node(
    ops: Path,
    ort_recommend: Path,  # noqa: F811
    topk_exports: Path,
    with_library: bool,
) -> None:
    """recipes/cpp/ort_recommend on the ScoreTopK file prints what the plain-ops file gives in Python."""
    history = ["i3", "i17", "i5", "i22", "i9"]
    cmd = [str(ort_recommend), "--model", str(topk_exports / "True" / "model.onnx"), "--k", str(K), *history]
    if with_library:
        cmd[1:1] = ["--ort-ops", str(ops)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split("\t") for line in proc.stdout.strip().splitlines()]
    tokens = tiny_model(num_layers=1).item_tokens  # the vocabulary items.txt was written from
    ids = np.array([[tokens.index(t) for t in history]], dtype=np.int64)
    plain = onnx.load(topk_exports / "False" / "model.onnx")
    feeds = {"item_seq": ids, "item_seq_len": np.array([5]), "exclude_items": np.zeros((1, 1), np.int64)}
    scores, items = _run(plain, None, feeds)
    assert [r[1] for r in rows] == [tokens[i] for i in items[0]]
    np.testing.assert_allclose([float(r[2]) for r in rows], scores[0], rtol=1e-5, atol=1e-5)


def _single_node(n_items: int, k: int, chunk: int, fp16: bool, table: np.ndarray) -> onnx.ModelProto:
    from onnx import TensorProto, helper, numpy_helper

    from m4r_export.onnx.topk_op import make_topk_function

    t = TensorProto.FLOAT16 if fp16 else TensorProto.FLOAT
    info = helper.make_tensor_value_info
    node = helper.make_node(
        "ScoreTopK", ["user", "table", "exclude"], ["topk_scores", "topk_items"], domain="m4r",
        k=k, topk_chunk=chunk, n_items=n_items,
    )  # fmt: skip
    graph = helper.make_graph(
        [node],
        "score_topk",
        [info("user", t, ["b", 8]), info("exclude", TensorProto.INT64, ["b", "e"])],
        [info("topk_scores", t, ["b", k]), info("topk_items", TensorProto.INT64, ["b", k])],
        [numpy_helper.from_array(table, "table")],
    )  # fmt: skip
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("m4r", 1)]
    )
    model.functions.append(make_topk_function(node, 20))
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16"])
def test_single_node_on_the_intra_op_pool_matches_its_body(ops: Path, fp16: bool) -> None:
    """batch 130 (3 row groups of 64) x 3,001 items on 2 intra-op threads: ONNX Runtime's ParallelFor runs
    the work items; data in steps of 1/8 so every score is exact (and an fp16 value) in both runs: ties
    between the 5 distinct table rows come out identically; E = 0 (nothing excluded) works too."""
    rng = np.random.default_rng(5)
    dtype = np.float16 if fp16 else np.float32
    base = rng.integers(-8, 9, (5, 8)) / 8
    table = base[np.arange(3001) % 5].astype(dtype)
    user = (rng.integers(-8, 9, (130, 8)) / 8).astype(dtype)
    exclude = rng.integers(-3, 3010, (130, 40)).astype(np.int64)
    model = _single_node(3001, 50, 700, fp16, table)
    for ex_feed in (exclude, np.zeros((130, 0), np.int64)):
        feeds = {"user": user, "exclude": ex_feed}
        before = topk_calls(ops) or 0
        native = _run(model, ops, feeds)
        assert topk_calls(ops) == before + 1
        body = _run(model, None, feeds)
        np.testing.assert_array_equal(native[1], body[1])
        np.testing.assert_array_equal(native[0], body[0])
        scores = user.astype(np.float64) @ table.astype(np.float64).T
        scores[:, 0] = -np.inf
        for r, ids in enumerate(ex_feed):
            ids = ids[(ids >= 1) & (ids < 3001)]
            scores[r, ids] = -np.inf
        order = np.argsort(-scores, axis=1, kind="stable")[:, :50]
        np.testing.assert_array_equal(native[1], order)


def test_native_op_reports_a_bad_input_as_one_error_naming_the_op(ops: Path) -> None:
    """A kernel failure reaches the caller as ONNX Runtime's error with the op and the input named (the
    shared glue in ortOpSupport.h), not as a crash or an exception escaping the C API."""
    table = np.ones((50, 8), np.float32)
    model = _single_node(50, 5, 16, False, table)
    feeds = {"user": np.ones((3, 8), np.float32), "exclude": np.zeros((2, 4), np.int64)}  # batch 3 vs 2
    message = r"m4r::ScoreTopK: exclude_items \(2, 4\) must be \(batch, E\) with batch 3"
    with pytest.raises(Exception, match=message):
        _run(model, ops, feeds)
