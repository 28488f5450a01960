"""Training throughput of gradlab's Lightning path vs a plain PyTorch loop (pytorch/examples mnist style).

    python scripts/bench_cnn.py                        # MNIST from ./data (python train.py downloads it)
    python scripts/bench_cnn.py --data /datasets --steps 200 --repeats 5

Both train the same CNN, batch 64, Adadelta lr 1.0, on the same IDX files, for the same number of steps, each in a fresh process (so both pay their imports), the two
interleaved `--repeats` times; the table gives medians. Validation is off in both: this times training.
The plain loop is the reference's: its `Net` verbatim (src/gradlab/models/reference_net.py), torchvision
MNIST + ToTensor/Normalize per sample + DataLoader. gradlab's MnistCNN has the same layers and parameters and computes the same function
(tests/test_cnn.py checks outputs and gradients against `Net` from the same weights); where its step is faster,
the reasons are in src/gradlab/models/cnn.py.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def plain_loop(data: str, steps: int, warmup: int, out: str) -> None:
    import torch
    import torch.nn.functional as F
    from torchvision import datasets, transforms

    from gradlab.models.reference_net import Net  # pytorch/examples' Net, verbatim

    torch.manual_seed(1)
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    dataset = datasets.MNIST(data, train=True, download=False, transform=transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=64, shuffle=True)
    model = Net()
    optimizer = torch.optim.Adadelta(model.parameters(), lr=1.0)
    model.train()
    step, samples, first, t_start = 0, 0, None, None
    while step < steps:
        for x, y in loader:
            if first is None:
                first = time.time() - float(os.environ["BENCH_T0"])
            if step == warmup:
                t_start, samples = time.perf_counter(), 0
            optimizer.zero_grad()
            loss = F.nll_loss(model(x), y)
            loss.backward()
            optimizer.step()
            samples += y.shape[0]
            step += 1
            if step == steps:
                break
    rate = samples / (time.perf_counter() - t_start)
    with open(out, "w") as f:
        json.dump({"first_step_s": first, "steps": step, "samples_per_s": rate}, f)


def run_worker(kind: str, args, tmp: str, i: int) -> dict:
    out = os.path.join(tmp, f"{kind}{i}.json")
    env = {**os.environ, "BENCH_T0": repr(time.time()),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "scripts"), str(ROOT / "src")])}  # this checkout's gradlab
    if kind == "plain":
        cmd = [sys.executable, __file__, "--worker", "plain", "--data", args.data, "--steps", str(args.steps),
               "--out", out]
    else:
        extra = ["trainer.precision=bf16-mixed"] if kind == "gradlab-bf16" else []
        cmd = [sys.executable, str(ROOT / "train.py"), "experiment=mnist_cnn", *extra, f"paths.data_dir={args.data}",
               f"paths.root_dir={tmp}", "data.download=false", f"data.val_size={args.val_size}",
               f"trainer.max_steps={args.steps}", "trainer.limit_val_batches=0", "test=false",
               "callbacks.progress_bar=null", "callbacks.model_summary=null",
               f"+callbacks.timer={{_target_:bench_timer.StepTimer,out:{out},warmup:{args.warmup}}}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{kind} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(Path(out).read_text())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT / "data"),
                        help="a folder holding MNIST/raw/*-ubyte (default: ./data, where train.py downloads MNIST)")
    parser.add_argument("--steps", type=int, default=200, help="training steps per run (default 200)")
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of the rate (default 10)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each, interleaved (default 3)")
    parser.add_argument("--bf16", action="store_true",
                        help="also time gradlab with trainer.precision=bf16-mixed (fast on CPUs with AVX512-BF16/AMX; "
                             "different numerics, so not part of the like-for-like ratio)")
    parser.add_argument("--val-size", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--worker", choices=["plain"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return plain_loop(args.data, args.steps, args.warmup, args.out)
    if not (Path(args.data) / "MNIST" / "raw").is_dir():
        sys.exit(f"No MNIST IDX files under {args.data}/MNIST/raw: pass --data a folder that has them.")

    results = {"plain": [], "gradlab": [], **({"gradlab-bf16": []} if args.bf16 else {})}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for kind in results:
                results[kind].append(run_worker(kind, args, tmp, i))
                r = results[kind][-1]
                print(f"  run {i + 1}/{args.repeats} {kind:12s} {r['samples_per_s']:7.0f} samples/s, "
                      f"first step after {r['first_step_s']:.2f} s", flush=True)

    med = {k: {m: statistics.median(r[m] for r in v) for m in ("samples_per_s", "first_step_s")}
           for k, v in results.items()}
    print(f"\nMNIST CNN training, batch 64, {args.steps} steps ({args.warmup} warm-up), "
          f"median of {args.repeats}, torch threads: {os.cpu_count()} cores")
    print("| path | samples/s | start to first step (s) |")
    print("|---|---:|---:|")
    print(f"| plain PyTorch loop (ToTensor/Normalize per sample) | {med['plain']['samples_per_s']:.0f} | "
          f"{med['plain']['first_step_s']:.2f} |")
    print(f"| gradlab (`train.py experiment=mnist_cnn`) | {med['gradlab']['samples_per_s']:.0f} | "
          f"{med['gradlab']['first_step_s']:.2f} |")
    ratio = med["gradlab"]["samples_per_s"] / med["plain"]["samples_per_s"]
    print(f"| **ratio gradlab / plain** | **{ratio:.2f}x** | "
          f"{med['gradlab']['first_step_s'] / med['plain']['first_step_s']:.2f}x |")
    if args.bf16:
        bf16 = med["gradlab-bf16"]
        print(f"| gradlab, `trainer.precision=bf16-mixed` (other numerics) | {bf16['samples_per_s']:.0f} "
              f"({bf16['samples_per_s'] / med['plain']['samples_per_s']:.2f}x plain) | {bf16['first_step_s']:.2f} |")


if __name__ == "__main__":
    main()
