"""``m4r export``: graph structure, parity with ServingModel, fp16, manifest, errors, atomicity."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from m4r_export.checkpoint import save_checkpoint
from m4r_export.cli import main
from m4r_export.errors import M4RError, UsageError
from m4r_export.fileio import sha256_file
from m4r_export.model import Mamba4Rec
from m4r_export.onnx import exclude_inputs, histories_to_inputs, truncate_inputs
from m4r_export.onnx import export as ex
from m4r_export.serving import ServingModel
from m4r_export.verify.testing import trained_like_

N_ITEMS = 40


def tiny_model(num_layers: int = 1, seed: int = 0) -> Mamba4Rec:
    torch.manual_seed(seed)
    model = trained_like_(Mamba4Rec(N_ITEMS, hidden_size=16, num_layers=num_layers, d_state=8).eval(), seed)
    with torch.no_grad():  # make the ranking non-trivial
        model.item_embedding.weight.normal_(0, 1.0)
    model.item_tokens = ["[PAD]"] + [f"i{i}" for i in range(1, N_ITEMS)]
    return model


def write_ckpt(path: Path, model: Mamba4Rec) -> Path:
    save_checkpoint(path, model, model.item_tokens, {"max_seq_len": 12})
    return path


def ort_run(
    path: Path, item_seq: np.ndarray, item_seq_len: np.ndarray, exclude: np.ndarray | None = None
) -> list[np.ndarray]:
    """Run the file; a model with the exclude_items input gets ``exclude`` (default: zeros [batch, 1])."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {"item_seq": item_seq, "item_seq_len": item_seq_len}
    if "exclude_items" in {i.name for i in sess.get_inputs()}:
        feeds["exclude_items"] = exclude if exclude is not None else np.zeros((len(item_seq), 1), np.int64)
    return sess.run(None, feeds)


def torch_run(
    model: Mamba4Rec,
    head: str,
    k: int,
    excl: bool,
    seq: np.ndarray,
    lens: np.ndarray,
    exclude: np.ndarray | None = None,
) -> list[Any]:
    serving = ServingModel(model, head, k, excl)
    ex_t = None if exclude is None else torch.from_numpy(exclude)
    with torch.no_grad():
        return [o.numpy() for o in serving(torch.from_numpy(seq), torch.from_numpy(lens), ex_t)]


EDGE_SEQ = np.array(
    [[3, 5, 7, 0, 0, 0, 0, 0, 0, 0], [-4, 2, 99, 8, 9, 1, 2, 3, 4, 5], [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]],
    dtype=np.int64,
)
EDGE_LEN = np.array([3, 25, 0], dtype=np.int64)  # 25 > seq is clamped, 0 -> 1


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Mamba4Rec, dict[str, Any]]]:
    """One export per head (scores with fp16; embedding with 2 layers to exercise mode='all')."""
    out: dict[str, tuple[Path, Mamba4Rec, dict[str, Any]]] = {}
    specs = {
        "scores": (tiny_model(), ex.ExportOptions(head="scores", max_seq_len=12, fp16=True)),
        "topk": (tiny_model(), ex.ExportOptions(head="topk", k=5, exclude_history=True, max_seq_len=12)),
        "embedding": (tiny_model(num_layers=2), ex.ExportOptions(head="embedding", max_seq_len=12)),
    }
    for head, (model, opts) in specs.items():
        d = tmp_path_factory.mktemp(head)
        ckpt = write_ckpt(d / "model.pt", model)
        res = ex.export_artifacts(model, d / "out", opts, checkpoint_path=ckpt)
        out[head] = (d / "out", model, res.manifest)
    return out


@pytest.mark.parametrize("head", ["scores", "topk", "embedding"])
def test_graph_has_one_scan_node_per_layer_and_the_function(exports: dict[str, Any], head: str) -> None:
    out, model, _ = exports[head]
    files = ["model.onnx", "model.fp16.onnx"] if head == "scores" else ["model.onnx"]
    for name in files:
        proto = onnx.load(str(out / name))
        onnx.checker.check_model(proto, full_check=True)
        nodes = [n for n in proto.graph.node if n.op_type == "SelectiveScan"]
        assert len(nodes) == len(model.mamba_layers)
        for i, n in enumerate(nodes):
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
            assert n.domain == "m4r"
            assert attrs["plugin_namespace"] == b"m4r" and attrs["plugin_version"] == b"1"
            assert attrs["delta_softplus"] == 1
            assert attrs["mode"] == (b"last" if i == len(nodes) - 1 else b"all")
            assert len(n.input) == 9
        fns = [(f.domain, f.name) for f in proto.functions]
        # the topk head is one m4r::ScoreTopK node (tests/test_score_topk.py)
        assert fns == [("m4r", "SelectiveScan")] + ([("m4r", "ScoreTopK")] if head == "topk" else [])
        assert {(o.domain, o.version) for o in proto.opset_import} >= {("m4r", 1), ("", 20)}
        inits = {i.name: i for i in proto.graph.initializer}
        a_input = inits[nodes[-1].input[2]]  # A = -exp(A_log) is a precomputed fp32 initializer
        assert a_input.data_type == onnx.TensorProto.FLOAT
        assert (onnx.numpy_helper.to_array(a_input) < 0).all()
        dims = {
            v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in proto.graph.input
        }
        expected = {"item_seq": ["batch", "seq"], "item_seq_len": ["batch"]}
        if head != "embedding":  # ranking heads take the items to exclude
            expected["exclude_items"] = ["batch", "exclude"]
        assert dims == expected
        itypes = {v.name: v.type.tensor_type.elem_type for v in proto.graph.input}
        assert set(itypes.values()) == {onnx.TensorProto.INT64}


def test_fp16_file_is_fp16_with_fp32_scan_parameters(exports: dict[str, Any]) -> None:
    out, _, _ = exports["scores"]
    proto = onnx.load(str(out / "model.fp16.onnx"))
    dtypes = {i.name: i.data_type for i in proto.graph.initializer}
    emb = [n for n in dtypes if n.endswith("item_embedding.weight")]
    assert emb and dtypes[emb[0]] == onnx.TensorProto.FLOAT16
    scan = next(n for n in proto.graph.node if n.op_type == "SelectiveScan")
    for idx in (2, 5, 7):  # A, D, delta_bias
        assert dtypes[scan.input[idx]] == onnx.TensorProto.FLOAT
    ln = [n for n in proto.graph.node if n.op_type == "LayerNormalization"]
    assert ln and all(dtypes.get(n.input[1]) == onnx.TensorProto.FLOAT for n in ln)
    assert proto.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT


@pytest.mark.parametrize("seq_len", [1, 5, 12])
@pytest.mark.parametrize("head", ["scores", "topk", "embedding"])
def test_ort_matches_serving_model(exports: dict[str, Any], head: str, seq_len: int) -> None:
    out, model, manifest = exports[head]
    rng = np.random.default_rng(seq_len)
    seq = rng.integers(1, N_ITEMS, size=(6, seq_len)).astype(np.int64)
    lens = rng.integers(1, seq_len + 1, size=6).astype(np.int64)
    k = manifest["k"] or 100
    ref = torch_run(model, head, k, manifest["exclude_history"], seq, lens)
    got = ort_run(out / "model.onnx", seq, lens)
    for r, g in zip(ref, got, strict=True):
        if r.dtype.kind == "f":
            np.testing.assert_array_equal(np.isfinite(r), np.isfinite(g))
            np.testing.assert_allclose(g[np.isfinite(r)], r[np.isfinite(r)], rtol=1e-4, atol=1e-5)
        else:
            np.testing.assert_array_equal(g, r)


@pytest.mark.parametrize("head", ["scores", "topk"])
def test_edge_inputs_behave_like_pytorch(exports: dict[str, Any], head: str) -> None:
    out, model, manifest = exports[head]
    ref = torch_run(model, head, manifest["k"] or 100, manifest["exclude_history"], EDGE_SEQ, EDGE_LEN)
    got = ort_run(out / "model.onnx", EDGE_SEQ, EDGE_LEN)
    if head == "scores":
        assert np.isneginf(got[0][:, 0]).all()  # padding is never ranked
        np.testing.assert_allclose(got[0][:, 1:], ref[0][:, 1:], rtol=1e-4, atol=1e-5)
    else:
        np.testing.assert_array_equal(got[1], ref[1])
        history = {3, 5, 7}  # exclude_history: row 0's valid items never come back
        assert not history & set(got[1][0].tolist())
        assert 0 not in got[1]


def test_fp16_file_ranks_like_fp32(exports: dict[str, Any]) -> None:
    out, model, _ = exports["scores"]
    rng = np.random.default_rng(1)
    seq = rng.integers(1, N_ITEMS, size=(16, 12)).astype(np.int64)
    lens = rng.integers(1, 13, size=16).astype(np.int64)
    ref = torch_run(model, "scores", 100, False, seq, lens)[0]
    got = ort_run(out / "model.fp16.onnx", seq, lens)[0]
    assert got.dtype == np.float32
    fin = np.isfinite(ref)
    assert np.abs(got[fin] - ref[fin]).max() < 0.05
    assert ex.overlap(ex._top10(ref), ex._top10(got)) >= 0.9


def test_manifest(exports: dict[str, Any]) -> None:
    out, model, manifest = exports["scores"]
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == manifest
    assert manifest["format"] == "m4r-export-manifest" and manifest["format_version"] == 1
    for key in ("tool_version", "created_utc", "checkpoint", "model", "max_seq_len", "head", "k"):
        assert key in manifest
    assert manifest["model"] == model.config.to_dict()
    assert manifest["custom_op"] == {
        "domain": "m4r",
        "name": "SelectiveScan",
        "version": 1,
        "plugin_namespace": "m4r",
        "plugin_version": "1",
        "function_body": "chunked",
        "fused_mixer": {"used": False, "name": "MambaMixer", "version": 1},
        "score_topk": {"used": False, "name": "ScoreTopK", "version": 1},  # the scores head has no TopK
    }
    assert manifest["inputs"] == [
        {"name": "item_seq", "dtype": "int64", "shape": ["batch", "seq"]},
        {"name": "item_seq_len", "dtype": "int64", "shape": ["batch"]},
        {"name": "exclude_items", "dtype": "int64", "shape": ["batch", "exclude"]},
    ]
    assert manifest["exclude_items"] is True and "exclude_items" in manifest["input_semantics"]
    meta = {p.key: p.value for p in onnx.load(str(out / "model.onnx")).metadata_props}
    assert meta["m4r.exclude_items"] == "1"
    assert manifest["outputs"] == [{"name": "scores", "dtype": "float32", "shape": ["batch", N_ITEMS]}]
    for name, info in manifest["files"].items():
        assert sha256_file(out / name) == info["sha256"]
        assert (out / name).stat().st_size == info["bytes"]
    assert manifest["files"]["model.fp16.onnx"]["precision"] == "fp16"
    for precision in ("fp32", "fp16"):
        p = manifest["parity"][precision]
        assert p["passed"] and p["max_abs_diff"] <= p["tolerance"]["atol"] + 1e-3
        assert p["top10_overlap"] >= p["tolerance"]["min_top10_overlap"]
    assert manifest["tensorrt"]["status"] in ("built", "skipped")
    assert (out / "items.txt").read_text().splitlines() == model.item_tokens
    emb_out, emb_model, emb_manifest = exports["embedding"]
    assert emb_manifest["exclude_items"] is False  # the embedding head ranks nothing
    assert [i["name"] for i in emb_manifest["inputs"]] == ["item_seq", "item_seq_len"]
    assert "exclude_items" not in emb_manifest["input_semantics"]
    table = np.load(emb_out / "item_embedding.npy")
    np.testing.assert_array_equal(table, emb_model.item_embedding.weight.detach().numpy())
    assert "item_embedding.npy" in emb_manifest["files"]


# ----------------------------------------------------------------------------------- CLI, errors


def test_cli_export_and_errors(tmp_path: Path) -> None:
    runner = CliRunner()
    ckpt = write_ckpt(tmp_path / "model.pt", tiny_model())
    out = tmp_path / "out"
    res = runner.invoke(
        main,
        [
            "export",
            "--ckpt",
            str(ckpt),
            "--out-dir",
            str(out),
            "--head",
            "topk",
            "--k",
            "3",
            "--no-exclude-items",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "TensorRT: skipped" in res.output or "TensorRT: built" in res.output
    manifest = json.loads((out / "manifest.json").read_text())
    # --no-exclude-items: the two-input signature of earlier releases
    assert [i["name"] for i in manifest["inputs"]] == ["item_seq", "item_seq_len"]
    assert manifest["exclude_items"] is False
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["item_seq", "item_seq_len"]
    assert manifest["max_seq_len"] == 12  # from the checkpoint's meta
    assert manifest["checkpoint"]["sha256"] == sha256_file(ckpt)

    bad = tmp_path / "bad"
    cases: list[tuple[list[str], str]] = [
        (["--ckpt", str(tmp_path / "missing.pt")], "does not exist"),
        (["--ckpt", str(ckpt), "--head", "topk", "--k", str(N_ITEMS)], "choose K between 1 and"),
        (["--ckpt", str(ckpt), "--opset", "17"], "opset 17 is not supported"),
        (["--ckpt", str(ckpt), "--max-seq-len", "0"], "max-seq-len"),
    ]
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(ckpt.read_bytes()[:200])
    cases.append((["--ckpt", str(corrupt)], "corrupt"))
    for args, message in cases:
        res = runner.invoke(main, ["export", "--out-dir", str(bad), *args])
        assert res.exit_code == 2, (args, res.output)
        assert message in res.output, res.output
        assert not bad.exists() or not any(bad.iterdir())


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_unwritable_out_dir(tmp_path: Path) -> None:
    ckpt = write_ckpt(tmp_path / "model.pt", tiny_model())
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    res = CliRunner().invoke(main, ["export", "--ckpt", str(ckpt), "--out-dir", str(locked / "x")])
    assert res.exit_code == 2 and "writable" in res.output


def test_unwritable_out_dir_is_a_file(tmp_path: Path) -> None:
    ckpt = write_ckpt(tmp_path / "model.pt", tiny_model())
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = CliRunner().invoke(main, ["export", "--ckpt", str(ckpt), "--out-dir", str(blocker / "sub")])
    assert res.exit_code == 2 and "cannot create output directory" in res.output


def test_failed_parity_writes_nothing_and_keeps_old_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"old")
    monkeypatch.setitem(ex.TOLERANCES, "fp32", ex.Tolerance(atol=0.0, rtol=0.0, min_top10_overlap=1.1))
    with pytest.raises(M4RError, match="parity check failed"):
        ex.export_artifacts(tiny_model(), out, ex.ExportOptions(max_seq_len=6))
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx"]
    assert (out / "model.onnx").read_bytes() == b"old"


# ---------------------------------------------------------------------------------- input helpers


def test_truncate_inputs_keeps_most_recent_items() -> None:
    seq = np.array([[1, 2, 3, 4, 5, 6], [7, 8, 0, 0, 0, 0], [1, 2, 3, 4, 0, 0]])
    lens = np.array([6, 2, 9])  # 9 > seq: clamped to 6 first, like the model
    out, new_len = truncate_inputs(seq, lens, 4)
    np.testing.assert_array_equal(out, [[3, 4, 5, 6], [7, 8, 0, 0], [3, 4, 0, 0]])
    np.testing.assert_array_equal(new_len, [4, 2, 4])
    same, same_len = truncate_inputs(seq, lens, 6)
    assert same is not None and same.shape == (3, 6) and (same_len == lens).all()
    s, n = histories_to_inputs([[1, 2, 3, 4, 5], [9]], 3)
    np.testing.assert_array_equal(s, [[3, 4, 5], [9, 0, 0]])
    np.testing.assert_array_equal(n, [3, 1])


def test_truncated_input_scores_like_pytorch_on_the_kept_items(exports: dict[str, Any]) -> None:
    out, model, _ = exports["scores"]
    long_seq = np.arange(1, 31, dtype=np.int64)[None, :] % (N_ITEMS - 1) + 1  # 30 > max_seq_len 12
    seq, lens = truncate_inputs(long_seq, np.array([30]), 12)
    ref = torch_run(model, "scores", 100, False, long_seq[:, -12:], np.array([12]))[0]
    got = ort_run(out / "model.onnx", seq, lens)[0]
    np.testing.assert_allclose(got[:, 1:], ref[:, 1:], rtol=1e-4, atol=1e-5)


def test_ort_session_keeps_torch_flush_to_zero(exports: dict[str, Any]) -> None:
    """ORT's first session in a process clears FTZ/DAZ on the calling thread; ort_session restores it."""
    out, _, _ = exports["scores"]
    code = (
        "import sys, torch; from m4r_export.onnx import export as ex; torch.set_flush_denormal(True); "
        "ex.ort_session(open(sys.argv[1], 'rb').read()); print(ex.flush_denormal_enabled())"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, str(out / "model.onnx")], capture_output=True, text=True
    )
    assert res.stdout.strip() == "True", res.stderr[-2000:]


# ----------------------------------------------------------------------------------- exclude_items


def _random_excludes(rng: np.random.Generator, batch: int, width: int) -> np.ndarray:
    """Ids in [-3, N_ITEMS + 3): padding 0s, duplicates, negative and too-large ids all occur."""
    ex_ = rng.integers(-3, N_ITEMS + 3, size=(batch, width)).astype(np.int64)
    if width > 1:
        ex_[:, 1] = ex_[:, 0]  # a duplicate in every row
        ex_[0, :] = 0  # a row that excludes nothing
    return ex_


@pytest.mark.parametrize("width", [0, 1, 3, 60])
@pytest.mark.parametrize("head", ["scores", "topk"])
def test_ort_exclude_items_matches_pytorch_and_python_sets(
    exports: dict[str, Any], head: str, width: int
) -> None:
    out, model, manifest = exports[head]
    rng = np.random.default_rng(width)
    seq = rng.integers(1, N_ITEMS, size=(5, 7)).astype(np.int64)
    seq[1, 0], seq[2, 0], seq[4, 6] = -5, N_ITEMS + 3, N_ITEMS  # out-of-range history ids
    lens = np.array([7, 3, 1, 0, 30], dtype=np.int64)
    excl = _random_excludes(rng, 5, width)
    ref = torch_run(model, head, manifest["k"] or 100, manifest["exclude_history"], seq, lens, excl)
    got = ort_run(out / "model.onnx", seq, lens, excl)
    for r, g in zip(ref, got, strict=True):
        if r.dtype.kind == "f":
            np.testing.assert_array_equal(np.isneginf(r), np.isneginf(g))
            np.testing.assert_allclose(g[np.isfinite(r)], r[np.isfinite(r)], rtol=1e-4, atol=1e-5)
        else:
            np.testing.assert_array_equal(g, r)
    # independent of ServingModel: the masked set per row, from plain Python sets
    clamped = np.clip(lens, 1, seq.shape[1])
    for row in range(5):
        banned = {0} | {int(i) for i in excl[row] if 1 <= i < N_ITEMS}
        if manifest["exclude_history"]:
            banned |= {int(i) for i in seq[row, : clamped[row]] if 0 <= i < N_ITEMS}
        if head == "scores":
            assert set(np.flatnonzero(np.isneginf(got[0][row])).tolist()) == banned
        else:
            k = manifest["k"]
            finite = np.isfinite(got[0][row])
            assert not banned & set(got[1][row][finite].tolist())
            assert finite.sum() == min(k, N_ITEMS - len(banned))


def test_exclude_inputs_pads_ragged_lists() -> None:
    np.testing.assert_array_equal(exclude_inputs([[5, 6, 6], [], [7]]), [[5, 6, 6], [0, 0, 0], [7, 0, 0]])
    np.testing.assert_array_equal(exclude_inputs([[], []]), np.zeros((2, 1), np.int64))
    np.testing.assert_array_equal(exclude_inputs([], batch=3), np.zeros((3, 1), np.int64))
    assert exclude_inputs([np.array([4, 9])]).dtype == np.int64
    with pytest.raises(Exception, match="2 rows but the batch has 3"):
        exclude_inputs([[1], [2]], batch=3)


def test_vocabulary_size_must_match_the_item_table(tmp_path: Path) -> None:
    model = tiny_model()
    model.item_tokens = model.item_tokens[:-1]  # one token short: items.txt would shift every id
    with pytest.raises(UsageError, match=f"vocabulary has {N_ITEMS - 1} tokens but the model has {N_ITEMS}"):
        ex.export_artifacts(model, tmp_path / "out", ex.ExportOptions(max_seq_len=12))
    out = tmp_path / "out"  # checked before anything is traced or written
    assert not out.exists() or not any(out.iterdir())
