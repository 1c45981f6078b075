"""Parity and latency of exported artifacts against the PyTorch model (``m4r verify``, ``m4r bench``).

Library entry points (used by the CLI and ``m4r demo``):

* :func:`run_verify` -> :class:`VerifyReport` (``.passed``, ``.failure_message()``, ``.to_dict()``)
* :func:`run_bench` -> :class:`BenchResult` (``.points``, ``.fits``, ``.ratios()``, ``.to_dict()``)
* :func:`render_verify` / :func:`render_bench` print rich tables; :func:`bench_markdown` for docs.

Backends are runners (:mod:`.runners`): one class each, registered by name in :data:`BACKENDS`.
Names are imported lazily, so that ``m4r --help`` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "BACKENDS": "runners",
    "Runner": "runners",
    "TorchRunner": "runners",
    "backend_availability": "runners",
    "make_runner": "runners",
    "BenchResult": "bench",
    "run_bench": "bench",
    "bench_markdown": "report",
    "render_bench": "report",
    "render_verify": "report",
    "DEFAULT_THRESHOLDS": "verify",
    "Thresholds": "verify",
    "VerifyReport": "verify",
    "run_verify": "verify",
}

__all__ = [
    "BACKENDS",
    "DEFAULT_THRESHOLDS",
    "BenchResult",
    "Runner",
    "Thresholds",
    "TorchRunner",
    "VerifyReport",
    "backend_availability",
    "bench_markdown",
    "make_runner",
    "render_bench",
    "render_verify",
    "run_bench",
    "run_verify",
]

if TYPE_CHECKING:
    from .bench import BenchResult, run_bench
    from .report import bench_markdown, render_bench, render_verify
    from .runners import BACKENDS, Runner, TorchRunner, backend_availability, make_runner
    from .verify import DEFAULT_THRESHOLDS, Thresholds, VerifyReport, run_verify


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
