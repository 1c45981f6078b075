"""``m4r bench-train``: training-step time of each scan backend on CPU.

One training step = forward (``model.logits``), CE loss over all items, backward, Adam update,
for the default model (hidden 64, 1 layer, d_state 32, d_conv 4, expand 2) at batch 256 and
every sequence full length (L = 50 and L = 200 by default). Variants, measured side by side:

* ``reference``       -- the sequential-loop scan, denormals NOT flushed: how the reference
  Mamba4Rec code runs on CPU (its pure-PyTorch scan is the same loop);
* ``reference+ftz``   -- the same loop with ``torch.set_flush_denormal(True)``;
* ``fast+ftz``        -- the fast scan with flush-denormal: what ``m4r train`` runs on CPU;
* ``fast``            -- the fast scan without flush-denormal (``--all-variants``);
* ``native+ftz``      -- the C++ CPU kernel (``native`` backend, ``m4r build-native``) with
  flush-denormal: what ``m4r train`` runs on CPU once the library is built;
* ``native``          -- the same without flush-denormal (``--all-variants``);
* ``reference-code``  -- the loop without flush-denormal AND without serving-style pruning: every
  layer runs on every position and the last position is gathered afterwards, which is the
  computation of the reference Mamba4Rec code's training step (``--all-variants``).
* ``every-position``  -- the every-position objective (``m4r train``'s default): the same batch of
  full-length sequences, CE (chunked) at *every* position, fast scan + flush-denormal; one step
  trains ``batch x L`` targets where the variants above train ``batch``;
* ``every-position-native`` -- the same with the native scan (``--all-variants``, when built).

``samples/s`` counts trained targets (RecBole's samples), so the objectives compare directly.

The machine may be shared, so the variants are *interleaved* (one step of each in turn, repeated)
and medians are reported, of CPU time (``time.process_time``: this process's own cores, the
fairest figure on a busy machine) and of wall time. A time budget bounds the run: repeats stop
once it is spent (every variant still gets at least one timed step after its warm-up step).
"""

from __future__ import annotations

import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:  # torch is imported where the benchmark runs: `m4r --help` lists this command
    import torch

#: variant -> (scan backend, flush denormals, last layer pruned to the last position)
VARIANTS = {
    "reference": ("reference", False, True),
    "reference+ftz": ("reference", True, True),
    "fast+ftz": ("fast", True, True),
    "fast": ("fast", False, True),
    "native+ftz": ("native", True, True),
    "native": ("native", False, True),
    "reference-code": ("reference", False, False),
    "every-position": ("fast", True, False),
    "every-position-native": ("native", True, False),
}
#: variants that train every position of each sequence (the rest: one target per sequence)
EVERY_POSITION = ("every-position", "every-position-native")


@dataclass
class Cell:
    variant: str
    seq_len: int
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    def median_wall(self) -> float:
        return statistics.median(self.wall) if self.wall else float("nan")

    def median_cpu(self) -> float:
        return statistics.median(self.cpu) if self.cpu else float("nan")


def _setup(
    variant: str, seq_len: int, batch: int, n_items: int, seed: int, state: dict[str, torch.Tensor] | None
) -> Any:
    import torch
    import torch.nn.functional as F

    from ..model import Mamba4Rec
    from .losses import ce_chunk, chunked_cross_entropy

    backend, _, pruned = VARIANTS[variant]
    torch.manual_seed(seed)
    model = Mamba4Rec(n_items)
    if state is not None:
        model.load_state_dict(state)
    model.set_scan_backend(backend)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed + seq_len)
    seq = torch.randint(1, n_items, (batch, seq_len), generator=g)
    lens = torch.full((batch,), seq_len, dtype=torch.long)
    tgt = torch.randint(1, n_items, (batch,), generator=g)
    # restore the weights before every step, so each variant always times the same step
    init = {k: v.clone() for k, v in model.state_dict().items()}

    def reset() -> None:
        model.load_state_dict(init)
        opt.state.clear()

    every = variant in EVERY_POSITION
    tgt_all = torch.randint(1, n_items, (batch * seq_len,), generator=g)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        if every:
            hidden = model.hidden_states(seq, lens).reshape(batch * seq_len, -1)
            weight = model.item_embedding.weight
            chunked_cross_entropy(hidden, weight, tgt_all, ce_chunk(n_items)).mean().backward()
            opt.step()
            return
        if pruned:
            logits = model.logits(seq, lens)
        else:
            logits = model.forward_all_positions(seq, lens) @ model.item_embedding.weight.t()
        F.cross_entropy(logits, tgt).backward()
        opt.step()

    return reset, step


def run_benchmark(
    *,
    lengths: list[int],
    variants: list[str],
    batch: int = 256,
    n_items: int = 1700,
    repeats: int = 5,
    budget_s: float = 900.0,
    threads: int = 1,
    seed: int = 0,
    ckpt: str | None = None,
    log: Any = None,
) -> dict[str, Any]:
    import torch

    torch.set_num_threads(threads)
    state = None
    if ckpt is not None:
        from ..checkpoint import read_checkpoint

        loaded = read_checkpoint(ckpt)
        n_items = loaded.config.n_items
        state = loaded.state_dict
    cells = {(v, L): Cell(v, L) for L in lengths for v in variants}
    steps = {(v, L): _setup(v, L, batch, n_items, seed, state) for L in lengths for v in variants}
    t_start = time.perf_counter()
    for rep in range(repeats + 1):  # rep 0 is the warm-up
        for L in lengths:
            for v in variants:
                if rep > 1 and time.perf_counter() - t_start > budget_s:
                    continue
                torch.set_flush_denormal(VARIANTS[v][1])
                reset, step = steps[(v, L)]
                reset()
                c0, w0 = time.process_time(), time.perf_counter()
                step()
                w, c = time.perf_counter() - w0, time.process_time() - c0
                if rep > 0:
                    cells[(v, L)].wall.append(w)
                    cells[(v, L)].cpu.append(c)
                if log is not None:
                    what = "warm-up" if rep == 0 else f"repeat {rep}"
                    log(f"{what}: L={L} {v}: {w:.2f} s wall, {c:.2f} s CPU")
    torch.set_flush_denormal(False)
    rows = []
    for L in lengths:
        base = cells.get(("reference", L))
        for v in variants:
            cell = cells[(v, L)]
            row: dict[str, Any] = {
                "seq_len": L,
                "variant": v,
                "backend": VARIANTS[v][0],
                "flush_denormal": VARIANTS[v][1],
                "pruned": VARIANTS[v][2],
                "steps_timed": len(cell.cpu),
                "median_cpu_s": cell.median_cpu(),
                "median_wall_s": cell.median_wall(),
                "targets_per_step": batch * (L if v in EVERY_POSITION else 1),
                "samples_per_s_wall": batch * (L if v in EVERY_POSITION else 1) / cell.median_wall(),
                "cpu_s": cell.cpu,
                "wall_s": cell.wall,
            }
            if base is not None:
                row["speedup_vs_reference_cpu"] = base.median_cpu() / cell.median_cpu()
                row["speedup_vs_reference_wall"] = base.median_wall() / cell.median_wall()
            ftz = cells.get(("reference+ftz", L))
            if ftz is not None:
                row["speedup_vs_reference_ftz_cpu"] = ftz.median_cpu() / cell.median_cpu()
            code = cells.get(("reference-code", L))
            if code is not None:
                row["speedup_vs_reference_code_cpu"] = code.median_cpu() / cell.median_cpu()
            rows.append(row)
    return {
        "benchmark": "training step (forward + CE over all items + backward + Adam); samples = targets",
        "batch": batch,
        "n_items": n_items,
        "model": "hidden 64, 1 layer, d_state 32, d_conv 4, expand 2, dropout 0.2",
        "weights": ckpt or "random init (seeded)",
        "threads": threads,
        "repeats_requested": repeats,
        "budget_s": budget_s,
        "total_s": time.perf_counter() - t_start,
        "torch": torch.__version__,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "results": rows,
    }


def _ratio(value: float | None) -> str:
    """A speed-up cell; '-' when the variant it compares with was not timed."""
    return "-" if value is None else f"{value:.1f}"


def print_table(report: dict[str, Any]) -> None:
    from rich.console import Console

    from ..console import titled_table

    title = (
        f"training step, batch {report['batch']}, {report['n_items']} items, {report['threads']} thread(s)"
    )
    t = titled_table(title)
    for col in (
        "L",
        "variant",
        "steps",
        "CPU s/step",
        "wall s/step",
        "samples/s",
        "x vs reference",
        "x vs ref+ftz",
        "x vs ref-code",
    ):
        t.add_column(col, justify="left" if col == "variant" else "right")
    for r in report["results"]:
        t.add_row(
            str(r["seq_len"]),
            r["variant"],
            str(r["steps_timed"]),
            f"{r['median_cpu_s']:.2f}",
            f"{r['median_wall_s']:.2f}",
            f"{r['samples_per_s_wall']:.0f}",
            _ratio(r.get("speedup_vs_reference_cpu")),
            _ratio(r.get("speedup_vs_reference_ftz_cpu")),
            _ratio(r.get("speedup_vs_reference_code_cpu")),
        )
    console = Console(width=max(Console().width, 120))
    console.print(t)
    console.print("x vs ...: ratio of median CPU time per step (variants interleaved in one run)")


@click.command("bench-train")
@click.option("--seq-len", "lengths", type=int, multiple=True, default=(50, 200), show_default=True)
@click.option(
    "--variant",
    "variants",
    type=click.Choice(sorted(VARIANTS)),
    multiple=True,
    default=("reference", "reference+ftz", "fast+ftz"),
    show_default=True,
)
@click.option(
    "--all-variants",
    is_flag=True,
    help="Also time fast without ftz and the reference code's step.",
)
@click.option("--batch", type=int, default=256, show_default=True)
@click.option("--n-items", type=int, default=1700, show_default=True)
@click.option(
    "--repeats", type=int, default=5, show_default=True, help="Timed steps per cell (after a warm-up)."
)
@click.option(
    "--budget", "budget_s", type=float, default=900, show_default=True, help="Seconds; stops repeats."
)
@click.option("--threads", type=int, default=1, show_default=True)
@click.option("--ckpt", type=click.Path(dir_okay=False), default=None, help="Use a trained model's weights.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--quiet", is_flag=True)
def bench_train(
    lengths: tuple[int, ...],
    variants: tuple[str, ...],
    all_variants: bool,
    batch: int,
    n_items: int,
    repeats: int,
    budget_s: float,
    threads: int,
    ckpt: str | None,
    json_path: Path | None,
    quiet: bool,
) -> None:
    """Time a training step with each scan backend (reference loop vs fast), flush-denormal on/off."""
    from ..errors import UsageError
    from ..fileio import write_json_atomic

    if batch < 1 or repeats < 1 or threads < 1 or any(L < 1 for L in lengths):
        raise UsageError("--batch, --repeats, --threads and --seq-len must be >= 1")
    chosen = list(dict.fromkeys(variants))
    if all_variants:
        from ..model.scan_native import native_available

        # the native variants only where their library is built (m4r build-native)
        chosen = [v for v in VARIANTS if VARIANTS[v][0] != "native" or native_available()]
    report = run_benchmark(
        lengths=list(lengths),
        variants=chosen,
        batch=batch,
        n_items=n_items,
        repeats=repeats,
        budget_s=budget_s,
        threads=threads,
        ckpt=ckpt,
        log=None if quiet else lambda m: click.echo(m, err=True),
    )
    print_table(report)
    if json_path is not None:
        write_json_atomic(json_path, report)
