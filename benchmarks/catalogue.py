"""Catalogue scale (issue 19): export, file sizes, peak RSS, exact and ANN top-K per catalogue size.

    python benchmarks/catalogue.py --items 1349 100000 1000000 10000000 --out catalogue.json

For each size: an untrained Mamba4Rec (hidden 64, 1 layer, max_seq_len 200; weights as initialised),
``m4r export --head topk --k 10 --fp16 --no-trt`` and ``m4r export --head embedding --ann pq``
(``--ann-kind``; the default index), each
in its own process (wall time and peak RSS from wait4). Then, in a fresh process per precision,
ONNX Runtime with 1 thread: exact top-K at batch 1 and 256 (median wall ms and process CPU ms),
side by side in one process: the ``m4r::ScoreTopK`` node run by libm4r_ort_ops.so (``--ort-ops``,
default $M4R_ORT_OPS; "native") and the same file without it (the node's function body, the chunked
graph; "body"), calls alternating; and each session's peak RSS growth during its batch-256 runs; the
ANN index at batch 1 (median ms) and its recall@10 against exact top-K of the same user vectors (200 users).
Prints a table and writes JSON. Big sizes need memory: run under `flock` on shared machines.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str]) -> tuple[float, float, str]:
    """(seconds, peak RSS GiB, output) of a child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-3000:]}")
    return time.perf_counter() - t0, usage.ru_maxrss / 2**20, out


def _checkpoint(n_items: int, path: Path) -> None:
    code = (
        "import sys, torch\n"
        "from m4r_export.model import Mamba4Rec\n"
        "from m4r_export.checkpoint import save_checkpoint\n"
        "torch.manual_seed(0)\n"
        f"m = Mamba4Rec({n_items}, hidden_size=64, num_layers=1).eval()\n"
        f"save_checkpoint({str(path)!r}, m, None, {{'max_seq_len': 200}})\n"
    )
    _run([sys.executable, "-c", code])


PROBE = r"""
import json, sys, time, numpy as np, onnxruntime as ort
def rss():
    return int(open('/proc/self/statm').read().split()[1]) * 4096 / 2**30
def peak():
    for line in open('/proc/self/status'):
        if line.startswith('VmHWM'):
            return int(line.split()[1]) / 2**20
path, n_items, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
lib = sys.argv[4] if len(sys.argv) > 4 else ''
def session(ops):
    so = ort.SessionOptions(); so.intra_op_num_threads = 1; so.inter_op_num_threads = 1
    if ops:
        so.register_custom_ops_library(ops)
    return ort.InferenceSession(path, so, providers=['CPUExecutionProvider'])
sess = session('')
rng = np.random.default_rng(0)
def feeds(b):
    f = {'item_seq': rng.integers(1, n_items, size=(b, 50)).astype(np.int64),
         'item_seq_len': rng.integers(1, 51, size=b).astype(np.int64)}
    if 'exclude_items' in {i.name for i in sess.get_inputs()}:
        f['exclude_items'] = np.zeros((b, 1), np.int64)
    return f
def median_ms(b, n):
    f = feeds(b); sess.run(None, f); ts = []
    for _ in range(n):
        t = time.perf_counter(); sess.run(None, f); ts.append((time.perf_counter() - t) * 1e3)
    return float(np.median(ts))
def side_by_side(sessions, b, n):  # median wall and process-CPU ms per session, calls alternating
    f = feeds(b); out = {k: s.run(None, f) for k, s in sessions.items()}
    wall = {k: [] for k in sessions}; cpu = {k: [] for k in sessions}
    for _ in range(n):
        for k, s in sessions.items():
            t, c = time.perf_counter(), time.process_time(); s.run(None, f)
            wall[k].append((time.perf_counter() - t) * 1e3); cpu[k].append((time.process_time() - c) * 1e3)
    same = all(np.array_equal(o[1], next(iter(out.values()))[1]) for o in out.values())
    return {k: (float(np.median(wall[k])), float(np.median(cpu[k]))) for k in sessions}, same
res = {}
if mode == 'topk':
    # 'body': the file as plain ONNX Runtime runs it (the ScoreTopK node's function body, or the plain
    # chunked ops of a --no-native-topk export); 'native': the same file with libm4r_ort_ops.so
    sessions = {'native': session(lib), 'body': sess} if lib else {'body': sess}
    res['session_gib'] = rss()
    big = n_items > 2_000_000  # fewer repeats where one call takes seconds
    b1, res['b1_same_items'] = side_by_side(sessions, 1, 10 if big else 30)
    for k in sessions:
        res[k] = {'batch1_ms': b1[k][0], 'batch1_cpu_ms': b1[k][1]}
    for k, s in sessions.items():  # peak growth per session: the native one first (the smaller)
        before = peak()
        one, _ = side_by_side({k: s}, 256, 1 if big else 3)
        res[k].update(batch256_ms=one[k][0], batch256_cpu_ms=one[k][1], batch256_extra_gib=peak() - before)
    res['peak_gib'] = peak()
else:
    import faiss
    from m4r_export import ann
    faiss.omp_set_num_threads(1)
    d = path.rsplit('/', 1)[0]
    spec = json.load(open(d + '/manifest.json'))['ann']
    index = ann.read_index(ann.Path(d) / ann.INDEX_FILE, ann.AnnParams.from_json(spec))
    table = np.load(d + '/item_embedding.npy', mmap_mode='r')
    users = sess.run(None, feeds(200))[0]
    exact = np.empty((200, 10), np.int64)
    for i in range(0, 200, 8):
        s = users[i:i + 8] @ table.T; s[:, 0] = -np.inf
        exact[i:i + 8] = np.argsort(-s, axis=1)[:, :10]
    ts, got = [], []
    for u in users:
        t = time.perf_counter()
        got.append(ann.search(index, u[None], 10)[1][0])
        ts.append((time.perf_counter() - t) * 1e3)
    res['ann_batch1_ms'] = float(np.median(ts))
    res['ann_recall@10'] = float(ann.recall(exact, np.array(got)).mean())
    res['user_embedding_batch1_ms'] = median_ms(1, 30)
print(json.dumps(res))
"""


def _sizes(d: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(d.iterdir())}


def bench_size(
    n_items: int, work: Path, ann: bool = True, ort_ops: str = "", ann_kind: str = "pq"
) -> dict[str, Any]:
    m4r = [sys.executable, "-m", "m4r_export.cli"]
    ckpt = work / f"m{n_items}.pt"
    _checkpoint(n_items, ckpt)
    row: dict[str, Any] = {"items": n_items, "table_fp32_gib": n_items * 64 * 4 / 2**30}
    top = work / f"topk{n_items}"
    t, rss, _ = _run([*m4r, "export", "--ckpt", str(ckpt), "--out-dir", str(top), "--head", "topk",
                      "--k", "10", "--max-seq-len", "200", "--fp16", "--no-trt"])  # fmt: skip
    row.update(export_s=t, export_peak_gib=rss, export_peak_x_table=rss / row["table_fp32_gib"])
    row["files"] = _sizes(top)
    for precision, name in (("fp32", "model.onnx"), ("fp16", "model.fp16.onnx")):
        _, _, out = _run([sys.executable, "-c", PROBE, str(top / name), str(n_items), "topk", ort_ops])
        row[f"exact_{precision}"] = json.loads(out.strip().splitlines()[-1])
    if not ann:
        return row
    emb = work / f"emb{n_items}"
    t, rss, _ = _run([*m4r, "export", "--ckpt", str(ckpt), "--out-dir", str(emb), "--head", "embedding",
                      "--max-seq-len", "200", "--ann", ann_kind])  # fmt: skip
    row.update(ann_export_s=t, ann_export_peak_gib=rss, ann_files=_sizes(emb))
    row["ann"] = json.loads((emb / "manifest.json").read_text())["ann"]
    _, _, out = _run([sys.executable, "-c", PROBE, str(emb / "model.onnx"), str(n_items), "ann"])
    row["ann_search"] = json.loads(out.strip().splitlines()[-1])
    return row


def _ms(x: float) -> str:
    return f"{x:.2f}" if x < 100 else f"{x:.0f}"


def table(rows: list[dict[str, Any]]) -> str:
    """Exact top-10 columns: 'native' = ScoreTopK in libm4r_ort_ops.so, 'body' = the same file without it
    (wall ms, with process CPU ms in parentheses), fp32 / fp16 files."""
    head = (
        "| items | export | export peak RSS (x fp32 table) | model.onnx (+ .data) | fp16 (+ .data) | "
        "exact top-10 b1 native fp32 / fp16 | b1 body fp32 / fp16 | b256 native fp32 / fp16 | "
        "b256 body fp32 / fp16 | b256 extra RSS native / body (fp16) | ANN b1 | ANN recall@10 |"
    )
    lines = [head, "|" + "---:|" * 12]
    nan = {"batch1_ms": float("nan"), "batch1_cpu_ms": float("nan"), "batch256_ms": float("nan"),
           "batch256_cpu_ms": float("nan"), "batch256_extra_gib": float("nan")}  # fmt: skip
    for r in rows:
        f = r["files"]
        m32 = (f.get("model.onnx", 0) + f.get("model.onnx.data", 0)) / 1e6
        m16 = (f.get("model.fp16.onnx", 0) + f.get("model.fp16.onnx.data", 0)) / 1e6
        e32, e16 = r["exact_fp32"], r["exact_fp16"]
        a = r.get("ann_search", {"ann_batch1_ms": float("nan"), "ann_recall@10": float("nan")})

        def col(kind: str, b: str, e32: dict[str, Any] = e32, e16: dict[str, Any] = e16) -> str:
            x, y = e32.get(kind, nan), e16.get(kind, nan)
            return (f"{_ms(x[f'batch{b}_ms'])} ({_ms(x[f'batch{b}_cpu_ms'])}) / "
                    f"{_ms(y[f'batch{b}_ms'])} ({_ms(y[f'batch{b}_cpu_ms'])}) ms")  # fmt: skip

        lines.append(
            f"| {r['items']:,} | {r['export_s']:.1f} s | {r['export_peak_gib']:.2f} GiB "
            f"({r['export_peak_x_table']:.1f}x) | {m32:.1f} MB | {m16:.1f} MB | "
            f"{col('native', '1')} | {col('body', '1')} | {col('native', '256')} | {col('body', '256')} | "
            f"{e16.get('native', nan)['batch256_extra_gib'] * 1024:.0f} / "
            f"{e16['body']['batch256_extra_gib'] * 1024:.0f} MiB | {a['ann_batch1_ms']:.2f} ms | "
            f"{a['ann_recall@10']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, nargs="+", default=[1349, 100_000, 1_000_000, 10_000_000])
    ap.add_argument("--out", type=Path, default=Path("catalogue.json"))
    ap.add_argument("--work", type=Path, default=None, help="directory for checkpoints and exports")
    ap.add_argument("--ann-up-to", type=int, default=None, help="build/time the ANN index up to this size")
    ap.add_argument("--ann-kind", default="pq", help="m4r export --ann KIND (pq, ivf, hnsw)")
    ap.add_argument(
        "--ort-ops",
        default=os.environ.get("M4R_ORT_OPS", ""),
        help="libm4r_ort_ops.so: time the native ScoreTopK op beside the function body "
        "(default $M4R_ORT_OPS)",
    )
    args = ap.parse_args()
    os.environ["PYTHONPATH"] = f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    rows = []
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        for n in args.items:
            load_before = os.getloadavg()
            with_ann = args.ann_up_to is None or n <= args.ann_up_to
            rows.append(bench_size(n, Path(tmp), with_ann, args.ort_ops, args.ann_kind))
            load = os.getloadavg()
            rows[-1]["loadavg_before"] = load_before
            rows[-1]["loadavg"] = load
            args.out.write_text(json.dumps(rows, indent=2) + "\n")
            print(f"{n:,} items done (load {load[0]:.1f})", file=sys.stderr, flush=True)
            for p in Path(tmp).iterdir():  # free the disk before the next size
                subprocess.run(["rm", "-rf", str(p)], check=True)
    print(table(rows))


if __name__ == "__main__":
    main()
