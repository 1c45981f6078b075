"""Streaming parity on every test user: init on half the history, step through the rest.

    m4r export --ckpt model.pt --out-dir DIR --streaming --fp16
    python benchmarks/streaming_ml100k.py --ckpt model.pt --dir DIR --data ml-100k.inter [--json out.json]

For each test user (leave-one-out test input, the whole history: no max_seq_len truncation),
``StreamingSession.start`` encodes the first half of the history (``init.onnx``), then
``push`` adds the remaining events one at a time (``step.onnx``; users with no event left push
0 = no event). After every event the scores are compared with a full re-encode of the history so
far by the fp32 PyTorch ServingModel: max abs difference over finite scores, fraction of
(user, event) pairs whose top-10 list is identical, and the mean top-10 overlap. Needs
``--head scores``. Pass criteria (issue 12): fp32 max abs <= 1e-5 and every top-10 identical;
fp16 mean top-10 overlap >= 0.99. Exit code 1 when a criterion fails.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from m4r_export.checkpoint import load_checkpoint
from m4r_export.data import load_dataset
from m4r_export.serving import ServingModel
from m4r_export.streaming import StreamingSession

NO_TRUNCATION = 1_000_000


def top10(scores: np.ndarray) -> np.ndarray:
    return np.argsort(-scores, axis=1, kind="stable")[:, :10]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--dir", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--json", default=None)
    ap.add_argument("--limit-users", type=int, default=None, help="Only the first N test users (smoke runs).")
    args = ap.parse_args()
    torch.set_flush_denormal(True)
    out = Path(args.dir)
    manifest = json.loads((out / "manifest.json").read_text())
    if manifest["head"] != "scores":
        raise SystemExit("export with --head scores for this comparison")
    model = load_checkpoint(args.ckpt).eval()
    model.set_scan_backend("fast")
    serving = ServingModel(model, "scores")
    ds = load_dataset(args.data, max_seq_len=NO_TRUNCATION)
    test = ds.test
    n = len(test) if args.limit_users is None else min(args.limit_users, len(test))
    histories = [list(map(int, test.item_seq[r, : test.item_seq_len[r]])) for r in range(n)]
    lengths = np.array([len(h) for h in histories])
    half = lengths // 2
    report: dict[str, object] = {
        "users": n,
        "events_streamed": int((lengths - half).sum()),
        "history_length": {
            "min": int(lengths.min()),
            "mean": float(lengths.mean()),
            "max": int(lengths.max()),
        },
        "init_on": "first floor(len/2) items (users with 1 item start from the empty state)",
        "reference": "ServingModel fp32 (scan backend 'fast'), full re-encode of the whole history so far",
    }
    ok = True
    for precision in manifest["streaming"]["files"]:
        t0 = time.perf_counter()
        session = StreamingSession.from_dir(out, precision)
        session.start([h[:k] for h, k in zip(histories, half, strict=True)])
        max_diff, identical, overlaps, events = 0.0, 0, [], 0
        for j in range(int((lengths - half).max())):
            pos = half + j
            active = pos < lengths
            ids = [h[p] if a else 0 for h, p, a in zip(histories, pos, active, strict=True)]
            got = session.push(ids)["scores"][active]
            rows = np.flatnonzero(active)
            width = int(pos[rows].max()) + 1
            seq = np.zeros((len(rows), width), dtype=np.int64)
            for r, u in enumerate(rows):
                seq[r, : pos[u] + 1] = histories[u][: pos[u] + 1]
            with torch.no_grad():
                (ref_t,) = serving(torch.from_numpy(seq), torch.from_numpy(pos[rows] + 1))
            ref = ref_t.numpy()
            finite = np.isfinite(ref)
            if not np.array_equal(finite, np.isfinite(got)):
                max_diff = float("inf")
            else:
                max_diff = max(max_diff, float(np.abs(ref[finite] - got[finite]).max()))
            tr, tg = top10(ref), top10(got)
            identical += int((tr == tg).all(axis=1).sum())
            overlaps += [len(set(a) & set(b)) / 10 for a, b in zip(tr.tolist(), tg.tolist(), strict=True)]
            events += len(rows)
        res = {
            "events": events,
            "max_abs_diff": max_diff,
            "top10_identical_fraction": identical / events,
            "top10_overlap_mean": float(np.mean(overlaps)),
            "top10_overlap_min": float(np.min(overlaps)),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        if precision == "fp32":
            res["passed"] = max_diff <= 1e-5 and identical == events
        else:
            res["passed"] = res["top10_overlap_mean"] >= 0.99
        ok &= bool(res["passed"])
        report[precision] = res
        print(precision, json.dumps(res))
    report["passed"] = ok
    if args.json:
        from m4r_export.fileio import write_json_atomic

        write_json_atomic(args.json, report)
        print(f"report written to {args.json}")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
