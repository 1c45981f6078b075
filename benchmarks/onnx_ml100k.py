"""Exported ONNX files vs the PyTorch model on every test user of a data set (ML-100K here).

    m4r export --ckpt model.pt --out-dir DIR --fp16
    python benchmarks/onnx_ml100k.py --ckpt model.pt --dir DIR --data ml-100k.inter [--json out.json]

For model.onnx and model.fp16.onnx (whichever exist): max abs score difference against the PyTorch
ServingModel (fp32, finite entries), mean top-10 overlap, and HIT@10 / NDCG@10 of the leave-one-out
test target computed from each side's full ranking (item 0 masked, history not excluded).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from m4r_export.checkpoint import load_checkpoint
from m4r_export.data import load_dataset
from m4r_export.serving import ServingModel


def ranks_of(scores: np.ndarray, target: np.ndarray) -> np.ndarray:
    """0-based rank of each row's target (ties count against the target, like RecBole)."""
    t = scores[np.arange(len(target)), target][:, None]
    return (scores >= t).sum(axis=1) - 1


def metrics(scores: np.ndarray, target: np.ndarray) -> dict[str, float]:
    r = ranks_of(scores, target)
    hit = r < 10
    return {"hit@10": float(hit.mean()), "ndcg@10": float(np.where(hit, 1.0 / np.log2(r + 2), 0.0).mean())}


def top10(scores: np.ndarray) -> np.ndarray:
    return np.argsort(-scores, axis=1, kind="stable")[:, :10]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--dir", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_flush_denormal(True)
    out = Path(args.dir)
    manifest = json.loads((out / "manifest.json").read_text())
    if manifest["head"] != "scores":
        raise SystemExit("export with --head scores for this comparison")
    model = load_checkpoint(args.ckpt)
    ds = load_dataset(args.data, max_seq_len=int(manifest["max_seq_len"]))
    if model.item_tokens is not None and list(model.item_tokens) != list(ds.item_tokens):
        raise SystemExit("the checkpoint's item vocabulary differs from the data set's")
    test = ds.test
    seq, lens, target = test.item_seq, test.item_seq_len, test.target
    with torch.no_grad():
        ref = ServingModel(model, "scores")(torch.from_numpy(seq), torch.from_numpy(lens))[0].numpy()
    report: dict[str, object] = {"users": len(target), "pytorch_fp32": metrics(ref, target)}
    print(f"{len(target)} test users; PyTorch fp32: {report['pytorch_fp32']}")
    ref_top = top10(ref)
    for name in ("model.onnx", "model.fp16.onnx"):
        if not (out / name).is_file():
            continue
        sess = ort.InferenceSession(str(out / name), providers=["CPUExecutionProvider"])
        feeds = {"item_seq": seq, "item_seq_len": lens}
        if "exclude_items" in {i.name for i in sess.get_inputs()}:
            feeds["exclude_items"] = np.zeros((len(seq), 1), np.int64)  # nothing: same as the reference
        got = sess.run(None, feeds)[0]
        fin = np.isfinite(ref)
        assert np.array_equal(fin, np.isfinite(got)), "masked entries differ"
        diff = float(np.abs(got[fin].astype(np.float64) - ref[fin]).max())
        ov = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ref_top, top10(got), strict=True)]))
        row = {"max_abs_score_diff": diff, "mean_top10_overlap": ov, **metrics(got, target)}
        report[name] = row
        print(f"{name}: {row}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
