"""``m4r verify``: does the artifact rank items like the PyTorch model?

:func:`run_verify` feeds the same users to the PyTorch reference (:class:`ServingModel`, the
definition of what an artifact computes) and to the artifact on one or more backends, computes
the metrics of :mod:`.metrics` and checks them against thresholds. Callers (the CLI, ``m4r demo``)
render the returned :class:`VerifyReport` and use ``report.passed``.

Inputs: the test users of a dataset (``data``: their leave-one-out histories, and the held-out
item as the target of hit/ndcg/mrr), or generated sequences of varied lengths (1, the maximum,
and uniform in between) with uniformly drawn items. Histories longer than the artifact's
``max_seq_len`` keep their most recent items.

Artifacts with the ``exclude_items`` input get, on both sides, exclude lists (``exclude="auto"``):
dataset users their full known history (every item before the target, as ``m4r evaluate
--exclude-history`` masks it), generated users random lists with 0s, duplicates and out-of-range
ids. So the artifact's masking is checked (``mask_mismatches``), and hit/ndcg@K of dataset users
match ``m4r evaluate --exclude-history``. ``exclude="none"`` feeds zeros [batch, 1] instead.
"""

from __future__ import annotations

import io
import platform
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import __version__
from ..ann import search as ann_search
from ..errors import M4RError, UsageError
from ..integrity import ArtifactIntegrityError, check_checkpoint_matches
from .artifact import ArtifactInfo, load_artifact
from .batches import BatchComparison, merge, score_rows
from .metrics import non_finite, score_errors, topk_from_scores
from .runners import TorchRunner, default_backend, default_threads, fit_width, make_runner

if TYPE_CHECKING:
    from collections.abc import Callable

    from ..checkpoint import Checkpoint


@dataclass(frozen=True)
class Thresholds:
    """Pass/fail limits. ``max_*``: the metric must be <=; ``min_*``: it must be >=.

    Defaults per precision come from measurements on ml-100k (docs/verify-bench.md): fp32 errors are
    float rounding (~1e-6 relative); fp16 artifacts round weights and activations to 11-bit
    mantissas, which moves scores by ~1e-3 relative and swaps near-tied items at the top-K border.
    """

    max_abs_error: float
    max_rel_error: float
    min_topk_overlap_mean: float
    min_topk_overlap_min: float
    min_kendall_tau_mean: float
    min_rbo_mean: float
    max_abs_ndcg_delta: float
    max_abs_hit_delta: float
    max_non_finite: int = 0
    max_mask_mismatches: int = 0

    @classmethod
    def defaults(cls, precision: str) -> Thresholds:
        return DEFAULT_THRESHOLDS[precision]

    def with_overrides(self, **overrides: Any) -> Thresholds:
        known = {f.name for f in fields(self)}
        bad = [k for k in overrides if k not in known]
        if bad:
            raise UsageError(f"unknown threshold(s) {bad}; known: {sorted(known)}")
        values = {**asdict(self), **{k: v for k, v in overrides.items() if v is not None}}
        return Thresholds(**values)


#: Chosen from measurements on ml-100k (943 test users, K=10; docs/verify-bench.md has the numbers):
#: fp32 artifacts differ from PyTorch by float rounding only (max rel. error ~3e-6, every top-10
#: identical), so the limits sit ~40x above that and still catch an fp16-sized deviation (~1e-2);
#: fp16 artifacts move scores by ~1e-2 of the score spread and swap near-tied items at the top-K
#: border for a few users (measured worst user 9/10), so their limits allow that and no more.
DEFAULT_THRESHOLDS: dict[str, Thresholds] = {
    "fp32": Thresholds(
        max_abs_error=1e-3,
        max_rel_error=1e-4,
        min_topk_overlap_mean=0.999,
        min_topk_overlap_min=0.9,
        min_kendall_tau_mean=0.999,
        min_rbo_mean=0.999,
        max_abs_ndcg_delta=0.001,
        max_abs_hit_delta=0.002,
    ),
    "fp16": Thresholds(
        max_abs_error=0.05,
        max_rel_error=0.05,
        min_topk_overlap_mean=0.98,
        min_topk_overlap_min=0.7,
        min_kendall_tau_mean=0.98,
        min_rbo_mean=0.98,
        max_abs_ndcg_delta=0.01,
        max_abs_hit_delta=0.01,
    ),
    # int8 (m4r export --int8; docs/ort-custom-ops.md): quantized weights move scores by ~0.1-0.2 and
    # reorder items at the top-K border; measured on ML-100K (943 users, scores head): max abs 0.42,
    # top-10 overlap mean 0.983 / worst user 0.7, Kendall tau 0.956, RBO 0.978, hit@10 -0.0021,
    # ndcg@10 -0.00016 (docs/ort-custom-ops.md)
    "int8": Thresholds(
        max_abs_error=1.0,
        max_rel_error=1.0,
        min_topk_overlap_mean=0.95,
        min_topk_overlap_min=0.5,
        min_kendall_tau_mean=0.9,
        min_rbo_mean=0.95,
        max_abs_ndcg_delta=0.01,
        max_abs_hit_delta=0.015,
    ),
}


@dataclass
class VerifyInputs:
    item_seq: np.ndarray
    item_seq_len: np.ndarray
    targets: np.ndarray | None
    source: str
    notes: list[str] = field(default_factory=list)
    #: per-user items to exclude, int64 [users, E] padded with 0 (None: the input is not fed)
    exclude_items: np.ndarray | None = None

    @property
    def users(self) -> int:
        return int(self.item_seq.shape[0])

    def rows(self, rows: slice) -> VerifyInputs:
        """The same inputs for users ``rows`` only (views, no copies)."""
        return VerifyInputs(
            self.item_seq[rows],
            self.item_seq_len[rows],
            None if self.targets is None else self.targets[rows],
            self.source,
            self.notes,
            None if self.exclude_items is None else self.exclude_items[rows],
        )


@dataclass
class Check:
    metric: str
    value: float
    op: str  # "<=" or ">="
    threshold: float
    passed: bool

    def __str__(self) -> str:
        bad = ">" if self.op == "<=" else "<"
        rel = self.op if self.passed else bad
        return f"{self.metric} = {self.value:.6g} {rel} {self.threshold:.6g}"


@dataclass
class BackendResult:
    backend: str
    runner: dict[str, Any]
    metrics: dict[str, Any]
    checks: list[Check]
    seconds: float
    overlap: np.ndarray = field(repr=False)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]


@dataclass
class VerifyReport:
    artifact: ArtifactInfo
    checkpoint: str
    inputs: dict[str, Any]
    reference: dict[str, Any]
    k: int
    thresholds: Thresholds
    threshold_source: str
    results: list[BackendResult]
    environment: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    def failure_message(self) -> str:
        parts = [
            f"{r.backend}: " + "; ".join(str(c) for c in r.failures) for r in self.results if not r.passed
        ]
        return "parity FAILED for " + " | ".join(parts) if parts else ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "tool": f"m4r-export {__version__}",
            "passed": self.passed,
            "artifact": self.artifact.describe(),
            "checkpoint": self.checkpoint,
            "k": self.k,
            "inputs": self.inputs,
            "reference": self.reference,
            "thresholds": asdict(self.thresholds),
            "threshold_source": self.threshold_source,
            "results": [
                {
                    "backend": r.backend,
                    "passed": r.passed,
                    "runner": r.runner,
                    "metrics": r.metrics,
                    "checks": [asdict(c) for c in r.checks],
                    "failures": [str(c) for c in r.failures],
                    "seconds": r.seconds,
                    "topk_overlap_histogram": overlap_histogram(r.overlap, self.k),
                }
                for r in self.results
            ],
            "environment": self.environment,
            "notes": self.notes,
        }


def overlap_histogram(overlap: np.ndarray, k: int) -> dict[str, int]:
    """Users per number of shared top-K items ("10/10": n, "9/10": n, ...)."""
    shared = np.rint(overlap * k).astype(int)
    return {f"{s}/{k}": int(np.count_nonzero(shared == s)) for s in range(k, -1, -1) if (shared == s).any()}


# --------------------------------------------------------------------------------------------- inputs


def generated_inputs(n_items: int, users: int, max_len: int, seed: int = 0) -> VerifyInputs:
    """Random histories: lengths 1 and ``max_len`` always present, the rest uniform in between."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, max_len + 1, size=users)
    lengths[: min(users, 2)] = [1, max_len][: min(users, 2)]
    items = rng.integers(1, n_items, size=(users, max_len))
    valid = np.arange(max_len)[None, :] < lengths[:, None]
    # exclude lists of 0..16 entries: ids uniform in [-2, n_items + 2) (duplicates and invalid ids too)
    exclude = rng.integers(-2, n_items + 2, size=(users, 16))
    exclude[np.arange(16)[None, :] >= rng.integers(0, 17, size=users)[:, None]] = 0
    return VerifyInputs(
        item_seq=np.where(valid, items, 0).astype(np.int64),
        item_seq_len=lengths.astype(np.int64),
        targets=None,
        source=f"generated: {users} sequences, lengths 1..{max_len}, items uniform in 1..{n_items - 1}, "
        f"seed {seed}",
        exclude_items=exclude.astype(np.int64),
    )


def dataset_inputs(
    data: str | Path,
    ckpt: Checkpoint,
    users: int,
    max_len: int,
    seed: int = 0,
    *,
    ckpt_label: str = "the checkpoint",
    columns: Any = None,
) -> VerifyInputs:
    """Test users of a dataset (leave-one-out), read with the checkpoint's protocol; the dataset's item
    vocabulary must be the checkpoint's (the check ``m4r evaluate`` makes)."""
    from ..data import load_dataset
    from ..onnx.inputs import exclude_inputs
    from ..training.evaluation import check_vocabulary

    meta = ckpt.meta
    ds = load_dataset(
        data,
        max_seq_len=max_len,
        min_user_inter=int(meta.get("min_user_inter", 5)),
        min_item_inter=int(meta.get("min_item_inter", 5)),
        columns=columns,
    )
    check_vocabulary(ckpt, ds, ckpt_label)
    split = ds.test
    notes: list[str] = []
    seq, lens, target = split.item_seq, split.item_seq_len, split.target
    known = ds.known_items("test")
    if ckpt.item_tokens is None:
        notes.append("the checkpoint has no item vocabulary: only its item count was checked")
    n = len(seq)
    if n == 0:
        raise UsageError(f"{data}: no test users left to verify with")
    sampled = ""
    if users < n:
        sampled = f", sampled at random (seed {seed}; --users {n} for all)"
        pick = np.sort(np.random.default_rng(seed).choice(n, size=users, replace=False))
        seq, lens, target = seq[pick], lens[pick], target[pick]
        known = [known[i] for i in pick.tolist()]
    return VerifyInputs(
        item_seq=seq.astype(np.int64),
        item_seq_len=lens.astype(np.int64),
        targets=target.astype(np.int64),
        source=f"dataset {data}: {len(seq)} of {n} test users{sampled} (leave-one-out targets), "
        f"max_seq_len {max_len}",
        notes=notes,
        exclude_items=exclude_inputs(known),
    )


# ---------------------------------------------------------------------------------------------- core


def _ann_index(art: ArtifactInfo) -> Any:
    """The export's ANN index (``m4r export --ann``; hashed with the other files), or None."""
    spec = (art.manifest or {}).get("ann") if art.head == "embedding" else None
    if not isinstance(spec, dict):
        return None
    from ..ann import AnnParams, read_index

    # the bytes that were hashed (issue 20.5), not the path again
    return read_index(art.read(art.path.parent / str(spec.get("file"))), AnnParams.from_json(spec))


def _compare_in_batches(
    art: ArtifactInfo,
    inputs: VerifyInputs,
    k: int,
    ref: Any,
    emb_ref: Any,
    runners: list[Any],
    item_table: np.ndarray | None,
    rows: int,
    index: Any = None,
) -> tuple[list[list[BatchComparison]], list[float]]:
    """Per runner, the comparison of every batch of ``rows`` users, and its seconds of inference.

    Only one batch's reference scores (``rows x n_items``) exist at a time, so peak memory does not
    depend on the number of users (:mod:`.batches`).
    """
    parts: list[list[BatchComparison]] = [[] for _ in runners]
    seconds = [0.0 for _ in runners]
    for i in range(0, inputs.users, rows):
        batch = inputs.rows(slice(i, i + rows))
        feed = (batch.item_seq, batch.item_seq_len, batch.exclude_items)
        ref_scores = ref.run(*feed)["scores"]
        ref_embedding = None if emb_ref is None else emb_ref.run(*feed[:2])["user_embedding"]
        for j, runner in enumerate(runners):
            t0 = time.perf_counter()
            outs = runner.run(*feed)
            seconds[j] += time.perf_counter() - t0
            part = compare_batch(
                art, ref_scores, outs, k, batch, ref_embedding=ref_embedding, item_table=item_table
            )
            if index is not None:
                part.ann_top = ann_search(index, outs["user_embedding"], k)[1]
            parts[j].append(part)
    return parts, seconds


def _history_mask(item_seq: np.ndarray, item_seq_len: np.ndarray, n_items: int) -> np.ndarray:
    mask = np.zeros((len(item_seq), n_items), dtype=bool)
    valid = np.arange(item_seq.shape[1])[None, :] < np.clip(item_seq_len, 1, item_seq.shape[1])[:, None]
    rows = np.broadcast_to(np.arange(len(item_seq))[:, None], item_seq.shape)
    ids = np.where((item_seq >= 0) & (item_seq < n_items), item_seq, 0)
    mask[rows[valid], ids[valid]] = True
    return mask


def compare_outputs(
    artifact: ArtifactInfo,
    ref_scores: np.ndarray,
    outs: dict[str, np.ndarray],
    k: int,
    inputs: VerifyInputs,
    *,
    ref_embedding: np.ndarray | None = None,
    item_table: np.ndarray | None = None,
) -> tuple[dict[str, Any], np.ndarray]:
    """All metrics of one backend's outputs against the reference scores; also per-user overlap."""
    part = compare_batch(
        artifact, ref_scores, outs, k, inputs, ref_embedding=ref_embedding, item_table=item_table
    )
    return merge([part], inputs.targets)


def compare_batch(
    artifact: ArtifactInfo,
    ref_scores: np.ndarray,
    outs: dict[str, np.ndarray],
    k: int,
    inputs: VerifyInputs,
    *,
    ref_embedding: np.ndarray | None = None,
    item_table: np.ndarray | None = None,
) -> BatchComparison:
    """One batch of users: errors, non-finite counts and both top-K lists (merged by :func:`merge`)."""
    counts: dict[str, int] = {}
    embedding = None
    n_items = ref_scores.shape[1]
    ref_top = topk_from_scores(ref_scores, k)
    if artifact.head == "scores":
        out_scores = outs["scores"]
        if out_scores.shape != ref_scores.shape:
            raise M4RError(
                f"artifact scores have shape {out_scores.shape}, the model gives {ref_scores.shape}"
            )
        err = score_errors(ref_scores, out_scores)
        bad = non_finite(out_scores, ref_scores)
        out_top = topk_from_scores(out_scores, k)
    elif artifact.head == "topk":
        items, scores = outs["topk_items"], outs["topk_scores"]
        if items.shape[1] < k:
            raise UsageError(
                f"--k {k} is larger than the artifact's top-K ({items.shape[1]}); pass --k <= that"
            )
        out_of_range = (items < 0) | (items >= n_items)
        counts["topk_items_out_of_range"] = int(np.count_nonzero(out_of_range))
        safe = np.where(out_of_range, 0, items)
        ref_at = np.take_along_axis(ref_scores, safe, axis=1)
        ref_at = np.where(out_of_range, np.nan, ref_at)
        err = score_errors(ref_at, scores)
        bad = non_finite(scores, ref_at)
        bad.nan += counts["topk_items_out_of_range"]
        out_top = items[:, :k]
    else:  # embedding
        emb = outs["user_embedding"]
        assert ref_embedding is not None and item_table is not None
        e = score_errors(ref_embedding, emb)
        embedding = (e.max_abs, e.mean_abs * e.compared, e.compared)
        # fp32 product (a float64 copy of a 1M-item table per batch would cost more than the batch)
        out_scores = (emb.astype(np.float32) @ item_table.T).astype(np.float64)
        mask = np.zeros_like(out_scores, dtype=bool)
        mask[:, 0] = True
        if artifact.exclude_history:
            mask |= _history_mask(inputs.item_seq, inputs.item_seq_len, n_items)
        out_scores = np.where(mask, -np.inf, out_scores)
        err = score_errors(ref_scores, out_scores)
        bad = non_finite(emb)
        out_top = topk_from_scores(out_scores, k)
    return BatchComparison(err, bad, ref_top, out_top, counts, embedding)


def check_metrics(metrics: dict[str, Any], t: Thresholds, k: int) -> list[Check]:
    def le(name: str, value: float, limit: float) -> Check:
        return Check(name, float(value), "<=", float(limit), bool(value <= limit))  # NaN fails

    def ge(name: str, value: float, limit: float) -> Check:
        return Check(name, float(value), ">=", float(limit), bool(value >= limit))

    checks = [
        le("non_finite", metrics["non_finite"], t.max_non_finite),
        le("mask_mismatches", metrics["mask_mismatches"], t.max_mask_mismatches),
        le("max_abs_error", metrics["max_abs_error"], t.max_abs_error),
        le("max_rel_error", metrics["max_rel_error"], t.max_rel_error),
        ge("topk_overlap_mean", metrics["topk_overlap_mean"], t.min_topk_overlap_mean),
        ge("topk_overlap_min", metrics["topk_overlap_min"], t.min_topk_overlap_min),
        ge("kendall_tau_mean", metrics["kendall_tau_mean"], t.min_kendall_tau_mean),
        ge("rbo_mean", metrics["rbo_mean"], t.min_rbo_mean),
    ]
    if f"ndcg@{k}_delta" in metrics:
        checks.append(le(f"|ndcg@{k}_delta|", abs(metrics[f"ndcg@{k}_delta"]), t.max_abs_ndcg_delta))
        checks.append(le(f"|hit@{k}_delta|", abs(metrics[f"hit@{k}_delta"]), t.max_abs_hit_delta))
    return checks


def run_verify(
    ckpt: str | Path,
    artifact: str | Path,
    *,
    data: str | Path | None = None,
    users: int = 1000,
    k: int = 10,
    backends: list[str] | None = None,
    thresholds: Thresholds | None = None,
    threshold_overrides: dict[str, Any] | None = None,
    batch_size: int = 256,
    threads: int | None = None,
    scan_backend: str = "auto",
    max_seq_len: int | None = None,
    seed: int = 0,
    ort_ops: Path | None = None,
    allow_other_checkpoint: bool = False,
    exclude: str = "auto",
    columns: Any = None,
    log: Callable[[str], None] | None = None,
) -> VerifyReport:
    """Compare ``artifact`` with the PyTorch model of ``ckpt`` on every backend in ``backends``.

    Raises :class:`UsageError` for bad arguments / files and :class:`M4RError` when a backend cannot
    run; parity failures are *not* exceptions: they are in ``report.passed`` / ``failure_message()``.
    The artifact's files are checked against its manifest first, and ``ckpt`` against the
    checkpoint sha256 the manifest recorded (:class:`~m4r_export.integrity.ArtifactIntegrityError`,
    exit code 3; ``allow_other_checkpoint`` turns the latter into a note).
    ``exclude``: "auto" feeds exclude lists to artifacts that take them (see the module docstring),
    "none" feeds none.
    """
    from ..checkpoint import read_checkpoint
    from ..serving import check_k

    if users < 1:
        raise UsageError(f"--users must be >= 1, got {users}")
    if k < 1:
        raise UsageError(f"--k must be >= 1, got {k}")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    if exclude not in ("auto", "none"):
        raise UsageError(f"--exclude {exclude!r}: choose auto or none")
    art = load_artifact(artifact)  # checks every file its manifest lists
    ck = read_checkpoint(ckpt)
    notes = list(art.notes)
    if art.manifest is not None:
        try:
            check_checkpoint_matches(art.manifest, ckpt)
        except ArtifactIntegrityError as exc:
            if not allow_other_checkpoint:
                raise
            notes.append(str(exc).split(";")[0] + " (--allow-other-checkpoint)")
    else:
        notes.append(
            "no manifest.json beside the artifact: file integrity and checkpoint identity not checked"
        )
    model = ck.build_model()
    if art.model_config is not None:
        mine = model.config.to_dict()
        diff = {
            key: (v, mine.get(key)) for key, v in art.model_config.items() if key in mine and mine[key] != v
        }
        if diff:
            raise UsageError(
                f"checkpoint {ckpt} does not match artifact {artifact}: config differs in "
                + ", ".join(f"{key} (artifact {a}, checkpoint {b})" for key, (a, b) in diff.items())
                + "; pass the checkpoint the artifact was exported from"
            )
    n_items = model.n_items
    check_k(k, n_items)
    if art.head == "topk" and art.k is not None and k > art.k:
        raise UsageError(f"--k {k} is larger than the artifact's top-K ({art.k}); pass --k {art.k} or less")
    max_len = max_seq_len or art.max_seq_len or int(ck.meta.get("max_seq_len") or 50)

    threads = threads or default_threads()
    if data is not None:
        inputs = dataset_inputs(data, ck, users, max_len, seed, ckpt_label=str(ckpt), columns=columns)
    else:
        inputs = generated_inputs(n_items, users, max_len, seed)
    if log is not None:
        log(f"verifying on {inputs.source} ...")
    if inputs.item_seq.shape[1] > max_len:
        inputs.item_seq, inputs.item_seq_len = fit_width(inputs.item_seq, inputs.item_seq_len, max_len)
        notes.append(f"histories longer than max_seq_len {max_len} keep their most recent items")
    notes += inputs.notes
    if not art.exclude_items or exclude == "none":
        inputs.exclude_items = None
    if inputs.exclude_items is not None:
        what = "its known history" if inputs.targets is not None else "a random list"
        notes.append(f"exclude_items: each user excludes {what} (up to {inputs.exclude_items.shape[1]} ids)")
    elif art.exclude_items:
        notes.append("exclude_items: zeros (nothing excluded)")

    if thresholds is None:
        thresholds = Thresholds.defaults(art.precision)
        source = f"defaults for {art.precision} artifacts"
    else:
        source = "given"
    if threshold_overrides:
        thresholds = thresholds.with_overrides(**threshold_overrides)
        given = ", ".join(f"{key}={v}" for key, v in threshold_overrides.items() if v is not None)
        if given:
            source += f", overridden: {given}"

    item_table = None
    if art.head == "embedding":
        if art.item_table is not None:
            item_table = np.load(io.BytesIO(art.read(art.item_table)), allow_pickle=False)
        else:
            item_table = model.item_embedding.weight.detach().cpu().numpy()
            notes.append("no item table (.npy) beside the artifact: the checkpoint's item embedding is used")
    ref = TorchRunner(model, "scores", k, art.exclude_history, scan_backend=scan_backend, threads=threads)
    emb_ref = None
    if art.head == "embedding":
        emb_ref = TorchRunner(model, "embedding", scan_backend=scan_backend, threads=threads)
    names = backends or [default_backend(art, ort_ops)]
    runners = []
    try:
        for backend in names:
            runners.append(make_runner(backend, art, threads=threads, ort_ops=ort_ops))
        parts, seconds = _compare_in_batches(
            art,
            inputs,
            k,
            ref,
            emb_ref,
            runners,
            item_table,
            score_rows(batch_size, n_items),
            _ann_index(art),
        )
        describes = [r.describe() for r in runners]
    finally:
        for r in [ref, emb_ref, *runners]:
            if r is not None:
                r.close()
    results = []
    for backend, describe, backend_parts, secs in zip(names, describes, parts, seconds, strict=True):
        metrics, overlap = merge(backend_parts, inputs.targets)
        results.append(
            BackendResult(backend, describe, metrics, check_metrics(metrics, thresholds, k), secs, overlap)
        )

    import onnxruntime
    import torch

    return VerifyReport(
        artifact=art,
        checkpoint=str(ckpt),
        inputs={
            "source": inputs.source,
            "users": inputs.users,
            "max_seq_len": max_len,
            "length_min": int(inputs.item_seq_len.min()),
            "length_max": int(inputs.item_seq_len.max()),
            "targets": inputs.targets is not None,
            "exclude_items": None
            if inputs.exclude_items is None
            else ("known history" if inputs.targets is not None else "random lists"),
            "batch_size": batch_size,
        },
        reference=ref.describe(),
        k=k,
        thresholds=thresholds,
        threshold_source=source,
        results=results,
        environment={
            "python": platform.python_version(),
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
            "threads": threads,
            "machine": platform.machine(),
        },
        notes=notes,
    )
