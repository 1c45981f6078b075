"""The fused MambaMixer export against the unfused export, on every test user of a dataset.

    m4r export --ckpt model.pt --out-dir BASE --fp16 --no-trt
    m4r export --ckpt model.pt --out-dir FUSED --fp16 --no-trt --fused
    python benchmarks/fused_parity_ml100k.py --ckpt model.pt --base BASE --fused FUSED \
        --data ml-100k.inter --ort-ops libm4r_ort_ops.so [--json out.json]

Per precision (fp32, fp16): the unfused file on plain ONNX Runtime (function body; the reference) vs the
fused file with the library (fused kernel) and without it (both function levels inlined). Every test user's
leave-one-out history with its known items excluded, batches of 256. Pass (issue 21): fp32 max abs <= 1e-5
over finite scores and every top-10 identical; fp16 mean top-10 overlap >= 0.99. Exit code 1 otherwise.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from m4r_export.checkpoint import read_checkpoint
from m4r_export.fileio import write_json_atomic
from m4r_export.onnx.export import ort_session
from m4r_export.onnx.ort_ops import mixer_calls
from m4r_export.verify.verify import dataset_inputs


def run(sess, inputs, batch=256):  # noqa: ANN001, ANN201
    out = []
    for i in range(0, inputs.users, batch):
        feeds = {
            "item_seq": inputs.item_seq[i : i + batch],
            "item_seq_len": inputs.item_seq_len[i : i + batch],
        }
        if "exclude_items" in {x.name for x in sess.get_inputs()}:
            feeds["exclude_items"] = inputs.exclude_items[i : i + batch]
        out.append(sess.run(None, feeds)[0])
    return np.concatenate(out)


def compare(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    fin = np.isfinite(ref)
    same_mask = bool(np.array_equal(fin, np.isfinite(got)))
    diff = float(np.abs(ref[fin].astype(np.float64) - got[fin]).max()) if same_mask else float("inf")
    a, b = np.argsort(-ref, 1, kind="stable")[:, :10], np.argsort(-got, 1, kind="stable")[:, :10]
    overlap = np.array([len(set(x) & set(y)) / 10 for x, y in zip(a.tolist(), b.tolist(), strict=True)])
    return {
        "max_abs": diff,
        "top10_identical_users": int((a == b).all(1).sum()),
        "top10_overlap_mean": float(overlap.mean()),
        "users": len(ref),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", type=Path, required=True)
    ap.add_argument("--base", type=Path, required=True)
    ap.add_argument("--fused", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--ort-ops", type=Path, required=True)
    ap.add_argument("--max-seq-len", type=int, default=200)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    ckpt = read_checkpoint(args.ckpt)
    inputs = dataset_inputs(args.data, ckpt, 10**9, args.max_seq_len, ckpt_label=str(args.ckpt))
    report: dict[str, dict[str, dict[str, float]]] = {}
    ok = True
    for precision, name in (("fp32", "model.onnx"), ("fp16", "model.fp16.onnx")):
        if not (args.base / name).is_file() or not (args.fused / name).is_file():
            continue
        ref = run(ort_session((args.base / name).read_bytes(), 1), inputs)
        before = mixer_calls(args.ort_ops) or 0
        fused_ops = run(ort_session((args.fused / name).read_bytes(), 1, args.ort_ops), inputs)
        served = (mixer_calls(args.ort_ops) or 0) - before
        fused_body = run(ort_session((args.fused / name).read_bytes(), 1), inputs)
        report[precision] = {
            "fused kernel": compare(ref, fused_ops),
            "fused file, body": compare(ref, fused_body),
        }
        report[precision]["fused kernel"]["mixer_calls"] = served
        for variant, r in report[precision].items():
            if precision == "fp32":
                passed = r["max_abs"] <= 1e-5 and r["top10_identical_users"] == r["users"]
            else:
                passed = r["top10_overlap_mean"] >= 0.99
            ok &= passed and (variant != "fused kernel" or served > 0)
            print(f"{precision} {variant:17s} vs unfused body: {r}  {'ok' if passed else 'FAIL'}")
    if args.json:
        write_json_atomic(args.json, report)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
