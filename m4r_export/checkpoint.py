"""Checkpoints: our own safe format, and checkpoints written by the reference code (RecBole).

Own format (``torch.load(weights_only=True)`` loads it; no code can run on load)::

    {"format": "m4r-checkpoint", "format_version": 1,
     "config": {...Mamba4RecConfig...}, "state_dict": {...}, "item_tokens": ["[PAD]", ...],
     "meta": {...plain values: epoch, metrics, data path, max_seq_len, tool version...}}

Reference checkpoints (RecBole's ``Trainer._save_checkpoint``) pickle a ``recbole`` ``Config``
object next to the ``state_dict``. They are read with :class:`RestrictedUnpickler`, which never
imports or calls anything outside a short allowlist: every ``recbole.*`` global becomes an inert
:class:`CapturedObject` whose fields we read, tensors are rebuilt by torch's own rebuild helpers,
and any other global (``os.system``, ``builtins.eval``, ...) aborts the load with an error.
RecBole checkpoints carry no item vocabulary: pass the dataset they were trained on to map raw
item tokens (RecBole assigns indices in order of first appearance after filtering, as we do).
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import stat
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .errors import M4RError, UsageError
from .fileio import atomic_write
from .model import Mamba4Rec, Mamba4RecConfig

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
    The C unpickler cannot be restricted per opcode, hence the Python one (the tensors' bytes are
    not in the pickle, so speed does not matter).
    """

    dispatch: dict[int, Any] = dict(_PyUnpickler.dispatch)

    def find_class(self, module: str, name: str) -> Any:
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
                f"sets state on {type(inst).__name__} {inst!r:.80}, which is not a plain data record"
            )

    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.NEWOBJ[0]] = load_newobj
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex
    dispatch[pickle.BUILD[0]] = load_build


def _restricted_zip_load(path: Path) -> Any:
    """Read a torch zip checkpoint with :class:`RestrictedUnpickler` (no ``torch.load``).

    torch's own loader acts on module-level state for some pickles (``dump_patches``, source
    checks writing ``.patch`` files); this reader only maps each storage record of the zip to a
    tensor storage. Records must be stored uncompressed (as ``torch.save`` writes them), so no
    record can expand beyond the file's own size.
    """
    with zipfile.ZipFile(path) as zf:
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
                raise _refuse(f"uses persistent id {str(pid)[:80]!r} (only tensor storages are allowed)")
            storage_type, key, _location, numel = pid[1:]
            if not any(storage_type is t for t in _NAMED_ONLY.values() if isinstance(t, type)):
                raise _refuse(f"names storage type {storage_type!r}")
            key = str(key)
            if key not in storages:
                with warnings.catch_warnings():  # TypedStorage.dtype warns that TypedStorage is deprecated
                    warnings.simplefilter("ignore")
                    dtype = torch.uint8 if storage_type is torch.UntypedStorage else storage_type.dtype
                info = zf.getinfo(f"{prefix}data/{key}")
                itemsize = torch.empty((), dtype=dtype).element_size()
                if info.compress_type != zipfile.ZIP_STORED or info.file_size != int(numel) * itemsize:
                    raise UsageError(f"checkpoint {path}: storage record {key} is corrupt")
                raw = bytearray(zf.read(info))
                untyped = torch.frombuffer(raw, dtype=torch.uint8).untyped_storage() if raw else None
                if untyped is None:
                    untyped = torch.UntypedStorage(0)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    storages[key] = torch.storage.TypedStorage(
                        wrap_storage=untyped, dtype=dtype, _internal=True
                    )
            return storages[key]

        with zf.open(pickles[0]) as fh:
            unpickler = RestrictedUnpickler(fh)
            unpickler.persistent_load = persistent_load
            return unpickler.load()


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
            f"{source}: {field_name} is {value!r:.40} ({type(value).__name__}); it must be {what} in {rng}"
        )
    inside = lo <= value <= hi if kind is int else (math.isfinite(value) and lo <= value < hi)
    if not inside:
        raise UsageError(f"{source}: {field_name} = {value!r:.40} is out of range; allowed: {what} in {rng}")
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
    exactly the file's tensors' sizes, so a small file cannot make us allocate a large model.
    """
    if not isinstance(state_dict, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state_dict.items()
    ):
        raise UsageError(f"{source}: the checkpoint's state_dict is not a mapping of names to tensors")
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


def _describe_non_file(p: Path) -> str | None:
    """What ``p`` is when it is not a regular file (None when it is one)."""
    try:
        st = p.stat()
    except FileNotFoundError:
        return "does not exist"
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    if stat.S_ISREG(st.st_mode):
        return None
    kinds = [
        (stat.S_ISDIR, "is a directory"),
        (stat.S_ISFIFO, "is a FIFO (named pipe)"),
        (stat.S_ISCHR, "is a character device"),
        (stat.S_ISBLK, "is a block device"),
        (stat.S_ISSOCK, "is a socket"),
    ]
    return next((text for test, text in kinds if test(st.st_mode)), "is not a regular file")


def read_checkpoint(path: str | Path, dataset: Any = None) -> Checkpoint:
    """Read an own-format or RecBole checkpoint (no model is built).

    Only torch's zip format is read (``torch.save`` has written it since torch 1.6): the legacy
    format's loader acts on module-level state for some pickles. Own-format files load with
    ``torch.load(weights_only=True)``; anything else (a RecBole Config) with
    :func:`_restricted_zip_load`. ``dataset`` (a :class:`m4r_export.data.SequenceDataset`)
    supplies the item vocabulary of a RecBole checkpoint.
    """
    p = Path(path)
    problem = _describe_non_file(p)
    if problem is not None:
        raise UsageError(f"checkpoint {p} {problem}; pass the model.pt file written by `m4r train`")
    if p.stat().st_size == 0:
        raise UsageError(f"checkpoint {p} is empty (0 bytes); re-copy it or re-run `m4r train`")
    if not zipfile.is_zipfile(p):
        with open(p, "rb") as fh:
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
        obj = _load_weights_only(p)
    except Exception:
        obj = _load_restricted(p)  # RecBole: pickled Config -> restricted unpickler
    if not isinstance(obj, dict):
        raise UsageError(f"{p} holds a {type(obj).__name__}, not a checkpoint dict; {_FORMATS_HINT}")
    if obj.get("format") == FORMAT_TAG:
        return _from_own(p, obj)
    if "state_dict" in obj and "config" in obj:
        return _from_recbole(p, obj, dataset)
    raise UsageError(
        f"{p} is a dict with keys {sorted(map(str, obj))[:8]}, not a known checkpoint; {_FORMATS_HINT}"
    )


def _load_weights_only(p: Path) -> Any:
    """torch.load(weights_only=True), memory-mapped where the file allows it (tensors are read from
    the file as used, never staged in a second in-memory copy: a 10M-item table is 2.5 GB)."""
    try:
        return torch.load(p, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return torch.load(p, map_location="cpu", weights_only=True)


def _load_restricted(p: Path) -> Any:
    try:
        return _restricted_zip_load(p)
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
