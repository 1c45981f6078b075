"""Approximate retrieval: a faiss index over the ``embedding`` head's item table (issue 19 item 5).

``m4r export --head embedding --ann pq`` writes ``item_index.faiss`` beside ``item_embedding.npy``;
the manifest lists and hashes it like every file and states its parameters (``ann`` section). A
client computes ``user_embedding`` with model.onnx and asks the index for the K items of largest
inner product (the exact score ``user_embedding @ table.T``); ``m4r verify`` measures the recall of
that against exact top-K, and the offline metrics of both.

Kinds (docs/onnx-export.md, "Approximate retrieval", has the measurements; benchmarks/ann_sweep.py
makes them):

* ``pq`` (default): the whole table scanned as 4-bit product-quantisation codes with faiss's SIMD
  fast scan (``IndexPQFastScan``, ``pq_m`` sub-quantisers, default hidden / 2: 16 bytes an item at
  hidden 64), the best ``k_factor * K`` candidates re-ranked with the exact inner product
  (``IndexRefineFlat``, fp32 copy of the table; ``refine="fp16"``: an fp16 copy, half the memory,
  scores rounded). It needs no cluster structure: at 1M items x 64 (1 thread) it keeps recall@10
  0.97 on an i.i.d. Gaussian table (an untrained table, or a trained catalogue's long tail, which
  stays near its random init) and 1.0 on a clustered one at about 1 ms a query, and builds in
  seconds. Its cost grows linearly with the catalogue (about 10x at 10M).
* ``ivf``: IVF-Flat, k-means on a sample, ``nlist`` = 4 sqrt(n) lists, ``nprobe`` searched. Fast
  and exact-ish on clustered tables (recall 1.0 at 0.9 ms at 1M), but it cannot find neighbours
  where the table has no clusters: recall@10 0.32 on the Gaussian 1M table at nprobe 64 (0.61 at
  nprobe 256, 3.8 ms), hence no longer the default.
* ``hnsw`` (M, efConstruction, efSearch): a graph; minutes to build at 100K items on one core.

Row 0 (padding) is not in any index: index ids are item index - 1.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import M4RError, UsageError

INDEX_FILE = "item_index.faiss"
KINDS = ("pq", "ivf", "hnsw")
#: pq: how the candidates are re-ranked (a copy of the table in that precision)
REFINES = ("fp32", "fp16")
#: pq: 4-bit codes, i.e. 16 centroids per sub-quantiser, trained on at least this many rows
PQ_MIN_ROWS = 16
#: k-means training sample per list (faiss warns below 39)
TRAIN_PER_LIST = 40
#: at most this many training vectors (k-means time grows with sample x nlist)
TRAIN_MAX = 200_000


@dataclass(frozen=True)
class AnnParams:
    kind: str = "pq"
    #: ivf: lists (0: 4 sqrt(n_items)) and lists searched per query
    nlist: int = 0
    nprobe: int = 64
    #: hnsw: graph degree, build and search beam widths
    m: int = 32
    ef_construction: int = 64
    ef_search: int = 256
    #: pq: sub-quantisers (0: hidden / 2, or hidden when odd), candidates per result re-ranked
    #: exactly (k_factor * K), and the precision of the re-ranking copy of the table
    pq_m: int = 0
    k_factor: int = 64
    refine: str = "fp32"

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "metric": "inner_product", "ids": "item index - 1 (row 0, padding, left out)"}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> AnnParams:
        try:
            return cls(
                str(d["kind"]),
                int(d.get("nlist") or 0),  # hnsw exports before this fix wrote null
                int(d["nprobe"]),
                int(d["m"]),
                int(d["ef_construction"]),
                int(d["ef_search"]),
                # exports before the pq kind have no pq fields: the defaults (unused by ivf / hnsw)
                int(d.get("pq_m") or 0),
                int(d.get("k_factor") or cls.k_factor),
                str(d.get("refine") or cls.refine),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise UsageError(f"manifest 'ann' section is malformed ({exc}); re-export with --ann") from exc


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise M4RError("approximate retrieval needs faiss-cpu: pip install faiss-cpu") from exc
    return faiss


def lists_for(n_items: int, params: AnnParams) -> int:
    return params.nlist or max(1, min(n_items - 1, int(4 * np.sqrt(n_items))))


def pq_m_for(dim: int, params: AnnParams) -> int:
    return params.pq_m or (dim // 2 if dim % 2 == 0 else dim)


def check(params: AnnParams, n_items: int, dim: int) -> None:
    """UsageError for parameters that cannot build an index of this table (before any slow work)."""
    if params.kind not in KINDS:
        raise UsageError(f"--ann {params.kind!r}: choose one of {', '.join(KINDS)}")
    if params.kind != "pq":
        return
    if params.refine not in REFINES:
        raise UsageError(f"--ann-refine {params.refine!r}: choose one of {', '.join(REFINES)}")
    m = pq_m_for(dim, params)
    if dim % m:
        raise UsageError(
            f"--ann-pq-m {m}: must divide the hidden size {dim} (default {pq_m_for(dim, AnnParams())})"
        )
    if n_items - 1 < PQ_MIN_ROWS:
        raise UsageError(
            f"--ann pq: the table has {n_items - 1} items, product quantisation needs at least "
            f"{PQ_MIN_ROWS}; use --ann ivf (exact top-K is cheap at this size)"
        )


def _pq_index(faiss: Any, dim: int, params: AnnParams) -> Any:
    """4-bit PQ fast scan over every row + exact (or fp16) re-ranking of the best candidates."""
    base = faiss.IndexPQFastScan(dim, pq_m_for(dim, params), 4, faiss.METRIC_INNER_PRODUCT)
    base.pq.cp.min_points_per_centroid = 1  # small tables: no warning per sub-quantiser
    if params.refine == "fp32":
        return faiss.IndexRefineFlat(base)
    fp16 = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
    return faiss.IndexRefine(base, fp16)


def build_index(table: np.ndarray, params: AnnParams, threads: int | None = None) -> Any:
    """An inner-product index over rows 1.. of ``table`` [n_items, hidden] (fp32)."""
    check(params, table.shape[0], table.shape[1])
    faiss = _faiss()
    if threads:
        faiss.omp_set_num_threads(threads)
    rows = table[1:]
    dim = table.shape[1]
    size = min(len(rows), TRAIN_MAX)
    if params.kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, params.m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params.ef_construction
        size = 0
    elif params.kind == "pq":
        index = _pq_index(faiss, dim, params)
    else:
        nlist = lists_for(len(table), params)
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        size = min(size, TRAIN_PER_LIST * nlist)
    if size:
        sample = np.sort(np.random.default_rng(0).choice(len(rows), size=size, replace=False))
        index.train(np.ascontiguousarray(rows[sample], dtype=np.float32))
    for start in range(0, len(rows), 1 << 18):  # add in slices: no second copy of a big table
        index.add(np.ascontiguousarray(rows[start : start + (1 << 18)], dtype=np.float32))
    _set_search(index, params)
    return index


def _set_search(index: Any, params: AnnParams) -> None:
    if params.kind == "hnsw":
        index.hnsw.efSearch = params.ef_search
    elif params.kind == "pq":
        index.k_factor = float(params.k_factor)
    else:
        index.nprobe = params.nprobe


def write_index(index: Any, path: Path) -> None:
    _faiss().write_index(index, str(path))


def read_index(source: Path | bytes, params: AnnParams) -> Any:
    """The index from a file, or from bytes already read and checked (the export's hashed copy)."""
    faiss = _faiss()
    if isinstance(source, bytes):
        index = faiss.deserialize_index(np.frombuffer(source, dtype=np.uint8))
    else:
        index = faiss.read_index(str(source))
    _set_search(index, params)
    return index


def search(index: Any, users: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, item indices) [batch, k] of the ANN top-K, best first; missing entries -inf / 0."""
    scores, ids = index.search(np.ascontiguousarray(users, dtype=np.float32), k)
    missing = ids < 0
    return np.where(missing, -np.inf, scores), np.where(missing, 0, ids + 1).astype(np.int64)


def recall(exact: np.ndarray, approx: np.ndarray) -> np.ndarray:
    """Per user: the fraction of the exact top-K also in the ANN top-K (recall@K)."""
    k = exact.shape[1]
    return np.array([len(set(a) & set(b)) / k for a, b in zip(exact.tolist(), approx.tolist(), strict=True)])
