"""``m4r export --int8``: model.int8.onnx with int8 weight GEMMs, the scan fp32, known to verify as int8."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from test_ort_ops import N_ITEMS, tiny_model

from m4r_export.onnx import export as ex
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
