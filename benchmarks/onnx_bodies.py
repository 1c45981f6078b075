"""ONNX Runtime CPU vs PyTorch eager for the exported serving graph, per SelectiveScan function body.

    python benchmarks/onnx_bodies.py [--threads 1] [--json out.json]

Model: Mamba4Rec hidden 64, d_state 32, 1 layer (the paper's), ``n_items`` 1350 (ML-100K-sized),
head ``scores``. For each body the script exports the model (fp32), then times ONNX Runtime (CPU
EP) and the PyTorch module (ServingModel, scan backend ``fast``, ``torch.no_grad``) in the same
process with the same thread count, interleaving the two so background load hits both alike (PyTorch with
flush-to-zero on, as recommended for its CPU scan; ONNX Runtime with its default, off),
and reports the median latency and the ratio PyTorch / ORT per (batch, seq) cell. Every row is
full length (lengths = seq), the rowwise body's worst case (it skips padding).

It also reports each body's accuracy: the scan alone against the float64 reference loop
(L = 200 and L = 1000) and the full model's max abs score difference against PyTorch.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from m4r_export.model import Mamba4Rec
from m4r_export.model.scan import selective_scan_ref
from m4r_export.onnx import export as ex
from m4r_export.onnx.bodies import BODIES, DOMAIN, INPUTS, OP_NAME, make_function
from m4r_export.serving import ServingModel

CELLS = [(1, 50), (1, 200), (256, 50), (256, 200)]


def interleaved_medians(
    fns: dict[str, Callable[[], Any]], budget_s: float, min_reps: int = 3, max_reps: int = 200
) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """Median wall-clock, median and minimum process CPU time (ms) per function, runs interleaved.

    On a shared machine the wall clock includes time the process waited for a core; CPU time
    does not, so it is the fairer comparison there (both runtimes use the calling thread when
    running single-threaded).
    """
    for f in fns.values():  # warm-up
        f()
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    start = time.perf_counter()
    reps = 0
    while reps < max_reps and (reps < min_reps or time.perf_counter() - start < budget_s):
        for k, f in fns.items():
            t, c = time.perf_counter(), time.process_time()
            f()
            cpu[k].append(time.process_time() - c)
            wall[k].append(time.perf_counter() - t)
        reps += 1
    return (
        {k: statistics.median(v) * 1e3 for k, v in wall.items()},
        {k: statistics.median(v) * 1e3 for k, v in cpu.items()},
        {k: min(v) * 1e3 for k, v in cpu.items()},
    )


def scan_accuracy(body: str, seq_len: int) -> float:
    """Max abs error of the body (mode='last', ORT), relative to max |y|, against the float64 loop."""
    from onnx import TensorProto, helper

    f32 = TensorProto.FLOAT
    types = [f32] * 8 + [TensorProto.INT32]
    node = helper.make_node(
        OP_NAME, list(INPUTS), ["y"], domain=DOMAIN, delta_softplus=1, mode="last", plugin_namespace="m4r"
    )
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info(n, t, None) for n, t in zip(INPUTS, types, strict=True)],
        [helper.make_tensor_value_info("y", f32, None)],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid(DOMAIN, 1)],
        functions=[make_function(body, 20)],
    )
    g = torch.Generator().manual_seed(0)
    b, d, n = 8, 128, 32
    u = torch.randn(b, d, seq_len, generator=g, dtype=torch.float64)
    delta = torch.randn(b, d, seq_len, generator=g, dtype=torch.float64) * 0.5 - 3.0
    A = -torch.exp(torch.log(torch.arange(1, n + 1, dtype=torch.float64)).repeat(d, 1))
    B = torch.randn(b, n, seq_len, generator=g, dtype=torch.float64)
    C = torch.randn(b, n, seq_len, generator=g, dtype=torch.float64)
    D = torch.ones(d, dtype=torch.float64)
    z = torch.randn(b, d, seq_len, generator=g, dtype=torch.float64)
    dbias = torch.randn(d, generator=g, dtype=torch.float64) * 0.1
    lengths = torch.randint(1, seq_len + 1, (b,), generator=g, dtype=torch.int32)
    lengths[0] = seq_len
    # the reference sees exactly the fp32 inputs ORT gets, so the difference is the body's own error
    u, delta, A, B, C, D, z, dbias = (t.float().double() for t in (u, delta, A, B, C, D, z, dbias))
    ref = selective_scan_ref(u, delta, A, B, C, D, z, dbias, True, lengths, "last").numpy()
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {k: v.float().numpy() for k, v in zip(INPUTS, (u, delta, A, B, C, D, z, dbias), strict=False)}
    feeds["lengths"] = lengths.numpy()
    return float(np.abs(sess.run(None, feeds)[0] - ref).max() / np.abs(ref).max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--budget", type=float, default=4.0, help="seconds of timing per cell and body")
    ap.add_argument("--bodies", nargs="*", default=list(BODIES))
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = Mamba4Rec(1350, hidden_size=64, num_layers=1, d_state=32).eval()
    serving = ServingModel(model, "scores")
    rng = np.random.default_rng(0)
    results: dict[str, Any] = {"threads": args.threads, "cells": [], "accuracy": {}}
    sessions = {}
    for body in args.bodies:
        # the two-input graph: this benchmark times the scan bodies, not the exclusion mask
        opts = ex.ExportOptions(head="scores", max_seq_len=200, body=body, exclude_items=False)
        proto = ex.trace_onnx(model, opts)
        blob = proto.SerializeToString()
        sessions[body] = ex.ort_session(blob, threads=args.threads)
        parity = ex.measure_parity(model, opts, blob, "fp32")
        results["accuracy"][body] = {
            "model_max_abs_score_diff": parity["max_abs_diff"],
            "scan_rel_err_L200": scan_accuracy(body, 200),
            "scan_rel_err_L1000": scan_accuracy(body, 1000),
        }
        print(body, results["accuracy"][body], flush=True)
    print(f"\nthreads={args.threads} (ORT intra_op_num_threads, torch.set_num_threads)")
    print("median ms, wall clock / process CPU time; ratio = PyTorch / ORT (CPU time)\n")
    header = "| batch | seq | PyTorch eager | " + " | ".join(f"ORT {b}" for b in args.bodies)
    header += " | " + " | ".join(f"ratio {b}" for b in args.bodies) + " |"
    print(header)
    print("|" + "---|" * (2 + 2 * len(args.bodies)))
    for batch, seq in CELLS:
        item_seq = rng.integers(1, 1350, size=(batch, seq)).astype(np.int64)
        lens = np.full(batch, seq, dtype=np.int64)
        ts, tl = torch.from_numpy(item_seq), torch.from_numpy(lens)

        def run_torch(ts: torch.Tensor = ts, tl: torch.Tensor = tl) -> None:
            # Creating an ORT session clears the thread's flush-to-zero/denormals-are-zero flags, so
            # set them for every PyTorch call (and clear them again: ORT runs with its own default).
            torch.set_flush_denormal(True)
            with torch.no_grad():
                serving(ts, tl)
            torch.set_flush_denormal(False)

        fns: dict[str, Callable[[], Any]] = {"torch": run_torch}
        for body, sess in sessions.items():
            fns[body] = functools.partial(sess.run, None, {"item_seq": item_seq, "item_seq_len": lens})
        wall, cpu, cpu_min = interleaved_medians(fns, args.budget)
        row: dict[str, Any] = {
            "batch": batch,
            "seq": seq,
            "torch_ms": wall["torch"],
            "torch_cpu_ms": cpu["torch"],
            "torch_cpu_min_ms": cpu_min["torch"],
        }
        for b in args.bodies:
            row.update({f"ort_{b}_ms": wall[b], f"ort_{b}_cpu_ms": cpu[b], f"ort_{b}_cpu_min_ms": cpu_min[b]})
            row[f"ratio_{b}_cpu_min"] = cpu_min["torch"] / cpu_min[b]
            row.update({f"ratio_{b}": cpu["torch"] / cpu[b], f"ratio_{b}_wall": wall["torch"] / wall[b]})
        results["cells"].append(row)
        cells = [f"{wall[k]:.2f} / {cpu[k]:.2f}" for k in ("torch", *args.bodies)]
        line = f"| {batch} | {seq} | " + " | ".join(cells)
        line += " | " + " | ".join(f"{cpu['torch'] / cpu[b]:.1f}x" for b in args.bodies) + " |"
        print(line, flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
