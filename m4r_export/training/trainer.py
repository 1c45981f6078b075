"""The training loop: CE (or BPR) over all items, Adam, early stopping on a validation metric.

Follows the reference configuration (RecBole's ``Trainer`` with the Mamba4Rec ``config.yaml``):

* loss: cross-entropy of ``model.logits`` against every item-embedding row, row 0 (padding)
  included as an ordinary class, exactly as the reference; ``loss_type: BPR`` uses one uniformly
  sampled negative per row instead;
* Adam with ``learning_rate`` (1e-3) and ``weight_decay`` (0);
* after every ``eval_step`` epochs the full-ranking ``valid_metric`` (NDCG@10) is computed; a value
  ``>=`` the best so far is an improvement (RecBole's ``early_stopping``), and training stops after
  ``stopping_step + 1`` evaluations in a row without one;
* the best epoch's model is written (atomically) to ``out`` with its validation and test metrics.

CPU specifics: ``torch.set_flush_denormal(True)`` -- the scan multiplies by ``exp(dt * A)`` decays
that drive states and gradients into the subnormal range, and x86 CPUs process subnormal floats
in slow microcode assists; flushing them to zero changes results by less than 1e-38 and makes the
reference scan 5-10x faster. Each batch is cropped to its longest history (right padding + a causal
model make this exact).

Resuming: after every epoch (and when a time budget ends an epoch early) a *state file* holds the
current weights, the optimizer, the epoch and batch position, the early-stopping counters and every
rank's RNG state. ``resume=True`` continues from it. Shuffling depends only on ``(seed, epoch)`` and
each epoch's dropout RNG is seeded from ``(seed, epoch, rank)``, so a resumed run makes the same
updates as an uninterrupted one.

Stopping early, safely:
  * SIGINT (Ctrl-C) / SIGTERM are treated like the time budget: the current batch finishes, the
    state file is written, the log says how to ``--resume``, and :class:`TrainingInterrupted`
    carries exit code 130 / 143 (128 + the signal number, as shells report).
  * A non-finite loss or weight (a diverging run, e.g. a learning rate of 10) stops training at
    that batch with :class:`TrainingDiverged` (exit code 1) naming the epoch and batch. The bad
    step is never saved: the checkpoint on disk stays the last finite one.
"""

from __future__ import annotations

import hashlib
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checkpoint import save_checkpoint
from ..data import SequenceDataset
from ..errors import M4RError, UsageError
from ..fileio import atomic_write
from ..model import Mamba4Rec
from ..model.scan import resolve_backend
from . import distributed as D
from . import losses
from .config import TrainConfig
from .metrics import evaluate_scorer, means, model_scorer
from .schedule import lr_factor, run_progress
from .sparse import SplitAdam, resolve_sparse_embedding
from .windows import Windows, batch_plan, build_windows

STATE_FORMAT = "m4r-train-state"
STATE_VERSION = 1


@dataclass
class TrainResult:
    best_epoch: int  # 1-based; 0 = the untrained model (no epoch ran)
    best_valid: dict[str, float]
    best_test: dict[str, float]
    epochs_run: int  # epochs (possibly the last one partial) run by this invocation
    last_epoch: int  # 1-based index of the last epoch trained (over all invocations)
    stopped: str  # "early-stopping", "epochs", "time-budget"
    wall_seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)


class _Objective(nn.Module):
    """Loss as a module so DistributedDataParallel can wrap it (DDP hooks ``forward`` only).

    ``prefix``: one user representation per sample (``target`` (B,)); ``every-position``: every
    position of each window (``target`` (B, W), 0 where no loss is taken). Returns the mean loss
    over the batch's targets.
    """

    def __init__(self, model: Mamba4Rec, loss_type: str, every_position: bool, sampled: Any = None) -> None:
        super().__init__()
        self.model = model
        self.loss_type = loss_type
        self.every_position = every_position
        self.sampled = sampled

    def forward(self, item_seq: Tensor, item_seq_len: Tensor, target: Tensor) -> Tensor:
        weight = self.model.item_embedding.weight
        if not self.every_position:
            if self.loss_type == "CE":  # exactly the reference's computation
                return F.cross_entropy(self.model.logits(item_seq, item_seq_len), target)
            hidden = self.model(item_seq, item_seq_len)
        else:
            hidden, target = self.every_position_pairs(item_seq, item_seq_len, target)
        return self.per_target(hidden, weight, target).mean()

    def every_position_pairs(
        self, item_seq: Tensor, item_seq_len: Tensor, target: Tensor
    ) -> tuple[Tensor, Tensor]:
        """(representation, target) of every trained position of a batch of windows: ``(N, H), (N,)``."""
        mask = target > 0
        return self.model.hidden_states(item_seq, item_seq_len)[mask], target[mask]

    def per_target(self, hidden: Tensor, weight: Tensor, target: Tensor) -> Tensor:
        if self.loss_type == "CE":
            return losses.chunked_cross_entropy(hidden, weight, target, losses.ce_chunk(weight.shape[0]))
        if self.loss_type == "SAMPLED":
            return self.sampled(hidden, weight, target)
        return losses.bpr_loss(hidden, weight, target)


def set_cpu_flush_denormal() -> bool:
    """Flush subnormal floats to zero on CPU (see the module docstring); True if supported."""
    return bool(torch.set_flush_denormal(True))


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def vocabulary_digest(item_tokens: list[str]) -> str:
    return hashlib.sha256("\x00".join(item_tokens).encode("utf-8")).hexdigest()


def build_model(cfg: TrainConfig, n_items: int) -> Mamba4Rec:
    return Mamba4Rec(
        n_items,
        hidden_size=cfg.hidden_size,
        num_layers=cfg.num_layers,
        d_state=cfg.d_state,
        d_conv=cfg.d_conv,
        expand=cfg.expand,
        dropout_prob=cfg.dropout_prob,
    )


def _batch_tensors(split: Any, rows: np.ndarray, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    lens = split.item_seq_len[rows]
    width = max(int(lens.max()), 1)
    seq = split.item_seq[rows, :width]  # crop to the longest history (exact: right padding, causal)
    return (
        torch.from_numpy(seq).to(device),
        torch.from_numpy(lens).to(device),
        torch.from_numpy(split.target[rows]).to(device),
    )


def _window_tensors(win: Windows, rows: np.ndarray, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    lens = win.length[rows]
    width = max(int(lens.max()), 1)  # crop to the longest window of the batch
    return (
        torch.from_numpy(win.seq[rows, :width]).to(device),
        torch.from_numpy(lens).to(device),
        torch.from_numpy(win.target[rows, :width]).to(device),
    )


# Model-shape and data-protocol fields that a resumed run must share with the state file.
_FIXED_ON_RESUME = (
    "hidden_size",
    "num_layers",
    "dropout_prob",
    "d_state",
    "d_conv",
    "expand",
    "max_seq_len",
    "min_user_inter",
    "min_item_inter",
    "loss_type",
    "train_batch_size",
    "seed",
    "objective",
    "window_stride",
    "num_negatives",
    "negative_distribution",
)
#: values of keys added since state files were first written (an older state trained with these)
_OLD_STATE_DEFAULTS = {
    "objective": "prefix",
    "window_stride": 0,
    "num_negatives": 1000,
    "negative_distribution": "uniform",
}


class TrainingDiverged(M4RError):
    """The loss or the weights became NaN/Inf; nothing non-finite was saved."""


class TrainingInterrupted(M4RError):
    """SIGINT/SIGTERM: the state file was written; ``--resume`` continues. Exit code 128 + signal."""


class Trainer:
    """One training run; see the module docstring. Use :func:`train` for the common case."""

    def __init__(
        self,
        dataset: SequenceDataset,
        cfg: TrainConfig,
        out: str | Path,
        *,
        data_path: str = "",
        state_path: str | Path | None = None,
        progress: bool = True,
        log: Callable[[str], None] | None = None,
        debug_dump: str | Path | None = None,
    ) -> None:
        self.ds = dataset
        self.cfg = cfg
        self.out = Path(out)
        self.state_path = Path(state_path) if state_path is not None else default_state_path(self.out)
        self.data_path = data_path
        self.progress = progress
        self.debug_dump = Path(debug_dump) if debug_dump is not None else None
        if cfg.device == "cuda" and not torch.cuda.is_available():
            raise UsageError("--device cuda was requested but CUDA is not available; use --device cpu")
        if len(dataset.train) == 0:
            raise UsageError(
                f"{dataset.source or 'the dataset'} has no training samples after filtering; use more data"
            )
        self.info = D.init_distributed(cfg.device)
        self.device = torch.device(f"cuda:{self.info.local_rank}" if cfg.device == "cuda" else "cpu")
        self._log = log if log is not None else print
        if self.device.type == "cpu":
            set_cpu_flush_denormal()
        try:
            self.backend = resolve_backend(cfg.scan_backend, self.device)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.model = build_model(cfg, dataset.n_items).to(self.device)
        self.model.set_scan_backend(self.backend)
        self.model.item_tokens = list(dataset.item_tokens)
        self.loss_type = cfg.resolved_loss_type(dataset.n_items)
        self.every_position = cfg.objective == "every-position"
        self.windows = (
            build_windows(dataset.train, cfg.max_seq_len, cfg.effective_stride())
            if self.every_position
            else None
        )
        sampled = None
        if self.loss_type == "SAMPLED":
            counts = np.bincount(dataset.train.target, minlength=dataset.n_items)
            sampled = losses.SampledSoftmax(
                dataset.n_items, cfg.num_negatives, cfg.negative_distribution, counts
            )
        self.sparse_embedding = self._sparse_choice(sampled)
        self.objective: nn.Module = _Objective(self.model, self.loss_type, self.every_position, sampled)
        if self.info.enabled:  # after _sparse_choice: DDP reads Embedding.sparse to expect sparse grads
            from torch.nn.parallel import DistributedDataParallel

            self.objective = DistributedDataParallel(
                self.objective, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        lr, decay = cfg.learning_rate, cfg.weight_decay
        self.optimizer: Any = (
            SplitAdam(self.model, self.model.item_embedding.weight, lr, decay)
            if self.sparse_embedding
            else torch.optim.Adam(self.model.parameters(), lr=lr, weight_decay=decay)
        )
        # global batch = train_batch_size, split over the ranks (as RecBole's distributed trainer)
        self.rank_batch = max(1, math.ceil(cfg.train_batch_size / self.info.world_size))
        self.valid_metric = "{}@{}".format(*cfg.valid_metric_key())
        self.ks = sorted(set(cfg.topk) | {cfg.valid_metric_key()[1]})
        # run state (overwritten by resume)
        self.epoch = 0  # 0-based index of the next epoch to run
        self.next_batch = 0
        self.best_score = -math.inf
        self.best_epoch = 0
        self.best_valid: dict[str, float] = {}
        self.best_test: dict[str, float] = {}
        self.cur_step = 0
        self.history: list[dict[str, Any]] = []
        self.elapsed_before = 0.0
        #: progress through the lr_schedule (schedule.py) reached so far; kept across --resume
        self.lr_progress = 0.0
        self._rng_states: list[Tensor] | None = None
        self._shards: dict[int, list[int]] = {}

    def log(self, msg: str) -> None:
        if self.info.is_main:
            self._log(msg)

    def _sparse_choice(self, sampled: Any) -> bool:
        """Resolve ``sparse_embedding`` (training/sparse.py) and switch the item-table reads to it."""
        backend = torch.distributed.get_backend() if self.info.enabled else None
        cfg = self.cfg
        on, why = resolve_sparse_embedding(cfg.sparse_embedding, self.loss_type, self.ds.n_items, backend)
        if self.cfg.sparse_embedding != "false" and self.loss_type == "SAMPLED" and not on:
            self.log(f"note: sparse_embedding {self.cfg.sparse_embedding} is off: {why}")
        if on:
            self.model.item_embedding.sparse = True  # the input lookup's gradient: row-indexed
            sampled.sparse = True  # the positives' and negatives' rows too
        return on

    # ------------------------------------------------------------------ evaluation
    def evaluate_split(self, which: str) -> dict[str, float]:
        """Metrics on ``valid`` or ``test``; rows are split over ranks and the sums all-reduced."""
        split = getattr(self.ds, which)
        if self.info.enabled:
            split = split.subset(np.arange(self.info.rank, len(split), self.info.world_size))
        self.model.eval()
        sums, n = evaluate_scorer(
            model_scorer(self.model), split, self.ks, batch_size=self.cfg.eval_batch_size, device=self.device
        )
        self.model.train()
        sums["__n"] = float(n)
        tot = D.all_reduce_dict(sums, self.info, self.device)
        n_all = int(tot.pop("__n"))
        return means(tot, n_all, self.ks)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        rng = D.gather_objects(torch.get_rng_state(), self.info)
        return {
            "format": STATE_FORMAT,
            "format_version": STATE_VERSION,
            "epoch": self.epoch,
            "next_batch": self.next_batch,
            "world_size": self.info.world_size,
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "sparse_embedding": self.sparse_embedding,
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
            "best_valid": dict(self.best_valid),
            "best_test": dict(self.best_test),
            "cur_step": self.cur_step,
            "history": list(self.history),
            "elapsed": self.elapsed_before + (time.perf_counter() - self._t0),
            "lr_progress": self.lr_progress,
            "rng": rng,
            "config": self.cfg.to_dict(),
            "n_items": self.ds.n_items,
            "vocabulary_sha256": vocabulary_digest(self.ds.item_tokens),
        }

    def save_state(self) -> None:
        state = self.state_dict()  # collective (RNG gather): every rank calls it
        if self.info.is_main:
            with atomic_write(self.state_path, "wb") as fh:
                torch.save(state, fh)

    def load_state(self, path: str | Path | None = None) -> None:
        p = Path(path) if path is not None else self.state_path
        if not p.is_file():
            raise UsageError(
                f"cannot resume: state file {p} does not exist (it is written after each epoch next to "
                "--out; pass --state PATH if it lives elsewhere, or drop --resume)"
            )
        try:
            st = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:  # truncated or foreign file
            raise UsageError(f"cannot resume from {p}: not a readable m4r training state ({exc})") from None
        if not isinstance(st, dict) or st.get("format") != STATE_FORMAT:
            raise UsageError(f"cannot resume from {p}: not an m4r training state file")
        if st["n_items"] != self.ds.n_items or st["vocabulary_sha256"] != vocabulary_digest(
            self.ds.item_tokens
        ):
            raise UsageError(
                f"cannot resume from {p}: it was trained on another item vocabulary ({st['n_items']} items) "
                f"than {self.ds.source or 'this dataset'} ({self.ds.n_items}); pass the same --data"
            )
        old = {**_OLD_STATE_DEFAULTS, **st["config"]}
        changed = [k for k in _FIXED_ON_RESUME if old.get(k) != getattr(self.cfg, k)]
        if changed:
            diffs = ", ".join(f"{k}: {old.get(k)!r} -> {getattr(self.cfg, k)!r}" for k in changed)
            raise UsageError(f"cannot resume from {p}: the config changed ({diffs}); use the run's config")
        if st["config"].get("valid_metric") != self.cfg.valid_metric:
            raise UsageError(
                f"cannot resume from {p}: valid_metric changed ({st['config'].get('valid_metric')!r} -> "
                f"{self.cfg.valid_metric!r}), but the best epoch so far was chosen by the old one; use the "
                "run's valid_metric"
            )
        if bool(st.get("sparse_embedding", False)) != self.sparse_embedding:
            was, now = ("on", "off") if st.get("sparse_embedding") else ("off", "on")
            raise UsageError(
                f"cannot resume from {p}: it was trained with the sparse item-table update {was} and this "
                f"run has it {now} (its optimizer state does not carry over); set sparse_embedding: "
                f"{'true' if was == 'on' else 'false'} to resume it"
            )
        self.model.load_state_dict(st["model"])
        self.optimizer.load_state_dict(st["optimizer"])
        self._apply_optimizer_settings(st["config"])
        self.epoch, self.next_batch = int(st["epoch"]), int(st["next_batch"])
        self.best_score, self.best_epoch = float(st["best_score"]), int(st["best_epoch"])
        self.best_valid, self.best_test = dict(st["best_valid"]), dict(st["best_test"])
        self.cur_step, self.history = int(st["cur_step"]), list(st["history"])
        self.elapsed_before = float(st["elapsed"])
        self.lr_progress = float(st.get("lr_progress", 0.0))
        if self.next_batch and st["world_size"] != self.info.world_size:
            self.log(
                f"note: the state was written by {st['world_size']} process(es), this run has "
                f"{self.info.world_size}; epoch {self.epoch + 1} restarts from its first batch"
            )
            self.next_batch = 0
        self._rng_states = list(st["rng"]) if self.next_batch else None

    def _apply_optimizer_settings(self, saved: dict[str, Any]) -> None:
        """This run's learning_rate / weight_decay win over the state file's (which Adam's
        ``load_state_dict`` restores); Adam's moments are kept. A change is logged."""
        for key, group_key in (("learning_rate", "lr"), ("weight_decay", "weight_decay")):
            value = getattr(self.cfg, key)
            for group in self.optimizer.param_groups:
                group[group_key] = value
            if saved.get(key) != value:
                self.log(f"resume: {key} {saved.get(key)} -> {value} (this run's value applies from now on)")

    def _schedule_lr(self, batch: int, n_batches: int, deadline: float | None, start: float) -> None:
        """Set this step's learning rate from ``lr_schedule`` (schedule.py); same value on every rank."""
        cfg = self.cfg
        if cfg.lr_schedule == "constant":
            return
        if deadline is not None:  # the share of this run's time budget spent
            share = (time.perf_counter() - self._t0) / max(deadline - self._t0, 1e-9)
            progress = D.max_over_ranks(run_progress(start, share), self.info, self.device)
        else:  # the share of epochs x batches done
            progress = (self.epoch * n_batches + batch) / max(1, cfg.epochs * n_batches)
        self.lr_progress = progress
        lr = cfg.learning_rate * lr_factor(cfg.lr_schedule, progress)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    # ------------------------------------------------------------------ checkpoint
    def _meta(self) -> dict[str, Any]:
        return {
            "epoch": self.best_epoch,
            "valid": dict(self.best_valid),
            "test": dict(self.best_test),
            "valid_metric": self.valid_metric,
            "data": self.data_path,
            "dataset_source": self.ds.source,
            **self.ds.protocol(),
            "seed": self.cfg.seed,
            "config": self.cfg.to_dict(),
            "scan_backend": self.backend,
            "world_size": self.info.world_size,
            "train_samples": len(self.ds.train),
            "objective": self.cfg.objective,
            "window_stride": self.cfg.effective_stride() if self.every_position else None,
            "train_windows": len(self.windows) if self.windows is not None else None,
            "loss": self.loss_type,
            "sparse_embedding": self.sparse_embedding,
        }

    def save_best(self) -> None:
        if self.info.is_main:
            save_checkpoint(self.out, self.model, list(self.ds.item_tokens), self._meta())

    # ------------------------------------------------------------------ loop
    def run(self, resume: bool = False) -> TrainResult:
        """Train (see the module docstring); SIGINT/SIGTERM stop after the current batch."""
        self._signal: int | None = None
        previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                previous[int(signum)] = signal.signal(signum, self._on_signal)
        try:
            return self._run(resume)
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if self._signal is not None:  # a second Ctrl-C: stop now, as Python would
            raise KeyboardInterrupt
        self._signal = signum
        self.log(
            f"{signal.Signals(signum).name} received: finishing the current batch, then saving the state"
        )

    def _check_finite(self, loss: Tensor, bi: int) -> None:
        """Stop (on every rank) when the loss or any weight is NaN/Inf, before anything is saved."""
        bad = not bool(torch.isfinite(loss.detach()))
        if not bad:
            bad = not all(bool(torch.isfinite(p).all()) for p in self.model.parameters())
        if not D.any_rank(bad, self.info, self.device):
            return
        what = "loss" if not bool(torch.isfinite(loss.detach())) else "weights after the optimizer step"
        kept = (
            f"{self.out} keeps the last finite checkpoint (epoch {self.best_epoch})"
            if self.out.exists()
            else "no checkpoint was written"
        )
        raise TrainingDiverged(
            f"training diverged: non-finite {what} ({float(loss.detach()):g}) at epoch {self.epoch + 1}, "
            f"batch {bi + 1}; {kept}. Lower learning_rate (now {self.cfg.learning_rate:g}) and train again"
        )

    def _run(self, resume: bool) -> TrainResult:
        self._t0 = time.perf_counter()
        if resume:
            self.load_state()
            self.log(f"resumed from {self.state_path} at epoch {self.epoch + 1}, batch {self.next_batch}")
        cfg = self.cfg
        deadline = self._t0 + 60.0 * cfg.max_minutes if cfg.max_minutes else None
        lr_start = self.lr_progress
        epochs_run = 0
        stopped = "epochs"
        if self.best_epoch == 0 and not self.best_valid and self.epoch == 0 and self.next_batch == 0:
            # the untrained model is the baseline "best" (epoch 0), so a checkpoint always exists
            self.log(
                f"validating the untrained model (the epoch-0 baseline: {len(self.ds.valid):,} valid and "
                f"{len(self.ds.test):,} test users, full ranking) ..."
            )
            self.best_valid = self.evaluate_split("valid")
            self.best_test = self.evaluate_split("test")
            self.best_score = -math.inf
            if cfg.epochs == 0:
                self.save_best()
        self.model.train()
        if self.epoch < cfg.epochs:
            what = (
                f"{self.windows.n_targets:,} targets in {len(self.windows):,} windows"
                if self.windows is not None
                else f"{len(self.ds.train):,} samples"
            )
            self.log(
                f"training: {what} per epoch, epochs {self.epoch + 1} to {cfg.epochs} (early stopping "
                f"after {cfg.stopping_step} evaluations without improvement) ..."
            )
        while self.epoch < cfg.epochs:
            batches = self._epoch_batches()
            if self._rng_states is not None:
                torch.set_rng_state(self._rng_states[self.info.rank])
                self._rng_states = None
            else:
                torch.manual_seed(epoch_seed(cfg.seed, self.epoch, self.info.rank))
            start = self.next_batch
            loss_sum, loss_n, partial = 0.0, 0, False
            t_epoch = time.perf_counter()
            with self._progress(len(batches), start) as bar:
                for bi in range(start, len(batches)):
                    rows = batches[bi]
                    if self.debug_dump is not None:
                        self._shards.setdefault(self.epoch, []).extend(rows.tolist())
                    seq, lens, tgt = self._tensors(rows)
                    n_targets = int((tgt > 0).sum()) if self.every_position else len(rows)
                    self.optimizer.zero_grad(set_to_none=True)
                    self._schedule_lr(bi, len(batches), deadline, lr_start)
                    loss = self.objective(seq, lens, tgt)
                    if not bool(torch.isfinite(loss.detach())):
                        self._check_finite(loss, bi)  # before the step: the weights are still finite
                    loss.backward()
                    self.optimizer.step()
                    self._check_finite(loss, bi)
                    loss_sum += float(loss.detach()) * n_targets
                    loss_n += n_targets
                    bar(
                        n_targets,
                        loss_sum / loss_n,
                        (loss_n * self.info.world_size) / (time.perf_counter() - t_epoch),
                    )
                    if D.any_rank(
                        (deadline is not None and time.perf_counter() >= deadline)
                        or self._signal is not None,
                        self.info,
                        self.device,
                    ):
                        if bi + 1 < len(batches):
                            partial = True
                            self.next_batch = bi + 1
                        break
            epochs_run += 1
            done_batches = (self.next_batch if partial else len(batches)) - start
            train_loss = D.all_reduce_dict({"s": loss_sum, "n": float(loss_n)}, self.info, self.device)
            record: dict[str, Any] = {
                "epoch": self.epoch + 1,
                "train_loss": train_loss["s"] / max(train_loss["n"], 1.0),
                "batches": done_batches,
                "partial": partial,
                "seconds": time.perf_counter() - t_epoch,
                "samples": int(train_loss["n"]),
                "lr": float(self.optimizer.param_groups[0]["lr"]),
            }
            if not partial:
                self.epoch += 1
                self.next_batch = 0
            evaluate_now = partial or (self.epoch % cfg.eval_step == 0) or self.epoch >= cfg.epochs
            evaluate_now = evaluate_now and self._signal is None  # interrupted: save the state promptly
            stop = False
            if evaluate_now:
                valid = self.evaluate_split("valid")
                record["valid"] = valid
                score = valid[self.valid_metric]
                if score >= self.best_score:  # RecBole: ties count as improvements
                    self.best_score, self.cur_step = score, 0
                    self.best_epoch = record["epoch"]
                    self.best_valid = valid
                    self.best_test = self.evaluate_split("test")
                    record["test"] = self.best_test
                    record["best"] = True
                    self.save_best()
                else:
                    self.cur_step += 1
                    stop = self.cur_step > cfg.stopping_step
            self.history.append(record)
            self._log_epoch(record, len(batches))
            self.save_state()
            if self._signal is not None:
                name = signal.Signals(self._signal).name
                raise TrainingInterrupted(
                    f"interrupted by {name} at epoch {record['epoch']}, "
                    f"after batch {record['batches'] + start}: "
                    f"the training state is saved in {self.state_path}; continue with the same command plus "
                    "--resume (the best checkpoint so far is "
                    f"{self.out if self.out.exists() else 'not written yet'})",
                    exit_code=128 + self._signal,
                )
            if stop:
                stopped = "early-stopping"
                self.log(
                    f"early stopping: {self.valid_metric} did not improve for {self.cur_step} evaluations "
                    f"(stopping_step {cfg.stopping_step}); best epoch {self.best_epoch}"
                )
                break
            out_of_time = deadline is not None and time.perf_counter() >= deadline
            # every rank must take the same branch (a rank leaving the loop alone would hang the rest)
            if partial or (D.any_rank(out_of_time, self.info, self.device) and self.epoch < cfg.epochs):
                stopped = "time-budget"
                self.log(f"time budget of {cfg.max_minutes} min reached; best epoch {self.best_epoch}")
                break
        if self.best_epoch == 0 and not self.out.exists():
            self.save_best()
        if self.debug_dump is not None:
            self._dump_debug()
        D.barrier(self.info)
        return TrainResult(
            best_epoch=self.best_epoch,
            best_valid=dict(self.best_valid),
            best_test=dict(self.best_test),
            epochs_run=epochs_run,
            last_epoch=self.history[-1]["epoch"] if self.history else 0,
            stopped=stopped,
            wall_seconds=time.perf_counter() - self._t0,
            history=list(self.history),
        )

    def _epoch_batches(self) -> list[np.ndarray]:
        """This rank's batches of the current epoch: training rows (prefix) or windows."""
        info, cfg = self.info, self.cfg
        if self.windows is not None:  # every-position: length-bucketed global batches of windows
            return batch_plan(
                self.windows.length, cfg.train_batch_size, cfg.seed, self.epoch, info.rank, info.world_size
            )
        n = len(self.ds.train)
        shard = D.shard_indices(n, cfg.seed, self.epoch, info.rank, info.world_size)
        return [shard[a : a + self.rank_batch] for a in range(0, len(shard), self.rank_batch)]

    def _tensors(self, rows: np.ndarray) -> tuple[Tensor, Tensor, Tensor]:
        if self.windows is not None:
            return _window_tensors(self.windows, rows, self.device)
        return _batch_tensors(self.ds.train, rows, self.device)

    def _log_epoch(self, rec: dict[str, Any], n_batches: int) -> None:
        part = f" (partial: {rec['batches']}/{n_batches} batches)" if rec["partial"] else ""
        rate = rec["samples"] / max(rec["seconds"], 1e-9)
        msg = (
            f"epoch {rec['epoch']}{part}: train loss {rec['train_loss']:.4f}, {rec['seconds']:.1f} s "
            f"({rate:,.0f} samples/s)"
        )
        if self.cfg.lr_schedule != "constant":
            msg += f", lr now {rec['lr']:.2g}"
        if "valid" in rec:
            msg += ", valid " + ", ".join(f"{k} {v:.4f}" for k, v in rec["valid"].items())
        if rec.get("best"):
            msg += "  *best*"
        self.log(msg)

    def _progress(self, total: int, start: int) -> Any:
        return _ProgressBar(
            total, start, enabled=self.progress and self.info.is_main, epoch=self.epoch + 1, log=self.log
        )

    def _dump_debug(self) -> None:
        import json

        assert self.debug_dump is not None
        self.debug_dump.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        for k, v in sorted(self.model.state_dict().items()):
            digest.update(k.encode())
            digest.update(v.detach().cpu().contiguous().numpy().tobytes())
        (self.debug_dump / f"rank{self.info.rank}.json").write_text(
            json.dumps(
                {
                    "rank": self.info.rank,
                    "world_size": self.info.world_size,
                    "shards": {str(k): v for k, v in self._shards.items()},
                    "weights_sha256": digest.hexdigest(),
                }
            )
        )


class _ProgressBar:
    """Per-batch progress of one epoch (a no-op when disabled).

    On a terminal: a transient rich bar with loss and samples/s. Elsewhere (a log file, CI, nohup,
    a pipe), where a bar would print nothing until the epoch ends, a plain line through ``log``
    every ``every`` batches (default: a tenth of the epoch) or every ``interval_s`` seconds,
    whichever comes first, so a long epoch is never silent.
    """

    def __init__(
        self,
        total: int,
        start: int,
        *,
        enabled: bool,
        epoch: int,
        log: Callable[[str], None] = print,
        interactive: bool | None = None,
        every: int | None = None,
        interval_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.enabled = enabled
        self.total, self.start, self.epoch = total, start, epoch
        self.log, self.interactive = log, interactive
        self.every = every if every is not None else max(1, math.ceil(total / 10))
        self.interval_s, self.clock = interval_s, clock

    def __enter__(self) -> Callable[[int, float, float], None]:
        if not self.enabled:
            return lambda n, loss, rate: None
        from rich.console import Console

        console = Console(stderr=True)
        if not (console.is_terminal if self.interactive is None else self.interactive):
            return self._lines()
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._p = Progress(
            TextColumn("epoch {task.fields[epoch]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}"),
            TextColumn("{task.fields[rate]:,.0f} samples/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            transient=True,
            console=console,
        )
        self._p.start()
        task = self._p.add_task(
            "train", total=self.total, completed=self.start, epoch=self.epoch, loss=0.0, rate=0.0
        )

        def update(n: int, loss: float, rate: float) -> None:
            self._p.update(task, advance=1, loss=loss, rate=rate)

        return update

    def _lines(self) -> Callable[[int, float, float], None]:
        t0 = last = self.clock()
        done = self.start

        def update(n: int, loss: float, rate: float) -> None:
            nonlocal done, last
            done += 1
            now = self.clock()
            if done < self.total and (done % self.every == 0 or now - last >= self.interval_s):
                last = now
                eta = (now - t0) / (done - self.start) * (self.total - done)
                self.log(
                    f"epoch {self.epoch}: batch {done}/{self.total}, loss {loss:.4f}, {rate:,.0f} samples/s, "
                    f"{now - t0:.0f} s, ETA {_duration(eta)} for this epoch"
                )

        return update

    def __exit__(self, *exc: object) -> None:
        if self.enabled and hasattr(self, "_p"):
            self._p.stop()


def _duration(seconds: float) -> str:
    """``42 s``, ``3 min 5 s``, ``2 h 10 min``."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60} min"


def default_state_path(out: Path) -> Path:
    return out.with_name(out.name + ".state")


def train(
    dataset: SequenceDataset,
    cfg: TrainConfig,
    out: str | Path,
    *,
    resume: bool = False,
    **kwargs: Any,
) -> TrainResult:
    """Train a Mamba4Rec on ``dataset`` and write the best epoch's checkpoint to ``out``."""
    return Trainer(dataset, cfg, out, **kwargs).run(resume=resume)


__all__ = ["TrainResult", "Trainer", "default_state_path", "set_cpu_flush_denormal", "train"]
