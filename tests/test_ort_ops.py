"""libm4r_ort_ops.so: the ONNX Runtime custom-op library for m4r::SelectiveScan.

Which implementation ran is proven by the library's own counter of executed SelectiveScan nodes
(``m4r_ort_ops_compute_calls``): it moves by one per scan node and run in a session that loaded the
library, and not at all in a session without it (ORT then inlines the function body).

The library comes from $M4R_ORT_OPS, else it is built from plugins/ when $ONNXRUNTIME_ROOT points at
ONNX Runtime's headers (scripts/fetch_ort_headers.sh); else the tests skip, unless
$M4R_REQUIRE_ORT_OPS=1 (CI), where a missing library is a failure.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper

from m4r_export.checkpoint import save_checkpoint
from m4r_export.cli import main
from m4r_export.errors import M4RError, UsageError
from m4r_export.model import Mamba4Rec
from m4r_export.model.scan import selective_scan_ref
from m4r_export.onnx import export as ex
from m4r_export.onnx import ort_ops
from m4r_export.serving import ServingModel

N_ITEMS = 40


@pytest.fixture(scope="module")
def lib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = os.environ.get(ort_ops.ORT_OPS_ENV)
    if path:
        return Path(path).resolve()
    root = os.environ.get(ort_ops.ONNXRUNTIME_ROOT_ENV)
    missing = None
    if not root:
        missing = (
            "set M4R_ORT_OPS or ONNXRUNTIME_ROOT (scripts/fetch_ort_headers.sh DIR) to test libm4r_ort_ops.so"
        )
    elif shutil.which("cmake") is None:
        missing = "cmake is needed to build libm4r_ort_ops.so"
    if missing:
        if os.environ.get("M4R_REQUIRE_ORT_OPS") == "1":
            pytest.fail(missing)
        pytest.skip(missing)
    return ort_ops.build_ort_ops(tmp_path_factory.mktemp("ortops"), onnxruntime_root_dir=Path(str(root)))


def tiny_model(num_layers: int = 2, seed: int = 0) -> Mamba4Rec:
    torch.manual_seed(seed)
    model = Mamba4Rec(N_ITEMS, hidden_size=16, num_layers=num_layers, d_state=8).eval()
    with torch.no_grad():
        model.item_embedding.weight.normal_(0, 1.0)
    model.item_tokens = ["[PAD]"] + [f"i{i}" for i in range(1, N_ITEMS)]
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Mamba4Rec]:
    """Scores head, 2 layers (SelectiveScan in mode all, then last); fp32 only (each trace costs
    seconds; fp16 I/O is tested on the single-node model below)."""
    model = tiny_model()
    out = tmp_path_factory.mktemp("export")
    save_checkpoint(out / "model.pt", model, model.item_tokens, {"max_seq_len": 12})
    ex.export_artifacts(model, out / "art", ex.ExportOptions(head="scores", max_seq_len=12, fp16=False))
    return out, model


SEQ = np.random.default_rng(0).integers(1, N_ITEMS, (5, 12)).astype(np.int64)
LENS = np.array([1, 3, 12, 7, 0], dtype=np.int64)


def _session(path: Path, library: Path | None) -> Any:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if library is not None:
        ort_ops.register_ort_ops(so, library)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _feeds(sess: Any) -> dict[str, np.ndarray]:
    """SEQ/LENS, plus exclude_items = zeros (nothing excluded) when the model takes it."""
    feeds = {"item_seq": SEQ, "item_seq_len": LENS}
    if "exclude_items" in {i.name for i in sess.get_inputs()}:
        feeds["exclude_items"] = np.zeros((len(SEQ), 1), dtype=np.int64)
    return feeds


def _torch_scores(model: Mamba4Rec) -> np.ndarray:
    with torch.no_grad():
        out = ServingModel(model, "scores", 10, False)(torch.from_numpy(SEQ), torch.from_numpy(LENS))
    return out[0].numpy()


def _finite_diff(a: np.ndarray, b: np.ndarray) -> float:
    assert (np.isinf(a) == np.isinf(b)).all()
    keep = np.isfinite(a)
    return float(np.abs(a[keep] - b[keep]).max())


def test_library_kernel_runs_when_loaded_and_function_body_when_not(
    lib: Path, exported: tuple[Path, Mamba4Rec]
) -> None:
    out, model = exported
    path, tol = out / "art" / "model.onnx", 1e-5
    n_scan = sum(n.op_type == "SelectiveScan" for n in onnx.load(str(path)).graph.node)
    assert n_scan == len(model.mamba_layers) == 2
    ref = _torch_scores(model)

    with_lib = _session(path, lib)
    before = ort_ops.compute_calls(lib)
    got = with_lib.run(None, _feeds(with_lib))[0]
    assert ort_ops.compute_calls(lib) - before == n_scan  # the library's kernel served every scan node
    assert _finite_diff(got, ref) <= tol

    body = _session(path, None)
    before = ort_ops.compute_calls(lib)
    got_body = body.run(None, _feeds(body))[0]
    assert ort_ops.compute_calls(lib) == before  # no library in this session: the function body ran
    assert _finite_diff(got_body, ref) <= tol
    helper_session = ex.ort_session(path.read_bytes(), ort_ops=lib)  # the Python session helper
    before = ort_ops.compute_calls(lib)
    np.testing.assert_array_equal(helper_session.run(None, _feeds(helper_session))[0], got)
    assert ort_ops.compute_calls(lib) - before == n_scan

    # same ranking from both implementations
    assert (np.argsort(-got, axis=1)[:, :10] == np.argsort(-got_body, axis=1)[:, :10]).all()


# ----------------------------------------------------------------------------- the op on its own


def _scan_model(
    mode: str = "all", softplus: int = 1, dtype: int = TensorProto.FLOAT, optional: bool = True
) -> bytes:
    """A graph holding one SelectiveScan node (no function body: only the library can run it)."""
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "lengths"]
    types = [dtype, dtype, TensorProto.FLOAT, dtype, dtype, TensorProto.FLOAT, dtype, TensorProto.FLOAT]
    types.append(TensorProto.INT32)
    used = names if optional else names[:5]
    inputs = [
        helper.make_tensor_value_info(n, t, None) for n, t in zip(names, types, strict=True) if n in used
    ]
    node = helper.make_node(
        "SelectiveScan",
        used + ([] if optional else ["", "", "", ""]),
        ["y"],
        domain="m4r",
        delta_softplus=softplus,
        mode=mode,
        plugin_namespace="m4r",
        plugin_version="1",
    )
    graph = helper.make_graph([node], "scan", inputs, [helper.make_tensor_value_info("y", dtype, None)])
    opsets = [helper.make_opsetid("", 20), helper.make_opsetid("m4r", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10).SerializeToString()


def _scan_inputs(batch: int, dim: int, seqlen: int, dstate: int, seed: int) -> dict[str, np.ndarray]:
    g = np.random.default_rng(seed)
    f = np.float32
    return {
        "u": g.standard_normal((batch, dim, seqlen)).astype(f),
        "delta": (0.5 * g.standard_normal((batch, dim, seqlen))).astype(f),
        "A": -np.exp(0.5 * g.standard_normal((dim, dstate))).astype(f),
        "B": g.standard_normal((batch, dstate, seqlen)).astype(f),
        "C": g.standard_normal((batch, dstate, seqlen)).astype(f),
        "D": g.standard_normal(dim).astype(f),
        "z": g.standard_normal((batch, dim, seqlen)).astype(f),
        "delta_bias": (0.3 * g.standard_normal(dim)).astype(f),
        "lengths": np.resize(np.array([0, seqlen + 3, max(1, seqlen // 2)], dtype=np.int32), batch),
    }


def _ref(x: dict[str, np.ndarray], mode: str, softplus: bool, optional: bool = True) -> np.ndarray:
    t = {k: torch.from_numpy(v) for k, v in x.items()}
    y = selective_scan_ref(
        t["u"], t["delta"], t["A"], t["B"], t["C"],
        t["D"] if optional else None, t["z"] if optional else None, t["delta_bias"] if optional else None,
        delta_softplus=softplus, lengths=t["lengths"] if optional else None, mode=mode,
    )  # fmt: skip
    return y.float().numpy()


@pytest.mark.parametrize("mode", ["all", "last"])
@pytest.mark.parametrize("softplus", [1, 0])
@pytest.mark.parametrize(
    ("batch", "dim", "seqlen", "dstate"), [(3, 8, 13, 16), (2, 5, 1, 4), (1, 33, 40, 64), (20, 9, 7, 8)]
)
def test_op_matches_pytorch_reference_with_ragged_lengths(
    lib: Path, mode: str, softplus: int, batch: int, dim: int, seqlen: int, dstate: int
) -> None:
    x = _scan_inputs(batch, dim, seqlen, dstate, seed=seqlen + 10 * batch)
    if not softplus:
        x["delta"] = np.abs(x["delta"])
    # 2 threads: the work is split over ORT's pool (rows, or channel blocks for small batches)
    sess = _session_bytes(_scan_model(mode, softplus), lib, threads=2)
    got = sess.run(None, x)[0]
    want = _ref(x, mode, bool(softplus))
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_op_fp16_io_and_omitted_optional_inputs(lib: Path) -> None:
    x = _scan_inputs(3, 8, 13, 16, seed=3)
    half = {k: v.astype(np.float16) if k in ("u", "delta", "B", "C", "z") else v for k, v in x.items()}
    got = _session_bytes(_scan_model("last", 1, TensorProto.FLOAT16), lib).run(None, half)[0]
    assert got.dtype == np.float16
    want = _ref({k: v.astype(np.float32) for k, v in half.items()}, "last", True)
    np.testing.assert_allclose(got.astype(np.float32), want, rtol=2e-3, atol=2e-3)

    five = {k: x[k] for k in ("u", "delta", "A", "B", "C")}
    got = _session_bytes(_scan_model("all", 1, optional=False), lib).run(None, five)[0]
    np.testing.assert_allclose(got, _ref(x, "all", True, optional=False), rtol=2e-5, atol=2e-5)


def _session_bytes(model: bytes, library: Path, threads: int = 1) -> Any:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = threads
    ort_ops.register_ort_ops(so, library)
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def test_unsupported_attribute_and_bad_shapes_are_errors_not_crashes(lib: Path) -> None:
    with pytest.raises(Exception, match=r'mode="middle" is not supported'):
        _session_bytes(_scan_model(mode="middle"), lib)
    with pytest.raises(Exception, match=r"delta_softplus=2 is not supported"):
        _session_bytes(_scan_model(softplus=2), lib)
    x = _scan_inputs(3, 8, 13, 16, seed=1)
    x["B"] = x["B"][:, :, :5]
    with pytest.raises(Exception, match=r"input B has shape \(3, 16, 5\), expected \(3, 16, 13\)"):
        _session_bytes(_scan_model(), lib).run(None, x)


# ------------------------------------------------------------------------------- finding, checking


def test_find_library_explicit_env_and_missing(
    lib: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("M4R_CACHE_DIR", str(tmp_path / "cache"))  # nothing built there
    monkeypatch.delenv(ort_ops.ORT_OPS_ENV, raising=False)
    assert ort_ops.find_ort_ops_library() is None
    with pytest.raises(M4RError, match="m4r build-ort-ops"):
        ort_ops.require_ort_ops_library()
    assert ort_ops.find_ort_ops_library(lib) == lib
    with pytest.raises(UsageError, match="no such file"):
        ort_ops.find_ort_ops_library(tmp_path / "nope.so")
    monkeypatch.setenv(ort_ops.ORT_OPS_ENV, str(lib))
    assert ort_ops.find_ort_ops_library() == lib
    monkeypatch.setenv(ort_ops.ORT_OPS_ENV, str(tmp_path / "gone.so"))
    with pytest.raises(UsageError, match="M4R_ORT_OPS"):
        ort_ops.find_ort_ops_library()


def test_wrong_architecture_non_library_and_old_runtime_are_clear_errors(
    lib: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    foreign = tmp_path / "arm.so"
    data = bytearray(lib.read_bytes()[:64])
    data[18:20] = (183).to_bytes(2, "little")  # EM_AARCH64 (x86-64 hosts) ...
    if ort_ops._HOST_MACHINE.get(os.uname().machine, os.uname().machine) == "aarch64":
        data[18:20] = (62).to_bytes(2, "little")  # ... or EM_X86_64 (aarch64 hosts)
    foreign.write_bytes(bytes(data))
    with pytest.raises(UsageError, match="built for .*, but this machine is"):
        ort_ops.register_ort_ops(ort.SessionOptions(), foreign)
    text = tmp_path / "notes.so"
    text.write_text("not a library")
    with pytest.raises(UsageError, match="not a shared library"):
        ort_ops.register_ort_ops(ort.SessionOptions(), text)
    monkeypatch.setattr(ort, "__version__", "1.16.3")
    with pytest.raises(M4RError, match=r"needs onnxruntime >= 1\.\d+, but onnxruntime 1\.16\.3 is installed"):
        ort_ops.register_ort_ops(ort.SessionOptions(), lib)


# ------------------------------------------------------------------------------------ verify, bench


def _cli(*args: object) -> tuple[int, str]:
    res = CliRunner().invoke(main, [str(a) for a in args])
    return res.exit_code, res.output


def test_verify_and_bench_record_the_library(
    lib: Path, exported: tuple[Path, Mamba4Rec], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # --ort-ops alone must do: no $M4R_ORT_OPS and no `m4r build-ort-ops` output to fall back on
    monkeypatch.delenv(ort_ops.ORT_OPS_ENV, raising=False)
    monkeypatch.setenv("M4R_CACHE_DIR", str(tmp_path / "empty-cache"))
    out, _ = exported
    art = out / "art" / "model.onnx"
    code, text = _cli(
        "verify", "--ckpt", out / "model.pt", "--artifact", art, "--users", 16, "--ort-ops", lib,
        "--json", tmp_path / "v.json",
    )  # fmt: skip
    assert code == 0, text
    result = json.loads((tmp_path / "v.json").read_text())["results"][0]
    assert result["backend"] == "ort-cpu-ops"
    info = result["runner"]["ort_ops"]
    assert info["path"] == str(lib) and info["compute_calls"] > 0 and info["api_version"] >= 1

    code, text = _cli(
        "bench", "--artifact", art, "--ckpt", out / "model.pt", "--batch", 2, "--seq", 12,
        "--backend", "ort-cpu", "ort-cpu-ops", "--ort-ops", lib, "--scan-backend", "fast", "reference",
        "--warmup", 0, "--repeats", 3, "--json", tmp_path / "b.json",
    )  # fmt: skip
    assert code == 0, text
    bench = json.loads((tmp_path / "b.json").read_text())
    names = {p["backend"] for p in bench["points"]}
    assert names == {"ort-cpu", "ort-cpu-ops", "pytorch", "pytorch-reference"}
    described = {b["name"]: b for b in bench["backends"]}
    assert "ort_ops" not in described["ort-cpu"] and described["ort-cpu-ops"]["ort_ops"]["path"] == str(lib)

    code, text = _cli("verify", "--ckpt", out / "model.pt", "--artifact", art, "--ort-ops", tmp_path / "x.so")
    assert code == 2 and "Error: --ort-ops" in text and "no such file" in text


# ------------------------------------------------------------------------ C++ example ort_recommend


@pytest.fixture(scope="module")
def ort_recommend() -> Path:
    """recipes/cpp/ort_recommend: $M4R_ORT_RECOMMEND (CI sets it to the CMake build's binary)."""
    path = os.environ.get("M4R_ORT_RECOMMEND")
    if not path or not Path(path).is_file():
        why = "set M4R_ORT_RECOMMEND to a built recipes/cpp/ort_recommend (cmake with ONNXRUNTIME_ROOT)"
        if os.environ.get("M4R_REQUIRE_ORT_OPS") == "1":
            pytest.fail(why)
        pytest.skip(why)
    return Path(path)


def _python_top_k(model: Mamba4Rec, history: list[str], k: int) -> list[tuple[str, float]]:
    """The Python path: tokens -> indices -> ServingModel scores -> top-k (score desc, index asc)."""
    tokens = model.item_tokens
    ids = [tokens.index(t) for t in history]
    with torch.no_grad():
        seq, lens = torch.tensor([ids]), torch.tensor([len(ids)])
        scores = ServingModel(model, "scores", k, False)(seq, lens)[0][0].numpy()
    order = sorted((i for i in range(len(scores)) if np.isfinite(scores[i])), key=lambda i: (-scores[i], i))
    return [(tokens[i], float(scores[i])) for i in order[:k]]


@pytest.mark.parametrize("with_library", [True, False])
def test_ort_recommend_prints_the_python_top_k(
    lib: Path, ort_recommend: Path, exported: tuple[Path, Mamba4Rec], with_library: bool
) -> None:
    import subprocess

    out, model = exported
    history = ["i3", "i17", "i5", "i22", "i9"]
    cmd = [str(ort_recommend), "--model", str(out / "art" / "model.onnx"), "--k", "7", *history]
    if with_library:
        cmd[1:1] = ["--ort-ops", str(lib)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split("\t") for line in proc.stdout.strip().splitlines()]
    want = _python_top_k(model, history, 7)
    assert [int(r[0]) for r in rows] == list(range(1, 8))
    assert [r[1] for r in rows] == [t for t, _ in want]
    np.testing.assert_allclose([float(r[2]) for r in rows], [s for _, s in want], rtol=1e-5, atol=1e-5)

    bad = subprocess.run([*cmd[:-1], "not-an-item"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "Error: item token 'not-an-item' is not in items.txt" in bad.stderr


def test_ort_recommend_names_a_missing_model_and_is_quiet_on_fp16(
    ort_recommend: Path, exported: tuple[Path, Mamba4Rec]
) -> None:
    """Issue 22.7: the missing file named is the model (not items.txt looked for beside it), and an fp16
    model prints no ONNX Runtime optimizer warnings."""
    import subprocess

    proc = subprocess.run([str(ort_recommend), "--model", "nope.onnx", "5"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("Error: --model nope.onnx: cannot read it") and "--items" not in proc.stderr
    out, model = exported
    ex.export_artifacts(model, out / "art16", ex.ExportOptions(head="scores", max_seq_len=12, fp16=True))
    cmd = [str(ort_recommend), "--model", str(out / "art16" / "model.fp16.onnx"), "--k", "3", "i3", "i5"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == 3 and proc.stderr == ""
