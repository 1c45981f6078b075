"""``manifest.json``: the one writer and reader of an export directory's manifest.

Writing (``m4r export``, streaming included): :func:`file_entries` builds the ``files`` map
(``name -> {"sha256", "bytes", ...notes}``) from the staged bytes, any plain file name included
(ONNX external-data side files, indexes: whatever a writer adds is hashed like the rest), and
:func:`manifest_bytes` serialises the manifest; the export publishes everything as one unit.

Reading (``verify``, ``bench``, ``triton``, the streaming helper, TensorRT): :func:`open_artifact`
opens the directory once, reads ``manifest.json`` through that directory handle, checks its values
(types, ranges, every file name it refers to) and opens every listed file (never following a
symlink), checking its size and sha256 through the open descriptor. Readers then take the bytes
from :meth:`ArtifactFiles.read`, which reads the same open file and checks its sha256 again, so
what a reader loads is exactly what was hashed, even while another ``m4r export`` republishes the
directory (a reader of the old export keeps the old files open; it never mixes two exports).
Any mismatch raises :class:`ArtifactIntegrityError` (exit code 3) naming the file.

Every file name a reader takes from the manifest (``files``, ``streaming.files``,
``tensorrt.engine``/``engine_manifest``, and any future one: add it to :func:`referenced_names`)
must be a plain name (no separator, not ``.``/``..``) listed and hashed in ``files``.

ONNX external data: a ``files`` entry may list its side files as ``"external_data": [names]``
(each one listed and hashed in ``files`` like any file). :func:`ort_session` then gives ONNX
Runtime the graph's bytes and the side files' tensors, read from the same checked descriptors:
small tensors are put back into the graph (shape inference reads constants before external
initializers are substituted), large ones go through ``SessionOptions.add_external_initializers``
as zero-copy OrtValues. ONNX Runtime never opens a path itself (given bytes, it would resolve
side files against the working directory), so what runs is what was hashed. The cost: every side
file is read into memory once (the weights are needed in memory anyway).

What this does not do: authenticate. Whoever can rewrite ``manifest.json`` can rewrite its
hashes; the checks catch corruption, partial copies, mixed exports, edits of a listed file and
names that point outside the directory.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import stat
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import M4RError, UsageError

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
#: a manifest larger than this is not one m4r wrote (refused before it is parsed)
MAX_MANIFEST_BYTES = 64 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")


class ArtifactIntegrityError(M4RError):
    """An artifact's files do not match its manifest (or the manifest is malformed): exit code 3."""

    exit_code = 3


def _fail(directory: Path, message: str) -> ArtifactIntegrityError:
    return ArtifactIntegrityError(
        f"{directory}: {message}; the export directory is damaged or mixed: re-export it with `m4r export`"
    )


def is_plain_name(name: object) -> bool:
    """A file name inside one directory: no separator, not empty, ``.`` or ``..``, no NUL."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and not any(c in name for c in ("/", "\\", "\0"))
    )


# --------------------------------------------------------------------------------------- writing


def file_entries(
    contents: Mapping[str, bytes | Path], notes: Mapping[str, Mapping[str, Any]] | None = None
) -> dict[str, dict[str, Any]]:
    """The manifest's ``files``: every name -> sha256, size and its notes (``manifest.json`` excluded).

    A value is the file's bytes, or a finished file on disk (large ones: external data, indexes)."""
    from ..fileio import sha256_file

    out: dict[str, dict[str, Any]] = {}
    for name, data in contents.items():
        if name == MANIFEST_NAME:
            continue
        if not is_plain_name(name):
            raise ValueError(f"file_entries: {name!r} is not a plain file name")
        out[name] = {
            "sha256": sha256_file(data) if isinstance(data, Path) else hashlib.sha256(data).hexdigest(),
            "bytes": data.stat().st_size if isinstance(data, Path) else len(data),
            **(notes or {}).get(name, {}),
        }
    return out


def io_spec(proto: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A graph's inputs and outputs as manifest entries (name, numpy dtype name, shape)."""
    import numpy as np
    from onnx import helper

    def spec(vi: Any) -> dict[str, Any]:
        t = vi.type.tensor_type
        dims = [d.dim_param if d.dim_param else int(d.dim_value) for d in t.shape.dim]
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.elem_type)).name
        return {"name": vi.name, "dtype": dtype, "shape": dims}

    return [spec(v) for v in proto.graph.input], [spec(v) for v in proto.graph.output]


def manifest_bytes(manifest: Mapping[str, Any]) -> bytes:
    return (json.dumps(manifest, indent=2) + "\n").encode("utf-8")


def previous_export(directory: Path) -> bool:
    """True when every entry of ``directory`` was written by ``m4r export`` (safe to replace)."""
    listed: set[str] = set()
    try:
        old = json.loads((directory / MANIFEST_NAME).read_text(encoding="utf-8"))
        if isinstance(old, dict) and isinstance(old.get("files"), dict):
            listed = {str(k) for k in old["files"]}
    except (OSError, ValueError):
        pass
    known = {
        MANIFEST_NAME,
        "model.onnx",
        "model.fp16.onnx",
        "model.int8.onnx",
        ITEMS_FILE,
        ITEM_TABLE,
        *listed,
    }
    return all(
        e.name in known
        or e.name.endswith((".plan", ".plan.json"))
        or (e.name.startswith(".") and e.name.endswith(".tmp"))
        for e in directory.iterdir()
    )


# --------------------------------------------------------------------------------------- reading


def required_files(manifest: Mapping[str, Any]) -> list[str]:
    """Files every export of this head has (besides the manifest)."""
    need = ["model.onnx", ITEMS_FILE]
    if manifest.get("head") == "embedding":
        need.append(ITEM_TABLE)
    return need


def referenced_names(manifest: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """(where, name) for every file name the manifest refers to outside ``files``."""
    refs: list[tuple[str, Any]] = []
    streaming = manifest.get("streaming")
    if streaming is not None:
        per_precision = streaming.get("files") if isinstance(streaming, dict) else None
        if not isinstance(per_precision, dict):
            refs.append(("streaming.files", per_precision))
        else:
            for precision, graphs in per_precision.items():
                if not isinstance(graphs, dict):
                    refs.append((f"streaming.files.{precision}", graphs))
                    continue
                refs += [(f"streaming.files.{precision}.{k}", v) for k, v in graphs.items()]
    ann = manifest.get("ann")
    if isinstance(ann, dict) and "file" in ann:
        refs.append(("ann.file", ann["file"]))
    trt = manifest.get("tensorrt")
    if isinstance(trt, dict):
        refs += [(f"tensorrt.{k}", trt[k]) for k in ("engine", "engine_manifest") if trt.get(k) is not None]
    files = manifest.get("files")
    if isinstance(files, dict):
        for name, entry in files.items():
            if isinstance(entry, dict) and "external_data" in entry:
                side = entry["external_data"]
                if not isinstance(side, list):
                    refs.append((f"files.{name}.external_data", side))
                else:
                    refs += [(f"files.{name}.external_data", s) for s in side]
    return refs


def _check_values(directory: Path, m: dict[str, Any]) -> None:
    """Types and ranges of the values readers act on (a non-numeric ``k`` is an error here)."""
    from ..checkpoint import MAX_SEQ_LEN_LIMIT, checked_number, validate_config
    from ..serving import HEADS

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


def _check_entry(directory: Path, name: Any, entry: Any) -> None:
    if not is_plain_name(name):
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


def _open_regular(dir_fd: int, directory: Path, name: str, what: str) -> int:
    """Open ``name`` in the directory without following a symlink; refuse anything not a file."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        raise _fail(directory, f"{name} is {what} but missing") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _fail(
                directory, f"{name} is a symbolic link; m4r reads only the regular files it wrote"
            ) from None
        raise _fail(directory, f"{name} cannot be opened ({exc.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise _fail(directory, f"{name} is not a regular file")
    return fd


def _read_fd(fd: int, size: int) -> bytes:
    chunks, offset = [], 0
    while offset < size:
        block = os.pread(fd, min(size - offset, 1 << 26), offset)
        if not block:
            break
        chunks.append(block)
        offset += len(block)
    return b"".join(chunks)


def _hash_fd(fd: int) -> tuple[str, int]:
    h, offset = hashlib.sha256(), 0
    while block := os.pread(fd, 1 << 20, offset):
        h.update(block)
        offset += len(block)
    return h.hexdigest(), offset


class ArtifactFiles:
    """An export directory opened and checked once (see the module docstring); close it when done."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.manifest: dict[str, Any] = {}
        self._fds: dict[str, int] = {}
        self._dir_fd = -1

    @property
    def names(self) -> list[str]:
        """The listed names, in manifest order."""
        return list(self.manifest.get("files", {}))

    def _entry(self, name: str) -> dict[str, Any]:
        if name not in self._fds:
            raise _fail(self.directory, f"{name} is not listed and hashed in {MANIFEST_NAME}")
        entry: dict[str, Any] = self.manifest["files"][name]
        return entry

    def read(self, name: str) -> bytes:
        """The bytes of a listed file, from the descriptor checked at open, sha256 checked again."""
        entry = self._entry(name)
        data = _read_fd(self._fds[name], entry["bytes"])
        if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise _fail(self.directory, f"{name} changed while it was being read")
        return data

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        if self._dir_fd >= 0:
            os.close(self._dir_fd)
            self._dir_fd = -1

    def __enter__(self) -> ArtifactFiles:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def __copy__(self) -> ArtifactFiles:  # one owner of the descriptors (dataclasses.asdict copies)
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> ArtifactFiles:
        return self

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown: os may be gone already
            self.close()

    def _open(self) -> None:
        d = self.directory
        try:
            self._dir_fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise _fail(d, f"the directory cannot be opened ({exc.strerror})") from None
        fd = _open_regular(self._dir_fd, d, MANIFEST_NAME, "the export's manifest")
        try:
            size = os.fstat(fd).st_size
            if size > MAX_MANIFEST_BYTES:
                raise _fail(d, f"{MANIFEST_NAME} has {size} bytes (more than {MAX_MANIFEST_BYTES})")
            raw = _read_fd(fd, size)
        finally:
            os.close(fd)
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise _fail(d, f"{MANIFEST_NAME} is unreadable ({str(exc)[:200]})") from None
        if not isinstance(data, dict):
            raise _fail(d, f"{MANIFEST_NAME} is not a JSON object")
        self.manifest = data
        _check_values(d, data)
        files = data.get("files")
        if not isinstance(files, dict) or not files:
            raise _fail(d, f"{MANIFEST_NAME} lists no files")
        missing = [name for name in required_files(data) if name not in files]
        if missing:
            raise _fail(
                d,
                f"{MANIFEST_NAME} does not list {', '.join(missing)} (every {data['head']} artifact has it)",
            )
        for name, entry in files.items():
            _check_entry(d, name, entry)
        for where, name in referenced_names(data):
            if not is_plain_name(name) or name not in files:
                raise _fail(
                    d,
                    f"{MANIFEST_NAME}: {where} names {name!r}, which is not a plain file name listed and "
                    "hashed in 'files'",
                )
        for name, entry in files.items():
            fd = _open_regular(self._dir_fd, d, name, f"listed in {MANIFEST_NAME}")
            self._fds[name] = fd
            size = os.fstat(fd).st_size
            if size != entry["bytes"]:
                raise _fail(d, f"{name} has {size} bytes but {MANIFEST_NAME} lists {entry['bytes']}")
            if _hash_fd(fd) != (entry["sha256"], size):
                raise _fail(d, f"{name} does not match its sha256 in {MANIFEST_NAME} (modified or corrupt)")


def open_artifact(directory: Path | str) -> ArtifactFiles:
    """Open and check an export directory (see the module docstring); raises ArtifactIntegrityError."""
    files = ArtifactFiles(Path(directory))
    try:
        files._open()
    except BaseException:
        files.close()
        raise
    return files


def check_artifact_files(directory: Path | str) -> dict[str, Any]:
    """Check an export directory against its manifest; return the parsed manifest.

    For a check only: a reader that then loads files takes them from :func:`open_artifact`.
    """
    with open_artifact(directory) as files:
        return files.manifest


def check_checkpoint_matches(manifest: Mapping[str, Any], ckpt: Path | str) -> None:
    """Refuse ``ckpt`` when the manifest recorded another checkpoint's sha256 at export."""
    from ..fileio import sha256_file

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


# ----------------------------------------------------------------------------- ONNX Runtime


#: external tensors up to this size are put back into the graph: shape inference reads constants
#: such as Split sizes before ONNX Runtime substitutes external initializers
INLINE_EXTERNAL_BYTES = 1 << 20


def ort_session(
    files: ArtifactFiles, name: str, options: Any = None, providers: Sequence[str] = ("CPUExecutionProvider",)
) -> Any:
    """An InferenceSession of the listed ONNX file ``name`` built from its checked bytes.

    Side files named in the entry's ``external_data`` are read from their checked descriptors:
    tensors up to :data:`INLINE_EXTERNAL_BYTES` go back into the (small) graph, larger ones are
    given to ONNX Runtime with ``add_external_initializers``; ONNX Runtime opens no path itself.
    """
    import onnxruntime as ort

    so = options if options is not None else ort.SessionOptions()
    data = files.read(name)
    side = files.manifest["files"][name].get("external_data") or []
    keep: list[Any] = []
    if side:
        data, names, keep = _external_initializers(files, name, data, side)
        if names:
            so.add_external_initializers(names, keep)
    sess = ort.InferenceSession(data, so, providers=list(providers))
    sess._m4r_external = keep  # the initializers' memory must outlive the session
    return sess


def _external_initializers(
    files: ArtifactFiles, name: str, data: bytes, side: Iterable[str]
) -> tuple[bytes, list[str], list[Any]]:
    """-> (the graph with its small external tensors inlined, names and OrtValues of the large ones)."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import helper

    proto = onnx.load_model_from_string(data)  # small: the weights live in the side files
    blobs = {s: files.read(s) for s in side}
    names, values = [], []
    for init in proto.graph.initializer:
        if init.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in init.external_data}
        location = info.get("location", "")
        if location not in blobs:
            where = f"{name}: tensor {init.name} is in {location!r}"
            raise _fail(files.directory, f"{where}, which its entry's external_data does not list")
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type))
        blob = blobs[location]
        offset, length = int(info.get("offset", 0)), int(info.get("length", len(blob)))
        count = int(np.prod(init.dims)) if init.dims else 1
        if length != count * dtype.itemsize or offset + length > len(blob):
            raise _fail(files.directory, f"{name}: tensor {init.name} does not fit {location}")
        if length <= INLINE_EXTERNAL_BYTES:
            init.raw_data = blob[offset : offset + length]
            del init.external_data[:]
            init.data_location = onnx.TensorProto.DEFAULT
            continue
        array = np.frombuffer(blob, dtype=dtype, count=count, offset=offset).reshape(tuple(init.dims))
        names.append(init.name)
        values.append(ort.OrtValue.ortvalue_from_numpy(array))
    return proto.SerializeToString(), names, values
