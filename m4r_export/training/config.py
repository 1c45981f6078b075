"""Training configuration: YAML recipes with the reference ``config.yaml``'s key names.

A recipe may use the reference Mamba4Rec/RecBole keys (``MAX_ITEM_LIST_LENGTH``,
``train_batch_size``, ``learning_rate``, ``stopping_step``, ``user_inter_num_interval``, ...) or
m4r's own names (``max_seq_len``, ``min_user_inter``, ...). Keys that only steer RecBole's
machinery (``gpu_id``, ``log_wandb``, ``load_col``, ...) are accepted and
ignored when their value is the one m4r implements anyway; any other key is refused, naming it, so
a typo never silently falls back to a default.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import UsageError
from .schedule import LR_SCHEDULES

METRIC_NAMES = ("hit", "ndcg", "mrr")
OBJECTIVES = ("every-position", "prefix")
LOSS_TYPES = ("AUTO", "CE", "SAMPLED", "BPR")
#: loss_type AUTO: full CE up to this many items (embedding rows), sampled softmax above; see
#: docs/training.md for the step-time measurements behind it
SAMPLED_SOFTMAX_ABOVE = 100_000


@dataclass
class TrainConfig:
    # model (reference names)
    hidden_size: int = 64
    num_layers: int = 1
    dropout_prob: float = 0.2
    d_state: int = 32
    d_conv: int = 4
    expand: int = 2
    # data protocol
    max_seq_len: int = 50
    min_user_inter: int = 5
    min_item_inter: int = 5
    #: the interaction log's column names (RecBole's USER_ID_FIELD, ITEM_ID_FIELD, TIME_FIELD)
    user_id_field: str = "user_id"
    item_id_field: str = "item_id"
    time_field: str = "timestamp"
    # optimisation
    #: "every-position" (one forward per window trains all its targets) or "prefix" (RecBole's
    #: one right-padded sample per target); see docs/training.md
    objective: str = "every-position"
    #: every-position windows start every window_stride inputs (0: max_seq_len, consecutive windows)
    window_stride: int = 0
    #: CE (all items), SAMPLED (sampled softmax with logQ correction), BPR, or AUTO: CE up to
    #: SAMPLED_SOFTMAX_ABOVE items, SAMPLED above (see losses.py)
    loss_type: str = "AUTO"
    num_negatives: int = 1000
    negative_distribution: str = "uniform"
    #: auto (on with loss SAMPLED above SAMPLED_SOFTMAX_ABOVE items), true, false: row-indexed
    #: item-table gradient + lazy Adam on the touched rows only (training/sparse.py; docs/training.md)
    sparse_embedding: str = "auto"
    epochs: int = 300
    train_batch_size: int = 2048
    learning_rate: float = 0.001
    #: "constant", "cosine" or "linear" decay of learning_rate over the run (see schedule.py)
    lr_schedule: str = "constant"
    weight_decay: float = 0.0
    stopping_step: int = 10
    eval_step: int = 1
    valid_metric: str = "NDCG@10"
    topk: list[int] = field(default_factory=lambda: [10])
    eval_batch_size: int = 4096
    seed: int = 2020
    # m4r runtime
    scan_backend: str = "auto"
    device: str = "cpu"
    max_minutes: float | None = None
    #: where the reference names differ: reference key -> our field
    ALIASES = {  # a class constant (no annotation, so not a dataclass field)
        "MAX_ITEM_LIST_LENGTH": "max_seq_len",
        "batch_size": "train_batch_size",
        "lr": "learning_rate",
        "USER_ID_FIELD": "user_id_field",
        "ITEM_ID_FIELD": "item_id_field",
        "TIME_FIELD": "time_field",
    }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def resolved_loss_type(self, n_items: int) -> str:
        """The loss actually trained: ``AUTO`` becomes CE or SAMPLED by catalogue size."""
        if self.loss_type != "AUTO":
            return self.loss_type
        return "CE" if n_items <= SAMPLED_SOFTMAX_ABOVE else "SAMPLED"

    def effective_stride(self) -> int:
        return self.window_stride or self.max_seq_len

    def valid_metric_key(self) -> tuple[str, int]:
        return parse_metric(self.valid_metric)

    def validate(self, source: str = "config") -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise UsageError(f"{source}: {msg}")

        for name in ("dropout_prob", "learning_rate", "weight_decay", "max_minutes"):
            value = getattr(self, name)
            need(value is None or math.isfinite(value), f"{name} must be a finite number, got {value}")
        for name in ("hidden_size", "num_layers", "d_state", "d_conv", "expand", "max_seq_len"):
            need(int(getattr(self, name)) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        need(0.0 <= self.dropout_prob < 1.0, f"dropout_prob must be in [0, 1), got {self.dropout_prob}")
        need(self.epochs >= 0, f"epochs must be >= 0, got {self.epochs}")
        need(self.train_batch_size >= 1, f"train_batch_size must be >= 1, got {self.train_batch_size}")
        need(self.eval_batch_size >= 1, f"eval_batch_size must be >= 1, got {self.eval_batch_size}")
        need(self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        need(self.stopping_step >= 0, f"stopping_step must be >= 0, got {self.stopping_step}")
        need(self.eval_step >= 1, f"eval_step must be >= 1, got {self.eval_step}")
        need(
            self.loss_type in LOSS_TYPES,
            f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}",
        )
        need(
            self.objective in OBJECTIVES,
            f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}",
        )
        need(
            0 <= self.window_stride <= self.max_seq_len,
            f"window_stride must be in [0, max_seq_len={self.max_seq_len}] (0 = max_seq_len), "
            f"got {self.window_stride}",
        )
        need(
            self.lr_schedule in LR_SCHEDULES,
            f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}",
        )
        need(self.num_negatives >= 1, f"num_negatives must be >= 1, got {self.num_negatives}")
        need(
            self.negative_distribution in ("uniform", "popularity"),
            f"negative_distribution must be 'uniform' or 'popularity', got {self.negative_distribution!r}",
        )
        need(
            self.sparse_embedding in ("auto", "true", "false"),
            f"sparse_embedding must be auto, true or false, got {self.sparse_embedding!r}",
        )
        need(self.device in ("cpu", "cuda"), f"device must be 'cpu' or 'cuda', got {self.device!r}")
        need(
            self.max_minutes is None or self.max_minutes > 0,
            f"max_minutes must be > 0, got {self.max_minutes}",
        )
        need(all(int(k) >= 1 for k in self.topk), f"topk values must be >= 1, got {self.topk}")
        parse_metric(self.valid_metric, source)


def parse_metric(name: str, source: str = "config") -> tuple[str, int]:
    """``'NDCG@10'`` -> ``('ndcg', 10)`` (RecBole names, case-insensitive)."""
    m = re.fullmatch(r"\s*([A-Za-z]+)\s*@\s*(\d+)\s*", str(name))
    if not m or m.group(1).lower() not in METRIC_NAMES or int(m.group(2)) < 1:
        raise UsageError(
            f"{source}: metric {name!r} is not supported; use one of Hit@K, NDCG@K, MRR@K (e.g. NDCG@10)"
        )
    return m.group(1).lower(), int(m.group(2))


def _parse_interval(value: Any, key: str, source: str) -> int:
    """RecBole's ``"[5,inf)"`` -> 5 (only lower bounds are supported)."""
    if value is None:
        return 0
    m = re.fullmatch(r"\s*\[\s*(\d+)\s*,\s*inf\s*\)\s*", str(value))
    if not m:
        raise UsageError(
            f"{source}: {key}: {value!r} is not supported; m4r implements lower bounds only, written as "
            'RecBole does: "[5,inf)"'
        )
    return int(m.group(1))


# Reference keys m4r accepts and ignores, with the value(s) m4r's behaviour corresponds to
# (None = any value is fine: it only affects RecBole's logging or file discovery).
_IGNORED: dict[str, Any] = {
    "gpu_id": None,
    "log_wandb": None,
    "dataset": None,
    "data_path": None,
    "checkpoint_dir": None,
    "show_progress": None,
    "state": None,
    "reproducibility": None,
    "load_col": None,
    "learner": ("adam",),
    "train_neg_sample_args": None,  # checked against loss_type below
    "metrics": None,  # checked below
    "eval_args": None,
    "model": ("Mamba4Rec",),
    "repeatable": (True,),
}


def config_from_dict(raw: dict[str, Any], source: str = "config") -> TrainConfig:
    """Build a :class:`TrainConfig` from a recipe dict (reference or m4r key names)."""
    if not isinstance(raw, dict):
        raise UsageError(
            f"{source}: a config must be a YAML mapping of keys to values, got {type(raw).__name__}"
        )
    names = {f.name for f in fields(TrainConfig)}
    values: dict[str, Any] = {}
    unknown: list[str] = []
    for key, value in raw.items():
        key = str(key)
        if key in ("user_inter_num_interval", "item_inter_num_interval"):
            target = "min_user_inter" if key.startswith("user") else "min_item_inter"
            values[target] = _parse_interval(value, key, source)
        elif key in TrainConfig.ALIASES:
            values[TrainConfig.ALIASES[key]] = value
        elif key in names:
            values[key] = value
        elif key in _IGNORED:
            allowed = _IGNORED[key]
            if allowed is not None and value not in allowed and str(value).lower() not in map(str, allowed):
                raise UsageError(
                    f"{source}: {key}: {value!r} is not supported by m4r (it implements {allowed[0]!r})"
                )
        else:
            unknown.append(key)
    if unknown:
        raise UsageError(
            f"{source}: unknown config key(s) {', '.join(repr(k) for k in unknown)}; known keys: "
            f"{', '.join(sorted(names | set(TrainConfig.ALIASES)))} (and the RecBole keys "
            "user_inter_num_interval, item_inter_num_interval, "
            f"{', '.join(sorted(_IGNORED))}, which m4r accepts)"
        )
    if "metrics" in raw and raw["metrics"] is not None:
        bad = [m for m in raw["metrics"] if str(m).lower() not in METRIC_NAMES]
        if bad:
            raise UsageError(f"{source}: metrics {bad} are not supported; m4r computes Hit, NDCG and MRR")
    if isinstance(values.get("topk"), int):
        values["topk"] = [values["topk"]]
    try:
        cfg = TrainConfig(**values)
        cfg = _coerce(cfg)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{source}: bad value ({exc})") from None
    if cfg.loss_type != "BPR" and raw.get("train_neg_sample_args") not in (None, {}):
        raise UsageError(
            f"{source}: train_neg_sample_args must be empty (~) with loss_type {cfg.loss_type} "
            "(only BPR samples one negative per target)"
        )
    cfg.validate(source)
    return cfg


def _coerce(cfg: TrainConfig) -> TrainConfig:
    """YAML gives strings for things like ``1e-3``; convert every field to its declared type."""
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        if v is None:
            continue
        if f.type in ("int",):
            if isinstance(v, bool) or float(v) != int(float(v)):
                raise ValueError(f"{f.name} must be an integer, got {v!r}")
            setattr(cfg, f.name, int(float(v)))
        elif f.type in ("float", "float | None"):
            setattr(cfg, f.name, float(v))
        elif f.type == "str":
            setattr(cfg, f.name, str(v))
        elif f.type == "list[int]":
            setattr(cfg, f.name, [int(x) for x in v])
    cfg.loss_type = cfg.loss_type.upper()
    cfg.objective = cfg.objective.lower()
    cfg.negative_distribution = cfg.negative_distribution.lower()
    cfg.sparse_embedding = cfg.sparse_embedding.lower()  # YAML's true/false arrive as "True"/"False"
    return cfg


def load_config(path: str | Path | None, **overrides: Any) -> TrainConfig:
    """Read a YAML recipe (or the defaults if ``path`` is None) and apply non-None ``overrides``."""
    import yaml

    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise UsageError(f"config {p} does not exist; pass a YAML recipe such as recipes/ml-100k.yaml")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise UsageError(f"config {p} is not valid YAML: {exc}") from None
        raw = loaded if loaded is not None else {}
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return config_from_dict({**raw, **given}, source)
    except UsageError:
        if not given:
            raise
    # Whose value is wrong? The recipe's when it fails on its own (this raises) ...
    config_from_dict(raw, source)
    # ... else an override's: name the option(s), not the recipe file
    named = ", ".join(f"{k}={v!r}" for k, v in given.items())
    return config_from_dict({**raw, **given}, f"option(s) {named}")
