"""``m4r export --int8``: model.int8.onnx with int8 weight GEMMs, the scan fp32, known to verify as int8."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto
from test_ort_ops import N_ITEMS, lib, tiny_model  # noqa: F401  (lib: the library fixture)

from m4r_export.onnx import export as ex
from m4r_export.onnx.ort_ops import mixer_calls
from m4r_export.verify.artifact import load_artifact
from m4r_export.verify.verify import DEFAULT_THRESHOLDS


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = tiny_model(num_layers=1)
    out = tmp_path_factory.mktemp("int8") / "art"
    ex.export_artifacts(
        model, out, ex.ExportOptions(head="scores", max_seq_len=10, int8=True), build_trt=False
    )
    return out


def test_int8_file_quantizes_the_weight_gemms_and_keeps_the_scan_fp32(exported: Path) -> None:
    proto = onnx.load(exported / "model.int8.onnx")
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("MatMulInteger") >= 3  # at least in_proj, x_proj, dt_proj of the Mamba block
    scan = [n for n in proto.graph.node if n.op_type == "SelectiveScan"]
    assert len(scan) == 1 and scan[0].domain == "m4r"  # left alone: fp32 op, fp32 state
    manifest = json.loads((exported / "manifest.json").read_text())
    assert manifest["files"]["model.int8.onnx"]["precision"] == "int8"
    assert manifest["parity"]["int8"]["passed"] is True
    assert load_artifact(exported / "model.int8.onnx").precision == "int8"  # verify's int8 thresholds
    assert load_artifact(exported / "model.onnx").precision == "fp32"
    assert DEFAULT_THRESHOLDS["int8"].min_topk_overlap_mean < DEFAULT_THRESHOLDS["fp32"].min_topk_overlap_mean


def test_int8_scores_track_fp32(exported: Path) -> None:
    rng = np.random.default_rng(0)
    feeds = {
        "item_seq": rng.integers(1, N_ITEMS, (16, 10)).astype(np.int64),
        "item_seq_len": rng.integers(1, 11, 16).astype(np.int64),
        "exclude_items": np.zeros((16, 1), np.int64),
    }
    ref = ex.ort_session((exported / "model.onnx").read_bytes(), 1).run(None, feeds)[0]
    got = ex.ort_session((exported / "model.int8.onnx").read_bytes(), 1).run(None, feeds)[0]
    finite = np.isfinite(ref)
    assert np.array_equal(finite, np.isfinite(got))
    assert 0 < float(np.abs(got[finite] - ref[finite]).max()) < 0.2 * float(np.abs(ref[finite]).max())


@pytest.fixture(scope="module")
def exported_fused(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = tiny_model(num_layers=1)
    out = tmp_path_factory.mktemp("int8fused") / "art"
    opts = ex.ExportOptions(head="scores", max_seq_len=10, int8=True, fused=True)
    ex.export_artifacts(model, out, opts, build_trt=False)
    return out


def test_int8_with_fused_keeps_the_mixer_fp32_and_runs_its_kernel(exported_fused: Path, lib: Path) -> None:  # noqa: F811
    """`m4r export --int8 --fused`: the quantizer leaves the m4r::MambaMixer node (a custom-domain node; its
    in_proj/x_proj/dt_proj weights stay fp32 initializers), quantizes the GEMMs outside it, verify classes the
    file as int8, and with the library the node runs the fused kernel and the scores track the fp32 file."""
    proto = onnx.load(exported_fused / "model.int8.onnx")
    ops = [n.op_type for n in proto.graph.node]
    assert "MatMulInteger" in ops  # something outside the mixer is int8
    (mixer,) = [n for n in proto.graph.node if n.op_type == "MambaMixer"]
    assert mixer.domain == "m4r"
    weights = {i.name: i for i in proto.graph.initializer}
    fed = [weights[name] for name in mixer.input[2:] if name in weights]
    assert fed and all(w.data_type == TensorProto.FLOAT for w in fed)
    assert load_artifact(exported_fused / "model.int8.onnx").precision == "int8"
    manifest = json.loads((exported_fused / "manifest.json").read_text())
    assert manifest["parity"]["int8"]["passed"] is True
    rng = np.random.default_rng(1)
    feeds = {
        "item_seq": rng.integers(1, N_ITEMS, (16, 10)).astype(np.int64),
        "item_seq_len": rng.integers(1, 11, 16).astype(np.int64),
        "exclude_items": np.zeros((16, 1), np.int64),
    }
    ref = ex.ort_session((exported_fused / "model.onnx").read_bytes(), 1).run(None, feeds)[0]
    before = mixer_calls(lib) or 0
    got = ex.ort_session((exported_fused / "model.int8.onnx").read_bytes(), 1, lib).run(None, feeds)[0]
    assert (mixer_calls(lib) or 0) == before + 1
    body = ex.ort_session((exported_fused / "model.int8.onnx").read_bytes(), 1).run(None, feeds)[0]
    finite = np.isfinite(ref)
    assert np.array_equal(finite, np.isfinite(got))
    scale = float(np.abs(ref[finite]).max())
    assert 0 < float(np.abs(got[finite] - ref[finite]).max()) < 0.2 * scale
    np.testing.assert_allclose(got, body, rtol=1e-4, atol=1e-4 * scale)  # kernel = the node's function body
