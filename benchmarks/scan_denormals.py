"""The native CPU scan kernel's forward with the caller's flush-denormal setting off and on.

    m4r build-native
    python benchmarks/scan_denormals.py [--lib A.so --lib B.so] [--seq-len 200] [--json out.json]

Calls ``m4r_scan_native_forward`` through ctypes (batch 256, d_inner 128, d_state 32, softplus + bias +
D + z, mode ``all``, 1 thread) on random inputs, unscaled and with ``u`` scaled by 1e-36 (every state
update denormal), with ``torch.set_flush_denormal`` off and on around the call. Libraries (default: the
``m4r build-native`` output) and settings are interleaved; median CPU ms of ``--repeats``. A kernel that
flushes denormals itself takes the same time in every column.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time
from pathlib import Path

import torch

from m4r_export.fileio import write_json_atomic
from m4r_export.model import scan_native


def _inputs(seq_len: int, u_scale: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    batch, dim, n = 256, 128, 32
    return {
        "u": torch.randn(batch, dim, seq_len, generator=g) * u_scale,
        "delta": torch.randn(batch, dim, seq_len, generator=g) * 0.5,
        "A": -torch.arange(1, n + 1, dtype=torch.float32).repeat(dim, 1),
        "B": torch.randn(batch, n, seq_len, generator=g),
        "C": torch.randn(batch, n, seq_len, generator=g),
        "D": torch.randn(dim, generator=g),
        "z": torch.randn(batch, dim, seq_len, generator=g),
        "bias": torch.randn(dim, generator=g) * 0.1,
        "y": torch.empty(batch, dim, seq_len),
    }


def _forward(lib: ctypes.CDLL, t: dict[str, torch.Tensor]) -> float:
    def p(x: torch.Tensor) -> ctypes.c_void_p:
        return ctypes.c_void_p(x.data_ptr())

    batch, dim, seq_len = t["u"].shape
    start = time.process_time()
    rc = lib.m4r_scan_native_forward(
        p(t["u"]), p(t["delta"]), p(t["A"]), p(t["B"]), p(t["C"]), p(t["D"]), p(t["z"]), p(t["bias"]), None,
        batch, dim, seq_len, t["A"].shape[1], 1, 0, 0, p(t["y"]), 1,
    )  # fmt: skip
    elapsed = time.process_time() - start
    if rc != 0:
        raise SystemExit(f"m4r_scan_native_forward returned {rc}")
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lib", type=Path, action="append", help="libm4r_scan_native.so (repeatable)")
    ap.add_argument("--seq-len", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    paths = args.lib or [scan_native.find_scan_library()]
    if None in paths:
        raise SystemExit("libm4r_scan_native.so not found: run `m4r build-native` or pass --lib")
    libs = {str(p): ctypes.CDLL(str(p)) for p in paths}
    cases = {"random": _inputs(args.seq_len, 1.0), "u*1e-36 (denormal states)": _inputs(args.seq_len, 1e-36)}
    times: dict[tuple[str, str, bool], list[float]] = {}
    try:
        for _ in range(args.repeats):
            for case, t in cases.items():
                for name, lib in libs.items():
                    for ftz in (False, True):
                        torch.set_flush_denormal(ftz)
                        _forward(lib, t)  # warm-up
                        times.setdefault((case, name, ftz), []).append(_forward(lib, t))
    finally:
        torch.set_flush_denormal(False)
    rows = [
        {"inputs": c, "lib": n, "caller_flush_denormal": f, "cpu_ms": 1e3 * statistics.median(v)}
        for (c, n, f), v in times.items()
    ]
    print(f"forward, batch 256 x d_inner 128 x L {args.seq_len} x d_state 32, 1 thread, median CPU ms")
    print(f"{'inputs':28} {'caller FTZ':>10} {'CPU ms':>8}  library")
    for r in rows:
        mode = "on" if r["caller_flush_denormal"] else "off"
        print(f"{r['inputs']:28} {mode:>10} {r['cpu_ms']:8.1f}  {r['lib']}")
    if args.json:
        write_json_atomic(args.json, {"seq_len": args.seq_len, "rows": rows})
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
