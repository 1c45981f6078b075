"""``step.onnx`` bound once per batch size, so that a streaming push costs the graph, not Python.

A plain ``InferenceSession.run`` converts every feed to an ONNX Runtime value and every output back
to a new numpy array: at batch 1 that is about 8-10 us of a 45 us step (ML-100K model, 1 thread).
:class:`StepBinding` binds the graph's inputs and outputs once, to numpy buffers that ONNX Runtime
reads and writes in place (``OrtValue.ortvalue_from_numpy`` shares the memory), with two state sets
that swap roles each call: call n reads set A and writes set B, call n + 1 reads B and writes A
(an input and an output never share memory). A call then writes the new ids (and the exclude
list, when given) into the bound buffers and runs the prepared binding.

CPU sessions only: :func:`can_bind` says whether a session qualifies (another execution provider
would copy the bound host buffers to its device and back, which is what ``run`` already does).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}


def can_bind(session: Any) -> bool:
    """True for a session that runs on the CPU execution provider alone."""
    return list(session.get_providers()) == ["CPUExecutionProvider"]


class StepBinding:
    """One batch size's prepared ``step.onnx`` calls; see the module docstring.

    ``state_pairs``: (step input, step output) per state tensor; ``states``: the starting states by
    step-input name (copied in); ``head_names``: the outputs :meth:`run` returns (copies). Raises
    ``ValueError`` when a head output's shape is not fixed up to the batch (use ``run`` then).
    """

    def __init__(
        self,
        session: Any,
        *,
        item_name: str,
        exclude_name: str | None,
        state_pairs: Sequence[tuple[str, str]],
        head_names: Sequence[str],
        states: Mapping[str, np.ndarray],
    ) -> None:
        import onnxruntime as ort

        self._ort_value = ort.OrtValue.ortvalue_from_numpy
        self._session = session
        self._item_name = item_name
        self._exclude_name = exclude_name
        self._pairs = list(state_pairs)
        self.batch = int(next(iter(states.values())).shape[0])
        self._ids = np.zeros(self.batch, dtype=np.int64)
        self._exclude = np.zeros((self.batch, 1), dtype=np.int64)
        self._exclude_given: np.ndarray | None = None
        self._sets = [
            {name: np.array(value, copy=True) for name, value in states.items()},
            {name: np.empty_like(value) for name, value in states.items()},
        ]
        meta = {o.name: o for o in session.get_outputs()}
        self._heads = {name: self._output_buffer(meta[name]) for name in head_names}
        self._bindings = [self._bind(current) for current in (0, 1)]
        self._current = 0

    def _output_buffer(self, meta: Any) -> np.ndarray:
        dims = [self.batch if d == "batch" else d for d in meta.shape]
        if meta.type not in _DTYPES or not all(isinstance(d, int) for d in dims):
            raise ValueError(f"step output {meta.name!r} has shape {meta.shape} of {meta.type}")
        return np.empty(dims, dtype=_DTYPES[meta.type])

    def _bind(self, current: int) -> Any:
        """The binding that reads state set ``current`` and writes the other one."""
        binding = self._session.io_binding()
        src, dst = self._sets[current], self._sets[1 - current]
        binding.bind_ortvalue_input(self._item_name, self._ort_value(self._ids))
        if self._exclude_name is not None:
            binding.bind_ortvalue_input(self._exclude_name, self._ort_value(self._exclude))
        for step_input, step_output in self._pairs:
            binding.bind_ortvalue_input(step_input, self._ort_value(src[step_input]))
            binding.bind_ortvalue_output(step_output, self._ort_value(dst[step_input]))
        for name, buffer in self._heads.items():
            binding.bind_ortvalue_output(name, self._ort_value(buffer))
        return binding

    def load(self, states: Mapping[str, np.ndarray]) -> None:
        """Copy ``states`` (same batch) into the set the next call reads."""
        for name, buffer in self._sets[self._current].items():
            np.copyto(buffer, states[name])

    @property
    def states(self) -> dict[str, np.ndarray]:
        """The current states by step-input name (the bound buffers: copy before keeping them)."""
        return self._sets[self._current]

    def _set_exclude(self, exclude: np.ndarray | None) -> None:
        if exclude is None:
            exclude = np.zeros((self.batch, 1), dtype=np.int64)
        elif exclude is self._exclude_given:  # the caller's unchanged array (e.g. its cached zeros)
            return
        self._exclude_given = exclude
        if exclude.shape == self._exclude.shape:
            self._exclude[...] = exclude
            return
        self._exclude = np.array(exclude, dtype=np.int64, copy=True)  # owned: later calls write into it
        for binding in self._bindings:  # another width: both bindings read the new buffer
            binding.bind_ortvalue_input(self._exclude_name, self._ort_value(self._exclude))

    def run(
        self, ids: np.ndarray, exclude: np.ndarray | None = None, heads: bool = True
    ) -> dict[str, np.ndarray]:
        """One step: ``ids`` [batch] int64 -> head outputs (copies; none when ``heads`` is False)."""
        self._ids[...] = ids
        if self._exclude_name is not None:
            self._set_exclude(exclude)
        self._session.run_with_iobinding(self._bindings[self._current])
        self._current = 1 - self._current
        return {name: buffer.copy() for name, buffer in self._heads.items()} if heads else {}
