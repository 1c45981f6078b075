"""``m4r demo``: the whole pipeline on CPU in a few minutes, with no network and no arguments.

It runs the very commands a user would type (printed before each step), on a synthetic data set
with learnable sequential structure: data -> train -> evaluate -> export (fp32 + fp16) ->
verify (both files, the fp16 one with its parity histogram) -> bench (with its latency plot).
Every artifact lands in ``--out-dir`` for inspection.

On a slow or busy machine the demo takes longer but still completes with the same steps: training
stops at ``TRAIN_MINUTES`` (then the best epoch so far is the model; fewer epochs mean a lower
hit@10, never a failure) and the benchmark at ``BENCH_SECONDS`` (fewer timed calls per point:
p90/p99 become "n/a" where there are too few). Data, evaluation, export and verification have no
time limit: they do the same work on any machine.
"""

from __future__ import annotations

import shlex
import time
from pathlib import Path

import click

from .errors import M4RError

#: CPU-sized recipe for the demo: the paper's model, trained briefly on synthetic data
DEMO_RECIPE = """\
# m4r demo recipe: the paper's Mamba4Rec, sized for a CPU (8 short epochs; training stops at
# the demo's --max-minutes on a slow machine and keeps the best epoch so far)
hidden_size: 64
num_layers: 1
dropout_prob: 0.2
d_state: 32
d_conv: 4
expand: 2
loss_type: CE
MAX_ITEM_LIST_LENGTH: 50
train_batch_size: 16      # windows (users' histories of <= 50 items) per step, every position trained
learning_rate: 0.003
epochs: 8
stopping_step: 3
eval_batch_size: 1024
seed: 0
"""


#: time limits of the two steps whose work would otherwise grow on a slow machine
TRAIN_MINUTES = 4
BENCH_SECONDS = 30


def demo_steps(out: Path, quick: bool) -> list[list[str]]:
    """The demo's commands, as argument lists for ``m4r``."""
    q = {  # shell-quoted paths, so the command lines read like what a user types
        "data": shlex.quote(str(out / "synthetic.inter")),
        "recipe": shlex.quote(str(out / "recipe.yaml")),
        "ckpt": shlex.quote(str(out / "model.pt")),
        "export": shlex.quote(str(out / "export")),
        "out": shlex.quote(str(out)),
    }
    users, epochs = ("200", "3") if quick else ("600", "8")
    bench_seconds = 10 if quick else BENCH_SECONDS
    lines = [
        f"data synthetic {q['data']} --users {users} --items 150 --seed 0",
        f"train --data {q['data']} --config {q['recipe']} --out {q['ckpt']} --epochs {epochs} "
        f"--max-minutes {TRAIN_MINUTES}",
        f"evaluate --ckpt {q['ckpt']} --data {q['data']} --k 10 20 --json {q['out']}/evaluate.json",
        f"export --ckpt {q['ckpt']} --out-dir {q['export']} --fp16",
        f"verify --ckpt {q['ckpt']} --artifact {q['export']}/model.onnx --data {q['data']} "
        f"--json {q['out']}/verify.fp32.json",
        f"verify --ckpt {q['ckpt']} --artifact {q['export']}/model.fp16.onnx --data {q['data']} "
        f"--json {q['out']}/verify.fp16.json --plot {q['out']}/parity.fp16.png",
        f"bench --artifact {q['export']}/model.onnx --ckpt {q['ckpt']} --batch 1 64 --seq 50 100 200 "
        f"--max-seconds {bench_seconds} --json {q['out']}/bench.json --plot {q['out']}/latency.png",
    ]
    return [shlex.split(line) for line in lines]


@click.command()
@click.option(
    "--out-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("m4r-demo"),
    show_default=True,
    help="Where the data, checkpoint, artifacts and reports go.",
)
@click.option("--quick", is_flag=True, help="Smaller data and fewer epochs (used by the test suite).")
def demo(out_dir: Path, quick: bool) -> None:
    """Run the whole pipeline on synthetic data on CPU: train, evaluate, export, verify, bench."""
    from .cli import main
    from .fileio import ensure_writable_dir, write_text_atomic

    ensure_writable_dir(out_dir)
    write_text_atomic(out_dir / "recipe.yaml", DEMO_RECIPE)
    steps = demo_steps(out_dir, quick)
    start = time.perf_counter()
    took: list[str] = []
    for i, args in enumerate(steps, 1):
        click.secho(f"\n[{i}/{len(steps)}] m4r {shlex.join(args)}", bold=True, fg="cyan")
        t0 = time.perf_counter()
        try:
            main.main(args, prog_name="m4r", standalone_mode=False)
        except SystemExit as exc:  # a command that ends with an explicit exit code
            if exc.code not in (0, None):
                raise M4RError(f"demo step {i} (m4r {args[0]}) failed with exit code {exc.code}") from None
        took.append(f"{args[0]} {time.perf_counter() - t0:.0f} s")
    click.secho(
        f"\nDemo finished in {time.perf_counter() - start:.0f} s ({', '.join(took)}); everything is in "
        f"{out_dir}/ (plots: latency.png, parity.fp16.png)",
        fg="green",
    )
