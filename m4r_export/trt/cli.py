"""``m4r build-plugin``, ``m4r build-native`` and ``m4r build-engine``."""

from __future__ import annotations

from pathlib import Path

import click

from .manifest import ShapeProfile


@click.command("build-plugin")
@click.option(
    "--out",
    "out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Build directory (default: $M4R_CACHE_DIR/native/<key>, where M4R_CACHE_DIR defaults to "
    "$XDG_CACHE_HOME/m4r or ~/.cache/m4r; m4r finds the plugin there).",
)
@click.option(
    "--tensorrt-root",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    envvar="TensorRT_ROOT",
    help="TensorRT install/SDK root holding include/ and lib/ (env: TensorRT_ROOT).",
)
@click.option(
    "--cuda-archs",
    default=None,
    help='CUDA architectures, e.g. "89" or "80;86" (default: 75;80;86;87;89;90; one arch builds ~6x faster).',
)
@click.option("--jobs", "-j", type=int, default=None, help="Parallel compile jobs (default: CPU count).")
@click.option("--verbose", "-v", is_flag=True, help="Echo CMake and compiler output.")
def build_plugin(
    out: Path | None, tensorrt_root: Path | None, cuda_archs: str | None, jobs: int | None, verbose: bool
) -> None:
    """Build the SelectiveScan TensorRT plugin (needs cmake, nvcc and the TensorRT headers)."""
    from .native import PLUGIN_ENV, PLUGIN_LIBRARY, PLUGIN_STATIC_LIBRARY, build_native, default_build_dir

    where = (
        out if out is not None else f"{default_build_dir()} (set M4R_CACHE_DIR or pass --out to change it)"
    )
    click.echo(f"building the m4r native libraries with CMake into {where} ...")
    build = build_native(
        out,
        tensorrt_root=tensorrt_root,
        cuda_archs=cuda_archs,
        require_plugin=True,
        jobs=jobs,
        echo=click.echo if verbose else None,
    )
    for name, path in sorted(build.libraries.items()):
        click.echo(f"  {name}: {path}")
    plugin = build.libraries[PLUGIN_LIBRARY]
    found = "m4r finds it there" if out is None else f"set {PLUGIN_ENV}={plugin} so that m4r finds it"
    click.echo(
        f"TensorRT: load {plugin} with IPluginRegistry::loadLibrary or trtexec --dynamicPlugins ({found}); "
        f"use {PLUGIN_STATIC_LIBRARY} for LD_PRELOAD (Triton) or trtexec --staticPlugins."
    )


@click.command("build-native")
@click.option(
    "--out",
    "out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Build directory (default: ~/.cache/m4r/native-cpu/<sources hash>, where m4r finds the library).",
)
@click.option("--jobs", "-j", type=int, default=None, help="Parallel compile jobs (default: CPU count).")
@click.option("--verbose", "-v", is_flag=True, help="Echo CMake and compiler output.")
def build_native_cmd(out: Path | None, jobs: int | None, verbose: bool) -> None:
    """Build the optimised CPU scan kernel (the `native` scan backend; needs cmake and a C++ compiler)."""
    from ..model.scan_native import SCAN_LIB_ENV
    from .native import SCAN_NATIVE_LIBRARY, build_native, default_build_dir

    click.echo("building the m4r CPU scan kernel with CMake ...")
    build = build_native(
        out or default_build_dir(cpu_only=True),
        with_cuda=False,
        targets=["m4r_scan_native"],
        jobs=jobs,
        echo=click.echo if verbose else None,
    )
    lib = build.libraries[SCAN_NATIVE_LIBRARY]
    found = "m4r finds it there" if out is None else f"set {SCAN_LIB_ENV}={lib} so that m4r finds it"
    click.echo(f"  {SCAN_NATIVE_LIBRARY}: {lib} ({found}; scan backend `auto` now uses it on CPU)")


@click.command("build-engine")
@click.option(
    "--onnx", "onnx_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Output directory (default: next to the ONNX file).",
)
@click.option("--engine-name", default="model.plan", show_default=True)
@click.option(
    "--plugin",
    "plugin",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="libm4r_trt_plugin.so (default: $M4R_TRT_PLUGIN or the `m4r build-plugin` output).",
)
@click.option(
    "--no-build-plugin",
    is_flag=True,
    help="Do not build the plugin when it is not found (default: build it).",
)
@click.option("--min-batch", type=int, default=1, show_default=True)
@click.option("--opt-batch", type=int, default=64, show_default=True)
@click.option("--max-batch", type=int, default=1024, show_default=True)
@click.option("--min-seq", type=int, default=1, show_default=True)
@click.option("--opt-seq", type=int, default=50, show_default=True)
@click.option("--max-seq", type=int, default=200, show_default=True)
@click.option(
    "--min-exclude", type=int, default=1, show_default=True, help="exclude_items width E (ranking heads)."
)
@click.option("--opt-exclude", type=int, default=1, show_default=True)
@click.option("--max-exclude", type=int, default=1024, show_default=True)
@click.option(
    "--timing-cache",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Timing cache file, read if present and updated after the build.",
)
@click.option("--opt-level", type=int, default=3, show_default=True, help="Builder optimization level 0..5.")
def build_engine(
    onnx_path: Path,
    out_dir: Path | None,
    engine_name: str,
    plugin: Path | None,
    no_build_plugin: bool,
    min_batch: int,
    opt_batch: int,
    max_batch: int,
    min_seq: int,
    opt_seq: int,
    max_seq: int,
    min_exclude: int,
    opt_exclude: int,
    max_exclude: int,
    timing_cache: Path | None,
    opt_level: int,
) -> None:
    """Build a strongly typed TensorRT engine (+ manifest) from an exported ONNX file."""
    from .engine import build_engine as _build

    profile = ShapeProfile(
        min_batch, opt_batch, max_batch, min_seq, opt_seq, max_seq, min_exclude, opt_exclude, max_exclude
    )
    profile.validate()
    engine_path = (out_dir or onnx_path.parent) / engine_name
    manifest = _build(
        onnx_path,
        engine_path,
        profile=profile,
        plugin_library=plugin,
        build_plugin=not no_build_plugin,
        timing_cache=timing_cache,
        optimization_level=opt_level,
    )
    click.echo(
        f"engine: {engine_path} (TensorRT {manifest['tensorrt_version']}, {manifest['gpu']['name']}, "
        f"sm {manifest['gpu']['compute_capability']})"
    )
    for note in manifest["notes"]:
        click.echo(f"  note: {note}")
