"""What a cold cache costs the batch-1 streaming step: the step and a one-node graph after other calls.

    m4r export --ckpt model.pt --out-dir DIR --streaming --fused --no-trt
    python benchmarks/cold_step.py --export DIR --ort-ops build/native-ci/lib/libm4r_ort_ops.so \
        [--history 200] [--calls 400] [--flush-mb 1 4 32] [--json out.json]

Prints one row per previous call (none, SASRec's re-encode, numpy passes over 1/4/32 MB): the step's and
ONNX Runtime's floor's median ms right after it. See m4r_export/bench/cold.py.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from m4r_export.bench.cold import DEFAULT_FLUSH_MB, render_cold, run_cold_bench
from m4r_export.errors import M4RError
from m4r_export.fileio import write_json_atomic


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--export", type=Path, required=True, help="DIR of `m4r export --streaming`")
    ap.add_argument("--ort-ops", type=Path, default=None, help="libm4r_ort_ops.so (the fused step kernel)")
    ap.add_argument("--history", type=int, default=200)
    ap.add_argument("--calls", type=int, default=400, help="timed calls per (previous call, target)")
    ap.add_argument("--flush-mb", type=int, nargs="+", default=list(DEFAULT_FLUSH_MB))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    try:
        result = run_cold_bench(
            args.export, ort_ops=args.ort_ops, history=args.history, calls=args.calls, flush_mb=args.flush_mb
        )
    except M4RError as e:
        print(f"Error: {e}")
        return 2
    if args.json:
        write_json_atomic(args.json, result)
    print(render_cold(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
