"""Triton ``config.pbtxt`` files: built as Triton's own ``ModelConfig`` protobuf, checked, rendered.

Every config goes through :func:`render` which serialises it to protobuf text and parses the text
back against the schema (``tritonclient.grpc.model_config_pb2``) plus the checks Triton would
otherwise only make at load time (data types set, dims present, ensemble wiring complete). The
schema ships with ``tritonclient``; without it ``m4r triton`` refuses to write anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import M4RError, UsageError

#: numpy dtype name (as in manifest.json) -> Triton data type
TRITON_DTYPES = {
    "int64": "TYPE_INT64",
    "int32": "TYPE_INT32",
    "float32": "TYPE_FP32",
    "float16": "TYPE_FP16",
    "bool": "TYPE_BOOL",
    "object": "TYPE_STRING",
}


def schema() -> Any:
    """The ``model_config_pb2`` module (Triton's model-config schema)."""
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError as exc:
        raise UsageError(
            "m4r triton checks every config.pbtxt against Triton's schema, which ships with tritonclient "
            f"({exc}); install it: pip install 'tritonclient[grpc]'"
        ) from exc
    return model_config_pb2


@dataclass(frozen=True)
class TensorSpec:
    """One Triton input/output, batch dimension excluded."""

    name: str
    dtype: str  # numpy name, key of TRITON_DTYPES
    dims: tuple[int, ...]
    reshape: tuple[int, ...] | None = None  # e.g. () for item_seq_len sent as [1]
    optional: bool = False

    def to_dict(self, *, is_input: bool) -> dict[str, Any]:
        if self.dtype not in TRITON_DTYPES:
            raise M4RError(
                f"tensor {self.name!r} has dtype {self.dtype} which m4r triton cannot map to Triton"
            )
        d: dict[str, Any] = {
            "name": self.name,
            "data_type": TRITON_DTYPES[self.dtype],
            "dims": list(self.dims),
        }
        if self.reshape is not None:
            d["reshape"] = {"shape": list(self.reshape)}
        if is_input and self.optional:
            d["optional"] = True
        return d


def model_config(
    *,
    name: str,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    max_batch: int,
    platform: str | None = None,
    backend: str | None = None,
    kind: str | None = None,
    instances: int = 1,
    queue_delay_us: int | None = None,
    parameters: dict[str, str] | None = None,
    op_library: str | None = None,
    ensemble_steps: list[dict[str, Any]] | None = None,
    sequence_batching: dict[str, Any] | None = None,
) -> Any:
    """A ``ModelConfig`` message (not yet checked; :func:`render` checks)."""
    from google.protobuf import json_format

    cfg: dict[str, Any] = {
        "name": name,
        "max_batch_size": max_batch,
        "input": [t.to_dict(is_input=True) for t in inputs],
        "output": [t.to_dict(is_input=False) for t in outputs],
    }
    if platform:
        cfg["platform"] = platform
    if backend:
        cfg["backend"] = backend
    if ensemble_steps is not None:
        cfg["ensemble_scheduling"] = {"step": ensemble_steps}
    else:
        cfg["version_policy"] = {"latest": {"num_versions": 1}}
        cfg["instance_group"] = [{"count": instances, "kind": "KIND_GPU" if kind == "gpu" else "KIND_CPU"}]
        if sequence_batching is not None:  # stateful: the sequence batcher replaces the dynamic one
            cfg["sequence_batching"] = sequence_batching
        elif queue_delay_us is not None and max_batch > 0:
            cfg["dynamic_batching"] = {
                "preferred_batch_size": preferred_batch_sizes(max_batch),
                "max_queue_delay_microseconds": queue_delay_us,
            }
    if parameters:
        cfg["parameters"] = {k: {"string_value": v} for k, v in parameters.items()}
    if op_library:
        cfg["model_operations"] = {"op_library_filename": [op_library]}
    return json_format.ParseDict(cfg, schema().ModelConfig())


def preferred_batch_sizes(max_batch: int) -> list[int]:
    """Powers of two from 4 up to ``max_batch`` (and ``max_batch`` itself): the batcher prefers these."""
    sizes = {max_batch}
    p = 4
    while p < max_batch:
        sizes.add(p)
        p *= 2
    return sorted(sizes)


def render(cfg: Any, known_models: dict[str, Any] | None = None) -> str:
    """``cfg`` as config.pbtxt text, after parsing that text back against the schema and checking it."""
    from google.protobuf import text_format

    text = text_format.MessageToString(cfg)
    parsed = parse(text, where=f"model {cfg.name!r}")
    check(parsed, known_models or {})
    return text


def parse(text: str, where: str) -> Any:
    """Parse config.pbtxt text with Triton's schema; a clear error names the problem."""
    from google.protobuf import text_format

    try:
        return text_format.Parse(text, schema().ModelConfig())
    except text_format.ParseError as exc:
        raise M4RError(f"{where}: config.pbtxt does not match Triton's model-config schema: {exc}") from exc


def check(cfg: Any, known_models: dict[str, Any]) -> None:
    """What Triton checks at load time, checked before anything is written."""
    pb = schema()
    where = f"config of model {cfg.name!r}"
    if not cfg.name:
        raise M4RError(f"{where}: empty model name")
    if not (cfg.platform or cfg.backend):
        raise M4RError(f"{where}: neither platform nor backend set")
    if cfg.max_batch_size < 0:
        raise M4RError(f"{where}: max_batch_size {cfg.max_batch_size} < 0")
    for t in list(cfg.input) + list(cfg.output):
        if t.data_type == pb.TYPE_INVALID:
            raise M4RError(f"{where}: tensor {t.name!r} has no data type")
        if not t.dims or any(d == 0 or d < -1 for d in t.dims):
            raise M4RError(f"{where}: tensor {t.name!r} has invalid dims {list(t.dims)}")
    if cfg.platform == "ensemble":
        _check_ensemble(cfg, known_models, where)
    elif cfg.max_batch_size > 0 and cfg.HasField("dynamic_batching"):
        for size in cfg.dynamic_batching.preferred_batch_size:
            if not 1 <= size <= cfg.max_batch_size:
                raise M4RError(f"{where}: preferred batch size {size} outside [1, {cfg.max_batch_size}]")
    if cfg.HasField("sequence_batching"):
        _check_sequence_batching(cfg, where)


def _check_sequence_batching(cfg: Any, where: str) -> None:
    """Implicit state: each pair must name a model input and output (Triton feeds and reads them)."""
    sb = cfg.sequence_batching
    inputs, outputs = {t.name for t in cfg.input}, {t.name for t in cfg.output}
    controls = {c.name for c in sb.control_input}
    if clash := (inputs | outputs) & controls:
        raise M4RError(f"{where}: control inputs {sorted(clash)} clash with model tensors")
    for st in sb.state:
        if st.input_name in inputs or st.output_name in outputs:
            raise M4RError(f"{where}: state {st.input_name!r} is also declared as a model input/output")
        if not st.dims or any(d < 1 for d in st.dims):
            raise M4RError(f"{where}: state {st.input_name!r} needs fixed dims, got {list(st.dims)}")
        for init in st.initial_state:
            if list(init.dims) != list(st.dims) or init.data_type != st.data_type:
                raise M4RError(f"{where}: initial state of {st.input_name!r} does not match its dims/type")
    if sb.HasField("oldest"):
        for size in sb.oldest.preferred_batch_size:
            if not 1 <= size <= cfg.max_batch_size:
                raise M4RError(f"{where}: preferred batch size {size} outside [1, {cfg.max_batch_size}]")


def _check_ensemble(cfg: Any, known_models: dict[str, Any], where: str) -> None:
    available = {t.name for t in cfg.input}
    produced: set[str] = set()
    for step in cfg.ensemble_scheduling.step:
        sub = known_models.get(step.model_name)
        if sub is None:
            raise M4RError(f"{where}: step model {step.model_name!r} is not in the repository")
        if sub.max_batch_size < cfg.max_batch_size:
            raise M4RError(f"{where}: step {step.model_name!r} has a smaller max_batch_size")
        sub_in = {t.name for t in sub.input}
        sub_out = {t.name for t in sub.output}
        for model_tensor, ens_tensor in step.input_map.items():
            if model_tensor not in sub_in:
                raise M4RError(f"{where}: {step.model_name!r} has no input {model_tensor!r}")
            if ens_tensor not in available | produced:
                raise M4RError(f"{where}: tensor {ens_tensor!r} is used before any step produces it")
        required = {t.name for t in sub.input if not t.optional}
        if missing := required - set(step.input_map):
            raise M4RError(f"{where}: step {step.model_name!r} misses required inputs {sorted(missing)}")
        for model_tensor, ens_tensor in step.output_map.items():
            if model_tensor not in sub_out:
                raise M4RError(f"{where}: {step.model_name!r} has no output {model_tensor!r}")
            produced.add(ens_tensor)
    if missing_out := {t.name for t in cfg.output} - produced:
        raise M4RError(f"{where}: no step produces the outputs {sorted(missing_out)}")
