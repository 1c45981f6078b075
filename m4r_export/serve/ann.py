"""``m4r triton --ann``: user embedding + ANN search in one Python-backend model (issue 19 item 5).

From an ``m4r export --head embedding --ann pq|ivf|hnsw`` directory, the model ``m4r_ann`` takes the
same ``item_seq`` / ``item_seq_len`` (and optional ``exclude_items``) as the ranking models and
returns ``topk_scores`` / ``topk_items`` [K] like ``--head topk``, computed approximately:
``1/model.py`` (``python_models/ann_model.py``) runs :class:`m4r_export.retrieval.AnnRetriever`,
i.e. ``model.onnx`` on ONNX Runtime for the user vector, then the faiss index. Both run in one
process, so the user vectors never cross a model boundary and one dynamic batcher batches both.

The version folder is a checked export of its own: the files the embedding head needs, the index,
and a manifest listing exactly them; the retriever hashes every file against it before loading
(a tampered ``item_index.faiss`` fails the model's load).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..onnx.manifest import MANIFEST_NAME, required_files
from .config import TensorSpec

OUTPUTS = ("topk_scores", "topk_items")


def ann_tensors(
    manifest: dict[str, Any], artifacts: Path, k: int
) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """(inputs, outputs) of the ANN model; refuses an export without an index."""
    from ..serving import EXCLUDE_INPUT, INPUT_NAMES

    spec = manifest.get("ann")
    if manifest.get("head") != "embedding" or not isinstance(spec, dict):
        raise UsageError(
            f"--ann: {artifacts}/{MANIFEST_NAME} has no ANN index; export with "
            "`m4r export --head embedding --ann pq`"
        )
    n_items = int(manifest["model"]["n_items"])
    if not 1 <= k < n_items:
        raise UsageError(f"--k {k}: must be in [1, {n_items - 1}] (the export has {n_items - 1} items)")
    history, length = INPUT_NAMES
    inputs = [
        TensorSpec(history, "int64", (int(manifest["max_seq_len"]),)),
        TensorSpec(length, "int64", (1,), reshape=()),
        TensorSpec(EXCLUDE_INPUT, "int64", (-1,), optional=True),
    ]
    outputs = [TensorSpec(OUTPUTS[0], "float32", (k,)), TensorSpec(OUTPUTS[1], "int64", (k,))]
    return inputs, outputs


def plan_ann_files(plan: Any, artifacts: Path, manifest: dict[str, Any], name: str) -> None:
    """``<name>/1/``: model.py, the embedding head's files, the index and a manifest of exactly them."""
    keep = set(required_files(manifest)) | {str(manifest["ann"]["file"])}
    keep.update(manifest["files"]["model.onnx"].get("external_data") or [])
    for f in sorted(keep):
        plan.copies[f"{name}/1/{f}"] = artifacts / f
    trimmed = dict(manifest, files={k: v for k, v in manifest["files"].items() if k in keep})
    # the engine is not copied: a name the manifest gives must be a file it lists (open_artifact)
    trimmed["tensorrt"] = {"status": "skipped", "reason": "not part of this Triton model"}
    trimmed.pop("streaming", None)
    plan.texts[f"{name}/1/{MANIFEST_NAME}"] = json.dumps(trimmed, indent=2)
    source = resources.files("m4r_export.serve.python_models").joinpath("ann_model.py")
    plan.texts[f"{name}/1/model.py"] = source.read_text(encoding="utf-8")
