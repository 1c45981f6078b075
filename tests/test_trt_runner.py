"""The TensorRT engine path end to end against the strict fake tensorrt module (tests/fake_tensorrt.py):
build_engine -> manifest -> TrtRunner.run, with the error paths a real deployment hits (TensorRT too old
or of another version, plugin missing, loaded too late or another build, shapes outside the profile, a
rejected timing cache), the plugin build cache key and the TopK limit at export."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fake_tensorrt import TOP_K, HostDevice, fake_tensorrt

from m4r_export.errors import M4RError, UsageError
from m4r_export.onnx.export import TENSORRT_MAX_TOPK, ExportOptions
from m4r_export.trt import engine as engine_mod
from m4r_export.trt import env, native
from m4r_export.trt import runner as runner_mod
from m4r_export.trt.engine import build_engine, make_logger
from m4r_export.trt.manifest import ShapeProfile, manifest_path_for
from m4r_export.trt.native import PLUGIN_ENV

GPU = env.GpuInfo(0, "Fake L4", "8.9")
PROFILE = ShapeProfile(1, 4, 8, 1, 6, 10)


@pytest.fixture()
def fake(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """The strict fake installed as `tensorrt`, one GPU, host buffers for the runner, a plugin file."""
    calls: dict[str, Any] = {}
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(calls))
    for mod in (engine_mod, runner_mod):
        monkeypatch.setattr(mod, "list_gpus", lambda: ([GPU], None))
    monkeypatch.setattr(runner_mod, "CudaDevice", HostDevice)
    monkeypatch.setenv("M4R_CACHE_DIR", str(tmp_path / "cache"))
    lib = tmp_path / "libm4r_trt_plugin.so"
    lib.write_bytes(b"plugin build 1")
    monkeypatch.setenv(PLUGIN_ENV, str(lib))
    calls["lib"] = lib
    yield calls
    HostDevice.buffers.clear()


def _onnx(tmp_path: Path) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    onnx = tmp_path / "model.fp16.onnx"
    onnx.write_bytes(b"graph with one m4r SelectiveScan node")
    return onnx


def _engine(tmp_path: Path) -> Path:
    engine = tmp_path / "model.plan"
    build_engine(_onnx(tmp_path), engine, profile=PROFILE, build_plugin=False)
    return engine


def _inputs() -> tuple[np.ndarray, np.ndarray]:
    item_seq = np.array([[5, 6, 7, 0, 0], [9, 8, 0, 0, 0], [3, 4, 5, 6, 7]], dtype=np.int64)
    return item_seq, np.array([3, 9, 0], dtype=np.int64)  # in range, over-long, zero


def test_engine_built_then_run_end_to_end(fake: dict[str, Any], tmp_path: Path) -> None:
    engine = _engine(tmp_path)
    runner = runner_mod.TrtRunner(engine)
    item_seq, lengths = _inputs()
    out = runner.run(item_seq, lengths)

    order = fake["order"]
    # build: the plugin is registered before the parse; run: again before deserialisation
    assert order.index("registry.load_library") < order.index("parser.parse_from_file")
    assert order.index("parser.parse_from_file") < order.index("builder.build_serialized_network")
    assert order.index("runtime.deserialize_cuda_engine") < order.index("context.execute_async_v3")
    assert fake["stream"] == HostDevice.STREAM  # the runner's own stream, never the legacy default (0)
    # outputs sized from the engine ([batch, K]), not from an input, and read back by name
    last = np.array([7, 0, 3])  # item at clamp(len, 1, seq) - 1 (row 1: padding at position 4)
    np.testing.assert_array_equal(out["top_items"], last[:, None] + np.arange(TOP_K))
    np.testing.assert_array_equal(out["top_scores"], lengths[:, None] + np.arange(TOP_K))
    assert out["top_items"].dtype == np.int32 and out["top_scores"].shape == (3, TOP_K)
    assert fake["order"].count("context.set_input_shape:exclude_items") == 1  # zeros [batch, 1] by default
    excluded = runner.run(item_seq, lengths, np.array([[2], [0], [1]]))
    np.testing.assert_array_equal(excluded["top_items"][:, 0], last + 1000 * np.array([2, 0, 1]))


def test_plugin_that_fails_to_load_stops_the_build_before_parsing(
    fake: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TensorRT maps the scan node to the plugin only if it is registered before the parse."""
    fake["plugin_load_fails"] = True
    with pytest.raises(M4RError, match="could not load the plugin library"):
        _engine(tmp_path)
    assert "parser.parse_from_file" not in fake["order"]


def test_unsupported_tensorrt_versions_are_refused(
    fake: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = _engine(tmp_path)  # built with 10.8.0.43
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt({}, version="10.6.0.26"))
    for action in (lambda: runner_mod.TrtRunner(engine), lambda: _engine(tmp_path / "again")):
        with pytest.raises(M4RError, match=r"TensorRT 10\.6\.0\.26 is too old: m4r needs TensorRT >= 10\.8"):
            action()
    assert env.version_problem("10.8.0.43") is None and env.version_problem("11.1.0") is None
    assert "10.7.0" in str(env.version_problem("10.7.0"))
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt({}, version="10.9.0.34"))
    with pytest.raises(
        M4RError, match=r"built with TensorRT 10\.8\.0\.43, but this is TensorRT 10\.9\.0\.34"
    ):
        runner_mod.TrtRunner(engine)


def test_missing_or_other_plugin_build_is_refused(
    fake: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = _engine(tmp_path)
    fake["lib"].write_bytes(b"plugin build 2")  # rebuilt since: another sha256 than the manifest's
    with pytest.raises(M4RError, match="is not the build engine .* was made with"):
        runner_mod.TrtRunner(engine)
    monkeypatch.delenv(PLUGIN_ENV)
    with pytest.raises(M4RError, match="uses the m4r SelectiveScan plugin .* cannot be found"):
        runner_mod.TrtRunner(engine)


def test_engine_without_plugin_loaded_cannot_deserialise(
    fake: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = _engine(tmp_path)
    manifest = json.loads(manifest_path_for(engine).read_text())
    manifest["plugin"] = None  # a manifest that forgets the plugin: the runner then never loads it
    manifest_path_for(engine).write_text(json.dumps(manifest))
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt({}))  # a fresh process: nothing loaded
    with pytest.raises(M4RError, match="(?s)could not deserialise.*Cannot find plugin creator"):
        runner_mod.TrtRunner(engine)


def test_shapes_outside_the_profile(fake: dict[str, Any], tmp_path: Path) -> None:
    runner = runner_mod.TrtRunner(_engine(tmp_path))
    with pytest.raises(UsageError, match=r"sequence length 11 .* outside the engine's profile \[1, 10\]"):
        runner.run(np.ones((2, 11), dtype=np.int64), np.ones(2, dtype=np.int64))
    with pytest.raises(UsageError, match=r"batch size 9 is outside"):
        runner.run(np.ones((9, 4), dtype=np.int64), np.ones(9, dtype=np.int64))
    # the engine itself refuses what the manifest's profile would let through (a stale manifest)
    runner.profile = ShapeProfile(1, 4, 8, 1, 6, 50)
    with pytest.raises(
        M4RError, match=r"(?s)TensorRT rejected shape \(2, 11\) for item_seq.*outside profile"
    ):
        runner.run(np.ones((2, 11), dtype=np.int64), np.ones(2, dtype=np.int64))
    assert "context.execute_async_v3" not in fake["order"]


def test_rejected_timing_cache_starts_fresh_with_a_warning(fake: dict[str, Any], tmp_path: Path) -> None:
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"CACHE:another-gpu")
    with pytest.warns(UserWarning, match="rejected by TensorRT"):
        manifest = build_engine(
            _onnx(tmp_path), tmp_path / "m.plan", profile=PROFILE, build_plugin=False, timing_cache=cache
        )
    assert any("timing cache" in n and "fresh" in n for n in manifest["notes"])
    assert cache.read_bytes() == b"CACHE:fake"  # replaced by this GPU's cache
    assert fake["config"].cache.data == b""  # the build ran with the fresh cache
    build_engine(
        _onnx(tmp_path), tmp_path / "m2.plan", profile=PROFILE, build_plugin=False, timing_cache=cache
    )


def test_logger_keeps_a_bounded_tail(fake: dict[str, Any]) -> None:
    logger = make_logger(keep=5)
    for i in range(50):
        logger.log(fake_tensorrt({}).ILogger.Severity.ERROR, f"message {i}")
    assert list(logger.messages) == [f"[ERROR] message {i}" for i in range(45, 50)]
    assert engine_mod.logged(logger, last=2).endswith("message 48\n  [ERROR] message 49")


def test_plugin_cache_key_covers_archs_and_nvcc(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("M4R_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native, "_nvcc_version", lambda: "release 13.0, V13.0.88")
    sm90, sm80 = native.default_build_dir("90"), native.default_build_dir("80")
    assert sm90 != sm80 != native.default_build_dir(None)
    assert native.default_build_dir("80;86") == native.default_build_dir("86;80")
    monkeypatch.setattr(native, "_nvcc_version", lambda: "release 12.8, V12.8.93")
    assert native.default_build_dir("90") != sm90
    # discovery looks in the build for this GPU's arch, then the default-arch build; never another arch's
    monkeypatch.delenv(PLUGIN_ENV, raising=False)
    lib = native.default_build_dir("90") / "lib" / native.PLUGIN_LIBRARY
    lib.parent.mkdir(parents=True)
    lib.write_bytes(b"sm90")
    assert native.find_plugin_library(cuda_archs="90") == lib
    with pytest.raises(M4RError, match="not found"):
        native.find_plugin_library(cuda_archs="80")


def test_topk_above_tensorrt_limit_refused_when_an_engine_is_requested() -> None:
    n_items = 10_000
    ExportOptions(head="topk", k=TENSORRT_MAX_TOPK + 1).validate(n_items)  # ONNX only: fine
    ExportOptions(head="topk", k=TENSORRT_MAX_TOPK).validate(n_items, engine=True)
    with pytest.raises(UsageError, match=r"--k 3841: TensorRT's TopK supports K <= 3840.*--no-trt"):
        ExportOptions(head="topk", k=TENSORRT_MAX_TOPK + 1).validate(n_items, engine=True)
