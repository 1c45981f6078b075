"""GPU self-check of the SelectiveScan CUDA kernels: build, parity, speed.

    python -m m4r_export.trt.selftest            (or scripts/gpu_check.sh)

Needs a GPU, torch with CUDA, nvcc and cmake; no TensorRT. Sized for one call of a few minutes:
  1. builds the native libraries for this GPU's architecture only (~30 s) and runs ctest, which includes
     the C++ kernel-vs-CPU-reference test;
  2. compares the kernels (through libm4r_scan_cuda.so's C entry point) with the C++ CPU reference and
     with the PyTorch reference on random inputs: several shapes, fp32/fp16/bf16, modes all/last;
  3. times the kernels against the PyTorch scan on the GPU for recommender shapes and prints the
     achieved memory throughput next to the device-to-device copy bandwidth it measures.
Exit code 0 when every parity check passes, 1 otherwise, 2 when the machine cannot run the check.

``--cpu-dry-run`` runs steps 2-3 on CPU tensors with the C++ CPU reference standing in for the kernels and
compares it with the PyTorch reference: it checks the harness and the CPU reference, not the kernels
(tests use it on machines without a GPU). Step 2 also bounds the effect of the device's __expf at L = 1000.
"""

from __future__ import annotations

import argparse
import ctypes
import math
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..model.scan import selective_scan_fast, selective_scan_ref
from .native import SCAN_CPU_LIBRARY, SCAN_CUDA_LIBRARY, build_native

_IO_TYPE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
Inputs = dict[str, torch.Tensor]
ScanFn = Callable[[Inputs, torch.Tensor, str], torch.Tensor]


@dataclass(frozen=True)
class Case:
    batch: int
    dim: int
    seqlen: int
    dstate: int
    dtype: torch.dtype
    mode: str

    def label(self) -> str:
        dt = str(self.dtype).replace("torch.", "")
        return f"B={self.batch} D={self.dim} L={self.seqlen} N={self.dstate} {dt} {self.mode}"

    def bytes_moved(self) -> int:
        """Compulsory DRAM traffic of one call (each input read once, y written once)."""
        e = torch.finfo(self.dtype).bits // 8
        bdl, bnl = self.batch * self.dim * self.seqlen, self.batch * self.dstate * self.seqlen
        params = self.dim * (self.dstate + 2) * 4
        if self.mode == "all":  # u, delta, z, B, C in; y out
            return (4 * bdl + 2 * bnl) * e + params
        # last (full-length rows): u, delta, B over the sequence; C, z at one position; y (B, D)
        return (2 * bdl + bnl) * e + (self.batch * (self.dstate + 2 * self.dim)) * e + params


def make_inputs(case: Case, device: torch.device, seed: int = 0) -> tuple[Inputs, torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(seed)

    def r(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    b, d, seq, n = case.batch, case.dim, case.seqlen, case.dstate
    t = {
        "u": r(b, d, seq).to(case.dtype),
        "delta": r(b, d, seq, scale=0.5).to(case.dtype),
        "A": -torch.exp(r(d, n, scale=0.5)),
        "B": r(b, n, seq).to(case.dtype),
        "C": r(b, n, seq).to(case.dtype),
        "D": r(d),
        "z": r(b, d, seq).to(case.dtype),
        "delta_bias": r(d, scale=0.3),
    }
    # rows cover over-long, zero and in-range lengths (clamped to [1, L] by every implementation)
    lengths = torch.tensor([(seq + 3, 0, 1 + i % seq)[i % 3] for i in range(b)], dtype=torch.int32)
    return {k: v.to(device).contiguous() for k, v in t.items()}, lengths.to(device)


def load_cuda_scan(path: Path) -> ScanFn:
    lib = ctypes.CDLL(str(path))
    fn = lib.m4r_scan_cuda
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_int32] + [ctypes.c_void_p] * 9 + [ctypes.c_int32] * 6 + [ctypes.c_void_p] * 2
    lib.m4r_scan_cuda_error_string.restype = ctypes.c_char_p

    def run(t: Inputs, lengths: torch.Tensor, mode: str) -> torch.Tensor:
        u = t["u"]
        b, d, seq = u.shape
        y = torch.empty((b, d) if mode == "last" else (b, d, seq), dtype=u.dtype, device=u.device)
        stream = torch.cuda.current_stream(u.device).cuda_stream
        rc = fn(
            _IO_TYPE[u.dtype],
            *(t[k].data_ptr() for k in _NAMES),
            lengths.data_ptr(),
            b,
            d,
            seq,
            t["A"].shape[1],
            1,
            int(mode == "last"),
            y.data_ptr(),
            stream,
        )
        if rc != 0:
            raise RuntimeError(f"m4r_scan_cuda failed: {lib.m4r_scan_cuda_error_string(rc).decode()}")
        return y

    return run


def load_cpu_scan(path: Path) -> ScanFn:
    lib = ctypes.CDLL(str(path))
    fn = lib.m4r_scan_cpu_f32
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 9 + [ctypes.c_int32] * 6 + [ctypes.c_void_p]

    def run(t: Inputs, lengths: torch.Tensor, mode: str) -> torch.Tensor:
        # torch CPU tensors instead of numpy arrays: the self-check must run where only torch is installed
        host = {k: v.detach().float().cpu().contiguous() for k, v in t.items()}
        lens = lengths.to(device="cpu", dtype=torch.int32).contiguous()
        b, d, seq = host["u"].shape
        y = torch.empty((b, d) if mode == "last" else (b, d, seq), dtype=torch.float32)
        rc = fn(*(host[k].data_ptr() for k in _NAMES), lens.data_ptr(), b, d, seq, host["A"].shape[1], 1,
                int(mode == "last"), y.data_ptr())  # fmt: skip
        if rc != 0:
            raise RuntimeError("m4r_scan_cpu_f32 rejected its arguments")
        return y

    return run


def torch_scan(fn: Callable[..., torch.Tensor]) -> ScanFn:
    def run(t: Inputs, lengths: torch.Tensor, mode: str) -> torch.Tensor:
        return fn(*(t[k] for k in _NAMES), delta_softplus=True, lengths=lengths, mode=mode)

    return run


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    g, w = got.detach().float().cpu(), want.detach().float().cpu()
    err = ((g - w).abs() / (1.0 + w.abs())).max().item()
    return float("inf") if err != err else float(err)  # NaN counts as a failure


def expf_error_bound(t: Inputs, seqlen: int) -> float:
    """Bound on the relative error __expf adds over ``seqlen`` steps (see selectiveScanMath.h).

    __expf's documented maximum error is 2 + floor(|1.173 x|) ulp; each step's decay error enters the
    state multiplicatively, so L steps add at most L times the worst per-step error (2^-24 per ulp).
    """
    dt = torch.nn.functional.softplus(t["delta"].float() + t["delta_bias"].float()[:, None])
    x = (dt.amax(dim=(0, 2))[:, None] * t["A"].float().abs()).max().item()
    return seqlen * (2 + math.floor(1.173 * x)) * 2.0**-24


def parity(
    kernel: ScanFn,
    references: dict[str, ScanFn],
    cases: list[Case],
    device: torch.device,
    tol: Callable[[Case, Inputs], float] | None = None,
) -> bool:
    """Compare ``kernel`` with each reference on every case; the PyTorch reference gets twice the tolerance
    (it rounds its own output to the I/O dtype too)."""
    ok = True
    names = " and ".join(references)
    print(f"\n== parity: {names} ({len(cases)} cases)")
    for i, case in enumerate(cases):
        t, lengths = make_inputs(case, device, seed=i)
        got = kernel(t, lengths, case.mode)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        limit = tol(case, t) if tol is not None else _TOL[case.dtype]
        parts, good = [], True
        for name, ref in references.items():
            err = rel_err(got, ref(t, lengths, case.mode))
            good &= err <= (2 * limit if name == "torch ref" else limit)
            parts.append(f"vs {name} {err:.2e}")
        ok &= good
        status = "ok  " if good else "FAIL"
        print(f"  {status} {case.label():<40} {'  '.join(parts)}  (tol {limit:.1e})")
    return ok


def _time(fn: Callable[[], object], device: torch.device, budget_s: float = 2.0) -> float:
    """Median seconds per call; fewer repetitions for slow functions so the check stays short."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    once = time.perf_counter() - t0
    reps = max(1, min(50, int(budget_s / max(once, 1e-6))))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, nbytes: int = 512 << 20) -> float:
    """Device-to-device copy bandwidth in GB/s (read + write)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = _time(lambda: dst.copy_(src), device, budget_s=1.0)
    return 2 * nbytes / t / 1e9


def _bind(fn: ScanFn, t: Inputs, lengths: torch.Tensor, mode: str) -> Callable[[], object]:
    return lambda: fn(t, lengths, mode)


def benchmark(kernel: ScanFn, cases: list[Case], device: torch.device) -> None:
    bw = copy_bandwidth(device)
    print(f"\n== speed (copy bandwidth measured: {bw:.0f} GB/s)")
    print(f"  {'case':<40} {'kernel':>10} {'GB/s':>7} {'% copy':>7} {'torch':>10} {'speed-up':>8}")
    for case in cases:
        t, _ = make_inputs(case, device)
        full = torch.full((case.batch,), case.seqlen, dtype=torch.int32, device=device)
        tk = _time(_bind(kernel, t, full, case.mode), device)
        tt = _time(_bind(torch_scan(selective_scan_fast), t, full, case.mode), device)
        gbs = case.bytes_moved() / tk / 1e9
        print(f"  {case.label():<40} {tk * 1e3:8.3f}ms {gbs:7.0f} {100 * gbs / bw:6.0f}% {tt * 1e3:8.2f}ms"
              f" {tt / tk:7.1f}x")  # fmt: skip


PARITY_CASES = [
    Case(b, d, seq, n, dt, mode)
    for (b, d, seq, n) in [
        (3, 70, 45, 16),
        (2, 64, 33, 20),
        (2, 130, 100, 64),
        (5, 8, 1, 4),
        (4, 128, 300, 32),
    ]
    for dt in (torch.float32, torch.float16, torch.bfloat16)
    for mode in ("all", "last")
]
# Long rows: the accumulated __expf error at L = 1000 must stay within expf_error_bound (issue 9.18).
EXPF_CASES = [Case(2, 64, 1000, 16, torch.float32, mode) for mode in ("all", "last")]
SPEED_CASES = [
    Case(2048, 128, 50, 16, torch.float16, "last"),  # paper config (hidden 64, expand 2), serving
    Case(2048, 128, 50, 16, torch.float32, "last"),
    Case(256, 256, 200, 32, torch.float16, "last"),
    Case(256, 128, 200, 16, torch.float16, "all"),
    Case(16, 512, 2048, 64, torch.float16, "all"),  # long sequences
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="GPU self-check of the m4r SelectiveScan CUDA kernels")
    ap.add_argument("--build-dir", type=Path, default=None, help="CMake build dir (default: a temporary one)")
    ap.add_argument("--cuda-archs", default=None, help="default: this GPU's compute capability only")
    ap.add_argument("--no-speed", action="store_true", help="parity only")
    ap.add_argument("--cpu-dry-run", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.cpu_dry_run:
        # No kernels to check without a GPU: this checks the harness and the C++ CPU reference (what
        # stands in for the kernels) against the PyTorch reference, never the CPU reference against itself.
        build = build_native(
            args.build_dir or Path(tempfile.mkdtemp(prefix="m4r-selftest-")), with_cuda=False
        )
        cpu = load_cpu_scan(build.libraries[SCAN_CPU_LIBRARY])
        device = torch.device("cpu")
        small = [Case(2, 8, 9, 4, dt, m) for dt in (torch.float32, torch.float16) for m in ("all", "last")]
        print("selftest --cpu-dry-run: C++ CPU reference vs PyTorch reference (no GPU kernels checked)")
        ok = parity(cpu, {"torch ref": torch_scan(selective_scan_ref)}, small, device)
        if not args.no_speed:
            benchmark(cpu, small[:1], device)
        return 0 if ok else 1

    if not torch.cuda.is_available():
        print("selftest: torch sees no CUDA GPU (CPU-only torch build, or no GPU/driver); nothing to check")
        return 2
    device = torch.device("cuda", 0)
    props = torch.cuda.get_device_properties(device)
    major, minor = torch.cuda.get_device_capability(device)
    gib = props.total_memory / 2**30
    print(f"GPU: {props.name} (sm_{major}{minor}, {gib:.0f} GiB), torch {torch.__version__}")

    build_dir = args.build_dir or Path(tempfile.mkdtemp(prefix="m4r-selftest-"))
    t0 = time.perf_counter()
    build = build_native(build_dir, cuda_archs=args.cuda_archs or f"{major}{minor}", build_tests=True)
    print(f"built {', '.join(sorted(build.libraries))} in {time.perf_counter() - t0:.0f} s ({build_dir})")
    if SCAN_CUDA_LIBRARY not in build.libraries:
        print(f"selftest: {SCAN_CUDA_LIBRARY} was not built (nvcc missing?); see {build.log_path}")
        return 2
    ctest = subprocess.run(
        ["ctest", "--test-dir", str(build_dir), "--output-on-failure"], capture_output=True, text=True
    )
    print("\n== ctest\n" + "\n".join(ctest.stdout.strip().splitlines()[-40:]))

    kernel = load_cuda_scan(build.libraries[SCAN_CUDA_LIBRARY])
    cpu = load_cpu_scan(build.libraries[SCAN_CPU_LIBRARY])
    refs = {"CPU ref": cpu, "torch ref": torch_scan(selective_scan_ref)}
    ok = parity(kernel, refs, PARITY_CASES, device) and ctest.returncode == 0
    print("\n== __expf error at L = 1000 (bound: L * (2 + floor(1.173 max|dt*A|)) ulp, selectiveScanMath.h)")
    ok &= parity(
        kernel, {"CPU ref": cpu}, EXPF_CASES, device, lambda c, t: 1e-5 + expf_error_bound(t, c.seqlen)
    )
    if not args.no_speed:
        benchmark(kernel, SPEED_CASES, device)
    print(f"\nselftest: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
