"""m4r_export.trt without TensorRT: detection, skip reasons, manifest checks, plugin discovery, and the
engine-build flow against a minimal fake of the tensorrt module (the real one cannot be installed here)."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from fake_tensorrt import fake_tensorrt

from m4r_export.cli import main
from m4r_export.errors import M4RError, UsageError
from m4r_export.trt import engine as engine_mod
from m4r_export.trt import env
from m4r_export.trt.engine import build_engine, try_build_engine
from m4r_export.trt.manifest import (
    MANIFEST_FORMAT,
    ShapeProfile,
    check_engine_compatible,
    check_inputs_in_profile,
    manifest_path_for,
    read_manifest,
)
from m4r_export.trt.native import PLUGIN_ENV, find_plugin_library


@pytest.fixture()
def stub_only_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    """What tensorrt-stubs gives at run time: an importable, empty 'tensorrt' namespace."""
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))


@pytest.fixture()
def no_plugin(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(PLUGIN_ENV, raising=False)
    monkeypatch.setenv("M4R_CACHE_DIR", str(tmp_path / "cache"))


def test_stub_namespace_is_not_a_tensorrt_install(stub_only_tensorrt: None) -> None:
    reason = env.tensorrt_unavailable_reason()
    assert reason is not None and "tensorrt.Builder is missing" in reason
    with pytest.raises(M4RError, match="TensorRT is unavailable"):
        env.load_tensorrt()


def test_module_with_builder_counts_as_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt({}))
    assert env.tensorrt_unavailable_reason() is None


def test_try_build_engine_skips_without_tensorrt(stub_only_tensorrt: None, tmp_path: Path) -> None:
    result = try_build_engine(tmp_path / "model.fp16.onnx", tmp_path)
    assert not result.built and result.status == "skipped"
    assert result.message.startswith("skipped: no TensorRT engine built: ")
    assert "tensorrt.Builder is missing" in result.message
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_try_build_engine_skips_without_gpu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt({}))
    monkeypatch.setattr(
        engine_mod, "gpu_unavailable_reason", lambda: "no NVIDIA driver found (libcuda.so.1 ...)"
    )
    result = try_build_engine(tmp_path / "model.fp16.onnx", tmp_path)
    assert result.status == "skipped" and "no NVIDIA driver found" in result.reason


def test_build_engine_flow_with_fake_tensorrt(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: dict[str, Any] = {}
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(calls))
    lib = tmp_path / "libm4r_trt_plugin.so"
    lib.write_bytes(b"plugin")

    def found(explicit: Path | None, cuda_archs: str | None = None) -> Path:
        calls["plugin_archs"] = cuda_archs
        return lib

    monkeypatch.setattr(engine_mod, "find_or_build_plugin", found)
    monkeypatch.setattr(engine_mod, "list_gpus", lambda: ([env.GpuInfo(0, "Fake L4", "8.9")], None))
    monkeypatch.setattr(engine_mod, "gpu_unavailable_reason", lambda: None)
    onnx = tmp_path / "model.fp16.onnx"
    onnx.write_bytes(b"onnx")
    cache = tmp_path / "timing.cache"
    profile = ShapeProfile(1, 8, 32, 2, 20, 100)

    result = try_build_engine(
        onnx, tmp_path / "out", profile=profile, timing_cache=cache, optimization_level=4
    )

    assert result.built and result.engine_path is not None
    assert json.loads(result.engine_path.read_bytes())["fake_engine"] == 1
    assert calls["network_flags"] == 1 << 1  # STRONGLY_TYPED on TensorRT 10
    assert calls["config"].builder_optimization_level == 4
    assert calls["shapes"]["item_seq"] == ((1, 2), (8, 20), (32, 100))
    assert calls["shapes"]["item_seq_len"] == ((1,), (8,), (32,))
    assert calls["shapes"]["exclude_items"] == ((1, 1), (8, 1), (32, 1024))  # E >= 1 in an engine
    assert cache.read_bytes() == b"CACHE:fake" and calls["timing_cache_in"] == b""
    # the plugin is registered before the ONNX parse (the strict fake refuses the scan node otherwise)
    assert calls["order"].index("registry.load_library") < calls["order"].index("parser.parse_from_file")
    manifest = json.loads(manifest_path_for(result.engine_path).read_text())
    assert manifest["format"] == MANIFEST_FORMAT and manifest["tensorrt_version"] == "10.8.0.43"
    assert manifest["gpu"] == {"name": "Fake L4", "compute_capability": "8.9"}
    assert manifest["profile"] == {"batch": [1, 8, 32], "seq": [2, 20, 100], "exclude": [1, 1, 1024]}
    assert ShapeProfile.from_json(manifest["profile"]) == profile
    # an ONNX file exported with --no-exclude-items: no profile for an input it does not have
    calls.clear()
    calls["inputs"] = ["item_seq", "item_seq_len"]
    try_build_engine(onnx, tmp_path / "out2", profile=profile)
    assert set(calls["shapes"]) == {"item_seq", "item_seq_len"}
    assert calls["plugin_archs"] == "89" and manifest["plugin"]["library"] == lib.name
    assert read_manifest(result.engine_path) == manifest


def test_missing_plugin_skips_the_engine_with_the_fix(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, no_plugin: None
) -> None:
    # TensorRT cannot import the op's function body (string If), so no plugin means no engine
    calls: dict[str, Any] = {}
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(calls))

    def cannot_build(explicit: Path | None, cuda_archs: str | None = None) -> Path:
        raise M4RError("libm4r_trt_plugin.so not found ...; building it failed: nvcc was not found")

    monkeypatch.setattr(engine_mod, "find_or_build_plugin", cannot_build)
    monkeypatch.setattr(engine_mod, "list_gpus", lambda: ([env.GpuInfo(0, "Fake L4", "8.9")], None))
    monkeypatch.setattr(engine_mod, "gpu_unavailable_reason", lambda: None)
    onnx = tmp_path / "model.fp16.onnx"
    onnx.write_bytes(b"onnx")
    result = try_build_engine(onnx, tmp_path / "out")
    assert result.status == "skipped"
    assert "nvcc was not found" in result.reason and "m4r build-plugin" in result.reason
    assert "network_flags" not in calls and not (tmp_path / "out" / "model.plan").exists()
    with pytest.raises(engine_mod.PluginUnavailable, match="plugin is required"):
        build_engine(onnx, tmp_path / "out" / "model.plan")


def test_build_engine_loads_and_records_the_plugin(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: dict[str, Any] = {}
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(calls))
    monkeypatch.setattr(engine_mod, "list_gpus", lambda: ([env.GpuInfo(0, "Fake H100", "9.0")], None))
    lib = tmp_path / "libm4r_trt_plugin.so"
    lib.write_bytes(b"plugin")
    monkeypatch.setattr(engine_mod, "find_or_build_plugin", lambda explicit, cuda_archs=None: lib)
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"onnx")
    manifest = build_engine(onnx, tmp_path / "m.plan")
    assert calls["loaded"] == str(lib)  # registered through IPluginRegistry.load_library
    assert manifest["plugin"]["library"] == "libm4r_trt_plugin.so" and len(manifest["plugin"]["sha256"]) == 64
    assert manifest["notes"] == []


def test_build_engine_explicit_missing_plugin_is_an_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt({}))
    monkeypatch.setattr(engine_mod, "list_gpus", lambda: ([env.GpuInfo(0, "Fake", "8.9")], None))
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"onnx")
    with pytest.raises(UsageError, match="does not exist"):
        build_engine(onnx, tmp_path / "m.plan", plugin_library=tmp_path / "libm4r_trt_plugin.so")


@pytest.mark.parametrize(
    ("profile", "field"),
    [
        (ShapeProfile(min_batch=0), "batch"),
        (ShapeProfile(opt_batch=2048), "batch"),
        (ShapeProfile(opt_seq=500), "seq"),
        (ShapeProfile(min_exclude=0), "exclude"),
    ],
)
def test_invalid_profiles_name_the_option(profile: ShapeProfile, field: str) -> None:
    with pytest.raises(UsageError, match=f"invalid {field} profile.*--max-{field}"):
        profile.validate()


def _manifest(trt: str = "10.8.0.43", cc: str = "8.9", name: str = "NVIDIA L4") -> dict[str, Any]:
    return {
        "format": MANIFEST_FORMAT,
        "tensorrt_version": trt,
        "gpu": {"name": name, "compute_capability": cc},
    }


def test_engine_from_other_tensorrt_version_is_refused() -> None:
    with pytest.raises(
        M4RError, match=r"built with TensorRT 10\.8\.0\.43, but this is TensorRT 10\.13\.0.*m4r build-engine"
    ):
        check_engine_compatible(_manifest(), Path("model.plan"), "10.13.0", "NVIDIA L4", "8.9")


def test_engine_from_other_gpu_architecture_is_refused() -> None:
    with pytest.raises(M4RError, match=r"compute capability 8\.9 \(NVIDIA L4\).*H100.*9\.0"):
        check_engine_compatible(_manifest(), Path("model.plan"), "10.8.0.43", "NVIDIA H100", "9.0")


def test_same_architecture_other_gpu_only_warns() -> None:
    warnings = check_engine_compatible(_manifest(), Path("model.plan"), "10.8.0.43", "NVIDIA RTX 4090", "8.9")
    assert len(warnings) == 1 and "RTX 4090" in warnings[0]


def test_inputs_outside_profile_name_the_fix() -> None:
    p = ShapeProfile(1, 8, 32, 1, 20, 100)
    check_inputs_in_profile(p, 32, 100)  # edges are inside
    with pytest.raises(UsageError, match=r"batch size 33 .*\[1, 32\].*--max-batch"):
        check_inputs_in_profile(p, 33, 10)
    with pytest.raises(UsageError, match=r"sequence length 101 .*most recent items.*--max-seq 101"):
        check_inputs_in_profile(p, 4, 101)
    check_inputs_in_profile(p, 4, 10, 1024)
    with pytest.raises(UsageError, match=r"exclude_items width 0 .*zeros \[batch, 1\]"):
        check_inputs_in_profile(p, 4, 10, 0)
    with pytest.raises(UsageError, match=r"exclude_items width 1025 .*--max-exclude 1025"):
        check_inputs_in_profile(p, 4, 10, 1025)
    # engines built before exclude_items: their manifest has no "exclude" entry
    assert ShapeProfile.from_json({"batch": [1, 8, 32], "seq": [1, 20, 100]}).max_exclude == 1024


def test_missing_or_foreign_manifest(tmp_path: Path) -> None:
    engine = tmp_path / "model.plan"
    with pytest.raises(UsageError, match="manifest .* is missing"):
        read_manifest(engine)
    manifest_path_for(engine).write_text('{"format": "something-else"}')
    with pytest.raises(UsageError, match="not an m4r engine manifest"):
        read_manifest(engine)


def test_plugin_discovery_errors_name_the_fix(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, no_plugin: None
) -> None:
    with pytest.raises(M4RError, match="libm4r_trt_plugin.so not found.*m4r build-plugin"):
        find_plugin_library()
    monkeypatch.setenv(PLUGIN_ENV, str(tmp_path / "nope.so"))
    with pytest.raises(UsageError, match=f"\\${PLUGIN_ENV}=.*does not exist"):
        find_plugin_library()
    lib = tmp_path / "libm4r_trt_plugin.so"
    lib.write_bytes(b"")
    monkeypatch.setenv(PLUGIN_ENV, str(lib))
    assert find_plugin_library() == lib


def test_cli_build_engine_without_tensorrt_fails_clearly(stub_only_tensorrt: None, tmp_path: Path) -> None:
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"x")
    result = CliRunner().invoke(main, ["build-engine", "--onnx", str(onnx)])
    assert result.exit_code == 1
    assert "TensorRT is unavailable" in result.output and not (tmp_path / "model.plan").exists()


def test_cli_build_plugin_rejects_a_tensorrt_root_without_headers(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main, ["build-plugin", "--out", str(tmp_path / "b"), "--tensorrt-root", str(tmp_path)]
    )
    assert result.exit_code == 2 and "NvInferRuntime.h not found" in result.output


def test_find_or_build_plugin_builds_when_missing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, no_plugin: None
) -> None:
    from m4r_export.trt import native

    built = tmp_path / "lib" / "libm4r_trt_plugin.so"
    seen: dict[str, Any] = {}

    def fake_build(build_dir: Path | None = None, **kw: Any) -> native.NativeBuild:
        seen.update(kw)
        return native.NativeBuild(tmp_path, {native.PLUGIN_LIBRARY: built})

    monkeypatch.setattr(native, "build_native", fake_build)
    assert native.find_or_build_plugin(cuda_archs="90") == built
    assert seen["cuda_archs"] == "90" and seen["require_plugin"] is True

    def failing_build(build_dir: Path | None = None, **kw: Any) -> native.NativeBuild:
        raise M4RError("the TensorRT headers were not found (pass --tensorrt-root or set TensorRT_ROOT)")

    monkeypatch.setattr(native, "build_native", failing_build)
    with pytest.raises(M4RError, match="not found.*building it failed: the TensorRT headers were not found"):
        native.find_or_build_plugin()
    with pytest.raises(UsageError):  # an explicit path is never replaced by a build
        native.find_or_build_plugin(tmp_path / "missing.so")


def test_build_tree_from_another_copy_of_the_sources_is_reconfigured(tmp_path: Path) -> None:
    """The build cache is keyed by source content, so a clone and a worktree share it: CMake's cache
    from the other path must go (CMake refuses to reuse it), one from the same path must stay."""
    from m4r_export.trt.native import _forget_other_source_tree

    src, other, out = tmp_path / "src", tmp_path / "other", tmp_path / "build"
    for d in (src, other, out / "CMakeFiles"):
        d.mkdir(parents=True)
    cache = out / "CMakeCache.txt"
    cache.write_text(f"CMAKE_HOME_DIRECTORY:INTERNAL={src}\n")
    _forget_other_source_tree(out, src)
    assert cache.is_file() and (out / "CMakeFiles").is_dir()
    _forget_other_source_tree(out, other)
    assert not cache.exists() and not (out / "CMakeFiles").exists()
