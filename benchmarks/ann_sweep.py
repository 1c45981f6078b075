"""ANN recall@10 / batch-1 latency trade-offs of the faiss index m4r export builds (issue 19 item 5).

    python benchmarks/ann_sweep.py CKPT DATA [ivf|ivf4|hnsw|ivf,hnsw]   # a trained table, real histories
    python benchmarks/ann_sweep.py gauss|clustered N_ITEMS [ivf4 ...]    # synthetic tables

A checkpoint's item table is searched with the user vectors of 500 test histories of DATA; ``gauss``
is an i.i.d. Gaussian table (= untrained), ``clustered`` has n/500 Gaussian clusters (noise 0.3) and
users near items. Per index (IVF with 4 sqrt(n) lists, and 16 sqrt(n) unless ``ivf4``; HNSW M 32
with efConstruction 64 and 200) and search knob (nprobe / efSearch): one JSON line with the build
time, the mean batch-1 search time (1 thread) and recall@10 against the exact top-10
(:func:`m4r_export.bench.ann.exact_topk`).
"""

from __future__ import annotations

import json
import sys
import time

import faiss
import numpy as np
import torch

from m4r_export import ann
from m4r_export.bench.ann import exact_topk

K, USERS = 10, 500


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
        table = rng.normal(size=(n, d)).astype(np.float32) * 0.02
        return table, rng.normal(size=(USERS, d)).astype(np.float32)
    centres = rng.normal(size=(max(n // 500, 50), d)).astype(np.float32)
    table = (centres[rng.integers(0, len(centres), n)] + 0.3 * rng.normal(size=(n, d))).astype(np.float32)
    return table, (table[rng.integers(1, n, USERS)] + 0.3 * rng.normal(size=(USERS, d))).astype(np.float32)


def main() -> None:
    faiss.omp_set_num_threads(1)
    torch.set_num_threads(1)
    src, arg = sys.argv[1], sys.argv[2]
    which = sys.argv[3] if len(sys.argv) > 3 else "ivf,hnsw"
    table, users = tables(src, arg, np.random.default_rng(0))
    n = len(table)
    exact = exact_topk(users, table, K)

    def measure(index: object, label: str, build_s: float) -> None:
        t = time.perf_counter()
        got = np.concatenate([ann.search(index, users[i : i + 1], K)[1] for i in range(len(users))])
        ms = (time.perf_counter() - t) / len(users) * 1e3
        row = {"source": src, "n": n, "index": label, "build_s": round(build_s, 1), "ms_b1": round(ms, 3)}
        print(json.dumps({**row, "recall@10": round(float(ann.recall(exact, got).mean()), 3)}), flush=True)

    if "ivf" in which:
        for mult in (4,) if "ivf4" in which else (4, 16):
            p = ann.AnnParams(kind="ivf", nlist=int(mult * np.sqrt(n)))
            t = time.time()
            index = ann.build_index(table, p, threads=1)
            built = time.time() - t
            for nprobe in (8, 16, 32, 64, 128, 256):
                if nprobe <= p.nlist:
                    index.nprobe = nprobe
                    measure(index, f"ivf nlist {p.nlist} nprobe {nprobe}", built)
    if "hnsw" in which:
        for efc in (64, 200):
            p = ann.AnnParams(kind="hnsw", m=32, ef_construction=efc)
            t = time.time()
            index = ann.build_index(table, p, threads=1)
            built = time.time() - t
            for ef in (32, 64, 128, 256, 512):
                index.hnsw.efSearch = ef
                measure(index, f"hnsw M 32 efC {efc} efS {ef}", built)


if __name__ == "__main__":
    main()
