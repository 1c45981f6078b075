"""Training-step time and peak memory vs catalogue size: full CE (chunked) vs sampled softmax,
the latter with a dense item-table gradient + Adam and with a sparse (row-indexed) one + lazy Adam
(``sparse_embedding``, training/sparse.py).

    python benchmarks/sampled_softmax_scale.py --items 100000 1000000 --threads 1
    flock /work/wt/bigmem.lock python benchmarks/sampled_softmax_scale.py --items 10000000 --steps 2

Each (items, loss) cell runs in its own subprocess so that its peak RSS is its own. The batch is
built in memory (random long-tailed item ids, every sequence full length): ``--batch`` windows of
``--seq-len`` positions, every position trained (the every-position objective), the paper's model
(hidden 64, 1 layer), Adam (SparseAdam on the item table for ``sampled-sparse``). Timed: ``--steps``
steps after one warm-up step (median wall time and median process CPU time).
Full CE is skipped above ``--max-full-ce-items`` (its step is linear in the catalogue: the table
says so instead of running it). Runs needing more than 6 GB should hold /work/wt/bigmem.lock.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any


def cell(n_items: int, loss: str, batch: int, seq_len: int, negatives: int, steps: int, threads: int) -> dict:
    import numpy as np
    import torch

    from m4r_export.model import Mamba4Rec
    from m4r_export.training.losses import SampledSoftmax, ce_chunk, chunked_cross_entropy
    from m4r_export.training.sparse import SplitAdam

    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    model = Mamba4Rec(n_items)
    model.set_scan_backend("auto")
    sparse = loss == "sampled-sparse"
    opt: Any = (
        SplitAdam(model, model.item_embedding.weight, 1e-3, 0.0)
        if sparse
        else torch.optim.Adam(model.parameters(), lr=1e-3)
    )
    model.item_embedding.sparse = sparse
    rng = np.random.default_rng(0)
    zipf = np.minimum(rng.zipf(1.2, size=(batch, seq_len + 1)), n_items - 1).astype(np.int64)
    seq = torch.from_numpy(zipf[:, :-1])
    tgt = torch.from_numpy(zipf[:, 1:]).reshape(-1)
    lens = torch.full((batch,), seq_len)
    counts = np.bincount(zipf.reshape(-1), minlength=n_items)
    sampled = SampledSoftmax(n_items, negatives, "popularity", counts) if loss != "full-ce" else None
    if sampled is not None:
        sampled.sparse = sparse
    times, cpu = [], []
    for i in range(steps + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        opt.zero_grad(set_to_none=True)
        hidden = model.hidden_states(seq, lens).reshape(batch * seq_len, -1)
        w = model.item_embedding.weight
        if sampled is not None:
            per = sampled(hidden, w, tgt)
        else:
            per = chunked_cross_entropy(hidden, w, tgt, ce_chunk(n_items))
        per.mean().backward()
        opt.step()
        if i:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    table_gb = n_items * 64 * 4 / 1024**3
    return {
        "items": n_items,
        "loss": loss if loss == "full-ce" else f"{loss} ({negatives} popularity negatives, logQ)",
        "step_s": statistics.median(times),
        "step_cpu_s": statistics.median(cpu),
        "peak_rss_gb": peak_gb,
        "table_gb": table_gb,
        "positions_per_step": batch * seq_len,
        "threads": threads,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=50)
    ap.add_argument("--negatives", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-full-ce-items", type=int, default=1_000_000)
    ap.add_argument(
        "--losses", nargs="+", default=["sampled-sparse", "sampled", "full-ce"],
        choices=["sampled-sparse", "sampled", "full-ce"],
    )  # fmt: skip
    ap.add_argument("--cell", nargs=2, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if a.cell:
        r = cell(int(a.cell[0]), a.cell[1], a.batch, a.seq_len, a.negatives, a.steps, a.threads)
        print(json.dumps(r))
        return
    rows = []
    for n in a.items:
        for loss in a.losses:
            if loss == "full-ce" and n > a.max_full_ce_items:
                continue
            cmd = [sys.executable, __file__, "--cell", str(n), loss, "--batch", str(a.batch)]
            cmd += ["--seq-len", str(a.seq_len), "--negatives", str(a.negatives), "--steps", str(a.steps)]
            cmd += ["--threads", str(a.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            r["load"] = os.getloadavg()[0]
            rows.append(r)
            print(json.dumps(r), flush=True)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
