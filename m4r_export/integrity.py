"""Is an export directory the one ``m4r export`` wrote? Checked before anything runs on it.

:func:`check_artifact_files` reads ``manifest.json``, checks that its values have the types and
ranges the exporter writes, that every file it lists is present with the listed size and sha256
(streamed through :mod:`hashlib`), and that the files every artifact needs are listed. Any
mismatch raises :class:`ArtifactIntegrityError` (exit code 3) naming the file. ``m4r verify`` and
``m4r bench`` call it before loading a model; so should any other reader of an export directory.

The manifest records the sha256 of the checkpoint the artifact was exported from;
:func:`check_checkpoint_matches` compares it with the checkpoint a user passes.

What this does not do: authenticate. Whoever can rewrite ``manifest.json`` can rewrite its
hashes; the checks catch corruption, partial copies, mixed exports and edits of a listed file.
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import Any

from .errors import M4RError, UsageError
from .fileio import sha256_file

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "m4r-export-manifest"
MANIFEST_VERSION = 1
ITEMS_FILE = "items.txt"
ITEM_TABLE = "item_embedding.npy"
#: how items.txt is laid out; written into every manifest (key "items_format")
ITEMS_FORMAT = (
    "UTF-8 text, one raw item token per line, lines separated by '\\n' only; line i (0-based) is the "
    "token of item index i; line 0 is the padding token. No token contains a character that "
    "str.splitlines() treats as a line break."
)
_SHA256 = re.compile(r"[0-9a-f]{64}")


class ArtifactIntegrityError(M4RError):
    """An artifact's files do not match its manifest (or the manifest is malformed): exit code 3."""

    exit_code = 3


def _fail(directory: Path, message: str) -> ArtifactIntegrityError:
    return ArtifactIntegrityError(
        f"{directory}: {message}; the export directory is damaged or mixed: re-export it with `m4r export`"
    )


def _read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise _fail(directory, f"{MANIFEST_NAME} is missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(directory, f"{MANIFEST_NAME} is unreadable ({exc})") from exc
    if not isinstance(data, dict):
        raise _fail(directory, f"{MANIFEST_NAME} is not a JSON object")
    return data


def _check_values(directory: Path, m: dict[str, Any]) -> None:
    """Types and ranges of the values readers act on (a non-numeric ``k`` is an error here)."""
    from .checkpoint import MAX_SEQ_LEN_LIMIT, checked_number, validate_config
    from .serving import HEADS

    where = f"{directory / MANIFEST_NAME}"
    if m.get("format") != MANIFEST_FORMAT or m.get("format_version") != MANIFEST_VERSION:
        raise _fail(
            directory,
            f"{MANIFEST_NAME} has format {m.get('format')!r} version {m.get('format_version')!r}; this m4r "
            f"reads {MANIFEST_FORMAT!r} version {MANIFEST_VERSION}",
        )
    if m.get("head") not in HEADS:
        raise _fail(
            directory, f"{MANIFEST_NAME}: head is {m.get('head')!r}; expected one of {', '.join(HEADS)}"
        )
    try:
        config = validate_config(m.get("model"), f"{where} (model)")
        if m.get("k") is not None or m["head"] == "topk":
            checked_number(m.get("k"), "k", int, 1, config.n_items - 1, where)
        checked_number(m.get("max_seq_len"), "max_seq_len", int, 1, MAX_SEQ_LEN_LIMIT, where)
    except UsageError as exc:
        raise _fail(directory, str(exc).removeprefix(f"{where}: ")) from exc
    if not isinstance(m.get("exclude_history"), bool):
        raise _fail(
            directory, f"{MANIFEST_NAME}: exclude_history is {m.get('exclude_history')!r}, not true/false"
        )
    ckpt = m.get("checkpoint")
    if ckpt is not None and not (
        isinstance(ckpt, dict) and (ckpt.get("sha256") is None or _SHA256.fullmatch(str(ckpt.get("sha256"))))
    ):
        raise _fail(
            directory, f"{MANIFEST_NAME}: checkpoint must be {{'path': ..., 'sha256': <64 hex digits>}}"
        )


def _check_file(directory: Path, name: Any, entry: Any) -> None:
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name:
        raise _fail(directory, f"{MANIFEST_NAME} lists {name!r}, which is not a plain file name")
    if not (
        isinstance(entry, dict)
        and isinstance(entry.get("sha256"), str)
        and _SHA256.fullmatch(entry["sha256"])
        and isinstance(entry.get("bytes"), int)
        and not isinstance(entry.get("bytes"), bool)
    ):
        raise _fail(
            directory, f"{MANIFEST_NAME}: the entry of {name} needs 'sha256' (64 hex digits) and 'bytes'"
        )
    path = directory / name
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise _fail(directory, f"{name} is listed in {MANIFEST_NAME} but missing") from None
    if not stat.S_ISREG(st.st_mode):
        raise _fail(directory, f"{name} is not a regular file")
    if st.st_size != entry["bytes"]:
        raise _fail(directory, f"{name} has {st.st_size} bytes but {MANIFEST_NAME} lists {entry['bytes']}")
    if sha256_file(path) != entry["sha256"]:
        raise _fail(directory, f"{name} does not match its sha256 in {MANIFEST_NAME} (modified or corrupt)")


def required_files(manifest: dict[str, Any]) -> list[str]:
    """Files every export of this head has (besides the manifest)."""
    need = ["model.onnx", ITEMS_FILE]
    if manifest.get("head") == "embedding":
        need.append(ITEM_TABLE)
    files = manifest.get("files")
    for entry in files.values() if isinstance(files, dict) else ():
        side = entry.get("external_data") if isinstance(entry, dict) else None
        if side is not None:  # ONNX external data: the model file is useless without it
            need.append(side if isinstance(side, str) else repr(side))
    return need


def check_artifact_files(directory: Path | str) -> dict[str, Any]:
    """Check an export directory against its manifest; return the parsed manifest.

    Raises :class:`ArtifactIntegrityError` (exit code 3) naming the first file that is missing,
    has another size or sha256, or a manifest value of the wrong type or range.
    """
    d = Path(directory)
    manifest = _read_manifest(d)
    _check_values(d, manifest)
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise _fail(d, f"{MANIFEST_NAME} lists no files")
    missing = [name for name in required_files(manifest) if name not in files]
    if missing:
        raise _fail(
            d,
            f"{MANIFEST_NAME} does not list {', '.join(missing)} (every {manifest['head']} artifact has it)",
        )
    for name, entry in files.items():
        _check_file(d, name, entry)
    return manifest


def check_checkpoint_matches(manifest: dict[str, Any], ckpt: Path | str) -> None:
    """Refuse ``ckpt`` when the manifest recorded another checkpoint's sha256 at export."""
    recorded = (manifest.get("checkpoint") or {}).get("sha256")
    if recorded is None:
        return
    actual = sha256_file(ckpt)
    if actual != recorded:
        raise ArtifactIntegrityError(
            f"this artifact was exported from a different checkpoint (manifest: sha256 {recorded[:12]}..., "
            f"{ckpt}: sha256 {actual[:12]}...); pass the checkpoint it was exported from, or "
            "--allow-other-checkpoint to compare against this one anyway"
        )
