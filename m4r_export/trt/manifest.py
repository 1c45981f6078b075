"""The JSON manifest written next to every engine, and the checks made before an engine is used.

A serialized TensorRT engine only runs with the TensorRT version that built it and on GPUs of the same
compute capability; deserialising it elsewhere fails with a terse message deep inside TensorRT. The
manifest records what the engine needs so that the runner can say what is wrong and how to fix it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import M4RError, UsageError

MANIFEST_FORMAT = "m4r-trt-engine/1"
INPUT_NAMES = ("item_seq", "item_seq_len")
#: the ranking heads' optional third input (m4r_export.serving.EXCLUDE_INPUT; not imported: no torch here)
EXCLUDE_INPUT = "exclude_items"


def manifest_path_for(engine_path: Path) -> Path:
    """model.plan -> model.plan.json"""
    return engine_path.with_name(engine_path.name + ".json")


@dataclass(frozen=True)
class ShapeProfile:
    """Optimization profile over the model inputs: item_seq [batch, seq], item_seq_len [batch] and,
    for ranking heads that take it, exclude_items [batch, exclude] (E >= 1 in an engine: send zeros
    [batch, 1] to exclude nothing)."""

    min_batch: int = 1
    opt_batch: int = 64
    max_batch: int = 1024
    min_seq: int = 1
    opt_seq: int = 50
    max_seq: int = 200
    min_exclude: int = 1
    opt_exclude: int = 1
    max_exclude: int = 1024

    def validate(self) -> None:
        for what, lo, opt, hi in (
            ("batch", self.min_batch, self.opt_batch, self.max_batch),
            ("seq", self.min_seq, self.opt_seq, self.max_seq),
            ("exclude", self.min_exclude, self.opt_exclude, self.max_exclude),
        ):
            if not 1 <= lo <= opt <= hi:
                raise UsageError(
                    f"invalid {what} profile min={lo} opt={opt} max={hi}: need 1 <= min <= opt <= max "
                    f"(--min-{what}/--opt-{what}/--max-{what})"
                )

    def input_shapes(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """name -> (min, opt, max) shapes for IOptimizationProfile.set_shape."""
        return {
            "item_seq": (
                (self.min_batch, self.min_seq),
                (self.opt_batch, self.opt_seq),
                (self.max_batch, self.max_seq),
            ),
            "item_seq_len": ((self.min_batch,), (self.opt_batch,), (self.max_batch,)),
            EXCLUDE_INPUT: (
                (self.min_batch, self.min_exclude),
                (self.opt_batch, self.opt_exclude),
                (self.max_batch, self.max_exclude),
            ),
        }

    def to_json(self) -> dict[str, list[int]]:
        return {
            "batch": [self.min_batch, self.opt_batch, self.max_batch],
            "seq": [self.min_seq, self.opt_seq, self.max_seq],
            "exclude": [self.min_exclude, self.opt_exclude, self.max_exclude],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ShapeProfile:
        b, s = data["batch"], data["seq"]
        e = data.get("exclude") or [1, 1, 1024]  # engines built before exclude_items existed
        return cls(int(b[0]), int(b[1]), int(b[2]), int(s[0]), int(s[1]), int(s[2]), *map(int, e))


def read_manifest(engine_path: Path) -> dict[str, Any]:
    path = manifest_path_for(engine_path)
    if not path.is_file():
        raise UsageError(
            f"engine manifest {path} is missing; rebuild the engine with `m4r build-engine` (the manifest "
            "records the TensorRT version, GPU and input profile the engine needs)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"engine manifest {path} is unreadable ({exc}); rebuild the engine") from exc
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise UsageError(
            f"{path} is not an m4r engine manifest (format {MANIFEST_FORMAT!r}); rebuild the engine"
        )
    return data


def check_engine_compatible(
    manifest: dict[str, Any], engine_path: Path, trt_version: str, gpu_name: str, compute_capability: str
) -> list[str]:
    """Raise M4RError when the engine cannot run here; return warnings for tolerable differences."""
    built_trt = str(manifest.get("tensorrt_version"))
    gpu = manifest.get("gpu") or {}
    built_cc, built_name = str(gpu.get("compute_capability")), str(gpu.get("name"))
    fix = f"rebuild it on this machine: m4r build-engine --onnx <model.onnx> --out {engine_path.parent}"
    if built_trt != trt_version:
        raise M4RError(
            f"engine {engine_path} was built with TensorRT {built_trt}, but this is TensorRT {trt_version}; "
            f"engines only load in the TensorRT version that built them: {fix}"
        )
    if built_cc != compute_capability:
        raise M4RError(
            f"engine {engine_path} was built for compute capability {built_cc} ({built_name}), "
            f"but this GPU is {gpu_name} (compute capability {compute_capability}): {fix}"
        )
    warnings = []
    if built_name != gpu_name:
        warnings.append(
            f"engine {engine_path} was tuned on {built_name}; it runs on {gpu_name} (same compute "
            "capability) but may be slower than an engine built here"
        )
    return warnings


def check_inputs_in_profile(profile: ShapeProfile, batch: int, seq: int, exclude: int | None = None) -> None:
    """UsageError naming the offending dimension and the fix when (batch, seq, E) is outside the profile."""
    if not profile.min_batch <= batch <= profile.max_batch:
        raise UsageError(
            f"batch size {batch} is outside the engine's profile [{profile.min_batch}, {profile.max_batch}]; "
            f"split the batch or rebuild the engine with --min-batch/--max-batch covering {batch}"
        )
    if not profile.min_seq <= seq <= profile.max_seq:
        raise UsageError(
            f"sequence length {seq} (item_seq.shape[1]) is outside the engine's profile "
            f"[{profile.min_seq}, {profile.max_seq}]; pad/truncate item_seq to at most {profile.max_seq} "
            f"columns (keep the most recent items) or rebuild the engine with --max-seq {seq}"
        )
    if exclude is not None and not profile.min_exclude <= exclude <= profile.max_exclude:
        raise UsageError(
            f"exclude_items width {exclude} is outside the engine's profile [{profile.min_exclude}, "
            f"{profile.max_exclude}]; send zeros [batch, 1] (not [batch, 0]) to exclude nothing, and "
            f"rebuild the engine with --max-exclude {max(exclude, 1)} for longer lists"
        )
