"""Small ONNX artifacts for tests, traced with ``torch.onnx`` independently of the exporter.

:func:`trace_onnx` traces :class:`~m4r_export.serving.ServingModel` with a closed-form scan written
in plain tensor ops (single-layer models only) and writes a ``manifest.json`` with the keys
``verify`` reads. It exists so the verify/bench tests do not
depend on the exporter's progress; it is not a substitute for ``m4r export``.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..fileio import sha256_file
from ..integrity import ITEM_TABLE, ITEMS_FILE, MANIFEST_FORMAT, MANIFEST_VERSION
from ..model import Mamba4Rec, register_scan_backend
from ..model.scan import _finish, _gather_last, _prepare_dt, last_index
from ..serving import EXCLUDE_INPUT, HEAD_OUTPUTS, ServingModel

TRACE_BACKEND = "verify-trace"


def _traceable_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    lengths: Tensor | None = None,
    mode: str = "all",
) -> Tensor:
    if mode != "last":
        raise ValueError("the test trace only supports single-layer models (mode='last')")
    batch, _, seq_len = u.shape
    dt = _prepare_dt(delta, delta_bias, delta_softplus)
    idx = last_index(lengths, batch, seq_len, u.device)
    valid = (torch.arange(seq_len, device=u.device)[None, :] <= idx[:, None]).to(dt.dtype)
    dtv = dt * valid[:, None, :]
    decay = F.pad(dtv[..., 1:], (0, 1)).flip(-1).cumsum(-1).flip(-1)
    c_last = C.float().gather(2, idx.view(-1, 1, 1).expand(C.shape[0], C.shape[1], 1))
    bc = B.float() * c_last
    w = torch.exp(decay.unsqueeze(-1) * A[None, :, None, :]) * bc.transpose(1, 2)[:, None]
    y = torch.einsum("bdln,bdl->bd", w, dtv * u.float())
    y = _finish(y, _gather_last(u, idx), D, None if z is None else _gather_last(z, idx))
    return y.to(u.dtype)


register_scan_backend(TRACE_BACKEND, _traceable_scan)


def trained_like_(model: Mamba4Rec, seed: int = 0) -> Mamba4Rec:
    """Move a freshly built model's parameters away from the special values of the initialisation.

    The reference initialisation zeroes every Linear bias (``dt_proj.bias`` too) and draws weights
    with std 0.02, so ``delta = softplus(dt_proj(x) + dt_bias)`` is ~ln 2 everywhere and a bug that
    drops, zeroes or misplaces the dt bias (``softplus(delta) + bias``) changes nothing. Here the dt
    projection gets mamba-ssm's own initialisation (``bias = softplus^-1(dt)``, dt log-uniform in
    [1e-3, 0.1], so the bias is about -2.3 .. -6.9: delta spans two decades as in a trained model)
    and every other parameter a perturbation of std 0.05 (trained weights differ from init by that
    order: ML-100K, 7 epochs). In place; returns ``model``.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("dt_proj.bias"):
                dt = torch.exp(
                    torch.rand(p.shape, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)
                )
                p.copy_(dt + torch.log(-torch.expm1(-dt)))
            elif name.endswith("dt_proj.weight"):
                bound = p.shape[1] ** -0.5
                p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) * bound)
            else:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def tiny_model(n_items: int = 40, seed: int = 0, hidden_size: int = 16, d_state: int = 8) -> Mamba4Rec:
    """A random single-layer model, parameters as after training (:func:`trained_like_`), whose
    scores are spread enough to rank (the std-0.02 item table is flat)."""
    torch.manual_seed(seed)
    model = trained_like_(Mamba4Rec(n_items, hidden_size=hidden_size, d_state=d_state).eval(), seed)
    with torch.no_grad():
        model.item_embedding.weight.normal_(0.0, 1.0)
    return model


def trace_onnx(
    model: Mamba4Rec,
    out_dir: str | Path,
    *,
    head: str = "scores",
    k: int = 10,
    exclude_history: bool = False,
    exclude_items: bool = True,
    max_seq_len: int = 12,
    static_seq: bool = False,
    name: str = "model.onnx",
) -> Path:
    """Trace ``model`` to ``out_dir/name`` (+ manifest.json).

    The sequence axis is dynamic unless ``static_seq`` (then the graph takes exactly
    ``max_seq_len`` columns, like a fixed-shape deployment).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    previous = [str(m.scan_backend) for m in model.modules() if hasattr(m, "scan_backend")]
    model.set_scan_backend(TRACE_BACKEND)
    serving = ServingModel(model, head, k, exclude_history, exclude_items).eval()
    seq = torch.randint(1, model.n_items, (2, max_seq_len))
    lens = torch.tensor([1, max_seq_len])
    args: tuple[Tensor, ...] = (seq, lens)
    if serving.exclude_items:
        args = (seq, lens, torch.randint(0, model.n_items, (2, 3)))
    inputs = serving.input_names
    outputs = HEAD_OUTPUTS[head]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                serving,
                args,
                str(out / name),
                input_names=list(inputs),
                output_names=list(outputs),
                dynamic_axes={
                    **{n: {0: "batch"} for n in (*inputs, *outputs)},
                    **({} if static_seq else {"item_seq": {0: "batch", 1: "seq"}}),
                    EXCLUDE_INPUT: {0: "batch", 1: "exclude"},
                },
                opset_version=18,
                dynamo=False,
            )
    finally:
        model.set_scan_backend(previous[0] if previous else "auto")
        serving.eval()
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "head": head,
        "k": k if head == "topk" else None,
        "exclude_history": exclude_history,
        "exclude_items": serving.exclude_items,
        "max_seq_len": max_seq_len,
        "model": model.config.to_dict(),
        "inputs": {"item_seq": ["batch", max_seq_len if static_seq else "seq"], "item_seq_len": ["batch"]},
        "outputs": list(outputs),
        "files": {},
        "parity": None,
    }
    (out / ITEMS_FILE).write_text("".join(f"{t}\n" for t in ["[PAD]", *map(str, range(1, model.n_items))]))
    if head == "embedding":
        np.save(out / ITEM_TABLE, model.item_embedding.weight.detach().numpy())
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    rehash_manifest(out)
    return out / name


def rehash_manifest(directory: str | Path) -> None:
    """Rewrite ``directory/manifest.json``'s file list from the files present (sha256 + bytes).

    For tests that change a model on purpose and want verify to judge its numbers, not its
    integrity (a real export never needs this).
    """
    d = Path(directory)
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["files"] = {
        p.name: {
            **manifest.get("files", {}).get(p.name, {}),
            "sha256": sha256_file(p),
            "bytes": p.stat().st_size,
        }
        for p in sorted(d.iterdir())
        if p.is_file() and p.name != "manifest.json" and not p.name.startswith(".")
    }
    (d / "manifest.json").write_text(json.dumps(manifest, indent=2))


def perturb_onnx_weight(src: str | Path, dst: str | Path, scale: float = 1.0) -> str:
    """Copy an ONNX model, adding ``scale`` to one element of its largest 2-D initializer.

    Returns the perturbed initializer's name.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    mats = [i for i in model.graph.initializer if len(i.dims) == 2]
    if not mats:
        raise ValueError(f"{src} has no 2-D initializer to perturb")
    target = max(mats, key=lambda i: int(np.prod(i.dims)))
    arr = numpy_helper.to_array(target).copy()
    arr.flat[arr.size // 2] += np.asarray(scale, dtype=arr.dtype)
    target.CopyFrom(numpy_helper.from_array(arr, target.name))
    onnx.save(model, str(dst))
    return target.name
