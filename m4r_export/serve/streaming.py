"""``m4r triton --streaming``: a stateful model on Triton's sequence batcher (see docs/triton.md).

- ``python`` backend: ``1/model.py`` (``python_models/streaming_model.py``) drives the export's
  ``init.onnx``/``step.onnx`` through :class:`m4r_export.streaming.StreamingSession` and keeps
  the states per correlation id. A request carries ``item_ids`` [1, n]: on the first request of
  a sequence (START) the user's history (through ``init``), afterwards the new events (through
  ``step``, oldest first, 0 = padding). END drops the state; states idle longer than
  ``max_sequence_idle_microseconds`` are dropped too (Triton does not tell a backend that it
  reclaimed a sequence, so the model checks the age of every state on each call).
- ``onnxruntime`` / ``tensorrt``: ``step.onnx`` (or an engine built from it) with Triton's
  implicit state: ``sequence_batching { state [...] }`` pairs every state input with its output
  (names, dims from the manifest), initial state zeros (= the empty history). One event per
  request; a history is sent as successive requests.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import M4RError, UsageError
from ..onnx.manifest import MANIFEST_NAME, required_files
from . import config as cfgmod
from .config import TRITON_DTYPES, TensorSpec

ITEMS_INPUT = "item_ids"
CONTROLS = ("START", "END", "CORRID")


def _dims(shape: list[Any]) -> tuple[int, ...]:
    """A manifest shape without its batch dimension; symbolic sizes become -1."""
    return tuple(-1 if isinstance(d, str) else int(d) for d in shape[1:])


def _spec(manifest: dict[str, Any], artifacts: Path) -> dict[str, Any]:
    spec = manifest.get("streaming")
    if not spec:
        raise UsageError(
            f"--streaming: {artifacts}/{MANIFEST_NAME} has no 'streaming' section; re-export with "
            "`m4r export --streaming`"
        )
    return dict(spec)


def plan_streaming(plan: Any, artifacts: Path, manifest: dict[str, Any], opts: Any, name: str) -> Any:
    """Add the stateful model ``name`` to ``plan``; return its (checked) ModelConfig."""
    spec = _spec(manifest, artifacts)
    step = spec["step"]
    heads = [
        TensorSpec(o["name"], o["dtype"], _dims(o["shape"]))
        for o in step["outputs"]
        if o["role"] == "head_output"
    ]
    takes_exclude = any(i["role"] == "exclude_items" for i in step["inputs"])
    exclude = [TensorSpec("exclude_items", "int64", (-1,), optional=opts.backend == "python")]
    common: dict[str, Any] = {
        "name": name,
        "outputs": heads,
        "max_batch": opts.max_batch,
        "kind": opts.device_kind,
        "instances": opts.instances,
    }
    if opts.backend == "python":
        inputs = [TensorSpec(ITEMS_INPUT, "int64", (-1,))] + (exclude if takes_exclude else [])
        batching = _sequence_batching(opts, controls=True, states=[], strategy="oldest")
        cfg = cfgmod.model_config(
            backend="python",
            inputs=inputs,
            # the largest request the model accepts (enforced in model.py; docs/streaming.md)
            parameters={"precision": "fp32", "max_request_events": str(opts.max_request_events)},
            sequence_batching=batching,
            **common,
        )
        _plan_python_files(plan, artifacts, manifest, spec, name)
    else:
        (item,) = [i for i in step["inputs"] if i["role"] == "item_ids"]
        inputs = [TensorSpec(item["name"], "int64", (1,), reshape=())] + (exclude if takes_exclude else [])
        states = [_state(s, step) for s in spec["states"]]
        batching = _sequence_batching(opts, controls=False, states=states, strategy="direct")
        if opts.backend == "onnxruntime":
            cfg = cfgmod.model_config(
                platform="onnxruntime_onnx", inputs=inputs, sequence_batching=batching, **common
            )
            plan.copies[f"{name}/1/model.onnx"] = artifacts / spec["files"]["fp32"]["step"]
        else:
            cfg = cfgmod.model_config(
                platform="tensorrt_plan", inputs=inputs, sequence_batching=batching, **common
            )
            plan.data[f"{name}/1/model.plan"] = _step_engine(artifacts, manifest, spec, opts.engine)
    plan.configs[name] = cfgmod.render(cfg)
    return cfg


def _state(pair: dict[str, Any], step: dict[str, Any]) -> dict[str, Any]:
    (inp,) = [i for i in step["inputs"] if i["name"] == pair["step_input"]]
    dims = list(_dims(inp["shape"]))
    if any(d < 1 for d in dims):
        raise M4RError(f"streaming state {inp['name']!r} has no fixed shape in the manifest ({inp['shape']})")
    dtype = TRITON_DTYPES[inp["dtype"]]
    return {
        "input_name": pair["step_input"],
        "output_name": pair["output"],
        "data_type": dtype,
        "dims": dims,
        # zeros are the empty history's state (manifest semantics: init of a length-0 row)
        "initial_state": [
            {"name": f"{pair['step_input']}_zero", "data_type": dtype, "dims": dims, "zero_data": True}
        ],
    }


def _sequence_batching(
    opts: Any, *, controls: bool, states: list[dict[str, Any]], strategy: str
) -> dict[str, Any]:
    batching: dict[str, Any] = {"max_sequence_idle_microseconds": opts.sequence_idle_us}
    if controls:
        batching["control_input"] = [
            {"name": "START", "control": [{"kind": "CONTROL_SEQUENCE_START", "int32_false_true": [0, 1]}]},
            {"name": "END", "control": [{"kind": "CONTROL_SEQUENCE_END", "int32_false_true": [0, 1]}]},
            {"name": "CORRID", "control": [{"kind": "CONTROL_SEQUENCE_CORRID", "data_type": "TYPE_UINT64"}]},
        ]
    if states:
        batching["state"] = states
    if strategy == "oldest":
        batching["oldest"] = {
            "max_candidate_sequences": opts.max_sequences,
            "preferred_batch_size": cfgmod.preferred_batch_sizes(opts.max_batch),
            "max_queue_delay_microseconds": opts.max_queue_delay_us,
        }
    else:
        batching["direct"] = {"max_queue_delay_microseconds": opts.max_queue_delay_us}
    return batching


def _plan_python_files(
    plan: Any, artifacts: Path, manifest: dict[str, Any], spec: dict[str, Any], name: str
) -> None:
    """``1/``: the streaming graphs and a manifest listing exactly the files copied beside it."""
    from importlib import resources

    keep = set(required_files(manifest))
    for files in spec["files"].values():
        keep.update(files.values())
    for f in sorted(keep):
        plan.copies[f"{name}/1/{f}"] = artifacts / f
    trimmed = dict(manifest, files={k: v for k, v in manifest["files"].items() if k in keep})
    # the engine is not copied: a name the manifest gives must be a file it lists (open_artifact)
    trimmed["tensorrt"] = {"status": "skipped", "reason": "not part of this Triton model"}
    plan.texts[f"{name}/1/{MANIFEST_NAME}"] = json.dumps(trimmed, indent=2)
    source = resources.files("m4r_export.serve.python_models").joinpath("streaming_model.py")
    plan.texts[f"{name}/1/model.py"] = source.read_text(encoding="utf-8")


def _step_engine(
    artifacts: Path, manifest: dict[str, Any], spec: dict[str, Any], engine: str | None
) -> bytes:
    """An engine built from this export's step graph (checked against its engine manifest)."""
    from .repository import read_engine

    steps = {f["step"] for f in spec["files"].values()}
    if engine is None:
        raise UsageError(
            "--backend tensorrt --streaming needs an engine built from the step graph: build it on the "
            f"serving GPU (`m4r build-engine --onnx {artifacts}/step.onnx ...`) and pass --engine NAME"
        )
    data, meta = read_engine(artifacts, engine, f"build it from {', '.join(sorted(steps))}")
    source = (meta.get("onnx") or {}).get("file")
    if source not in steps:
        raise UsageError(
            f"--engine {engine} was built from {source!r}, not from the step graph {sorted(steps)}"
        )
    if manifest["files"][source]["sha256"] != (meta.get("onnx") or {}).get("sha256"):
        raise UsageError(f"--engine {engine} was built from another {source} than this export's; rebuild it")
    return data


def streaming_readme(name: str, opts: Any, manifest: dict[str, Any]) -> str:
    """README.md of a ``--streaming`` repository: the request protocol and how to start a server."""
    from .readme import NGC_IMAGE

    step = manifest["streaming"]["step"]
    heads = ", ".join(f"`{o['name']}`" for o in step["outputs"] if o["role"] == "head_output")
    idle = opts.sequence_idle_us / 1e6
    lines = [
        f"# Triton model repository `{name}` (written by `m4r triton --streaming`)",
        "",
        f"Backend: **{opts.backend}**; one stateful model `{name}` on Triton's sequence batcher. Every "
        "request carries a correlation id (`sequence_id`) and the START/END flags; responses are "
        f"the head's outputs ({heads}) for the user's whole history so far. A sequence idle for "
        f"{idle:g} s (`max_sequence_idle_microseconds`) is reclaimed with its state.",
        "",
        "## Request format (one user per request)",
    ]
    if opts.backend == "python":
        lines += [
            f"* `{ITEMS_INPUT}`: int64 `[1, n]`. With START: the user's history, oldest first (may be "
            "empty; `init.onnx` on its first events, `step.onnx` on the rest, so memory per request "
            "is bounded). Without START: the new events, oldest first (through `step.onnx`, one at a "
            "time). 0 = padding; ids outside `[1, n_items)` are skipped. At most "
            f"{opts.max_request_events} ids per request (config parameter `max_request_events`, "
            "`m4r triton --max-request-events`): send a longer history as START + later requests.",
            "* `exclude_items` (ranking heads): optional int64 `[1, m]`, items not to rank in this "
            "response (0 = none); not remembered.",
            "* END drops the state after answering. A request without START for a sequence that "
            "has no state is an error.",
            "",
            "## Start a server (from inside this directory)",
            "",
            "The model imports `m4r_export.streaming`: install the m4r-export package this repository "
            "was written with (and onnxruntime, numpy < 2 for older Triton images) in the server's Python.",
            "",
            "```bash",
            f"docker run --rm -p8000:8000 -p8001:8001 -p8002:8002 -v $PWD:/repo {NGC_IMAGE} \\",
            "  bash -c 'pip install /repo/m4r_export-*.whl onnxruntime && "
            "tritonserver --model-repository=/repo'",
            "```",
            "",
            "(copy the m4r-export wheel into this directory first, or install it any other way).",
        ]
    else:
        (item,) = [i["name"] for i in step["inputs"] if i["role"] == "item_ids"]
        lines += [
            f"* `{item}`: int64 `[1, 1]`: one new event per request (the history is sent as "
            "successive requests after START; the state starts from zeros = the empty history).",
            "* `exclude_items` (ranking heads): int64 `[1, m]`, required (zeros `[1, 1]` for none).",
            "* The states never leave the server: Triton keeps them per sequence (implicit state).",
        ]
    return "\n".join(lines) + "\n"
