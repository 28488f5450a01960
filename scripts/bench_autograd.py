"""The lesson's hand-written backward against autograd: time and memory of one training step of the same MLP.

    python scripts/bench_autograd.py                 # ~2 min on an idle CPU core (much more on a busy one)
    python scripts/bench_autograd.py --reps 9 --passes 2   # the docs/benchmarks.md table

Each row builds ManualMLP twice from one seed: backend=manual (one hand-written Function per layer, what
`model=mlp` runs) and backend=autograd (nn.Linear, nn.Sigmoid, ..., nn.CrossEntropyLoss), and times
forward + backward + SGD step. The two take turns round by round in the same process (the order
alternates), so a slow spell of a shared machine hits both; the table shows the median over rounds of the
per-step time. The whole table is timed in several passes (--passes); each ratio is the median of the
passes with its range. Time is this process's CPU time, not wall time: on a shared machine the wall clock
also counts the time other processes hold the core. With --threads 1 all work is on this thread (autograd
runs CPU backward on the calling thread).

Memory, measured in a separate untimed step (gradlab.autograd.memory: every tensor storage an aten op creates,
from its creation until it is freed, above parameters and the input batch; no allocator caching):
  kept   the bytes alive when forward has returned: what the graph keeps for backward;
  peak   the most bytes alive at once during forward + backward + step.

Goal: the lesson path within 1.10x of autograd's time in every row, memory <= 1.0x.
"""

import argparse
import gc
import platform
import statistics
import subprocess
import time

import torch

from gradlab.autograd.memory import step_memory
from gradlab.models.mlp import ManualMLP, classification_loss

BACKENDS = {"lesson": "manual", "autograd": "autograd"}
TIME_GOAL, MEMORY_GOAL = 1.10, 1.00


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build(backend: str, sizes: list[int], activation: str, batch_norm: bool, seed: int = 0):
    torch.manual_seed(seed)
    net = ManualMLP(sizes[0], sizes[1:-1], sizes[-1], activation, batch_norm=batch_norm, backend=backend)
    return net, classification_loss(sizes[-1], backend), torch.optim.SGD(net.parameters(), lr=0.01)


def train_step(net, criterion, optimizer, x, y):
    optimizer.zero_grad(set_to_none=True)
    criterion(net(x), y).backward()
    optimizer.step()


def time_steps(runs: dict, x, y, reps: int, steps: int) -> dict[str, float]:
    """Median seconds per step of each run, the runs taking turns round by round."""
    per_step = {name: [] for name in runs}
    for run in runs.values():  # warm-up: allocator, MKL code paths, grads in place
        for _ in range(3):
            train_step(*run, x, y)
    names = list(runs)
    for r in range(reps):
        for name in names[r % 2:] + names[:r % 2]:  # neither always goes first
            gc.collect()  # as timeit does, no garbage collection inside a timed round: it would land on
            gc.disable()  # whichever run happens to be going when the collector's threshold trips
            try:
                start = time.process_time()
                for _ in range(steps):
                    train_step(*runs[name], x, y)
                per_step[name].append((time.process_time() - start) / steps)
            finally:
                gc.enable()
    return {name: statistics.median(v) for name, v in per_step.items()}


CASES = [  # (label, sizes, activation, batch_norm)
    ("784-256-128-10 relu", [784, 256, 128, 10], "relu", False),  # what `python train.py model=mlp` trains
    ("784-512-256-10 sigmoid", [784, 512, 256, 10], "sigmoid", False),
    ("784-512-256-10 relu", [784, 512, 256, 10], "relu", False),
    ("20x256 sigmoid", [256] * 21 + [10], "sigmoid", False),  # 20 hidden layers of 256, then 10 classes
    ("20x256 relu", [256] * 21 + [10], "relu", False),
    ("20x256 tanh", [256] * 21 + [10], "tanh", False),
    ("20x256 leaky_relu", [256] * 21 + [10], "leaky_relu", False),
    ("784-512-256-10 relu + BN", [784, 512, 256, 10], "relu", True),
]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=15, help="timing rounds per backend and pass (median taken)")
    parser.add_argument("--passes", type=int, default=3, help="passes over the whole table (ratio: median and range)")
    parser.add_argument("--steps", type=int, default=5, help="training steps per round")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    print(f"CPU: {cpu_model()}")
    print(f"float32, batch {args.batch}, {torch.get_num_threads()} thread(s), torch {torch.__version__}; time = CPU "
          f"time per step, median of {args.reps} rounds x {args.steps} steps, in each of {args.passes} pass(es)")
    setups, memory = [], []
    for _, sizes, activation, batch_norm in CASES:
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(args.batch, sizes[0], generator=gen)
        y = torch.randint(0, sizes[-1], (args.batch,), generator=gen)
        runs = {name: build(backend, sizes, activation, batch_norm) for name, backend in BACKENDS.items()}
        setups.append((runs, x, y))
        memory.append({name: step_memory(*run, x, y) for name, run in runs.items()})
    times = [[] for _ in CASES]  # per case, one {backend: seconds per step} per pass
    for i in range(args.passes):  # pass-major: a slow spell of the machine hits every row alike
        for case, (runs, x, y) in enumerate(setups):
            times[case].append(time_steps(runs, x, y, args.reps, args.steps))
        print(f"  pass {i + 1}/{args.passes} done", flush=True)

    mib = 2 ** 20
    header = (f"{'network':<26} {'lesson ms':>9} {'autograd ms':>11} {'time ratio':>18}   "
              f"{'kept MiB':>17} {'ratio':>6}   {'peak MiB':>17} {'ratio':>6}")
    print(header)
    print("-" * len(header))
    missed = []
    for (label, *_), case_times, mem in zip(CASES, times, memory):
        ms = {name: statistics.median(t[name] for t in case_times) * 1e3 for name in BACKENDS}
        ratios = sorted(t["lesson"] / t["autograd"] for t in case_times)
        ratio = statistics.median(ratios)
        (kept, peak), (ref_kept, ref_peak) = mem["lesson"], mem["autograd"]
        print(f"{label:<26} {ms['lesson']:>9.2f} {ms['autograd']:>11.2f} "
              f"{f'{ratio:.2f}x [{ratios[0]:.2f}-{ratios[-1]:.2f}]':>18}   "
              f"{f'{kept / mib:.2f} / {ref_kept / mib:.2f}':>17} {kept / ref_kept:>5.2f}x   "
              f"{f'{peak / mib:.2f} / {ref_peak / mib:.2f}':>17} {peak / ref_peak:>5.2f}x")
        if ratio > TIME_GOAL or kept > ref_kept * MEMORY_GOAL or peak > ref_peak * MEMORY_GOAL:
            missed.append(label)
    print(f"lesson: model=mlp (one hand-written Function per layer); MiB: lesson / autograd. Goal: time <= "
          f"{TIME_GOAL:.2f}x, kept and peak memory <= {MEMORY_GOAL:.2f}x in every row: "
          + ("met." if not missed else f"missed in {', '.join(missed)}."))


if __name__ == "__main__":
    main()
