"""Training and evaluation: ``m4r train`` / ``m4r evaluate`` (see docs/training.md).

Names are imported lazily (like :mod:`m4r_export.verify`): the CLI modules of this package are
imported by ``m4r --help``, which must not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "TrainConfig": "config",
    "config_from_dict": "config",
    "load_config": "config",
    "EvalReport": "evaluation",
    "check_vocabulary": "evaluation",
    "evaluate_checkpoint": "evaluation",
    "evaluate": "metrics",
    "model_scorer": "metrics",
    "popularity_scorer": "metrics",
    "target_ranks": "metrics",
    "TrainResult": "trainer",
    "Trainer": "trainer",
    "set_cpu_flush_denormal": "trainer",
    "train": "trainer",
}

__all__ = [
    "EvalReport",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "check_vocabulary",
    "config_from_dict",
    "evaluate",
    "evaluate_checkpoint",
    "load_config",
    "model_scorer",
    "popularity_scorer",
    "set_cpu_flush_denormal",
    "target_ranks",
    "train",
]

if TYPE_CHECKING:
    from .config import TrainConfig, config_from_dict, load_config
    from .evaluation import EvalReport, check_vocabulary, evaluate_checkpoint
    from .metrics import evaluate, model_scorer, popularity_scorer, target_ranks
    from .trainer import Trainer, TrainResult, set_cpu_flush_denormal, train


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
