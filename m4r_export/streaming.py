"""Drive an export's streaming graphs (``init.onnx``/``step.onnx``) from its manifest alone.

    session = StreamingSession.from_dir("export_dir")
    out = session.start([[3, 17, 9], [42]])   # head outputs for each history
    out = session.push([5, 0])                # row 0 gets item 5, row 1 has no new event
    saved = session.states                    # keep per user; session.load_states(saved) later

Only numpy and onnxruntime are needed (no torch). Every tensor name, dtype and shape comes from
the manifest's ``streaming`` section (see docs/streaming.md), so this is also the reference for
a client in another language. Semantics: ids outside ``[1, n_items)`` are skipped (in ``start``
they are dropped from the history; in ``push`` the row's state and outputs stay as they were);
the result equals a full re-encode of the whole history.

Memory per call is bounded whatever the history's length: ``start`` runs ``init`` on at most
:func:`init_window` events of each row and folds the rest in with ``step`` (carrying the state,
exact), so a 100,000-event history peaks like a 4,096-event one. A call accepts at most
``max_events`` events per row (:data:`MAX_REQUEST_EVENTS` by default; docs/streaming.md).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UsageError
from .streaming_binding import StepBinding, can_bind

#: init's closed form holds a rows x history x d_inner x d_state fp32 temporary; calls are split
#: into row chunks that keep it below this many bytes
INIT_TEMP_BYTES = 256 << 20


#: init's closed-form temporary per row is capped at this many bytes (the window of
#: :func:`init_window`); measured peak RSS is about 3.4x it (ML-100K model: 55 KB per event)
INIT_WINDOW_TEMP_BYTES = 64 << 20
#: the largest history (events per row) one ``start`` call, or one Triton request, accepts by default:
#: memory no longer depends on it; time does (about 0.15 ms per event past the init window)
MAX_REQUEST_EVENTS = 262_144


def _temp_bytes_per_event(model_config: Mapping[str, Any]) -> int:
    return int(model_config["expand"]) * int(model_config["hidden_size"]) * int(model_config["d_state"]) * 4


def init_window(model_config: Mapping[str, Any]) -> int:
    """Events of a row that one ``init.onnx`` call takes (at least 1); ``step`` folds in the rest."""
    return max(1, INIT_WINDOW_TEMP_BYTES // max(1, _temp_bytes_per_event(model_config)))


def init_chunk_rows(model_config: Mapping[str, Any], width: int) -> int:
    """Rows per ``init.onnx`` call for histories ``width`` long (at least 1)."""
    per_row = width * _temp_bytes_per_event(model_config)
    return max(1, INIT_TEMP_BYTES // max(1, per_row))


def _open_export(directory: Path) -> Any:
    """The export opened and checked (every listed file hashed, no symlinks) with a streaming section."""
    from .onnx.manifest import MANIFEST_NAME, open_artifact

    if not os.path.lexists(directory / MANIFEST_NAME):
        raise UsageError(
            f"{directory / MANIFEST_NAME} not found: pass the directory written by `m4r export --streaming`"
        )
    files = open_artifact(directory)
    if "streaming" not in files.manifest:
        files.close()
        raise UsageError(
            f"{directory / MANIFEST_NAME} has no 'streaming' section: re-export with `m4r export --streaming`"
        )
    return files


class StreamingSession:
    """One batch of users' streaming state on ONNX Runtime (CPU unless ``providers`` says otherwise)."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        precision: str = "fp32",
        *,
        threads: int | None = None,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        max_events: int = MAX_REQUEST_EVENTS,
        ort_ops: str | os.PathLike[str] | None = None,
    ) -> None:
        """``ort_ops``: libm4r_ort_ops.so to load into both sessions (an ``m4r export --fused`` step.onnx
        then runs its m4r::MambaMixerStep nodes as the fused CPU kernel instead of their function body)."""
        import onnxruntime as ort

        from .onnx.manifest import ort_session

        if max_events < 1:
            raise UsageError(f"max_events={max_events}: must be >= 1")
        self.max_events = max_events
        self.directory = Path(directory)
        with _open_export(self.directory) as listed:
            self.manifest = listed.manifest
            self._setup(listed, precision, threads, providers, ort, ort_session, ort_ops)
        self._states: dict[str, np.ndarray] | None = None
        self._binding: StepBinding | None = None
        self._no_exclude = np.zeros((0, 1), dtype=np.int64)
        self._bindable = can_bind(self._step)

    def _setup(
        self,
        listed: Any,
        precision: str,
        threads: int | None,
        providers: Sequence[str],
        ort: Any,
        load: Any,
        ort_ops: str | os.PathLike[str] | None = None,
    ) -> None:
        """Read the manifest's streaming section; load both graphs from the checked, listed files."""
        spec = self.manifest["streaming"]
        if precision not in spec["files"]:
            raise UsageError(
                f"precision {precision!r} is not in {self.directory}/manifest.json (has "
                f"{', '.join(spec['files'])}); re-export with --fp16 for fp16 graphs"
            )
        self.precision = precision
        self.n_items = int(self.manifest["model"]["n_items"])
        self.init_spec, self.step_spec = spec["init"], spec["step"]
        self.state_pairs = [(s["step_input"], s["output"]) for s in spec["states"]]
        self.head_names = [o["name"] for o in self.step_spec["outputs"] if o["role"] == "head_output"]
        (self._seq_name,) = [i["name"] for i in self.init_spec["inputs"] if i["role"] == "item_ids"]
        (self._len_name,) = [i["name"] for i in self.init_spec["inputs"] if i["role"] == "lengths"]
        (self._item_name,) = [i["name"] for i in self.step_spec["inputs"] if i["role"] == "item_ids"]
        excl = [i["name"] for i in self.step_spec["inputs"] if i["role"] == "exclude_items"]
        self._exclude_name = excl[0] if excl else None
        self._state_inputs = {i["name"]: i for i in self.step_spec["inputs"] if i["role"].endswith("_state")}
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = threads
        if ort_ops is not None:
            from .onnx.ort_ops import register_ort_ops

            register_ort_ops(so, Path(ort_ops))
        files = spec["files"][precision]  # plain names listed and hashed in 'files' (checked at open)
        self._init = load(listed, files["init"], so, providers)
        self._step = load(listed, files["step"], so, providers)
        self._step_names = [o.name for o in self._step.get_outputs()]

    @classmethod
    def from_dir(
        cls, directory: str | os.PathLike[str], precision: str = "fp32", **kwargs: Any
    ) -> StreamingSession:
        return cls(directory, precision, **kwargs)

    # ------------------------------------------------------------------------------------ state

    @property
    def batch(self) -> int:
        if self._states is None:
            return 0
        return int(next(iter(self._states.values())).shape[0])

    @property
    def states(self) -> dict[str, np.ndarray]:
        """The current states by step-input name (copies; feed them back with :meth:`load_states`)."""
        if self._states is None:
            raise UsageError("no state yet: call start(histories) first")
        return {k: v.copy() for k, v in self._states.items()}

    def load_states(self, states: Mapping[str, np.ndarray]) -> None:
        """Replace the states (for example with ones saved earlier), after checking them.

        Each tensor must be present, have the manifest's dtype and shape (one shared batch size)
        and be finite; anything else raises :class:`UsageError` naming the tensor.
        """
        self._states = self._checked(states)

    def _checked(self, states: Mapping[str, Any]) -> dict[str, np.ndarray]:
        missing = sorted(set(self._state_inputs) - set(states))
        if missing:
            raise UsageError(
                f"state tensors missing: {', '.join(missing)}; pass every name in session.states"
            )
        unknown = sorted(set(states) - set(self._state_inputs))
        if unknown:
            raise UsageError(
                f"unknown state tensors: {', '.join(unknown)}; expected {sorted(self._state_inputs)}"
            )
        out: dict[str, np.ndarray] = {}
        batch: int | None = None
        for name, spec in self._state_inputs.items():
            value = states[name]
            if not isinstance(value, np.ndarray) or value.dtype != np.dtype(spec["dtype"]):
                got = value.dtype if isinstance(value, np.ndarray) else type(value).__name__
                raise UsageError(f"state {name!r}: dtype {got}, expected {spec['dtype']} (manifest)")
            want = [batch if d == "batch" else d for d in spec["shape"]]
            if value.ndim != len(want) or any(
                w is not None and w != g for w, g in zip(want, value.shape, strict=True)
            ):
                shape = ["batch" if d == "batch" else d for d in spec["shape"]]
                raise UsageError(
                    f"state {name!r}: shape {list(value.shape)}, expected {shape}"
                    + (f" with batch {batch}" if batch is not None else "")
                    + " (manifest); states of one session share the batch size"
                )
            batch = int(value.shape[0])
            if not np.isfinite(value).all():
                raise UsageError(
                    f"state {name!r} contains NaN or Inf: it is corrupt; rebuild it with start()"
                )
            out[name] = value
        return out

    # ------------------------------------------------------------------------------------ calls

    def _outputs(self, names: list[str], values: list[np.ndarray]) -> dict[str, np.ndarray]:
        got = dict(zip(names, values, strict=True))
        self._states = {i: got[o] for i, o in self.state_pairs}
        return {n: got[n] for n in self.head_names}

    def _exclude(self, exclude: Sequence[Sequence[int]] | None, batch: int) -> dict[str, np.ndarray]:
        """The ``exclude_items`` feed (zeros [batch, 1] when None) or nothing if the graphs lack it."""
        if self._exclude_name is None:
            if exclude is not None:
                raise UsageError(
                    "exclude=...: this export's head has no exclude_items input (embedding head, "
                    "or exported with --no-exclude-items)"
                )
            return {}
        if exclude is None:  # the same zeros each call (the prepared step skips copying them again)
            if self._no_exclude.shape[0] != batch:
                self._no_exclude = np.zeros((batch, 1), dtype=np.int64)
            return {self._exclude_name: self._no_exclude}
        from .onnx.inputs import exclude_inputs

        return {self._exclude_name: exclude_inputs(exclude, batch)}

    def start(
        self, histories: Sequence[Sequence[int]], exclude: Sequence[Sequence[int]] | None = None
    ) -> dict[str, np.ndarray]:
        """Encode one history per row (item indices, oldest first) -> head outputs; keeps the states.

        Ids outside ``[1, n_items)`` are dropped first (streaming skips them); an empty history
        gives the empty state (the outputs are then those the model gives an empty input).
        ``exclude``: per row, items never to rank in these outputs (ranking heads; not kept).
        Memory is bounded: ``init`` takes each row's first :func:`init_window` events, ``step``
        the rest (exact). More than ``max_events`` events in a row raise :class:`UsageError`.
        """
        from .data.protocol import index_rows

        given = index_rows(histories, "start(histories)")  # None, raw tokens, floats: a clear error
        if len(given) == 0:
            raise UsageError("start(histories): need at least one history")
        longest = max(len(h) for h in given)
        if longest > self.max_events:
            raise UsageError(
                f"start(histories): a history has {longest} events, above the {self.max_events} one call "
                "accepts (max_events); start with its first part and push() the rest"
            )
        excl = self._exclude(exclude, len(given))
        rows = [[i for i in h if 1 <= i < self.n_items] for h in given]
        window = init_window(self.manifest["model"])
        outs = self._init_rows([r[:window] for r in rows], excl)
        longest = max(len(r) for r in rows)
        if longest > window:  # the rest through step, all rows at once (0: no event for that row)
            tail = np.zeros((len(rows), longest - window), dtype=np.int64)
            for i, r in enumerate(rows):
                tail[i, : max(0, len(r) - window)] = r[window:]
            outs = self._fold(tail, excl)
        return outs

    def extend(
        self, events: Sequence[Sequence[int]], exclude: Sequence[Sequence[int]] | None = None
    ) -> dict[str, np.ndarray]:
        """:meth:`push` each column of ``events`` (one list of new ids per row, oldest first; rows
        shorter than the longest get 0 = no event) -> the head outputs after the last one.

        Same results as pushing one by one, faster (the head runs once); at most ``max_events``
        events per row."""
        if self._states is None:
            raise UsageError("extend() before start(): call start(histories) first")
        if len(events) != self.batch:
            raise UsageError(
                f"extend(events): need {self.batch} lists of ids (one per row), got {len(events)}"
            )
        longest = max((len(e) for e in events), default=0)
        if longest > self.max_events:
            raise UsageError(
                f"extend(events): a row has {longest} events, above the {self.max_events} one call accepts "
                "(max_events); send them in several calls"
            )
        matrix = np.zeros((self.batch, max(1, longest)), dtype=np.int64)  # no event at all: one 0 column
        for i, e in enumerate(events):
            matrix[i, : len(e)] = np.asarray(e, dtype=np.int64)
        return self._fold(matrix, self._exclude(exclude, self.batch))

    def _fold(self, events: np.ndarray, excl: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One step per column of ``events`` [batch, n >= 1]; only the last computes the head outputs."""
        assert self._states is not None  # start() or load_states() set them (and checked them)
        bound = self._bound(self._states)
        if bound is not None:
            for t in range(events.shape[1] - 1):
                bound.run(events[:, t], excl.get(self._exclude_name or ""), heads=False)
            return self._advance(events[:, -1], excl, bound.states)
        states = self._states
        outputs = [o for _, o in self.state_pairs]
        for t in range(events.shape[1] - 1):
            feeds = {self._item_name: events[:, t], **excl, **states}
            new = self._step.run(outputs, feeds)
            states = {i: v for (i, _), v in zip(self.state_pairs, new, strict=True)}
        self._states = states
        return self._advance(events[:, -1], excl, states)

    def _bound(self, states: dict[str, np.ndarray]) -> StepBinding | None:
        """The prepared step for this batch size holding ``states`` (None: this session runs plainly)."""
        if not self._bindable:
            return None
        bound = self._binding
        batch = int(next(iter(states.values())).shape[0])
        if bound is None or bound.batch != batch:
            try:
                bound = StepBinding(
                    self._step,
                    item_name=self._item_name,
                    exclude_name=self._exclude_name,
                    state_pairs=self.state_pairs,
                    head_names=self.head_names,
                    states=states,
                )
            except ValueError:  # a head output of unknown shape: plain runs
                self._bindable = False
                return None
            self._binding = bound
        elif states is not bound.states:
            bound.load(states)
        return bound

    def _init_rows(self, rows: list[list[int]], excl: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``init.onnx`` on ``rows`` (already filtered and windowed), in row chunks of bounded memory."""
        names = [o.name for o in self._init.get_outputs()]
        parts: list[list[np.ndarray]] = []
        step = init_chunk_rows(self.manifest["model"], max(1, max(len(r) for r in rows)))
        for lo in range(0, len(rows), step):
            chunk = rows[lo : lo + step]
            width = max(1, max(len(r) for r in chunk))
            seq = np.zeros((len(chunk), width), dtype=np.int64)
            for r, h in enumerate(chunk):
                seq[r, : len(h)] = h
            lengths = np.array([len(h) for h in chunk], dtype=np.int64)
            feeds = {self._seq_name: seq, self._len_name: lengths}
            feeds.update({k: v[lo : lo + step] for k, v in excl.items()})
            parts.append(self._init.run(None, feeds))
        return self._outputs(names, [np.concatenate(col) for col in zip(*parts, strict=True)])

    def push(
        self, item_ids: Sequence[int] | np.ndarray, exclude: Sequence[Sequence[int]] | None = None
    ) -> dict[str, np.ndarray]:
        """Fold one new item per row into the states -> head outputs for the longer histories.

        ``item_ids`` has one id per row of the batch; ids outside ``[1, n_items)`` (use 0 for "no
        event") leave that row's state and outputs unchanged. ``exclude`` as for :meth:`start`.
        """
        if self._states is None:
            raise UsageError("push() before start(): call start(histories) first")
        ids = np.asarray(item_ids)
        if ids.ndim != 1 or ids.shape[0] != self.batch or not np.issubdtype(ids.dtype, np.integer):
            raise UsageError(
                f"push(item_ids): need {self.batch} integer ids (one per row), got shape {list(ids.shape)} "
                f"of {ids.dtype}"
            )
        # the states were checked when loaded, or computed by the graphs: not re-checked per event
        return self._advance(ids.astype(np.int64), self._exclude(exclude, self.batch), self._states)

    def _advance(
        self, ids: np.ndarray, excl: dict[str, np.ndarray], states: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """One ``step.onnx`` call (through the prepared binding on CPU); keeps the new states."""
        bound = self._bound(states)
        if bound is not None:
            heads = bound.run(ids, excl.get(self._exclude_name or ""))
            self._states = bound.states
            return heads
        feeds = {self._item_name: ids, **excl, **states}
        return self._outputs(self._step_names, self._step.run(None, feeds))
