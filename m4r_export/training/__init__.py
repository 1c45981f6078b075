"""Training and evaluation: ``m4r train`` / ``m4r evaluate`` (see docs/training.md)."""

from .config import TrainConfig, config_from_dict, load_config
from .evaluation import EvalReport, check_vocabulary, evaluate_checkpoint
from .metrics import evaluate, model_scorer, popularity_scorer, target_ranks
from .trainer import Trainer, TrainResult, set_cpu_flush_denormal, train

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
