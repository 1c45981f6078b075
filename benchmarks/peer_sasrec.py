"""m4r's ONNX artifacts beside a same-size SASRec (RecBole shape, torch.onnx.export), one run.

    m4r export --ckpt model.pt --out-dir DIR --streaming --max-seq-len 1000 --no-trt
    python benchmarks/peer_sasrec.py --export m4r=DIR [--export fused=DIR2] --ort-ops libm4r_ort_ops.so \
        [--batch 1 256] [--seq 50 200 1000] [--threads 1 2] [--json out.json]

Every export is timed twice: plain ONNX Runtime (function body, label ``<name> body``) and with the
custom-op library (``<name> ops``); with ``step.onnx`` in the export, the streaming step is timed
beside SASRec's re-encode of the history plus the new event. At every point a one-node graph is timed
beside SASRec too (``ort floor (1 node)``: ONNX Runtime's own cost per call; --no-floor skips it). See
m4r_export/bench/peer.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from m4r_export.bench.peer import (
    DEFAULT_BATCHES,
    DEFAULT_SEQS,
    DEFAULT_THREADS,
    M4RExport,
    render_tables,
    run_peer_bench,
)
from m4r_export.fileio import write_json_atomic


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--export", action="append", required=True, help="LABEL=DIR of an m4r export (repeat)")
    ap.add_argument("--ort-ops", type=Path, default=None, help="libm4r_ort_ops.so (time '<label> ops' too)")
    ap.add_argument("--batch", type=int, nargs="+", default=list(DEFAULT_BATCHES))
    ap.add_argument("--seq", type=int, nargs="+", default=list(DEFAULT_SEQS))
    ap.add_argument("--threads", type=int, nargs="+", default=list(DEFAULT_THREADS))
    ap.add_argument("--repeats", type=int, default=50, help="timed rounds per point (at most)")
    ap.add_argument("--seconds-per-point", type=float, default=10.0, help="soft budget per point")
    ap.add_argument(
        "--consecutive",
        type=int,
        default=1,
        help="timed calls of each variant in a row per round (1: interleaved call by call, caches cold; "
        "e.g. 10: warm, as a server running one model)",
    )
    ap.add_argument("--no-streaming", action="store_true")
    ap.add_argument(
        "--no-floor",
        action="store_true",
        help="skip the runtime floor (a one-node graph timed beside SASRec at every point)",
    )
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    exports = []
    for spec in args.export:
        label, sep, path = spec.partition("=")
        if not sep or not label or not Path(path, "manifest.json").is_file():
            print(f"Error: --export {spec!r}: expected LABEL=DIR of an m4r export (with manifest.json)")
            return 2
        exports.append(M4RExport(label, Path(path)))
    result = run_peer_bench(
        exports,
        ort_ops=args.ort_ops,
        batches=args.batch,
        seqs=args.seq,
        threads=args.threads,
        streaming=not args.no_streaming,
        repeats=args.repeats,
        seconds_per_point=args.seconds_per_point,
        consecutive=args.consecutive,
        floor=not args.no_floor,
        progress=lambda line: print(line, file=sys.stderr, flush=True),
    )
    if args.json:  # first: the numbers survive whatever the rendering does
        write_json_atomic(args.json, result)
    print(render_tables(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
