"""What some tests need from outside the repository, and what happens when it is missing.

Datasets: where the tests find the shared datasets (MovieLens-100K).

The product never reads them; a few end-to-end tests do. They are looked up in ``$M4R_SHARED_DIR``,
else in ``../shared`` beside the repository, else beside the local repository it was cloned from.
Missing data skips those tests on a developer machine, but fails them when ``M4R_REQUIRE_DATA=1``
(``.ci/run`` sets it): a test that skips in CI did not run.
"""

from __future__ import annotations

import importlib
import os
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    """``$M4R_SHARED_DIR``; else ``../shared`` beside this checkout; else, for a clone of a local repository
    (``git clone /work/main /tmp/ci-check``), ``../shared`` beside the repository it was cloned from."""
    if os.environ.get("M4R_SHARED_DIR"):
        return Path(os.environ["M4R_SHARED_DIR"])
    beside = ROOT.parent / "shared"
    if beside.is_dir():
        return beside
    origin = _local_origin()
    return origin.parent / "shared" if origin is not None and (origin.parent / "shared").is_dir() else beside


def _local_origin() -> Path | None:
    """The directory this checkout was cloned from, when its ``origin`` remote is a local path."""
    try:
        url = subprocess.run(
            ["git", "-C", str(ROOT), "config", "--get", "remote.origin.url"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    url = url.removeprefix("file://")
    return Path(url).resolve() if url.startswith("/") and Path(url).is_dir() else None


def ml100k_path() -> Path:
    return shared_dir() / "datasets" / "ml-100k" / "ml-100k.inter"


def require_ml100k() -> Path:
    """The ML-100K interaction file; skip (or fail under ``M4R_REQUIRE_DATA=1``) when it is missing."""
    path = ml100k_path()
    if path.is_file():
        return path
    msg = f"{path} is not available (set M4R_SHARED_DIR to the folder holding datasets/ml-100k)"
    if os.environ.get("M4R_REQUIRE_DATA") == "1":
        pytest.fail(msg + "; M4R_REQUIRE_DATA=1 makes this a failure")
    pytest.skip(msg)


def import_or_skip(module: str, require_env: str, reason: str) -> Any:
    """``pytest.importorskip(module)``, except that with ``$require_env`` = 1 (``.ci/run`` sets the
    M4R_REQUIRE_* variables) a missing module is an import error, so the tests fail instead of skipping."""
    if os.environ.get(require_env) == "1":
        mod: ModuleType = importlib.import_module(module)
        return mod
    return pytest.importorskip(module, reason=reason)
