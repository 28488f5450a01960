"""Training throughput of DDP with 2 CPU processes (trainer=ddp_cpu) against one process (trainer=cpu).

    python scripts/bench_ddp.py                          # MNIST CNN on ./data (python train.py downloads it)
    python scripts/bench_ddp.py --model mlp --steps 200 --repeats 3

Three setups run `train.py` with the same per-process batch (64) for the same number of optimizer steps, each in a
fresh process, interleaved `--repeats` times; the table gives medians. DDP processes batch x 2 samples per step.
The one-thread row shows what one core does alone, the budget each DDP rank has here.
The rate comes from the wall-clock stamps of the per-step `train/loss` events that rank 0 writes (the ranks move
in lockstep: every step ends in a gradient all-reduce), after `--warmup` steps. Validation, testing, checkpoints
and the other per-step callbacks are off: this times training alone.

On an idle 2-core CPU expect about 1x: one process already uses both cores for its intra-op threads, and DDP gives
each rank one core, so the gain is none and the all-reduce (gloo, 1.2M floats for the CNN) costs a little. The point
is that the multi-process path works here and costs little; on GPUs the same code scales with the device count.
On a CPU busy with other work, two-thread intra-op parallelism loses most of its speed waiting for the busy core,
and one thread per process comes out well ahead: the load average printed with the table says which case it was.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parents[1]
# name -> (trainer config, processes, torch threads per process; None: torch's default, one per core)
SETUPS = {"cpu": ("cpu", 1, None), "cpu_1thread": ("cpu", 1, 1), "ddp_cpu": ("ddp_cpu", 2, None)}


def run(name: str, args, root: Path) -> float:
    """Samples per second of one training run (all ranks together)."""
    trainer, processes, threads = SETUPS[name]
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    cmd = [sys.executable, str(ROOT / "train.py"), f"trainer={trainer}", f"model={args.model}",
           f"paths.data_dir={args.data}", f"paths.root_dir={root}", "data.download=false", "data.val_size=100",
           f"data.batch_size={args.batch_size}", f"trainer.max_steps={args.steps}", "trainer.max_epochs=-1",
           "trainer.limit_val_batches=0", "trainer.log_every_n_steps=1", "test=false",
           *(f"callbacks.{name}=null" for name in
             ("progress_bar", "model_summary", "model_checkpoint", "lr_monitor", "grad_norm"))]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
    (run_dir,) = (root / "logs" / "train" / "runs").iterdir()
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    stamps = [(e.step, e.wall_time) for e in acc.Scalars("train/loss") if e.step >= args.warmup]
    (s0, t0), (s1, t1) = stamps[0], stamps[-1]
    return (s1 - s0) * args.batch_size * processes / (t1 - t0)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT / "data"),
                        help="a folder holding MNIST/raw/*-ubyte (default: ./data, where train.py downloads MNIST)")
    parser.add_argument("--model", default="cnn", help="model config (default cnn)")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per run (default 100)")
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of the rate (default 10)")
    parser.add_argument("--batch-size", type=int, default=64, help="per process (default 64)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each, interleaved (default 2)")
    args = parser.parse_args(argv)
    if not (Path(args.data) / "MNIST" / "raw").is_dir():
        sys.exit(f"No MNIST IDX files under {args.data}/MNIST/raw: pass --data a folder that has them.")

    rates: dict[str, list[float]] = {name: [] for name in SETUPS}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for name in SETUPS:
                rates[name].append(run(name, args, Path(tmp) / f"{name}{i}"))
                print(f"  run {i + 1}/{args.repeats} {name:11s} {rates[name][-1]:7.0f} samples/s", flush=True)

    med = {name: statistics.median(r) for name, r in rates.items()}
    print(f"\n{args.model} on MNIST, batch {args.batch_size} per process, {args.steps} steps ({args.warmup} warm-up), "
          f"median of {args.repeats}, {os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f} at the end")
    print("| path | processes x threads | samples/s | ratio to one process |")
    print("|---|---:|---:|---:|")
    print(f"| one process (`trainer=cpu`) | 1 x {os.cpu_count()} | {med['cpu']:.0f} | 1.00x |")
    print(f"| one process, one thread (`OMP_NUM_THREADS=1`) | 1 x 1 | {med['cpu_1thread']:.0f} | "
          f"{med['cpu_1thread'] / med['cpu']:.2f}x |")
    print(f"| DDP, gloo (`trainer=ddp_cpu`) | 2 x 1 | {med['ddp_cpu']:.0f} | **{med['ddp_cpu'] / med['cpu']:.2f}x** |")


if __name__ == "__main__":
    main()
