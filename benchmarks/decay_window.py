"""How much of a long history the last Mamba layer still depends on (oracle estimate; m4r does not truncate).

    python benchmarks/decay_window.py --ckpt model.pt [--seq 1000] [--rows 8] [--tol 1e-7 1e-9] [--json F]

See m4r_export/bench/decay.py for what the columns mean.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from m4r_export.bench.decay import render_decay, run_decay_estimate
from m4r_export.checkpoint import load_checkpoint
from m4r_export.errors import M4RError
from m4r_export.fileio import write_json_atomic


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", type=Path, required=True)
    ap.add_argument("--seq", type=int, default=1000)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--tol", type=float, nargs="+", default=[1e-7, 1e-9])
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.seq < 2 or args.rows < 1:
        print(f"Error: --seq {args.seq} --rows {args.rows}: need seq >= 2 and rows >= 1")
        return 2
    try:
        model = load_checkpoint(args.ckpt)
    except M4RError as e:
        print(f"Error: {e}")
        return 2
    result = run_decay_estimate(model, seq=args.seq, rows=args.rows, tols=tuple(args.tol))
    result["checkpoint"] = str(args.ckpt)
    if args.json:
        write_json_atomic(args.json, result)
    print(render_decay(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
