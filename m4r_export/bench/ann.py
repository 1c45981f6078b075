"""``m4r bench`` on an export with an ANN index: exact top-K and the index side by side (issue 19.5).

Both search the same user vectors (the artifact's ``user_embedding`` for random full-length
histories) for the ``k`` items of largest inner product with the item table, item 0 (padding)
excluded:

* ``exact``: ``users @ table.T`` over the whole table in row chunks of :data:`EXACT_CHUNK` items
  (numpy, BLAS), the chunk's top-K with ``argpartition`` merged into a running top-K: what a client
  of the embedding head does without an index, in bounded memory;
* ``ann``: ``index.search`` with the export's parameters (``k_factor`` / ``nprobe`` / ``efSearch`` from
  the manifest).

Per batch size they take turns (one call each per round, after one warm-up call each) so that a
noisy neighbour slows both alike; p50 per call and the ratio exact/ann are reported, and recall@K
of the index against the exact top-K over ``recall_users`` users. The table and the index come
from the bytes checked against the manifest.
"""

from __future__ import annotations

import io
import time
from typing import Any

import numpy as np

#: items scored at a time by the exact search (memory batch x chunk fp32)
EXACT_CHUNK = 65536
RECALL_USERS = 512
#: the manifest's parameters that matter per index kind (reported by bench)
PARAM_KEYS = {
    "pq": ("pq_m", "k_factor", "refine"),
    "ivf": ("nlist", "nprobe"),
    "hnsw": ("m", "ef_construction", "ef_search"),
}


def exact_topk(users: np.ndarray, table: np.ndarray, k: int) -> np.ndarray:
    """Item ids [batch, k] of the largest ``users @ table[1:].T``, best first (ties: lower id)."""
    batch = users.shape[0]
    best_s = np.full((batch, 0), -np.inf, np.float32)
    best_i = np.zeros((batch, 0), np.int64)
    for start in range(1, table.shape[0], EXACT_CHUNK):
        scores = users @ table[start : start + EXACT_CHUNK].T
        kk = min(k, scores.shape[1])
        part = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
        best_s = np.concatenate([best_s, np.take_along_axis(scores, part, axis=1)], axis=1)
        best_i = np.concatenate([best_i, part + start], axis=1)
        if best_s.shape[1] > k:
            keep = np.argpartition(-best_s, k - 1, axis=1)[:, :k]
            best_s = np.take_along_axis(best_s, keep, axis=1)
            best_i = np.take_along_axis(best_i, keep, axis=1)
    order = np.lexsort((best_i, -best_s), axis=1)
    return np.take_along_axis(best_i, order, axis=1)


def load_table_and_index(art: Any) -> tuple[np.ndarray, Any, dict[str, Any]] | None:
    """(item table, index, manifest 'ann' section) of an export with an index, from checked bytes."""
    spec = (art.manifest or {}).get("ann") if art.head == "embedding" else None
    if not isinstance(spec, dict) or art.item_table is None:
        return None
    from ..ann import AnnParams, read_index

    table = np.load(io.BytesIO(art.read(art.item_table)), allow_pickle=False)
    index = read_index(art.read(art.path.parent / str(spec["file"])), AnnParams.from_json(spec))
    return np.ascontiguousarray(table, np.float32), index, spec


def run_ann_bench(
    art: Any,
    user_vectors: Any,
    n_items: int,
    max_seq_len: int,
    *,
    batches: list[int],
    k: int,
    threads: int,
    repeats: int,
    max_seconds: float,
    seed: int = 0,
) -> dict[str, Any] | None:
    """The ANN section of ``m4r bench``'s result, or None when the export has no index.

    ``user_vectors(item_seq, item_seq_len) -> [batch, hidden]`` is the artifact's runner.
    """
    loaded = load_table_and_index(art)
    if loaded is None:
        return None
    import faiss

    from ..ann import recall, search

    table, index, spec = loaded
    faiss.omp_set_num_threads(threads)
    rng = np.random.default_rng(seed)
    n_users = max(max(batches), RECALL_USERS)
    users = np.concatenate(
        [
            user_vectors(rng.integers(1, n_items, size=(rows, max_seq_len)), np.full(rows, max_seq_len))
            for rows in [min(256, n_users - s) for s in range(0, n_users, 256)]
        ]
    ).astype(np.float32)
    exact_all = exact_topk(users[:RECALL_USERS], table, k)
    ann_all = search(index, users[:RECALL_USERS], k)[1]
    r = recall(exact_all, ann_all)
    rows = []
    budget = max_seconds / len(batches)
    for batch in batches:
        u = users[:batch]
        exact_topk(u, table, k), search(index, u, k)  # warm-up
        times: dict[str, list[float]] = {"exact": [], "ann": []}
        t0 = time.perf_counter()
        for i in range(repeats):
            if i >= 3 and time.perf_counter() - t0 > budget:
                break
            s = time.perf_counter()
            exact_topk(u, table, k)
            times["exact"].append((time.perf_counter() - s) * 1000.0)
            s = time.perf_counter()
            search(index, u, k)
            times["ann"].append((time.perf_counter() - s) * 1000.0)
        exact_ms, ann_ms = (float(np.percentile(times[n], 50)) for n in ("exact", "ann"))
        rows.append(
            {
                "batch": batch,
                "runs": len(times["ann"]),
                "exact_p50_ms": exact_ms,
                "ann_p50_ms": ann_ms,
                "speedup": exact_ms / ann_ms if ann_ms > 0 else float("inf"),
            }
        )
    knob = {"pq": "k_factor", "ivf": "nprobe", "hnsw": "ef_search"}.get(str(spec.get("kind")), "")
    return {
        "kind": spec.get("kind"),
        "params": {key: spec.get(key) for key in PARAM_KEYS.get(str(spec.get("kind")), ()) if key in spec},
        "search_knob": {knob: spec.get(knob)} if knob else {},
        "k": k,
        "n_items": int(table.shape[0]),
        "recall_users": int(len(r)),
        f"recall@{k}_mean": float(r.mean()),
        f"recall@{k}_min": float(r.min()),
        "threads": threads,
        "points": rows,
        "exact": f"numpy users @ table.T in chunks of {EXACT_CHUNK} items + argpartition (fp32)",
    }
