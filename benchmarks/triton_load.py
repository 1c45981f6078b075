"""Bounded load against a real Triton server (the one bundled in nvidia-pytriton) on a `python` repository.

    python benchmarks/triton_load.py --artifacts ART [--clients 16] [--requests 50]
                                     [--max-batch 64] [--json out.json]

Writes a `python` repository from an export (`m4r triton --with-tokens`), starts the server on
127.0.0.1, runs --clients threads x --requests gRPC requests (one user each: random item ids,
random length 1..max_seq_len, seeded), checks every reply's top-10 against the same model.onnx
run in-process (the export's parity check ties that file to PyTorch), and prints latency p50/p99,
throughput, errors and the batch sizes the dynamic batcher formed.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import tritonclient.grpc as tg

from m4r_export.serve import TritonOptions, write_repository
from m4r_export.serve.local import LocalTritonServer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--artifacts", type=Path, required=True)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=50)
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--instances", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    manifest = json.loads((args.artifacts / "manifest.json").read_text())
    L, n_items = int(manifest["max_seq_len"]), int(manifest["model"]["n_items"])
    name = f"m4r_{manifest['head']}"
    rng = np.random.default_rng(0)
    n = args.clients * args.requests
    lens = rng.integers(1, L + 1, size=(n, 1)).astype(np.int64)
    seq = rng.integers(1, n_items, size=(n, L)).astype(np.int64)
    seq[np.arange(L)[None, :] >= lens] = 0
    sess = ort.InferenceSession(str(args.artifacts / "model.onnx"), providers=["CPUExecutionProvider"])
    ids_out = next(o["name"] for o in manifest["outputs"] if o["dtype"] == "int64")
    feed = {"item_seq": seq, "item_seq_len": lens.reshape(-1)}
    for spec in manifest["inputs"][2:]:  # e.g. exclude_items: not sent, the Python backend fills zeros
        feed[spec["name"]] = np.zeros((n, 1), np.int64)
    ref = sess.run([ids_out], feed)[0]

    with tempfile.TemporaryDirectory() as tmp:
        opts = TritonOptions(max_batch=args.max_batch, instances=args.instances, with_tokens=True)
        repo = write_repository(args.artifacts, Path(tmp) / "repo", opts)
        with LocalTritonServer(repo) as server:
            lat: list[float] = []
            errors: list[str] = []
            lock = threading.Lock()

            def worker(c: int) -> None:
                client = tg.InferenceServerClient(server.grpc_url)
                for j in range(args.requests):
                    i = c * args.requests + j
                    inputs = [
                        tg.InferInput("item_seq", [1, L], "INT64"),
                        tg.InferInput("item_seq_len", [1, 1], "INT64"),
                    ]
                    inputs[0].set_data_from_numpy(seq[i : i + 1])
                    inputs[1].set_data_from_numpy(lens[i : i + 1])
                    t0 = time.perf_counter()
                    try:
                        r = client.infer(name, inputs)
                        bad = not np.array_equal(r.as_numpy(ids_out)[0, :10], ref[i, :10])
                        msg = f"request {i}: top-10 differs" if bad else None
                    except Exception as exc:
                        msg = str(exc)
                    with lock:
                        lat.append(time.perf_counter() - t0)
                        if msg:
                            errors.append(msg)
                client.close()

            threads = [threading.Thread(target=worker, args=(c,)) for c in range(args.clients)]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
            client = tg.InferenceServerClient(server.grpc_url)
            stats = client.get_inference_statistics(model_name=name, as_json=True)["model_stats"][0]
            client.close()
    batches = {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in stats.get("batch_stats", [])}
    p50, p99 = np.percentile(np.array(lat) * 1e3, [50, 99])
    result = {
        "artifacts": str(args.artifacts),
        "clients": args.clients,
        "requests_per_client": args.requests,
        "max_batch": args.max_batch,
        "errors": len(errors),
        "first_errors": errors[:3],
        "wall_s": round(wall, 2),
        "req_per_s": round(n / wall, 1),
        "p50_ms": round(float(p50), 2),
        "p99_ms": round(float(p99), 2),
        "batches_formed": dict(sorted(batches.items())),
    }
    print("| clients x requests | errors | req/s | p50 ms | p99 ms | batch sizes formed (size: count) |")
    print("|---|---|---|---|---|---|")
    print(
        f"| {args.clients} x {args.requests} | {len(errors)} | {result['req_per_s']} | {result['p50_ms']} | "
        f"{result['p99_ms']} | {result['batches_formed']} |"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
