"""User embedding + ANN search from one checked export (``m4r export --head embedding --ann ...``).

:class:`AnnRetriever` opens the export directory once with :func:`open_artifact` (every listed
file hashed against the manifest), builds the ONNX Runtime session of ``model.onnx`` and the faiss
index from those checked bytes (nothing is re-read by path), and answers
``recommend(item_seq, item_seq_len, k, exclude)`` -> ``(scores, items)`` [batch, k], best first.
The Triton Python-backend model written by ``m4r triton --ann`` is a thin wrapper around it.

Excluded items (``exclude_items``, 0 and ids outside ``[1, n_items)`` ignored, as in the ranking
heads): the index is asked for ``k + m`` neighbours, ``m`` the number of distinct in-range excluded
ids of the row (rows with the same ``m`` searched together, so a row's answer does not depend on
the other rows of its batch), the excluded ones are dropped and the first ``k`` kept. At most
``m`` of the ``k + m`` are excluded, so ``k`` remain whenever the index returns ``k + m``. The
answer is approximate like any ANN answer: the index's top-(k+m) candidates, filtered; it is exact
only where the index's search is. ``m`` is bounded by ``max_exclude``
(default :data:`MAX_EXCLUDE`), so a request's search cost is bounded. Entries the index could
not fill (too few items, or an IVF search probing too few lists) get score -inf and item 0.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .ann import AnnParams, read_index
from .errors import UsageError
from .onnx.manifest import open_artifact, ort_session

#: distinct excluded items per request a retriever accepts (over-fetch bound)
MAX_EXCLUDE = 4096


class AnnRetriever:
    """``model.onnx`` (user vector) + ``item_index.faiss`` of a checked embedding export."""

    def __init__(
        self, directory: str | os.PathLike[str], *, threads: int | None = None, max_exclude: int = MAX_EXCLUDE
    ) -> None:
        import onnxruntime as ort

        with open_artifact(Path(directory)) as files:
            m = files.manifest
            spec = m.get("ann")
            if m.get("head") != "embedding" or not isinstance(spec, dict):
                raise UsageError(
                    f"{directory} has no ANN index; export with `m4r export --head embedding --ann pq`"
                )
            so = ort.SessionOptions()
            so.log_severity_level = 3
            if threads:
                so.intra_op_num_threads = threads
            self.session = ort_session(files, "model.onnx", so)
            self.params = AnnParams.from_json(spec)
            if threads:
                import faiss

                faiss.omp_set_num_threads(threads)
            self.index = read_index(files.read(str(spec["file"])), self.params)
            self.n_items = int(m["model"]["n_items"])
            self.max_seq_len = int(m["max_seq_len"])
            self.manifest = m
        self.max_exclude = max_exclude

    def user_vectors(self, item_seq: np.ndarray, item_seq_len: np.ndarray) -> np.ndarray:
        feed = {
            "item_seq": np.asarray(item_seq, np.int64),
            "item_seq_len": np.asarray(item_seq_len, np.int64),
        }
        (user,) = self.session.run(["user_embedding"], feed)
        return np.asarray(user, np.float32)

    def recommend(
        self, item_seq: np.ndarray, item_seq_len: np.ndarray, k: int, exclude: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(scores float32, items int64) [batch, k]: the ANN top-k per row, excluded items left out."""
        return self.search(self.user_vectors(item_seq, item_seq_len), k, exclude)

    def search(
        self, users: np.ndarray, k: int, exclude: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        batch = users.shape[0]
        banned = [self.banned(exclude[r] if exclude is not None else None) for r in range(batch)]
        fetch = np.array([k + len(b) for b in banned], np.int64)
        users = np.ascontiguousarray(users, np.float32)
        out_s = np.full((batch, k), -np.inf, np.float32)
        out_i = np.zeros((batch, k), np.int64)
        # one search per distinct over-fetch: a row's answer depends on its own request only, not on
        # what else the batcher put beside it (pq re-ranks k_factor * fetch candidates, hnsw's beam
        # is at least fetch wide; more candidates can change the answer)
        for depth in np.unique(fetch).tolist():
            rows = np.flatnonzero(fetch == depth)
            scores, ids = self.index.search(users[rows], depth)
            items = np.where(ids < 0, 0, ids + 1).astype(np.int64)  # index ids are item index - 1
            for j, r in enumerate(rows.tolist()):
                keep = (ids[j] >= 0) & ~np.isin(items[j], banned[r])
                s, i = scores[j][keep][:k], items[j][keep][:k]
                out_s[r, : len(s)], out_i[r, : len(i)] = s, i
        return out_s, out_i

    def banned(self, row: Any) -> np.ndarray:
        """The distinct in-range item ids of one exclude row; more than ``max_exclude``: UsageError."""
        if row is None:
            return np.zeros(0, np.int64)
        ids = np.unique(np.asarray(row, np.int64).reshape(-1))
        ids = ids[(ids > 0) & (ids < self.n_items)]
        if len(ids) > self.max_exclude:
            raise UsageError(
                f"exclude_items: {len(ids)} distinct items in one row, above the limit of {self.max_exclude} "
                "(the ANN search over-fetches by that many); exclude fewer items"
            )
        return ids
