"""Triton Python-backend model: streaming recommendations, one state per sequence (m4r triton --streaming).

The sequence batcher gives every request the control inputs START, END (int32 0/1) and CORRID
(uint64). State lives here, per correlation id, as the batch-1 state tensors of
:class:`m4r_export.streaming.StreamingSession` (which holds all the init/step logic):

- START: ``item_ids`` [1, n] is the user's history (any length, may be empty) -> ``init``.
- otherwise: ``item_ids`` [1, n] are new events, oldest first -> ``step`` once per event
  (``StreamingSession.extend``; 0 = padding; ids outside [1, n_items) are skipped by the step
  graph itself).
- END: the state is dropped after the response.
- a request with more than ``max_request_events`` ids (config parameter) is refused with an error
  naming the limit; memory per request is bounded anyway (StreamingSession.start windows init).

Requests of one batch are run together: one ``init`` call for the STARTs, one ``step`` call per
event column for the others (rows with fewer events are fed 0, i.e. "no event").
Triton does not notify a backend when it reclaims an idle sequence, so on every call the model
drops states untouched for longer than ``max_sequence_idle_microseconds`` (Triton measures
idleness from the last request's arrival, which is earlier, so a live sequence is never dropped
here first).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from m4r_export.streaming import MAX_REQUEST_EVENTS, StreamingSession


def _log(message: str) -> None:
    """Triton's log (pb_utils.Logger where the backend has it, else the stub's stdout, also the log)."""
    logger = getattr(pb_utils, "Logger", None)
    if logger is not None:
        logger.log_info(message)
    else:
        print(message, flush=True)


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        directory = os.path.join(args["model_repository"], args["model_version"])
        threads = int(params.get("intra_op_num_threads", "0")) or None
        self.max_events = int(params.get("max_request_events", str(MAX_REQUEST_EVENTS)))
        self.session = StreamingSession.from_dir(
            directory, params.get("precision", "fp32"), threads=threads, max_events=self.max_events
        )
        self.outputs = [o["name"] for o in config["output"]]
        self.takes_exclude = any(i["name"] == "exclude_items" for i in config["input"])
        idle_us = int(config["sequence_batching"].get("max_sequence_idle_microseconds", 1_000_000))
        self.idle_s = idle_us / 1e6
        # correlation id -> (batch-1 states by step-input name, time of last use)
        self.states: dict[int, tuple[dict[str, np.ndarray], float]] = {}

    def _evict_idle(self, now: float) -> None:
        for corrid in [c for c, (_, t) in self.states.items() if now - t > self.idle_s]:
            del self.states[corrid]
            _log(
                f"m4r streaming: dropped the state of sequence {corrid} (idle > {self.idle_s:g} s, "
                "max_sequence_idle_microseconds)"
            )

    @staticmethod
    def _scalar(request: Any, name: str) -> int:
        return int(pb_utils.get_input_tensor_by_name(request, name).as_numpy().reshape(-1)[0])

    def _parse(self, request: Any) -> tuple[int, bool, bool, list[int], list[int]]:
        corrid = self._scalar(request, "CORRID")
        start, end = bool(self._scalar(request, "START")), bool(self._scalar(request, "END"))
        items = pb_utils.get_input_tensor_by_name(request, "item_ids").as_numpy()
        if items.ndim != 2 or items.shape[0] != 1:
            raise ValueError(f"item_ids: one user per request, shape [1, n]; got {list(items.shape)}")
        if items.shape[1] > self.max_events:
            raise ValueError(
                f"item_ids: {items.shape[1]} ids in one request, above max_request_events={self.max_events} "
                "(config.pbtxt): send the history's first part with START and the rest in later requests"
            )
        ids = [int(i) for i in items[0] if i != 0]
        exclude: list[int] = []
        if self.takes_exclude:
            tensor = pb_utils.get_input_tensor_by_name(request, "exclude_items")
            if tensor is not None:
                exclude = [int(i) for i in tensor.as_numpy().reshape(-1) if i != 0]
        if not start and corrid not in self.states:
            raise ValueError(
                f"sequence {corrid} has no state: its first request must set START (with the history), "
                f"and a sequence idle for more than {self.idle_s:g} s is reclaimed"
            )
        return corrid, start, end, ids, exclude

    def execute(self, requests: list[Any]) -> list[Any]:
        self._evict_idle(time.monotonic())
        responses: list[Any] = [None] * len(requests)
        starts: list[tuple[int, Any]] = []
        steps: list[tuple[int, Any]] = []
        for i, request in enumerate(requests):
            try:
                parsed = self._parse(request)
            except ValueError as exc:
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc)))
                continue
            (starts if parsed[1] else steps).append((i, parsed))
        for group, run in ((starts, self._start), (steps, self._step)):
            if not group:
                continue
            try:
                outs = run([p for _, p in group])
            except Exception as exc:  # a bad request must not take the model down
                for i, _ in group:
                    responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc)))
                continue
            states = self.session.states
            now = time.monotonic()
            for row, (i, (corrid, _, end, _, _)) in enumerate(group):
                if end:
                    self.states.pop(corrid, None)
                else:
                    self.states[corrid] = ({k: v[row : row + 1] for k, v in states.items()}, now)
                tensors = [
                    pb_utils.Tensor(n, np.ascontiguousarray(outs[n][row : row + 1])) for n in self.outputs
                ]
                responses[i] = pb_utils.InferenceResponse(output_tensors=tensors)
        return responses

    def _exclude(self, parsed: list[Any]) -> list[list[int]] | None:
        return [p[4] for p in parsed] if self.takes_exclude else None

    def _start(self, parsed: list[Any]) -> dict[str, np.ndarray]:
        return self.session.start([p[3] for p in parsed], exclude=self._exclude(parsed))

    def _step(self, parsed: list[Any]) -> dict[str, np.ndarray]:
        saved = [self.states[p[0]][0] for p in parsed]
        self.session.load_states({k: np.concatenate([s[k] for s in saved]) for k in saved[0]})
        # one step per event column (rows with fewer events get 0 = no event; none at all: outputs unchanged)
        return self.session.extend([p[3] for p in parsed], exclude=self._exclude(parsed))
