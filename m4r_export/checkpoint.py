"""Checkpoints: our own safe format, and checkpoints written by the reference code (RecBole).

Own format (``torch.load(weights_only=True)`` loads it; no code can run on load)::

    {"format": "m4r-checkpoint", "format_version": 1,
     "config": {...Mamba4RecConfig...}, "state_dict": {...}, "item_tokens": ["[PAD]", ...],
     "meta": {...plain values: epoch, metrics, data path, max_seq_len, tool version...}}

Reference checkpoints (RecBole's ``Trainer._save_checkpoint``) pickle a ``recbole`` ``Config``
object next to the ``state_dict``. Both kinds are read with :class:`RestrictedUnpickler`, which never
imports or calls anything outside a short allowlist: every ``recbole.*`` global becomes an inert
:class:`CapturedObject` whose fields we read, tensors are rebuilt by torch's own rebuild helpers,
and any other global (``os.system``, ``builtins.eval``, ...) aborts the load with an error.
RecBole checkpoints carry no item vocabulary: pass the dataset they were trained on to map raw
item tokens (RecBole assigns indices in order of first appearance after filtering, as we do).

Memory is bounded by the file's size whatever it claims: every zip record must be stored
uncompressed (checked in the central directory before anything is read), every tensor must lie in
bytes the file holds (no zero strides, no overlapping or shared data claiming more than its
storage), and containers may nest at most :data:`MAX_NESTING` deep (checked without recursion).
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import math
import os
import pickle
import struct
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .errors import M4RError, UsageError
from .fileio import atomic_write
from .model import Mamba4Rec, Mamba4RecConfig
from .safeopen import open_regular

FORMAT_TAG = "m4r-checkpoint"
FORMAT_VERSION = 1


class UnsafeCheckpointError(M4RError):
    """The pickle tried to import or call something that is not on the allowlist."""


@dataclass
class Checkpoint:
    config: Mamba4RecConfig
    state_dict: dict[str, torch.Tensor]
    item_tokens: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    source_format: str = FORMAT_TAG  # or "recbole"

    def build_model(self) -> Mamba4Rec:
        source = self.meta.get("path", "checkpoint")
        check_against_tensors(self.config, self.state_dict, source)  # before allocating anything
        with torch.device("meta"):  # no initialised weights: the checkpoint's tensors are assigned below
            model = Mamba4Rec.from_config(self.config)
        check_state_dict(model, self.state_dict, source)
        # assign: the parameters become the checkpoint's tensors (a 10M-item table is 2.5 GB: no copy)
        model.load_state_dict(self.state_dict, strict=True, assign=True)
        model.item_tokens = self.item_tokens
        return model.eval()


def save_checkpoint(
    path: str | Path, model: Mamba4Rec, item_tokens: list[str] | None, meta: dict[str, Any] | None = None
) -> None:
    """Write ``model`` in the own format, atomically."""
    if item_tokens is not None and len(item_tokens) != model.n_items:
        raise ValueError(f"vocabulary has {len(item_tokens)} tokens but the model has {model.n_items} items")
    payload = {
        "format": FORMAT_TAG,
        "format_version": FORMAT_VERSION,
        "config": model.config.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "item_tokens": list(item_tokens) if item_tokens is not None else None,
        "meta": {"tool": f"m4r-export {__version__}", **(meta or {})},
    }
    with atomic_write(path, "wb") as fh:
        torch.save(payload, fh)


# --------------------------------------------------------------------------- restricted unpickling


class CapturedObject:
    """Inert stand-in for a pickled ``recbole`` object (Config, enums): it only stores data."""

    qualname = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<captured {self.qualname} args={self.args!r}>"


_captured_classes: dict[str, type[CapturedObject]] = {}


def _captured_class(qualname: str) -> type[CapturedObject]:
    if qualname not in _captured_classes:
        _captured_classes[qualname] = type(
            qualname.rsplit(".", 1)[-1], (CapturedObject,), {"qualname": qualname}
        )
    return _captured_classes[qualname]


def _safe_reconstructor(cls: Any, base: Any, state: Any) -> Any:
    if not (isinstance(cls, type) and issubclass(cls, CapturedObject)) or base is not object:
        raise UnsafeCheckpointError(f"refusing to load: copyreg reconstruction of {cls!r} is not allowed")
    return object.__new__(cls)


def _storage_types() -> dict[str, Any]:
    return {
        f"torch.{name}": getattr(torch, name)
        for name in dir(torch)
        if name.endswith("Storage") and isinstance(getattr(torch, name), type)
    }


#: globals a pickle may *call* (REDUCE / NEWOBJ); storage classes and dtypes may only be named
_CALLABLE: dict[str, Any] = {
    "collections.OrderedDict": collections.OrderedDict,
    "torch._utils._rebuild_tensor_v2": torch._utils._rebuild_tensor_v2,
    "torch._utils._rebuild_parameter": torch._utils._rebuild_parameter,
    "torch.device": torch.device,
    "torch.Size": torch.Size,
    "builtins.set": set,
    "builtins.frozenset": frozenset,
    "builtins.slice": slice,
    "copyreg._reconstructor": _safe_reconstructor,
}
_NAMED_ONLY: dict[str, Any] = {
    "builtins.object": object,
    **_storage_types(),
    **{f"torch.{n}": getattr(torch, n) for n in dir(torch) if isinstance(getattr(torch, n), torch.dtype)},
}


#: how deep containers (lists, tuples, dicts, sets, captured objects) may nest in a checkpoint's pickle;
#: m4r's own files nest 4 deep, RecBole's Config about 6
MAX_NESTING = 100


def _too_deep(source: str, what: str) -> UsageError:
    return UsageError(
        f"{source}: refusing to load: its pickle {what} (checkpoints nest a few levels). The file is "
        "corrupt or hostile; re-save it with `m4r train`"
    )


def brief(value: Any, width: int = 40) -> str:
    """A short description of an untrusted value that never recurses or expands (for messages).

    Scalars are shown (strings and numbers cut to ``width`` characters, integers too large to print
    by their size); containers by type and length only: ``repr`` of a deeply nested or huge
    container would recurse or allocate without bound.
    """
    if value is None or isinstance(value, (bool, float)):
        return repr(value)[:width]
    if isinstance(value, int):
        return (
            repr(value)[:width] if value.bit_length() <= 256 else f"<an integer of {value.bit_length()} bits>"
        )
    if isinstance(value, (str, bytes)):
        return repr(value[:width])[: width + 3]
    try:
        size = f" of {len(value)}"
    except Exception:
        size = ""
    return f"<{type(value).__name__}{size}>"


def _refuse(what: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"refusing to load: the checkpoint's pickle {what}. A RecBole checkpoint only needs recbole "
        "objects and tensors. Do not load files from untrusted sources; if this is a genuine checkpoint, "
        "re-save it with `m4r train` or report it."
    )


#: the pure-Python unpickler (its opcode table can be overridden; the C one's cannot)
_PyUnpickler: Any = pickle._Unpickler


class RestrictedUnpickler(_PyUnpickler):
    """Pure-Python unpickler that resolves, calls and mutates only what a RecBole checkpoint needs.

    * ``find_class``: allowlisted globals; every ``recbole.*`` global becomes a :class:`CapturedObject`.
    * REDUCE / NEWOBJ / INST / OBJ: only the callables of :data:`_CALLABLE` and captured classes
      (storage classes and dtypes can be named in a tensor's persistent id, never called: a
      ``torch.FloatStorage(10**12)`` would allocate).
    * BUILD (``__setstate__`` / attribute state): only on a captured object (which just stores the
      state) or an ``OrderedDict`` (a state_dict's ``_metadata``, dropped). Anything else, a class
      in particular (``torch.TypedStorage.dump_patches = True``), is refused: nothing allowlisted
      can be mutated.
    * Protocol 0-2 pickles name Python 2 modules (``__builtin__.set``, ``copy_reg._reconstructor``):
      they are mapped onto Python 3 names with pickle's own table (``_compat_pickle``), exactly as
      ``pickle.Unpickler`` does, and then checked against the same allowlist.
    * Tuples may nest at most :data:`MAX_NESTING` deep: hashing a tuple (a dict key, a set member)
      recurses in C without a limit, and a 200,000-deep one crashes the interpreter.
    The C unpickler cannot be restricted per opcode, hence the Python one (the tensors' bytes are
    not in the pickle, so speed does not matter).
    """

    dispatch: dict[int, Any] = dict(_PyUnpickler.dispatch)
    #: the file, for messages
    source = "checkpoint"

    def find_class(self, module: str, name: str) -> Any:
        if self.proto < 3 and self.fix_imports:  # as pickle.Unpickler.find_class
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            elif module in _compat_pickle.IMPORT_MAPPING:
                module = _compat_pickle.IMPORT_MAPPING[module]
        key = f"{module}.{name}"
        if key in _CALLABLE:
            return _CALLABLE[key]
        if key in _NAMED_ONLY:
            return _NAMED_ONLY[key]
        if module == "recbole" or module.startswith("recbole."):
            return _captured_class(key)
        raise _refuse(f"references {key!r}, which is not on the allowlist")

    @staticmethod
    def _check_callable(func: Any) -> None:
        if isinstance(func, type) and issubclass(func, CapturedObject):
            return
        if any(func is allowed for allowed in _CALLABLE.values()):
            return
        raise _refuse(f"calls {getattr(func, '__qualname__', func)!r}, which may only be named, not called")

    def load_reduce(self) -> None:
        args = self.stack.pop()
        func = self.stack[-1]
        self._check_callable(func)
        self.stack[-1] = func(*args)

    def load_newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        self._check_callable(cls)
        self.append(cls.__new__(cls, *args))

    def load_newobj_ex(self) -> None:
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        self._check_callable(cls)
        self.append(cls.__new__(cls, *args, **kwargs))

    def _instantiate(self, klass: Any, args: Any) -> None:
        self._check_callable(klass)
        self.append(klass(*args))

    def load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, CapturedObject):
            inst.__setstate__(state)
        elif type(inst) is collections.OrderedDict:
            pass  # a state_dict's ``_metadata`` attribute: not needed, not applied
        else:
            raise _refuse(
                f"sets state on {type(inst).__name__} {brief(inst, 80)}, which is not a plain data record"
            )

    def _track_tuple(self) -> None:
        """Record the depth of the tuple just built (the stack top); refuse beyond MAX_NESTING."""
        top = self.stack[-1]
        depths = self.__dict__.setdefault("_tuple_depths", {})
        depth = 1 + max((depths.get(id(x), (None, 1))[1] for x in top if type(x) is tuple), default=0)
        if depth > MAX_NESTING:
            raise _too_deep(self.source, f"nests tuples more than {MAX_NESTING} levels deep")
        if depth > 1:
            depths[id(top)] = (top, depth)  # the tuple is kept alive, so its id stays its own

    def load_tuple(self) -> None:
        _PyUnpickler.load_tuple(self)
        self._track_tuple()

    def load_tuple1(self) -> None:
        _PyUnpickler.load_tuple1(self)
        self._track_tuple()

    def load_tuple2(self) -> None:
        _PyUnpickler.load_tuple2(self)
        self._track_tuple()

    def load_tuple3(self) -> None:
        _PyUnpickler.load_tuple3(self)
        self._track_tuple()

    dispatch[pickle.TUPLE[0]] = load_tuple
    dispatch[pickle.TUPLE1[0]] = load_tuple1
    dispatch[pickle.TUPLE2[0]] = load_tuple2
    dispatch[pickle.TUPLE3[0]] = load_tuple3
    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.NEWOBJ[0]] = load_newobj
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex
    dispatch[pickle.BUILD[0]] = load_build


#: a zip local file header: signature, versions/flags/method/time/date, crc, sizes, name/extra lengths
_LOCAL_HEADER = struct.Struct("<4s5H3L2H")


def _check_records(zf: zipfile.ZipFile, path: Path, size: int) -> None:
    """Every record stored uncompressed and inside the file, read from the central directory alone.

    ``torch.save`` stores records uncompressed; a deflated record could inflate to any size (a 1 MB
    file to 1 GB), so it is refused before anything is read or inflated.
    """
    for info in zf.infolist():
        if info.compress_type != zipfile.ZIP_STORED:
            raise UsageError(
                f"checkpoint {path}: record {brief(info.filename, 80)} is compressed (zip method "
                f"{info.compress_type}); m4r reads only uncompressed records, as torch.save writes them, so "
                "that no record expands beyond the file. Re-save the checkpoint with torch.save"
            )
        if info.file_size != info.compress_size or info.header_offset + info.file_size > size:
            raise UsageError(
                f"checkpoint {path} is truncated or corrupt (record {brief(info.filename, 80)} claims "
                f"{info.file_size} bytes the file does not hold); re-copy it or re-run `m4r train`"
            )


def _read_stored(fh: io.BufferedReader, info: zipfile.ZipInfo, path: Path) -> bytearray:
    """A stored record's bytes, read straight into one buffer (one copy in memory, CRC checked)."""
    fh.seek(info.header_offset)
    header = fh.read(_LOCAL_HEADER.size)
    if len(header) != _LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
        raise UsageError(f"checkpoint {path} is truncated or corrupt; re-copy it or re-run `m4r train`")
    name_len, extra_len = _LOCAL_HEADER.unpack(header)[-2:]
    fh.seek(info.header_offset + _LOCAL_HEADER.size + name_len + extra_len)
    buf = bytearray(info.file_size)
    if fh.readinto(buf) != info.file_size or zlib.crc32(buf) != info.CRC:
        raise UsageError(
            f"checkpoint {path}: record {brief(info.filename, 80)} is truncated or corrupt; re-copy it or "
            "re-run `m4r train`"
        )
    return buf


def _restricted_zip_load(fh: io.BufferedReader, path: Path) -> Any:
    """Read a torch zip checkpoint with :class:`RestrictedUnpickler` (no ``torch.load``).

    torch's own loader acts on module-level state for some pickles (``dump_patches``, source
    checks writing ``.patch`` files), inflates compressed records, and hashes dict keys of any depth
    (a deep tuple crashes it); this reader only maps each storage record of the zip to a tensor
    storage, after :func:`_check_records`, so no record can expand beyond the file's own size.
    """
    size = os.fstat(fh.fileno()).st_size
    with zipfile.ZipFile(fh) as zf:
        _check_records(zf, path, size)
        pickles = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise UsageError(f"checkpoint {path} is not a PyTorch checkpoint (no single */data.pkl record)")
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = prefix + "byteorder"
        if byteorder in zf.namelist() and zf.read(byteorder) != b"little":
            raise UsageError(f"checkpoint {path} was written on a big-endian machine; re-save it on this one")
        storages: dict[str, Any] = {}

        def persistent_load(pid: Any) -> Any:
            if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] in ("storage", b"storage")):
                raise _refuse(f"uses persistent id {brief(pid)} (only tensor storages are allowed)")
            storage_type, key, _location, numel = pid[1:]
            if not any(storage_type is t for t in _NAMED_ONLY.values() if isinstance(t, type)):
                raise _refuse(f"names storage type {brief(storage_type)}")
            key = str(key)
            if key not in storages:
                with warnings.catch_warnings():  # TypedStorage.dtype warns that TypedStorage is deprecated
                    warnings.simplefilter("ignore")
                    dtype = torch.uint8 if storage_type is torch.UntypedStorage else storage_type.dtype
                info = zf.getinfo(f"{prefix}data/{key}")
                itemsize = torch.empty((), dtype=dtype).element_size()
                if not isinstance(numel, int) or info.file_size != numel * itemsize:
                    raise UsageError(f"checkpoint {path}: storage record {brief(key)} is corrupt")
                raw = _read_stored(fh, info, path)
                untyped = torch.frombuffer(raw, dtype=torch.uint8).untyped_storage() if raw else None
                if untyped is None:
                    untyped = torch.UntypedStorage(0)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    storages[key] = torch.storage.TypedStorage(
                        wrap_storage=untyped, dtype=dtype, _internal=True
                    )
            return storages[key]

        # read whole (it is stored, so no larger than the file): unpickling from a zip stream costs a
        # Python-level zip read per opcode, twice the time of the whole load for a large vocabulary
        data = _read_stored(fh, zf.getinfo(pickles[0]), path)
        with io.BytesIO(data) as stream:
            unpickler = RestrictedUnpickler(stream)
            unpickler.persistent_load = persistent_load
            unpickler.source = f"checkpoint {path}"
            return unpickler.load()


def check_nesting(obj: Any, source: str) -> None:
    """Refuse containers nested deeper than :data:`MAX_NESTING`, or a container holding itself.

    Iterative (an explicit stack; each container's height is computed once, so shared containers
    cost nothing twice): a 200,000-deep list is refused without recursion. Nothing formats, compares
    or walks an untrusted value before this check.
    """

    kinds = (list, tuple, dict, set, frozenset, CapturedObject)

    def frame(x: Any) -> list[Any]:
        if isinstance(x, dict):
            inner = [v for kv in x.items() for v in kv if isinstance(v, kinds)]
        else:
            values = vars(x).values() if isinstance(x, CapturedObject) else x
            inner = [v for v in values if isinstance(v, kinds)]
        return [x, iter(inner), 0]  # node, the containers in it, the greatest height among them so far

    if not isinstance(obj, kinds):
        return
    height: dict[int, int] = {}  # id -> levels of nesting from that container down (1: flat)
    on_path = {id(obj)}
    stack = [frame(obj)]
    while stack:
        top = stack[-1]
        child = next(top[1], stack)  # the stack itself marks the end: it is never an element
        if child is stack:
            stack.pop()
            on_path.discard(id(top[0]))
            height[id(top[0])] = h = top[2] + 1
            if stack:
                stack[-1][2] = max(stack[-1][2], h)
        elif id(child) in on_path:
            raise _too_deep(source, "holds a container that contains itself")
        elif id(child) in height:  # met before: its height is known
            top[2] = max(top[2], height[id(child)])
            if len(stack) + top[2] > MAX_NESTING:
                raise _too_deep(source, f"nests containers more than {MAX_NESTING} levels deep")
        elif len(stack) >= MAX_NESTING:
            raise _too_deep(source, f"nests containers more than {MAX_NESTING} levels deep")
        else:
            on_path.add(id(child))
            stack.append(frame(child))


# --------------------------------------------------------------------------------------- reading

#: the longest history a checkpoint's meta may ask for (an export allocates batch x max_seq_len)
MAX_SEQ_LEN_LIMIT = 1 << 16

#: field -> (kind, min, max): what a model config may ask for. Shapes are then checked against
#: the tensors actually present, so no module is built larger than the file's own weights.
CONFIG_LIMITS: dict[str, tuple[type, float, float]] = {
    "n_items": (int, 2, 2**31 - 1),
    "hidden_size": (int, 1, 1 << 16),
    "num_layers": (int, 1, 1024),
    "d_state": (int, 1, 1024),
    "d_conv": (int, 1, 64),
    "expand": (int, 1, 64),
    "dropout_prob": (float, 0.0, 1.0),
}


def checked_number(value: Any, field_name: str, kind: type, lo: float, hi: float, source: str) -> Any:
    """``value`` as ``kind`` if it is such a number in [lo, hi] (float: [lo, hi)); else UsageError."""
    what = "an integer" if kind is int else "a number"
    rng = f"[{lo:g}, {hi:g}]" if kind is int else f"[{lo:g}, {hi:g})"
    ok_type = isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        ok_type = ok_type or isinstance(value, float)
    if not ok_type:
        raise UsageError(
            f"{source}: {field_name} is {brief(value)} ({type(value).__name__}); it must be {what} in {rng}"
        )
    inside = lo <= value <= hi if kind is int else (math.isfinite(value) and lo <= value < hi)
    if not inside:
        raise UsageError(f"{source}: {field_name} = {brief(value)} is out of range; allowed: {what} in {rng}")
    return kind(value)


def validate_config(values: Any, source: str) -> Mamba4RecConfig:
    """A :class:`Mamba4RecConfig` from untrusted values: every field typed and range-checked."""
    if not isinstance(values, dict):
        raise UsageError(f"{source}: the checkpoint's config is a {type(values).__name__}, not a dict")
    out: dict[str, Any] = {}
    for name, (kind, lo, hi) in CONFIG_LIMITS.items():
        if name not in values:
            if name == "n_items":
                raise UsageError(f"{source}: the checkpoint's config has no n_items; re-run `m4r train`")
            continue
        out[name] = checked_number(values[name], name, kind, lo, hi, source)
    return Mamba4RecConfig(**out)


def expected_shapes(config: Mamba4RecConfig) -> dict[str, tuple[int, ...]]:
    """State-dict names and shapes the model of ``config`` has (computed, nothing allocated)."""
    h, n = config.hidden_size, config.d_state
    di, rank = config.expand * h, math.ceil(h / 16)
    shapes: dict[str, tuple[int, ...]] = {
        "item_embedding.weight": (config.n_items, h),
        "LayerNorm.weight": (h,),
        "LayerNorm.bias": (h,),
    }
    for i in range(config.num_layers):
        p = f"mamba_layers.{i}."
        shapes.update(
            {
                p + "mamba.A_log": (di, n),
                p + "mamba.D": (di,),
                p + "mamba.in_proj.weight": (2 * di, h),
                p + "mamba.conv1d.weight": (di, 1, config.d_conv),
                p + "mamba.conv1d.bias": (di,),
                p + "mamba.x_proj.weight": (rank + 2 * n, di),
                p + "mamba.dt_proj.weight": (di, rank),
                p + "mamba.dt_proj.bias": (di,),
                p + "mamba.out_proj.weight": (h, di),
                p + "LayerNorm.weight": (h,),
                p + "LayerNorm.bias": (h,),
                p + "ffn.w_1.weight": (4 * h, h),
                p + "ffn.w_1.bias": (4 * h,),
                p + "ffn.w_2.weight": (h, 4 * h),
                p + "ffn.w_2.bias": (h,),
                p + "ffn.LayerNorm.weight": (h,),
                p + "ffn.LayerNorm.bias": (h,),
            }
        )
    return shapes


def check_against_tensors(config: Mamba4RecConfig, state_dict: Any, source: str) -> None:
    """Refuse a config that contradicts the tensors present, before any module is built.

    The layer count is compared first (a config asking for 100000 layers fails here without
    computing 100000 layers' shapes); then every name and shape. The model built afterwards has
    exactly the file's tensors' sizes, and :func:`check_tensor_data` makes those sizes real bytes of
    the file, so a small file cannot make us allocate a large model.
    """
    if not isinstance(state_dict, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state_dict.items()
    ):
        raise UsageError(f"{source}: the checkpoint's state_dict is not a mapping of names to tensors")
    check_tensor_data(state_dict, source)
    layers = {k.split(".")[1] for k in state_dict if k.startswith("mamba_layers.") and k.count(".") >= 2}
    if len(layers) != config.num_layers:
        raise UsageError(
            f"{source}: config says num_layers = {config.num_layers} but the weights hold {len(layers)} "
            "layer(s); the checkpoint's config and weights come from different models"
        )
    emb = state_dict.get("item_embedding.weight")
    if emb is not None and tuple(emb.shape) != (config.n_items, config.hidden_size):
        raise UsageError(
            f"{source}: item_embedding.weight has shape {tuple(emb.shape)} but the config says n_items = "
            f"{config.n_items}, hidden_size = {config.hidden_size}; the checkpoint's config and weights "
            "come from different models"
        )
    expected = expected_shapes(config)
    _check_names_and_shapes(expected, state_dict, source)
    for name in expected:
        if not state_dict[name].is_floating_point():
            raise UsageError(
                f"{source}: tensor {name} has dtype {state_dict[name].dtype}, not floating point"
            )


def read_checkpoint(path: str | Path, dataset: Any = None) -> Checkpoint:
    """Read an own-format or RecBole checkpoint (no model is built).

    Only torch's zip format is read (``torch.save`` has written it since torch 1.6): the legacy
    format's loader acts on module-level state for some pickles. Both formats are read with
    :func:`_restricted_zip_load` (own-format files are also loadable with
    ``torch.load(weights_only=True)``, which this reader is stricter than), then checked with
    :func:`check_nesting` before anything looks at a value. ``dataset`` (a
    :class:`m4r_export.data.SequenceDataset`) supplies the item vocabulary of a RecBole checkpoint.
    """
    p = Path(path)
    with open_regular(p, "checkpoint", "pass the model.pt file written by `m4r train`") as fh:
        obj = _load_zip(fh, p)
    check_nesting(obj, f"checkpoint {p}")
    if not isinstance(obj, dict):
        raise UsageError(f"{p} holds a {type(obj).__name__}, not a checkpoint dict; {_FORMATS_HINT}")
    if obj.get("format") == FORMAT_TAG:
        return _from_own(p, obj)
    if "state_dict" in obj and "config" in obj:
        return _from_recbole(p, obj, dataset)
    keys = sorted(brief(k, 20) for k in list(obj)[:8])
    raise UsageError(f"{p} is a dict with keys {keys}, not a known checkpoint; {_FORMATS_HINT}")


def _load_zip(fh: io.BufferedReader, p: Path) -> Any:
    if os.fstat(fh.fileno()).st_size == 0:
        raise UsageError(f"checkpoint {p} is empty (0 bytes); re-copy it or re-run `m4r train`")
    if not zipfile.is_zipfile(fh):
        fh.seek(0)
        head = fh.read(4)
        if head == b"PK\x03\x04":  # a zip whose central directory (at the end) is missing
            raise UsageError(f"checkpoint {p} is truncated or corrupt; re-copy it or re-run `m4r train`")
        if head[:1] == b"\x80":
            raise UsageError(
                f"checkpoint {p} is a bare pickle (PyTorch's legacy pre-1.6 format, or not a checkpoint), "
                "which m4r does not load; re-save it with torch.save from torch >= 1.6"
            )
        raise UsageError(
            f"{p} is not a PyTorch checkpoint (expected the m4r format written by `m4r train` or a "
            "RecBole checkpoint of the reference Mamba4Rec code)"
        )
    try:
        return _restricted_zip_load(fh, p)
    except M4RError:
        raise
    except Exception as exc:
        raise UsageError(
            f"checkpoint {p} is truncated or corrupt ({type(exc).__name__}: {str(exc)[:200]}); "
            "re-copy it or re-run `m4r train`"
        ) from exc


_FORMATS_HINT = (
    "m4r reads its own format (`m4r train`) and RecBole checkpoints of the reference Mamba4Rec code"
)


def _from_own(path: Path, obj: dict[str, Any]) -> Checkpoint:
    version = obj.get("format_version")
    if version != FORMAT_VERSION:
        raise UsageError(
            f"{path} has m4r checkpoint format version {version}; this m4r reads {FORMAT_VERSION}"
        )
    config = validate_config(obj.get("config"), str(path))
    state_dict: dict[str, torch.Tensor] = obj.get("state_dict")  # type: ignore[assignment]
    check_against_tensors(config, state_dict, str(path))
    meta = obj.get("meta") or {}
    if not isinstance(meta, dict):
        raise UsageError(f"{path}: the checkpoint's meta is a {type(meta).__name__}, not a dict")
    meta = dict(meta)
    if meta.get("max_seq_len") is not None:
        meta["max_seq_len"] = checked_number(
            meta["max_seq_len"], "meta.max_seq_len", int, 1, MAX_SEQ_LEN_LIMIT, str(path)
        )
    tokens = obj.get("item_tokens")
    if tokens is not None and (
        not isinstance(tokens, list)
        or len(tokens) != config.n_items
        or not all(isinstance(t, str) for t in tokens)
    ):
        raise UsageError(
            f"{path}: item_tokens must be a list of {config.n_items} strings (one per item index); "
            "re-run `m4r train`"
        )
    meta["path"] = str(path)
    return Checkpoint(config, state_dict, tokens, meta, FORMAT_TAG)


def _config_fields(config: Any) -> dict[str, Any]:
    """Hyper-parameters from a captured RecBole Config (its ``final_config_dict``)."""
    state = config.state if isinstance(config, CapturedObject) else config
    if isinstance(state, dict):
        for key in ("final_config_dict", "_final_config_dict"):
            if isinstance(state.get(key), dict):
                return dict(state[key])
        return dict(state)
    raise UsageError("RecBole checkpoint has no readable config fields (final_config_dict)")


def _from_recbole(path: Path, obj: dict[str, Any], dataset: Any) -> Checkpoint:
    fields_ = _config_fields(obj["config"])
    raw_sd = obj["state_dict"]
    if not isinstance(raw_sd, dict):
        raise UsageError(f"{path}: the RecBole checkpoint's state_dict is not a dict")
    state_dict = {k: v for k, v in raw_sd.items() if isinstance(v, torch.Tensor)}
    emb = state_dict.get("item_embedding.weight")
    if emb is None or emb.dim() != 2:
        raise UsageError(f"{path}: RecBole checkpoint has no item_embedding.weight; is it a Mamba4Rec model?")
    model_name = fields_.get("model")
    if model_name not in (None, "Mamba4Rec"):
        raise UsageError(f"{path} is a RecBole checkpoint of model {model_name!r}, not Mamba4Rec")
    defaults = {"hidden_size": int(emb.shape[1]), "num_layers": 1, "d_state": 32, "d_conv": 4, "expand": 2}
    values: dict[str, Any] = {"n_items": int(emb.shape[0])}
    for name in ("hidden_size", "num_layers", "d_state", "d_conv", "expand", "dropout_prob"):
        values[name] = fields_.get(name, defaults.get(name, 0.2))
    config = validate_config(values, f"{path} (RecBole config)")
    check_against_tensors(config, state_dict, str(path))
    tokens = None
    if dataset is not None:
        tokens = list(dataset.item_tokens)
        if len(tokens) != config.n_items:
            raise UsageError(
                f"{path} has {config.n_items} item rows but the dataset maps {len(tokens)} items; pass the "
                "dataset (and filtering thresholds) the reference model was trained on"
            )
    meta = {
        "path": str(path),
        "source": "recbole",
        "max_seq_len": checked_number(
            fields_.get("MAX_ITEM_LIST_LENGTH", 50),
            "MAX_ITEM_LIST_LENGTH",
            int,
            1,
            MAX_SEQ_LEN_LIMIT,
            str(path),
        ),
        "dataset": str(fields_.get("dataset", "")),
        "epoch": obj.get("epoch"),
    }
    return Checkpoint(config, state_dict, tokens, meta, "recbole")


def check_tensor_data(state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Every tensor's values must be bytes its storage holds: no repeats, no sharing beyond it.

    A stride-0 view (``expand``) of one stored element can claim 4M x 64 values; so can rows that
    overlap (stride 1 for a 64-wide row), or many tensors viewing the same bytes. Building the model
    copies every claimed value, so each is refused here: no zero stride along a dimension longer than
    1, no tensor needing more bytes than its storage, and no more bytes claimed in all than the
    distinct storages hold.
    """
    held: dict[tuple[int, int], int] = {}
    claimed = 0
    for name, t in state_dict.items():
        if t.layout != torch.strided or t.is_quantized or t.device.type == "meta":
            raise UsageError(f"{source}: tensor {brief(name, 80)} is not a plain dense tensor ({t.layout})")
        need = t.numel() * t.element_size()
        storage = t.untyped_storage()
        repeats = any(stride == 0 and size > 1 for size, stride in zip(t.shape, t.stride(), strict=True))
        if repeats or need > storage.nbytes() - t.storage_offset() * t.element_size():
            raise UsageError(
                f"{source}: tensor {brief(name, 80)} claims shape {tuple(t.shape)} ({need:,} bytes) over "
                f"{storage.nbytes():,} bytes of data (strides {t.stride()}); the file is corrupt or built to "
                "exhaust memory. Re-save the checkpoint with `m4r train` or torch.save"
            )
        held[(storage.data_ptr(), storage.nbytes())] = storage.nbytes()
        claimed += need
    if claimed > sum(held.values()):
        raise UsageError(
            f"{source}: its tensors claim {claimed:,} bytes but share {sum(held.values()):,} bytes of data; "
            "the file is corrupt or built to exhaust memory. Re-save the checkpoint with `m4r train`"
        )


def check_state_dict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Refuse a state dict whose keys or shapes contradict the config, naming the tensor."""
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    _check_names_and_shapes(expected, state_dict, source)


def _check_names_and_shapes(
    expected: dict[str, tuple[int, ...]], state_dict: dict[str, torch.Tensor], source: str
) -> None:
    """Refuse missing/unexpected tensors and shape mismatches, naming the first offender."""
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise UsageError(
            f"{source}: state dict does not match its config "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]}); "
            "the checkpoint's config and weights come from different models"
        )
    for name, shape in expected.items():
        got = tuple(state_dict[name].shape)
        if got != shape:
            raise UsageError(
                f"{source}: tensor {name} has shape {got} but the config implies {shape}; "
                "the checkpoint's config and weights come from different models"
            )


def load_checkpoint(path: str | Path, dataset: Any = None) -> Mamba4Rec:
    """Read a checkpoint (own format or RecBole) and return the model in eval mode."""
    return read_checkpoint(path, dataset).build_model()


def checkpoint_bytes(model: Mamba4Rec, item_tokens: list[str] | None = None) -> bytes:
    """In-memory own-format checkpoint (for tests and DDP broadcast checks)."""
    buf = io.BytesIO()
    torch.save(
        {
            "format": FORMAT_TAG,
            "format_version": FORMAT_VERSION,
            "config": model.config.to_dict(),
            "state_dict": model.state_dict(),
            "item_tokens": item_tokens,
            "meta": {},
        },
        buf,
    )
    return buf.getvalue()
