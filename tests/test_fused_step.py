"""The fused streaming step (``m4r export --fused --streaming``): one m4r::MambaMixerStep node per mixer.

Checked against the unfused ``step.onnx`` (the reference path) on states from ``init.onnx`` over ragged
histories (empty, 1, middle, full), events that are skipped (0, out of range) or taken, a 2-layer model, fp32
and fp16, 1 and 3 threads, batches on and off the kernel's 16-row tasks: the fused file on plain ONNX Runtime
(the function body inlined) and with libm4r_ort_ops.so (its counter ``m4r_ort_ops_mixer_step_calls`` proves
the kernel ran). The library: as in tests/test_ort_ops.py.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from test_ort_ops import N_ITEMS, lib, tiny_model  # noqa: F401  (lib: the library fixture)

from m4r_export.onnx import export as ex
from m4r_export.onnx.ort_ops import mixer_step_calls

MAX_SEQ = 12
FILES = {"fp32": ("init.onnx", "step.onnx"), "fp16": ("init.fp16.onnx", "step.fp16.onnx")}


@pytest.fixture(scope="module")
def ops(lib: Path) -> Path:  # noqa: F811
    return lib


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    model = tiny_model(num_layers=2)
    out = tmp_path_factory.mktemp("fused_step")
    for name, is_fused in (("base", False), ("fused", True)):
        opts = ex.ExportOptions(head="scores", max_seq_len=MAX_SEQ, fp16=True, fused=is_fused, streaming=True)
        ex.export_artifacts(model, out / name, opts, build_trt=False)
    return {"base": out / "base", "fused": out / "fused"}


def test_fused_step_file_has_one_node_per_mixer_and_the_same_init(exports: dict[str, Path]) -> None:
    for init_name, step_name in FILES.values():
        proto = onnx.load(exports["fused"] / step_name)
        onnx.checker.check_model(proto, full_check=True)
        m4r_nodes = [n.op_type for n in proto.graph.node if n.domain == "m4r"]
        assert m4r_nodes == ["MambaMixerStep", "MambaMixerStep"]
        assert [f.name for f in proto.functions] == ["MambaMixerStep"]
        body = proto.functions[0].node
        assert not [n for n in body if n.domain == "m4r" or n.op_type in ("If", "Loop", "Scan")]
        base = onnx.load(exports["base"] / step_name)
        assert not [n for n in base.graph.node if n.domain == "m4r"]
        digest = [hashlib.sha256((exports[k] / init_name).read_bytes()).digest() for k in ("base", "fused")]
        assert digest[0] == digest[1]  # --fused changes the step only
    manifests = {k: json.loads((v / "manifest.json").read_text()) for k, v in exports.items()}
    assert manifests["fused"]["streaming"]["fused_step"]["used"] is True
    assert manifests["base"]["streaming"]["fused_step"]["used"] is False


def _init_states(exports: dict[str, Path], precision: str, batch: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    init = ex.ort_session((exports["base"] / FILES[precision][0]).read_bytes(), 1)
    lengths = np.array(([0, 1, MAX_SEQ // 2, MAX_SEQ] * batch)[:batch], dtype=np.int64)
    feeds = {
        "item_seq": rng.integers(1, N_ITEMS, (batch, MAX_SEQ)).astype(np.int64),
        "item_seq_len": lengths,
        "exclude_items": np.zeros((batch, 1), np.int64),
    }
    outs = init.run(None, feeds)
    names = [o.name for o in init.get_outputs()]
    return {n[: -len("_out")]: v for n, v in zip(names, outs, strict=True) if n.endswith("_out")}


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_fused_step_kernel_and_body_match_the_unfused_step(
    exports: dict[str, Path], ops: Path, threads: int, precision: str
) -> None:
    step_name = FILES[precision][1]
    base = ex.ort_session((exports["base"] / step_name).read_bytes(), threads)
    body = ex.ort_session((exports["fused"] / step_name).read_bytes(), threads)
    kernel = ex.ort_session((exports["fused"] / step_name).read_bytes(), threads, ops)
    names = [o.name for o in base.get_outputs()]
    tol = 1e-5 if precision == "fp32" else 2e-2
    rng = np.random.default_rng(7)
    for batch, seed in ((1, 0), (6, 1), (37, 2)):
        states = {k: dict(_init_states(exports, precision, batch, seed)) for k in ("base", "body", "kernel")}
        for t in range(3):
            ids = rng.integers(1, N_ITEMS, batch).astype(np.int64)
            ids[t % batch] = 0 if t != 1 else N_ITEMS + 4  # a skipped event each call
            exclude = rng.integers(0, N_ITEMS, (batch, 2)).astype(np.int64)
            outs = {}
            for key, sess in (("base", base), ("body", body), ("kernel", kernel)):
                before = mixer_step_calls(ops)
                feeds = {"item_id": ids, "exclude_items": exclude, **states[key]}
                outs[key] = dict(zip(names, sess.run(None, feeds), strict=True))
                if key == "kernel":
                    assert mixer_step_calls(ops) == before + 2  # both layers ran the fused kernel
                states[key] = {n[: -len("_out")]: v for n, v in outs[key].items() if n.endswith("_out")}
            for name in names:
                ref = outs["base"][name]
                finite = np.isfinite(ref)
                for key in ("kernel", "body"):
                    got = outs[key][name]
                    assert np.array_equal(finite, np.isfinite(got)), (key, name)
                    scale = max(1.0, float(np.abs(ref[finite]).max()))
                    limit = (tol if key == "kernel" else 1e-6) * scale
                    assert float(np.abs(got[finite] - ref[finite]).max()) <= limit, (key, name, batch, t)
            if precision == "fp32":
                top = np.argsort(-outs["base"]["scores"], 1, kind="stable")[:, :10]
                assert np.array_equal(top, np.argsort(-outs["kernel"]["scores"], 1, kind="stable")[:, :10])


def test_streaming_session_loads_the_library_for_the_fused_step(exports: dict[str, Path], ops: Path) -> None:
    from m4r_export.streaming import StreamingSession

    base = StreamingSession.from_dir(exports["base"], threads=1)
    fused = StreamingSession.from_dir(exports["fused"], threads=1, ort_ops=ops)
    histories = [[3, 5, 7], [], [9] * (MAX_SEQ + 3)]
    for sess in (base, fused):
        sess.start(histories)
    before = mixer_step_calls(ops)
    for ids in ([4, 0, 11], [N_ITEMS + 2, 6, 1]):
        ref, got = base.push(ids)["scores"], fused.push(ids)["scores"]
        finite = np.isfinite(ref)
        assert np.array_equal(finite, np.isfinite(got))
        assert float(np.abs(got[finite] - ref[finite]).max()) <= 1e-5
    assert mixer_step_calls(ops) == before + 4  # 2 pushes x 2 layers on the fused kernel


@pytest.mark.parametrize("weights_as_inputs", [False, True])
def test_single_step_node_kernel_matches_its_body(ops: Path, weights_as_inputs: bool) -> None:
    """One MambaMixerStep node: weights as initializers (packed once) or as graph inputs (packed per call)."""
    import torch
    from onnx import TensorProto, helper, numpy_helper

    from m4r_export.model.mamba import Mamba
    from m4r_export.onnx import fused_step

    torch.manual_seed(3)
    m = Mamba(d_model=12, d_state=5, d_conv=3, expand=2).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    weights = {
        "in_proj_weight": m.in_proj.weight,
        "conv_weight": m.conv1d.weight,
        "conv_bias": m.conv1d.bias,
        "x_proj_weight": m.x_proj.weight,
        "dt_proj_weight": m.dt_proj.weight,
        "dt_bias": m.dt_proj.bias,
        "A": -torch.exp(m.A_log),
        "D": m.D,
        "out_proj_weight": m.out_proj.weight,
    }
    arrays = {k: v.detach().numpy().astype(np.float32) for k, v in weights.items()}
    batch = 19
    rng = np.random.default_rng(0)
    feeds = {
        "hidden": rng.standard_normal((batch, 12)).astype(np.float32),
        "conv_state": rng.standard_normal((batch, m.d_inner, 2)).astype(np.float32),
        "ssm_state": rng.standard_normal((batch, m.d_inner, 5)).astype(np.float32),
    }
    node = helper.make_node(
        "MambaMixerStep",
        list(fused_step.INPUTS),
        list(fused_step.OUTPUTS),
        domain="m4r",
        x_proj_split=[int(m.dt_rank), 5, 5],
    )
    value = {k: helper.make_tensor_value_info(k, TensorProto.FLOAT, list(v.shape)) for k, v in feeds.items()}
    if weights_as_inputs:
        feeds.update(arrays)
        value.update(
            {k: helper.make_tensor_value_info(k, TensorProto.FLOAT, list(v.shape)) for k, v in arrays.items()}
        )
    graph = helper.make_graph(
        [node],
        "step",
        [value[k] for k in fused_step.INPUTS if k in value],
        [
            helper.make_tensor_value_info(k, TensorProto.FLOAT, shape)
            for k, shape in zip(
                fused_step.OUTPUTS, ([batch, 12], [batch, m.d_inner, 2], [batch, m.d_inner, 5]), strict=True
            )
        ],
        initializer=[] if weights_as_inputs else [numpy_helper.from_array(v, k) for k, v in arrays.items()],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("m4r", 1)],
        functions=[fused_step.make_step_function(20)],
    )
    onnx.checker.check_model(model, full_check=True)
    blob = model.SerializeToString()
    want = ex.ort_session(blob, 1).run(None, feeds)
    before = mixer_step_calls(ops)
    got = ex.ort_session(blob, 3, ops).run(None, feeds)
    assert mixer_step_calls(ops) == before + 1
    with torch.no_grad():
        y, conv, h = m.step(*(torch.from_numpy(feeds[k]) for k in ("hidden", "conv_state", "ssm_state")))
    for ref, body, kernel in zip((y, conv, h), want, got, strict=True):
        assert float(np.abs(body - ref.numpy()).max()) <= 1e-5
        assert float(np.abs(kernel - ref.numpy()).max()) <= 1e-5
