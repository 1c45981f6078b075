"""Training-epoch time, prefix vs every-position objective, in one process (docs/training.md).

    python benchmarks/epoch_time.py --data ml-100k.inter --max-seq-len 200 --threads 1 \
        --prefix-batch 256 --every-batch 32 --prefix-max-batches 40

For each objective: the trainer's own batches, loss, backward and Adam step (no evaluation), the
``auto`` scan backend (native when built). The every-position epoch is timed in full; the prefix
epoch is timed for at most ``--prefix-max-batches`` batches (in the epoch's shuffled order) and
extrapolated to the whole epoch when it is cut, which the output says.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from m4r_export.data import load_dataset
from m4r_export.training import config_from_dict
from m4r_export.training.trainer import Trainer


def time_epoch(ds, cfg, max_batches: int | None) -> dict:  # type: ignore[no-untyped-def]
    tr = Trainer(ds, cfg, "/dev/null/unused.pt", progress=False, log=lambda m: None)
    tr.model.train()
    batches = tr._epoch_batches()
    timed = batches if max_batches is None else batches[:max_batches]
    t0 = time.perf_counter()
    c0 = time.process_time()
    targets = 0
    for rows in timed:
        seq, lens, tgt = tr._tensors(rows)
        targets += int((tgt > 0).sum()) if tr.every_position else len(rows)
        tr.optimizer.zero_grad(set_to_none=True)
        tr.objective(seq, lens, tgt).backward()
        tr.optimizer.step()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    scale = len(batches) / len(timed)
    return {
        "objective": cfg.objective,
        "batch": cfg.train_batch_size,
        "batches": len(batches),
        "batches_timed": len(timed),
        "targets_timed": targets,
        "extrapolated": scale > 1,
        "epoch_wall_s": wall * scale,
        "epoch_cpu_s": cpu * scale,
        "backend": tr.backend,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--max-seq-len", type=int, required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prefix-batch", type=int, default=256)
    ap.add_argument("--every-batch", type=int, default=64)
    ap.add_argument("--prefix-max-batches", type=int, default=None)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    ds = load_dataset(a.data, max_seq_len=a.max_seq_len)
    base = {"max_seq_len": a.max_seq_len, "loss_type": "CE", "seed": 2020}
    rows = []
    for objective, batch, cap in (
        ("every-position", a.every_batch, None),
        ("prefix", a.prefix_batch, a.prefix_max_batches),
    ):
        cfg = config_from_dict({**base, "objective": objective, "train_batch_size": batch}, "bench")
        r = time_epoch(ds, cfg, cap)
        r.update(data=os.path.basename(a.data), max_seq_len=a.max_seq_len, threads=a.threads)
        r["load"] = os.getloadavg()[0]
        rows.append(r)
        print(json.dumps(r), flush=True)
    ratio = rows[1]["epoch_wall_s"] / rows[0]["epoch_wall_s"]
    print(f"prefix / every-position epoch wall time: {ratio:.1f}x", flush=True)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
