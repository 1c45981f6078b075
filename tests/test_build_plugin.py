"""`m4r build-plugin`: stops at CMake's configure step when the plugin cannot be built, and says where
it builds. A stand-in `cmake` on PATH writes the CMakeCache.txt that a real configure would."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from m4r_export.cli import main
from m4r_export.errors import M4RError
from m4r_export.trt import native


def _fake_cmake(tmp_path: Path, cache: str) -> Path:
    """A `cmake` that logs its arguments; its configure writes ``cache`` into the build directory."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "cmake-calls.txt"
    script = bin_dir / "cmake"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> {calls}\n'
        'if [ "$1" = "-S" ]; then\n'
        f"  cat > \"$4/CMakeCache.txt\" <<'EOF'\n{cache}EOF\n"
        "fi\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return calls


NO_TENSORRT = (
    "# This is the CMakeCache file.\n"
    "CMAKE_CUDA_COMPILER:FILEPATH=/usr/local/cuda/bin/nvcc\n"
    "TensorRT_INCLUDE_DIR:PATH=TensorRT_INCLUDE_DIR-NOTFOUND\n"
)
NO_NVCC = (
    "CMAKE_CUDA_COMPILER:FILEPATH=CMAKE_CUDA_COMPILER-NOTFOUND\nTensorRT_INCLUDE_DIR:PATH=/opt/trt/include\n"
)
COMPLETE = "CMAKE_CUDA_COMPILER:FILEPATH=/usr/bin/nvcc\nTensorRT_INCLUDE_DIR:PATH=/opt/trt/include\n"


@pytest.mark.parametrize(
    ("cache", "needle"),
    [(NO_TENSORRT, "TensorRT headers (NvInferRuntime.h) were not found"), (NO_NVCC, "nvcc was not found")],
    ids=["no-tensorrt", "no-nvcc"],
)
def test_missing_pieces_fail_at_configure_before_compiling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache: str, needle: str
) -> None:
    calls = _fake_cmake(tmp_path, cache)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(M4RError, match="nothing was compiled") as exc:
        native.build_native(tmp_path / "build", require_plugin=True)
    assert needle in str(exc.value)
    invocations = calls.read_text().splitlines()
    assert len(invocations) == 1 and invocations[0].startswith("-S")  # configure only, no --build


def test_complete_toolchain_goes_on_to_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake_cmake(tmp_path, COMPLETE)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(M4RError, match="was not built"):  # the stand-in builds nothing
        native.build_native(tmp_path / "build", require_plugin=True)
    assert [c.split()[0] for c in calls.read_text().splitlines()] == ["-S", "--build"]


def test_cli_says_where_it_builds_and_the_cache_dir_is_configurable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_cmake(tmp_path, NO_TENSORRT)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("M4R_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("TensorRT_ROOT", raising=False)
    res = CliRunner().invoke(main, ["build-plugin"])
    assert res.exit_code == 1
    first = res.output.splitlines()[0]
    assert f"into {tmp_path / 'cache' / 'native'}" in first and "M4R_CACHE_DIR" in first
    assert "TensorRT headers" in res.output and "nothing was compiled" in res.output
    assert native.default_build_dir().is_relative_to(tmp_path / "cache")
