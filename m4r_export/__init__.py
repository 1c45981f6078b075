"""m4r-export: ship Mamba4Rec sequential recommenders to ONNX Runtime, TensorRT and Triton.

The public Python API lives at the package root (see docs/python-api.md)::

    from m4r_export import Mamba4Rec, load_checkpoint, ExportOptions, export_artifacts, run_verify

Names are resolved lazily (module ``__getattr__``): importing the package costs nothing, and
``m4r --help`` never imports torch. A name's first use imports only the submodule that defines it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> submodule (relative to this package) that defines it
_EXPORTS: dict[str, str] = {
    # model and checkpoints
    "Mamba4Rec": ".model",
    "Mamba4RecConfig": ".model",
    "Checkpoint": ".checkpoint",
    "load_checkpoint": ".checkpoint",
    "read_checkpoint": ".checkpoint",
    "save_checkpoint": ".checkpoint",
    # what a deployed model computes, and its inputs
    "ServingModel": ".serving",
    "exclude_inputs": ".onnx.inputs",
    "histories_to_inputs": ".onnx.inputs",
    "truncate_inputs": ".onnx.inputs",
    # data and training
    "load_dataset": ".data",
    "synthetic_interactions": ".data",
    "TrainConfig": ".training",
    "load_config": ".training",
    "train": ".training",
    "evaluate_checkpoint": ".training",
    # export
    "ExportOptions": ".onnx.export",
    "ExportResult": ".onnx.export",
    "export_artifacts": ".onnx.export",
    # verify and bench
    "Thresholds": ".verify",
    "VerifyReport": ".verify",
    "run_verify": ".verify",
    "BenchResult": ".verify",
    "run_bench": ".verify",
    "make_runner": ".verify",
    "load_artifact": ".verify.artifact",
    # errors
    "M4RError": ".errors",
    "UsageError": ".errors",
}

__all__ = [
    "BenchResult",
    "Checkpoint",
    "ExportOptions",
    "ExportResult",
    "M4RError",
    "Mamba4Rec",
    "Mamba4RecConfig",
    "ServingModel",
    "Thresholds",
    "TrainConfig",
    "UsageError",
    "VerifyReport",
    "evaluate_checkpoint",
    "exclude_inputs",
    "export_artifacts",
    "histories_to_inputs",
    "load_artifact",
    "load_checkpoint",
    "load_config",
    "load_dataset",
    "make_runner",
    "read_checkpoint",
    "run_bench",
    "run_verify",
    "save_checkpoint",
    "synthetic_interactions",
    "train",
    "truncate_inputs",
]

if TYPE_CHECKING:
    from .checkpoint import Checkpoint, load_checkpoint, read_checkpoint, save_checkpoint
    from .data import load_dataset, synthetic_interactions
    from .errors import M4RError, UsageError
    from .model import Mamba4Rec, Mamba4RecConfig
    from .onnx.export import ExportOptions, ExportResult, export_artifacts
    from .onnx.inputs import exclude_inputs, histories_to_inputs, truncate_inputs
    from .serving import ServingModel
    from .training import TrainConfig, evaluate_checkpoint, load_config, train
    from .verify import BenchResult, Thresholds, VerifyReport, make_runner, run_bench, run_verify
    from .verify.artifact import load_artifact


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
