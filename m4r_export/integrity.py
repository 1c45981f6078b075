"""Is an export directory the one ``m4r export`` wrote? (moved to :mod:`m4r_export.onnx.manifest`).

This module keeps the old import path: the manifest's one writer and reader is
:mod:`m4r_export.onnx.manifest`; readers that load files use its :func:`open_artifact`.
"""

from __future__ import annotations

from .onnx.manifest import (
    ITEM_TABLE,
    ITEMS_FILE,
    ITEMS_FORMAT,
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    MANIFEST_VERSION,
    ArtifactFiles,
    ArtifactIntegrityError,
    check_artifact_files,
    check_checkpoint_matches,
    open_artifact,
    required_files,
)

__all__ = [
    "ITEMS_FILE",
    "ITEMS_FORMAT",
    "ITEM_TABLE",
    "MANIFEST_FORMAT",
    "MANIFEST_NAME",
    "MANIFEST_VERSION",
    "ArtifactFiles",
    "ArtifactIntegrityError",
    "check_artifact_files",
    "check_checkpoint_matches",
    "open_artifact",
    "required_files",
]
