"""One small runner per backend behind one interface (Polygraphy's runner pattern).

``runner.run(item_seq, item_seq_len, exclude_items=None) -> {output name: float32/int64 array}``

* inputs: ``item_seq`` int [batch, seq] right-padded with 0, ``item_seq_len`` int [batch], and
  ``exclude_items`` int [batch, E] (items never to rank; 0 = none) for runners whose model takes it
  (``takes_exclude``); None feeds zeros ``[batch, 1]``, i.e. nothing excluded;
* a runner whose backend only accepts a fixed or bounded sequence width (a static ONNX dimension,
  a TensorRT profile) adapts the input: wider inputs keep each row's **most recent** items, narrower
  inputs are right-padded with 0 (both leave the model's output unchanged when nothing is cut);
* floating outputs come back as float32 whatever the artifact computes in.

Adding a backend is one subclass: set ``backend`` (the ``--backend`` name) and ``kinds`` (which
artifacts it runs), implement :meth:`unavailable_reason`, ``__init__`` and :meth:`infer`; the class
registers itself in :data:`BACKENDS`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ..errors import M4RError, UsageError
from ..serving import EXCLUDE_INPUT, HEAD_OUTPUTS, INPUT_NAMES
from .artifact import ArtifactInfo

#: --backend name -> runner class (filled by Runner.__init_subclass__)
BACKENDS: dict[str, type[ArtifactRunner]] = {}


def default_threads() -> int:
    """Threads for every backend of one run when the user gives none: 1.

    Single-thread latency is the number that stays comparable on a shared machine: with more
    threads than idle cores, PyTorch's OpenMP barriers wait on descheduled threads (a tiny model's
    depthwise conv went from 0.1 ms to 30 ms on 2 busy cores), which would turn every ratio into a
    measurement of the neighbours. Pass ``--threads N`` for multi-threaded numbers.
    """
    return 1


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def fit_width(item_seq: np.ndarray, item_seq_len: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Re-pad right-padded sequences to ``width`` columns, keeping each row's most recent items.

    Lengths are first clamped to [1, seq] (the model's own rule), so the result is what the model
    would see anyway; rows longer than ``width`` keep their last ``width`` valid items.
    """
    batch, seq = item_seq.shape
    lengths = np.clip(item_seq_len.astype(np.int64), 1, max(seq, 1))
    if seq == width and (lengths <= width).all():
        return item_seq, item_seq_len
    new_len = np.minimum(lengths, width)
    start = lengths - new_len
    cols = start[:, None] + np.arange(width)[None, :]
    valid = np.arange(width)[None, :] < new_len[:, None]
    gathered = np.take_along_axis(item_seq, np.minimum(cols, seq - 1), axis=1)
    return np.where(valid, gathered, 0).astype(np.int64), new_len.astype(np.int64)


def check_inputs(item_seq: Any, item_seq_len: Any) -> tuple[np.ndarray, np.ndarray]:
    seq = np.asarray(item_seq)
    lens = np.asarray(item_seq_len)
    if seq.ndim != 2 or lens.shape != (seq.shape[0],):
        raise UsageError(
            "expected item_seq [batch, seq] and item_seq_len [batch], "
            f"got shapes {seq.shape} and {lens.shape}"
        )
    if not (np.issubdtype(seq.dtype, np.integer) and np.issubdtype(lens.dtype, np.integer)):
        raise UsageError(f"item_seq and item_seq_len must be integers, got {seq.dtype} and {lens.dtype}")
    return seq.astype(np.int64, copy=False), lens.astype(np.int64, copy=False)


def check_exclude(exclude_items: Any, batch: int, takes_exclude: bool, name: str) -> np.ndarray | None:
    """The ``exclude_items`` feed for a runner: None when its model has no such input."""
    if exclude_items is None:
        return np.zeros((batch, 1), dtype=np.int64) if takes_exclude else None
    if not takes_exclude:
        raise UsageError(
            f"{name}: this model has no exclude_items input (exported with --no-exclude-items, or an "
            "embedding head); re-export without --no-exclude-items or drop the exclude lists"
        )
    ex = np.asarray(exclude_items)
    if ex.ndim != 2 or ex.shape[0] != batch or not np.issubdtype(ex.dtype, np.integer):
        raise UsageError(
            f"exclude_items must be integers [batch={batch}, E], got {ex.dtype} {ex.shape}; "
            "pad ragged lists with 0 (m4r_export.onnx.exclude_inputs)"
        )
    return ex.astype(np.int64, copy=False)


class Runner:
    """Base class: input checks, width adaptation, output normalisation and timing."""

    #: short name shown in reports
    name: str = "runner"
    #: "cpu" or "cuda"
    device: str = "cpu"
    #: the backend accepts exactly this many columns (static graph dimension), or None
    fixed_width: int | None = None
    #: the backend accepts at most this many columns (engine profile), or None
    max_width: int | None = None
    output_names: tuple[str, ...] = ()
    #: the model takes the exclude_items input
    takes_exclude: bool = False

    def infer(
        self, item_seq: np.ndarray, item_seq_len: np.ndarray, exclude_items: np.ndarray | None
    ) -> dict[str, np.ndarray]:
        """Backend call; ``exclude_items`` is an int64 array exactly when ``takes_exclude``."""
        raise NotImplementedError

    def adapt(self, item_seq: np.ndarray, item_seq_len: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        width = self.fixed_width
        if width is None and self.max_width is not None and item_seq.shape[1] > self.max_width:
            width = self.max_width
        return (item_seq, item_seq_len) if width is None else fit_width(item_seq, item_seq_len, width)

    def run(self, item_seq: Any, item_seq_len: Any, exclude_items: Any = None) -> dict[str, np.ndarray]:
        """Outputs for a batch; an empty batch gives empty outputs on every backend.

        ONNX Runtime's Scan refuses zero iterations (the ``chunked`` and ``rowwise`` bodies scan
        over rows), so an empty batch runs one padding row and returns its outputs' first 0 rows:
        the right names, dtypes and trailing shapes, whatever the backend.
        """
        seq, lens = self.adapt(*check_inputs(item_seq, item_seq_len))
        excl = check_exclude(exclude_items, seq.shape[0], self.takes_exclude, self.name)
        if seq.shape[0] == 0:
            width = max(1, seq.shape[1]) if self.fixed_width is None else self.fixed_width
            one_excl = None if excl is None else np.zeros((1, max(1, excl.shape[1])), dtype=np.int64)
            one = self.infer(np.zeros((1, width), dtype=np.int64), np.ones(1, dtype=np.int64), one_excl)
            outs = {k: v[:0] for k, v in one.items()}
        else:
            outs = self.infer(seq, lens, excl)
        return {
            k: v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) else v.astype(np.int64)
            for k, v in outs.items()
        }

    def timed(
        self, item_seq: np.ndarray, item_seq_len: np.ndarray, exclude_items: np.ndarray | None = None
    ) -> float:
        """Latency of one call in milliseconds (host wall clock; GPU runners synchronise)."""
        seq, lens = self.adapt(item_seq, item_seq_len)
        excl = check_exclude(exclude_items, seq.shape[0], self.takes_exclude, self.name)
        t0 = time.perf_counter_ns()
        self.infer(seq, lens, excl)
        return (time.perf_counter_ns() - t0) / 1e6

    def peak_memory_reset(self) -> None:
        """Start a peak-memory window for this runner's device (GPU runners override)."""

    def peak_memory_mib(self) -> float | None:
        """Peak device memory since :meth:`peak_memory_reset` (None: measured as host RSS instead)."""
        return None

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "device": self.device}

    def close(self) -> None:
        """Release sessions / contexts."""


class TorchRunner(Runner):
    """The PyTorch reference: :class:`~m4r_export.serving.ServingModel` (what every artifact computes).

    On CUDA the scan backend ``auto`` uses mamba-ssm's kernels when installed. On CPU denormal
    flushing is turned on: the scan's decaying state otherwise spends most of its time in denormal
    arithmetic (5-10x slower), which would make any speed-up ratio meaningless.
    """

    def __init__(
        self,
        model: Any,
        head: str = "scores",
        k: int = 10,
        exclude_history: bool = False,
        *,
        exclude_items: bool = True,
        device: str = "cpu",
        scan_backend: str = "auto",
        threads: int | None = None,
    ) -> None:
        import torch

        from ..model.scan import resolve_backend
        from ..serving import ServingModel

        if device.startswith("cuda") and not torch.cuda.is_available():
            raise M4RError("the PyTorch CUDA reference needs a CUDA build of torch and a GPU")
        self._torch = torch
        self.torch_device = torch.device(device)
        self.device = self.torch_device.type
        if self.device == "cpu":
            torch.set_flush_denormal(True)
        self._previous_threads = torch.get_num_threads()
        if threads is not None:
            torch.set_num_threads(threads)
        model = model.to(self.torch_device)
        model.set_scan_backend(scan_backend)
        self.scan_backend = resolve_backend(scan_backend, self.torch_device)
        # eval() on the wrapper too: a ServingModel left in train mode flips the model back on export
        self.module = ServingModel(model, head, k, exclude_history, exclude_items).eval()
        self.takes_exclude = self.module.exclude_items
        self.output_names = HEAD_OUTPUTS[head]
        self.name = "pytorch" if self.device == "cpu" else "pytorch-cuda"

    def infer(
        self, item_seq: np.ndarray, item_seq_len: np.ndarray, exclude_items: np.ndarray | None
    ) -> dict[str, np.ndarray]:
        torch = self._torch
        if self.device == "cpu":
            # again on every call: creating an ONNX Runtime session clears the thread's flush-to-zero
            # mode, and denormals slow the CPU scan 3-4x (see docs/onnx-export.md)
            torch.set_flush_denormal(True)
        with torch.inference_mode():
            seq = torch.from_numpy(item_seq).to(self.torch_device)
            lens = torch.from_numpy(item_seq_len).to(self.torch_device)
            excl = None if exclude_items is None else torch.from_numpy(exclude_items).to(self.torch_device)
            outs = self.module(seq, lens, excl)
            return {
                n: o.float().cpu().numpy() if o.is_floating_point() else o.cpu().numpy()
                for n, o in zip(self.output_names, outs, strict=True)
            }

    def timed(
        self, item_seq: np.ndarray, item_seq_len: np.ndarray, exclude_items: np.ndarray | None = None
    ) -> float:
        if self.device != "cuda":
            return super().timed(item_seq, item_seq_len, exclude_items)
        torch = self._torch
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        excl_np = check_exclude(exclude_items, item_seq.shape[0], self.takes_exclude, self.name)
        with torch.inference_mode():
            seq = torch.from_numpy(item_seq).to(self.torch_device)
            lens = torch.from_numpy(item_seq_len).to(self.torch_device)
            excl = None if excl_np is None else torch.from_numpy(excl_np).to(self.torch_device)
            start.record()
            self.module(seq, lens, excl)
            end.record()
        end.synchronize()
        return float(start.elapsed_time(end))

    def peak_memory_reset(self) -> None:
        if self.device == "cuda":
            self._torch.cuda.reset_peak_memory_stats(self.torch_device)

    def peak_memory_mib(self) -> float | None:
        if self.device == "cuda":
            return self._torch.cuda.max_memory_allocated(self.torch_device) / 2**20
        return None

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "scan_backend": self.scan_backend, "torch": self._torch.__version__}

    def close(self) -> None:
        """Give torch back the thread count it had before this runner."""
        self._torch.set_num_threads(self._previous_threads)


class ArtifactRunner(Runner):
    """A runner for an exported artifact; subclasses register under their ``backend`` name."""

    backend: ClassVar[str] = ""
    kinds: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.backend:
            BACKENDS[cls.backend] = cls

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """None when this backend can run on this machine, otherwise why not (and how to fix)."""
        return None

    def __init__(self, artifact: ArtifactInfo, *, threads: int | None = None) -> None:
        raise NotImplementedError


def _ort_available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


class OrtRunner(ArtifactRunner):
    """ONNX Runtime with one execution provider (CPU fallback only where the provider needs it)."""

    kinds = ("onnx",)
    provider: ClassVar[str] = "CPUExecutionProvider"
    fallback: ClassVar[tuple[str, ...]] = ()
    install_hint: ClassVar[str] = ""

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return cls.provider_unavailable_reason()

    @classmethod
    def provider_unavailable_reason(cls) -> str | None:
        """Why this ONNX Runtime lacks the execution provider (what every instance needs)."""
        try:
            providers = _ort_available_providers()
        except ImportError as exc:
            return f"onnxruntime is not installed ({exc}); pip install onnxruntime"
        if cls.provider not in providers:
            have = ", ".join(providers)
            return f"ONNX Runtime here has no {cls.provider} (available: {have}); {cls.install_hint}"
        return None

    def __init__(self, artifact: ArtifactInfo, *, threads: int | None = None) -> None:
        import onnxruntime as ort

        # the provider only: a runner given its custom-op library explicitly needs no default one
        reason = self.provider_unavailable_reason()
        if reason:
            raise UsageError(f"backend {self.backend} cannot run here: {reason}")
        path = artifact.onnx_path or artifact.path
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or default_threads()
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        # no busy-waiting between calls: runners take turns in bench, and a spinning ORT pool would
        # steal the cores the next backend needs
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._configure(opts)
        try:
            self.session = artifact.ort_session(opts, [self.provider, *self.fallback])
        except Exception as exc:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
            raise M4RError(
                f"ONNX Runtime ({self.provider}) could not load {path}: {exc}; re-export it with `m4r export`"
            ) from exc
        if self.provider not in self.session.get_providers():
            raise M4RError(f"ONNX Runtime did not enable {self.provider} for {path}; {self.install_hint}")
        inputs = {i.name: i for i in self.session.get_inputs()}
        if set(inputs) not in (set(INPUT_NAMES), {*INPUT_NAMES, EXCLUDE_INPUT}):
            raise M4RError(
                f"{path}: inputs are {sorted(inputs)}, expected item_seq, item_seq_len (and exclude_items); "
                "export the model with `m4r export`"
            )
        self.takes_exclude = EXCLUDE_INPUT in inputs
        width = inputs["item_seq"].shape[1] if len(inputs["item_seq"].shape) == 2 else None
        self.fixed_width = width if isinstance(width, int) and width > 0 else None
        self.output_names = tuple(o.name for o in self.session.get_outputs())
        self.threads = opts.intra_op_num_threads
        self.name = self.backend

    def _configure(self, opts: Any) -> None:
        """Last changes to the session options before the session is created (subclasses)."""

    def infer(
        self, item_seq: np.ndarray, item_seq_len: np.ndarray, exclude_items: np.ndarray | None
    ) -> dict[str, np.ndarray]:
        feeds = {"item_seq": item_seq, "item_seq_len": item_seq_len}
        if exclude_items is not None:
            feeds[EXCLUDE_INPUT] = exclude_items
        outs = self.session.run(None, feeds)
        return dict(zip(self.output_names, outs, strict=True))

    def describe(self) -> dict[str, Any]:
        import onnxruntime as ort

        return {
            **super().describe(),
            "onnxruntime": ort.__version__,
            "providers": self.session.get_providers(),
            "threads": self.threads,
        }

    def close(self) -> None:
        del self.session


class OrtCpuRunner(OrtRunner):
    backend = "ort-cpu"
    provider = "CPUExecutionProvider"
    install_hint = "pip install onnxruntime"


class OrtCpuOpsRunner(OrtCpuRunner):
    """ONNX Runtime CPU with the custom-op library libm4r_ort_ops.so: SelectiveScan runs the native
    kernel instead of the function body (``ort-cpu``). The library: ``ort_ops``, else $M4R_ORT_OPS,
    else the ``m4r build-ort-ops`` output."""

    backend = "ort-cpu-ops"

    @classmethod
    def unavailable_reason(cls) -> str | None:
        from ..onnx.ort_ops import ORT_OPS_ENV, find_ort_ops_library

        reason = super().unavailable_reason()
        if reason is None and find_ort_ops_library() is None:
            reason = (
                f"libm4r_ort_ops.so not built (run `m4r build-ort-ops`, set ${ORT_OPS_ENV} or pass --ort-ops)"
            )
        return reason

    def __init__(
        self, artifact: ArtifactInfo, *, threads: int | None = None, ort_ops: Path | None = None
    ) -> None:
        from ..onnx.ort_ops import require_ort_ops_library

        self.ort_ops_path = require_ort_ops_library(ort_ops)
        self.ort_ops: dict[str, Any] = {}
        super().__init__(artifact, threads=threads)

    def _configure(self, opts: Any) -> None:
        from ..onnx.ort_ops import register_ort_ops

        self.ort_ops = register_ort_ops(opts, self.ort_ops_path)

    def describe(self) -> dict[str, Any]:
        from ..onnx.ort_ops import compute_calls, mixer_calls, topk_calls

        # the counters show the library's kernels really served this process's SelectiveScan nodes
        # (compute_calls), fused MambaMixer nodes (mixer_calls; m4r export --fused) and the topk head's
        # ScoreTopK node (topk_calls)
        calls = {
            "compute_calls": compute_calls(self.ort_ops_path),
            "mixer_calls": mixer_calls(self.ort_ops_path),
            "topk_calls": topk_calls(self.ort_ops_path),
        }
        return {**super().describe(), "ort_ops": {**self.ort_ops, **calls}}


class OrtCudaRunner(OrtRunner):
    backend = "ort-cuda"
    device = "cuda"
    provider = "CUDAExecutionProvider"
    fallback = ("CPUExecutionProvider",)
    install_hint = "pip install onnxruntime-gpu (and a CUDA GPU + driver)"


class OrtTensorrtRunner(OrtRunner):
    backend = "ort-trt"
    device = "cuda"
    provider = "TensorrtExecutionProvider"
    fallback = ("CUDAExecutionProvider", "CPUExecutionProvider")
    install_hint = "pip install onnxruntime-gpu and install TensorRT libraries on the library path"


class TensorrtEngineRunner(ArtifactRunner):
    """A serialized TensorRT engine, through :class:`m4r_export.trt.runner.TrtRunner`."""

    backend = "tensorrt"
    kinds = ("engine",)
    device = "cuda"

    @classmethod
    def unavailable_reason(cls) -> str | None:
        from ..trt.env import gpu_unavailable_reason, tensorrt_unavailable_reason

        return tensorrt_unavailable_reason() or gpu_unavailable_reason()

    def __init__(
        self, artifact: ArtifactInfo, *, threads: int | None = None, plugin_library: Path | None = None
    ) -> None:
        reason = self.unavailable_reason()
        if reason:
            raise UsageError(f"backend tensorrt cannot run here: {reason}")
        from ..trt.runner import TrtRunner

        listed = artifact.files is not None and artifact.path.name in artifact.files.names
        data = artifact.read(artifact.path) if listed else None  # the checked bytes of a listed engine
        self._runner = TrtRunner(artifact.path, plugin_library=plugin_library, engine_bytes=data)
        self.max_width = self._runner.profile.max_seq
        self.output_names = tuple(self._runner.output_names)
        self.takes_exclude = self._runner.takes_exclude
        self.name = "tensorrt"

    def infer(
        self, item_seq: np.ndarray, item_seq_len: np.ndarray, exclude_items: np.ndarray | None
    ) -> dict[str, np.ndarray]:
        return self._runner.run(item_seq, item_seq_len, exclude_items)

    def describe(self) -> dict[str, Any]:
        import tensorrt

        return {**super().describe(), "tensorrt": tensorrt.__version__, "warnings": self._runner.warnings}


def default_backend(artifact: ArtifactInfo, ort_ops: Path | None = None) -> str:
    """tensorrt for engines; for ONNX files ort-cpu, or ort-cpu-ops when a custom-op library is given."""
    if artifact.kind == "engine":
        return "tensorrt"
    return "ort-cpu-ops" if ort_ops is not None else "ort-cpu"


def make_runner(
    backend: str, artifact: ArtifactInfo, *, threads: int | None = None, ort_ops: Path | None = None
) -> ArtifactRunner:
    """Instantiate ``backend`` for ``artifact`` with a clear error when it cannot run it or here.

    ``ort_ops``: the custom-op library for ``ort-cpu-ops`` (default: found as find_ort_ops_library does).
    """
    cls = BACKENDS.get(backend)
    if cls is None:
        raise UsageError(f"unknown backend {backend!r}; choose one of {', '.join(sorted(BACKENDS))}")
    if artifact.kind not in cls.kinds:
        fit = [b for b, c in sorted(BACKENDS.items()) if artifact.kind in c.kinds]
        raise UsageError(
            f"backend {backend} cannot run {artifact.kind} artifacts ({artifact.path.name}); "
            f"use one of {', '.join(fit)}"
        )
    if cls is OrtCpuOpsRunner:
        return OrtCpuOpsRunner(artifact, threads=threads, ort_ops=ort_ops)
    return cls(artifact, threads=threads)


def backend_availability() -> dict[str, str | None]:
    """backend -> None (available) or the reason it is not."""
    return {name: cls.unavailable_reason() for name, cls in sorted(BACKENDS.items())}
