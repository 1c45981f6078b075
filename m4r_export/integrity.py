"""Is an export directory intact? Every file listed in ``manifest.json`` has its recorded size and sha256.

Consumers that ship an export somewhere else (``m4r triton``) call :func:`check_artifact_files`
first, so a truncated copy or an edited model never reaches a server looking valid.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import M4RError
from .fileio import sha256_file


class ArtifactIntegrityError(M4RError):
    """An export directory whose files do not match its manifest: exit code 3."""

    exit_code = 3


def check_artifact_files(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Return the manifest of ``directory`` after checking every file in ``manifest["files"]``."""
    root = Path(directory)
    path = root / "manifest.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ArtifactIntegrityError(
            f"{path} is missing: {root} is not a complete export; run `m4r export --out {root}` again"
        ) from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactIntegrityError(f"{path} is unreadable ({exc}); re-export with `m4r export`") from exc
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not files:
        raise ArtifactIntegrityError(f"{path} lists no files; re-export with `m4r export`")
    for name, meta in files.items():
        f = root / name
        if not f.is_file():
            raise ArtifactIntegrityError(f"{f} is listed in {path} but missing; copy the whole export again")
        size = f.stat().st_size
        if size != meta.get("bytes"):
            raise ArtifactIntegrityError(
                f"{f} has {size} bytes, the manifest says {meta.get('bytes')}: the copy is incomplete or "
                "the file was changed; copy the export again or re-export"
            )
        if sha256_file(f) != meta.get("sha256"):
            raise ArtifactIntegrityError(
                f"{f} does not match its sha256 in {path}: the file was changed or corrupted; copy the "
                "export again or re-export"
            )
    return manifest
