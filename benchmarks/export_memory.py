"""Peak RSS of `m4r export` phases for an untrained catalogue (issue 19: export peak RSS vs the table).

    python benchmarks/export_memory.py --items 1000000 --out /tmp/e1m [--fp16] [--head topk]

Builds an untrained Mamba4Rec (hidden 64, 1 layer, d_state 32), then runs the export in this
process, printing VmRSS / VmHWM (reset after the model is built) at every phase message and, last,
one JSON line: the fp32 table, the process before the export (model included), the peak, and the
peak over the table. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import time
from pathlib import Path


def _status(field: str) -> float:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**20  # GiB
    raise RuntimeError(f"no {field} in /proc/self/status")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--head", default="topk", choices=["topk", "embedding", "scores"])
    ap.add_argument("--fp16", action="store_true")
    ap.add_argument("--max-seq-len", type=int, default=50)
    args = ap.parse_args()
    import torch

    from m4r_export.model import Mamba4Rec, Mamba4RecConfig
    from m4r_export.onnx.export import ExportOptions, export_artifacts

    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = Mamba4RecConfig(n_items=args.items, hidden_size=64, num_layers=1, d_state=32)
    model = Mamba4Rec.from_config(config).eval()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    base, table = _status("VmRSS"), args.items * 64 * 4 / 2**30
    print(
        f"items {args.items:,}: fp32 table {table:.3f} GiB, process with the model {base:.2f} GiB", flush=True
    )
    with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
        fh.write("5")  # VmHWM from here
    t0 = time.time()

    def say(msg: str) -> None:
        rss, peak = _status("VmRSS"), _status("VmHWM")
        print(f"  {time.time() - t0:6.1f} s  rss {rss:.2f}  peak {peak:.2f} GiB | {msg}", flush=True)

    opts = ExportOptions(head=args.head, k=10, max_seq_len=args.max_seq_len, fp16=args.fp16)
    export_artifacts(model, args.out, opts, build_trt=False, echo=say)
    peak = _status("VmHWM")
    row = {"items": args.items, "table_gib": table, "before_gib": base, "peak_gib": peak}
    print(json.dumps({**row, "peak_x_table": peak / table, "seconds": round(time.time() - t0, 1)}))


if __name__ == "__main__":
    main()
