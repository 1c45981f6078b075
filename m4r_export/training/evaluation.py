"""Evaluate a checkpoint on a dataset (what ``m4r evaluate`` does), with the most-popular baseline."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import Checkpoint, read_checkpoint
from ..data import SequenceDataset, load_dataset
from ..data.tables import Columns
from ..errors import UsageError
from ..model import Mamba4Rec
from ..model.scan import resolve_backend
from ..serving import check_k
from .metrics import evaluate, model_scorer, popularity_scorer
from .trainer import set_cpu_flush_denormal


@dataclass
class EvalReport:
    split: str
    rows: int
    ks: list[int]
    model: dict[str, float]
    baseline: dict[str, float] | None
    seconds: float
    checkpoint: str
    data: str
    exclude_history: bool = False

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.model)
        out.update(
            {
                "split": self.split,
                "rows": self.rows,
                "checkpoint": self.checkpoint,
                "data": self.data,
                "exclude_history": self.exclude_history,
                "seconds": round(self.seconds, 3),
            }
        )
        if self.baseline is not None:
            out["baseline"] = {"name": "pop", **self.baseline}
        return out


def check_vocabulary(ckpt: Checkpoint, ds: SequenceDataset, ckpt_path: str) -> list[str]:
    """The checkpoint's item vocabulary must be the dataset's; returns it (or raises a clear error)."""
    where = ds.source or "the dataset"
    if ckpt.item_tokens is None:  # RecBole checkpoints carry none: only the size can be checked
        if ckpt.config.n_items != ds.n_items:
            raise UsageError(
                f"{ckpt_path} has {ckpt.config.n_items} item rows but {where} maps {ds.n_items} items "
                "(after filtering); pass the dataset and thresholds the model was trained with"
            )
        return list(ds.item_tokens)
    tokens = list(ckpt.item_tokens)
    if tokens != list(ds.item_tokens):
        if len(tokens) != ds.n_items:
            detail = f"the checkpoint has {len(tokens) - 1} items, the dataset {ds.n_items - 1}"
        else:
            i = next(i for i, (a, b) in enumerate(zip(tokens, ds.item_tokens, strict=True)) if a != b)
            detail = (
                f"item index {i} is {tokens[i]!r} in the checkpoint but {ds.item_tokens[i]!r} in the data"
            )
        raise UsageError(
            f"item vocabulary mismatch between {ckpt_path} and {where}: {detail}. The model's item ids "
            "would mean different items; evaluate on the data (and max_seq_len / min_user_inter / "
            "min_item_inter) the checkpoint was trained with"
        )
    return tokens


def evaluate_checkpoint(
    ckpt_path: str | Path,
    data_path: str | Path,
    *,
    ks: Sequence[int] = (10,),
    split: str = "test",
    baseline: bool = True,
    device: str = "cpu",
    batch_size: int = 4096,
    scan_backend: str = "auto",
    max_seq_len: int | None = None,
    min_user_inter: int | None = None,
    min_item_inter: int | None = None,
    exclude_history: bool = False,
    columns: Columns | None = None,
) -> EvalReport:
    """Full-ranking metrics of a checkpoint (own format or RecBole) on ``split`` of ``data_path``.

    The data protocol (max_seq_len, filtering thresholds) defaults to the one stored in the
    checkpoint, so the evaluation sees the samples the model was validated on. ``exclude_history``
    masks each user's full known history (every item before the target), for the model and the
    baseline alike.
    """
    if split not in ("test", "valid"):
        raise UsageError(f"--split must be 'test' or 'valid', got {split!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was requested but CUDA is not available; use --device cpu")
    t0 = time.perf_counter()
    ckpt = read_checkpoint(ckpt_path)
    for k in ks:
        check_k(k, ckpt.config.n_items)
    meta = ckpt.meta
    ds = load_dataset(
        data_path,
        max_seq_len=int(max_seq_len or meta.get("max_seq_len") or 50),
        min_user_inter=int(min_user_inter if min_user_inter is not None else meta.get("min_user_inter", 5)),
        min_item_inter=int(min_item_inter if min_item_inter is not None else meta.get("min_item_inter", 5)),
        columns=columns,
    )
    tokens = check_vocabulary(ckpt, ds, str(ckpt_path))
    ckpt.item_tokens = tokens
    dev = torch.device(device)
    if dev.type == "cpu":
        set_cpu_flush_denormal()
    model: Mamba4Rec = ckpt.build_model().to(dev)
    try:
        model.set_scan_backend(resolve_backend(scan_backend, dev))
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    data_split = getattr(ds, split)
    exclude = ds.known_items(split) if exclude_history else None
    metrics = evaluate(
        model_scorer(model), data_split, ks, batch_size=batch_size, device=dev, exclude=exclude
    )
    base = None
    if baseline:
        base = evaluate(
            popularity_scorer(ds.train, ds.n_items, dev),
            data_split,
            ks,
            batch_size=batch_size,
            device=dev,
            exclude=exclude,
        )
    return EvalReport(
        split=split,
        rows=len(data_split),
        ks=sorted(set(ks)),
        model=metrics,
        baseline=base,
        seconds=time.perf_counter() - t0,
        checkpoint=str(ckpt_path),
        data=str(data_path),
        exclude_history=exclude_history,
    )
