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

import io
import pickle
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
        model = Mamba4Rec.from_config(self.config)
        check_state_dict(model, self.state_dict, self.meta.get("path", "checkpoint"))
        model.load_state_dict(self.state_dict, strict=True)
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


def _torch_allowed() -> dict[str, Any]:
    allowed: dict[str, Any] = {
        "collections.OrderedDict": __import__("collections").OrderedDict,
        "torch._utils._rebuild_tensor_v2": torch._utils._rebuild_tensor_v2,
        "torch._utils._rebuild_parameter": torch._utils._rebuild_parameter,
        "torch.device": torch.device,
        "torch.Size": torch.Size,
        "builtins.object": object,
        "builtins.set": set,
        "builtins.frozenset": frozenset,
        "builtins.slice": slice,
        "copyreg._reconstructor": __import__("copyreg")._reconstructor,
    }
    for name in dir(torch):
        obj = getattr(torch, name)
        if name.endswith("Storage") or isinstance(obj, torch.dtype):
            allowed[f"torch.{name}"] = obj
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only allowlisted globals (see module docstring)."""

    _allowed = _torch_allowed()

    def find_class(self, module: str, name: str) -> Any:
        key = f"{module}.{name}"
        if key in self._allowed:
            if key == "copyreg._reconstructor":
                return _safe_reconstructor
            return self._allowed[key]
        if module == "recbole" or module.startswith("recbole."):
            return _captured_class(key)
        raise UnsafeCheckpointError(
            f"refusing to load: the checkpoint's pickle references {key!r}, which is not on the allowlist "
            "(a RecBole checkpoint only needs recbole classes and tensors). Do not load files from untrusted "
            "sources; if this is a genuine checkpoint, re-save it with `m4r train` or report the global."
        )


def _safe_reconstructor(cls: Any, base: Any, state: Any) -> Any:
    if not (isinstance(cls, type) and issubclass(cls, CapturedObject)) or base is not object:
        raise UnsafeCheckpointError(f"refusing to load: copyreg reconstruction of {cls!r} is not allowed")
    return object.__new__(cls)


class _RestrictedPickleModule:
    """What ``torch.load(pickle_module=...)`` needs: Unpickler, load, and the error type."""

    Unpickler = RestrictedUnpickler
    UnpicklingError = pickle.UnpicklingError

    @staticmethod
    def load(fh: Any, **kwargs: Any) -> Any:
        return RestrictedUnpickler(fh, **kwargs).load()


# --------------------------------------------------------------------------------------- reading


def _torch_load(path: Path, *, weights_only: bool) -> Any:
    kwargs: dict[str, Any] = {"map_location": "cpu"}
    if weights_only:
        kwargs["weights_only"] = True
    else:
        kwargs["weights_only"] = False
        kwargs["pickle_module"] = _RestrictedPickleModule
    try:
        return torch.load(path, **kwargs)
    except UnsafeCheckpointError:
        raise
    except (EOFError, zipfile.BadZipFile, pickle.UnpicklingError, RuntimeError, ValueError, OSError) as exc:
        cause: BaseException = exc
        while cause.__cause__ is not None or cause.__context__ is not None:
            nxt = cause.__cause__ or cause.__context__
            if isinstance(nxt, UnsafeCheckpointError):
                raise nxt from None
            assert nxt is not None
            cause = nxt
        if weights_only:
            raise _WeightsOnlyRefused(str(exc)) from exc
        raise UsageError(
            f"checkpoint {path} is truncated or corrupt ({type(exc).__name__}: {str(exc)[:200]}); "
            "re-copy it or re-run `m4r train`"
        ) from exc


class _WeightsOnlyRefused(Exception):
    pass


def read_checkpoint(path: str | Path, dataset: Any = None) -> Checkpoint:
    """Read an own-format or RecBole checkpoint (no model is built).

    ``dataset`` (a :class:`m4r_export.data.SequenceDataset`) supplies the item vocabulary of a
    RecBole checkpoint.
    """
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"checkpoint {p} does not exist; pass the model.pt written by `m4r train`")
    if p.stat().st_size == 0:
        raise UsageError(f"checkpoint {p} is empty (0 bytes); re-copy it or re-run `m4r train`")
    if not zipfile.is_zipfile(p):
        with open(p, "rb") as fh:
            head = fh.read(4)
        if head == b"PK\x03\x04":  # a zip whose central directory (at the end) is missing
            raise UsageError(f"checkpoint {p} is truncated or corrupt; re-copy it or re-run `m4r train`")
        if head[:1] != b"\x80":  # neither torch's zip format nor a legacy pickle
            raise UsageError(
                f"{p} is not a PyTorch checkpoint (expected the m4r format written by `m4r train` or a "
                "RecBole checkpoint of the reference Mamba4Rec code)"
            )
    try:
        obj = _torch_load(p, weights_only=True)
    except _WeightsOnlyRefused:
        obj = _torch_load(p, weights_only=False)  # RecBole: pickled Config -> restricted unpickler
    if not isinstance(obj, dict):
        raise UsageError(f"{p} holds a {type(obj).__name__}, not a checkpoint dict; {_FORMATS_HINT}")
    if obj.get("format") == FORMAT_TAG:
        return _from_own(p, obj)
    if "state_dict" in obj and "config" in obj:
        return _from_recbole(p, obj, dataset)
    raise UsageError(
        f"{p} is a dict with keys {sorted(map(str, obj))[:8]}, not a known checkpoint; {_FORMATS_HINT}"
    )


_FORMATS_HINT = (
    "m4r reads its own format (`m4r train`) and RecBole checkpoints of the reference Mamba4Rec code"
)


def _from_own(path: Path, obj: dict[str, Any]) -> Checkpoint:
    version = obj.get("format_version")
    if version != FORMAT_VERSION:
        raise UsageError(
            f"{path} has m4r checkpoint format version {version}; this m4r reads {FORMAT_VERSION}"
        )
    try:
        config = Mamba4RecConfig.from_dict(obj["config"])
    except (KeyError, TypeError) as exc:
        raise UsageError(f"{path}: checkpoint config is incomplete ({exc}); re-run `m4r train`") from exc
    meta = dict(obj.get("meta") or {})
    meta["path"] = str(path)
    return Checkpoint(config, obj["state_dict"], obj.get("item_tokens"), meta, FORMAT_TAG)


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
    state_dict = {k: v for k, v in obj["state_dict"].items() if isinstance(v, torch.Tensor)}
    emb = state_dict.get("item_embedding.weight")
    if emb is None:
        raise UsageError(f"{path}: RecBole checkpoint has no item_embedding.weight; is it a Mamba4Rec model?")
    model_name = fields_.get("model")
    if model_name not in (None, "Mamba4Rec"):
        raise UsageError(f"{path} is a RecBole checkpoint of model {model_name!r}, not Mamba4Rec")
    config = Mamba4RecConfig(
        n_items=int(emb.shape[0]),
        hidden_size=int(fields_.get("hidden_size", emb.shape[1])),
        num_layers=int(fields_.get("num_layers", 1)),
        d_state=int(fields_.get("d_state", 32)),
        d_conv=int(fields_.get("d_conv", 4)),
        expand=int(fields_.get("expand", 2)),
        dropout_prob=float(fields_.get("dropout_prob", 0.2)),
    )
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
        "max_seq_len": int(fields_.get("MAX_ITEM_LIST_LENGTH", 50)),
        "dataset": str(fields_.get("dataset", "")),
        "epoch": obj.get("epoch"),
    }
    return Checkpoint(config, state_dict, tokens, meta, "recbole")


def check_state_dict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Refuse a state dict whose keys or shapes contradict the config, naming the tensor."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise UsageError(
            f"{source}: state dict does not match its config "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]}); "
            "the checkpoint's config and weights come from different models"
        )
    for name, tensor in expected.items():
        got = tuple(state_dict[name].shape)
        if got != tuple(tensor.shape):
            raise UsageError(
                f"{source}: tensor {name} has shape {got} but the config implies {tuple(tensor.shape)}; "
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
