"""ANN recall@10 / batch-1 latency trade-offs of the faiss indexes m4r export builds (issue 19 item 5).

    python benchmarks/ann_sweep.py CKPT DATA [--kinds pq,ivf,hnsw] [--out sweep.json]  # trained table
    python benchmarks/ann_sweep.py gauss|clustered N_ITEMS [--kinds pq,ivf] [--out sweep.json]

A checkpoint's item table is searched with the user vectors of 500 test histories of DATA; ``gauss``
is an i.i.d. Gaussian table (= untrained: the worst case, no cluster structure), ``clustered`` has
n/500 Gaussian clusters (noise 0.3) and users near items. Every index is built by
:func:`m4r_export.ann.build_index` (what ``m4r export --ann KIND`` writes), 1 thread:

* ``pq``: 4-bit PQ fast scan of every item (``--pq-m``, default hidden / 2) + re-ranking of
  ``k_factor`` x 10 candidates with an fp32 (and, with ``--fp16-refine``, fp16) copy of the table;
  knob ``k_factor``;
* ``ivf``: IVF-Flat with ``--ivf-lists`` x sqrt(n) lists (default 4); knob ``nprobe``;
* ``hnsw``: M 32, efConstruction 64; knob ``efSearch`` (slow to build beyond 100K items).

Per index and knob value: one JSON line (and, with ``--out``, a JSON list) with the build time, the
index file size, recall@10 against the exact top-10 (:func:`m4r_export.bench.ann.exact_topk`) and
the batch-1 search time over the 500 users (p50 and mean, 1 thread).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from typing import Any

import faiss
import numpy as np
import torch

from m4r_export import ann
from m4r_export.bench.ann import exact_topk

K, USERS = 10, 500
KNOBS = {
    "pq": ("k_factor", (8, 16, 32, 64, 128)),
    "ivf": ("nprobe", (16, 64, 256, 1024)),
    "hnsw": ("ef_search", (64, 256, 1024)),
}


def tables(src: str, arg: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    if src.endswith(".pt"):
        from m4r_export.checkpoint import load_checkpoint
        from m4r_export.data import load_dataset
        from m4r_export.serving import ServingModel

        model = load_checkpoint(src).eval()
        ds = load_dataset(arg, max_seq_len=50)
        t = ds.test.subset(rng.choice(len(ds.test), size=min(USERS, len(ds.test)), replace=False))
        with torch.no_grad():
            (users,) = ServingModel(model, "embedding", K)(
                torch.from_numpy(t.item_seq), torch.from_numpy(t.item_seq_len)
            )
        return model.item_embedding.weight.detach().numpy().astype(np.float32), users.numpy()
    n, d = int(arg), 64
    if src == "gauss":
        table = _normal(rng, n, d) * 0.02
        return table, rng.normal(size=(USERS, d)).astype(np.float32)
    centres = rng.normal(size=(max(n // 500, 50), d)).astype(np.float32)
    table = centres[rng.integers(0, len(centres), n)]
    table += 0.3 * _normal(rng, n, d)
    return table, (table[rng.integers(1, n, USERS)] + 0.3 * rng.normal(size=(USERS, d))).astype(np.float32)


def _normal(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """``rng.normal(size=(n, d))`` as float32 without the float64 copy (same draws, in slices)."""
    out = np.empty((n, d), np.float32)
    for s in range(0, n, 1 << 20):
        out[s : s + (1 << 20)] = rng.normal(size=(min(1 << 20, n - s), d))
    return out


def _index_mb(index: Any) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        ann.write_index(index, ann.Path(tmp) / "i.faiss")
        return os.path.getsize(os.path.join(tmp, "i.faiss")) / 2**20


def sweep(
    src: str, table: np.ndarray, users: np.ndarray, exact: np.ndarray, params: ann.AnnParams, knobs: list[int]
) -> list[dict[str, Any]]:
    t = time.perf_counter()
    index = ann.build_index(table, params, threads=1)
    built = time.perf_counter() - t
    size = _index_mb(index)
    knob, values = KNOBS[params.kind][0], knobs or KNOBS[params.kind][1]
    per_kind: dict[str, dict[str, Any]] = {
        "pq": {"pq_m": ann.pq_m_for(table.shape[1], params), "refine": params.refine},
        "ivf": {"nlist": ann.lists_for(len(table), params)},
        "hnsw": {"m": params.m, "ef_construction": params.ef_construction},
    }
    shown = per_kind[params.kind]
    out = []
    for value in values:
        if params.kind == "ivf" and value > shown["nlist"]:
            continue
        change: dict[str, Any] = {knob: value}
        p = dataclasses.replace(params, **change)
        ann._set_search(index, p)
        ann.search(index, users[:20], K)  # warm-up
        got, times = [], []
        for i in range(len(users)):
            s = time.perf_counter()
            got.append(ann.search(index, users[i : i + 1], K)[1][0])
            times.append((time.perf_counter() - s) * 1e3)
        r = ann.recall(exact, np.array(got))
        row = {"source": src, "n": len(table), "kind": params.kind, **shown, knob: value}
        row.update(
            {
                "recall@10": round(float(r.mean()), 4),
                "recall@10_min": round(float(r.min()), 2),
                "p50_ms_b1": round(float(np.percentile(times, 50)), 3),
                "mean_ms_b1": round(float(np.mean(times)), 3),
                "build_s": round(built, 1),
                "index_mb": round(size, 1),
            }
        )
        print(json.dumps(row), flush=True)
        out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", help="gauss | clustered | a checkpoint (.pt)")
    ap.add_argument("arg", help="number of items (synthetic) or the dataset of the checkpoint")
    ap.add_argument("--kinds", default="pq,ivf", help="comma-separated: pq, ivf, hnsw")
    ap.add_argument("--pq-m", type=int, default=0, help="pq sub-quantisers (0: hidden / 2)")
    ap.add_argument("--fp16-refine", action="store_true", help="pq: also the fp16 re-ranking copy")
    ap.add_argument("--ivf-lists", default="4", help="ivf: comma-separated multiples of sqrt(n)")
    ap.add_argument("--knobs", default="", help="comma-separated search-knob values (default: per kind)")
    ap.add_argument("--out", default=None, help="write every row as a JSON list here")
    args = ap.parse_args()
    faiss.omp_set_num_threads(1)
    torch.set_num_threads(1)
    table, users = tables(args.source, args.arg, np.random.default_rng(0))
    src = "beauty" if args.source.endswith(".pt") else args.source
    runs: list[ann.AnnParams] = []
    kinds = args.kinds.split(",")
    if "pq" in kinds:
        runs += [
            ann.AnnParams(kind="pq", pq_m=args.pq_m, refine=r) for r in ["fp32"] + ["fp16"] * args.fp16_refine
        ]
    if "ivf" in kinds:
        n = len(table)
        runs += [
            ann.AnnParams(kind="ivf", nlist=int(float(x) * np.sqrt(n))) for x in args.ivf_lists.split(",")
        ]
    if "hnsw" in kinds:
        runs.append(ann.AnnParams(kind="hnsw"))
    exact = exact_topk(users, table, K)
    knobs = [int(v) for v in args.knobs.split(",") if v]
    rows = [row for p in runs for row in sweep(src, table, users, exact, p, knobs)]
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"load_avg": os.getloadavg(), "faiss": faiss.__version__, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
