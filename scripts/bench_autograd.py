"""Manual backprop vs autograd: time and memory of one training step of the same MLP, same weights.

    python scripts/bench_autograd.py --passes 5      # the README table (~12 min on one CPU core)
    python scripts/bench_autograd.py --reps 31 --threads 2

Each row builds ManualMLP four times from one seed: backend=manual fused (the whole stack one
hand-written Function, gradlab.autograd.stack, the default: float32 matmuls and the forward's fused
linear + activation on oneDNN), the same with onednn=False (torch's addmm/mm kernels, as autograd
uses: what the hand-written backward alone gives), backend=manual fused=False (one
hand-written Function per layer) and backend=autograd (nn.Linear, nn.Sigmoid, …, nn.CrossEntropyLoss),
and times forward + backward + SGD step. The three take turns round by round in the same process (the
order rotates), and the table shows the median over rounds of the per-step time; ratios are to autograd.
The whole table is timed in several passes (--passes) and each ratio is given as the median of the passes
with its range. Time is this process's CPU time, not wall time: on a shared machine the wall clock also
counts the time other processes hold the core, CPU time counts only our own work.
(With --threads 1 all work is on this thread; autograd runs CPU backward on the calling thread.)

Memory, measured in a separate untimed step:
  kept   the bytes alive when forward has returned: what the graph keeps for backward (saved
         activations, however a Function keeps them), parameters and input excluded.
  peak   the peak bytes of all live tensors during forward + backward + step, above the parameters and
         the input batch: every tensor an aten op creates is counted from its creation until its
         storage is freed (a TorchDispatchMode with weakref finalizers). Allocator caching and the
         scratch space inside kernels are not included, so this is the model's own demand.
"""

import argparse
import gc
import statistics
import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from gradlab.models.mlp import ManualMLP, classification_loss

VARIANTS = {  # name: (backend, fused, onednn)
    "fused": ("manual", True, True),
    "aten": ("manual", True, False),
    "layers": ("manual", False, True),
    "autograd": ("autograd", False, True),
}


class LiveTensorBytes(TorchDispatchMode):
    """Peak of the bytes held by live tensor storages created inside the mode."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.tracked: set[int] = set()

    def _release(self, key: int, nbytes: int) -> None:
        self.tracked.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            # In-place ops and views return storages that already exist: only new ones count.
            if key in self.tracked or key in self.preexisting:
                continue
            self.tracked.add(key)
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._release, key, storage.nbytes())
        return out


def build(variant: str, sizes: list[int], activation: str, batch_norm: bool, seed: int = 0):
    backend, fused, onednn = VARIANTS[variant]
    torch.manual_seed(seed)
    net = ManualMLP(sizes[0], sizes[1:-1], sizes[-1], activation, batch_norm=batch_norm, backend=backend,
                    fused=fused, onednn=onednn)
    return net, classification_loss(sizes[-1], backend), torch.optim.SGD(net.parameters(), lr=0.01)


def train_step(net, criterion, optimizer, x, y):
    optimizer.zero_grad(set_to_none=True)
    criterion(net(x), y).backward()
    optimizer.step()


def memory_bytes(net, criterion, optimizer, x, y) -> tuple[int, int]:
    """(bytes alive after forward, peak bytes over forward + backward + step), above parameters and input."""
    train_step(net, criterion, optimizer, x, y)  # creates optimizer state, if any, outside the count
    optimizer.zero_grad(set_to_none=True)
    mode = LiveTensorBytes()
    mode.preexisting = {t.untyped_storage().data_ptr() for t in [*net.parameters(), *net.buffers(), x, y]}
    with mode:
        loss = criterion(net(x), y)
        kept = mode.live  # the graph's saved activations (and the loss): what backward will read
        loss.backward()
        del loss
        optimizer.step()
    return kept, mode.peak


def time_steps(runs: dict, x, y, reps: int, steps: int) -> dict[str, float]:
    per_step = {name: [] for name in runs}
    for name, run in runs.items():  # warm-up: allocator, MKL/oneDNN code paths, grads in place
        for _ in range(3):
            train_step(*run, x, y)
    for r in range(reps):
        names = list(runs)
        order = names[r % len(names):] + names[:r % len(names)]  # none always goes first
        for name in order:
            gc.collect()  # as timeit does, no garbage collection inside a timed round: it would land on
            gc.disable()  # whichever variant happens to run when the collector's threshold trips
            try:
                start = time.process_time()
                for _ in range(steps):
                    train_step(*runs[name], x, y)
                per_step[name].append((time.process_time() - start) / steps)
            finally:
                gc.enable()
    return {name: statistics.median(v) for name, v in per_step.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=15, help="timing rounds per variant and pass (median taken)")
    parser.add_argument("--passes", type=int, default=3,
                        help="passes over the whole table (default 3): each row reports the median of the passes' "
                             "ratios and their range, which shows how much a reading moves between runs")
    parser.add_argument("--steps", type=int, default=5, help="training steps per round")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    deep = [256] * 21 + [10]  # 20 hidden layers of 256, then 10 classes
    cases = [  # (label, sizes, activation, batch_norm)
        ("784-512-256-10 sigmoid", [784, 512, 256, 10], "sigmoid", False),
        ("784-512-256-10 relu", [784, 512, 256, 10], "relu", False),
        ("20x256 sigmoid", deep, "sigmoid", False),
        ("20x256 relu", deep, "relu", False),
        ("20x256 tanh", deep, "tanh", False),
        ("20x256 leaky_relu", deep, "leaky_relu", False),
        ("784-512-256-10 relu + BN", [784, 512, 256, 10], "relu", True),
    ]
    print(f"float32, CPU, batch {args.batch}, {torch.get_num_threads()} thread(s), torch {torch.__version__}; "
          f"time = CPU time per step, median of {args.reps} rounds x {args.steps} steps, in each of {args.passes} "
          "passes over the table; ratios: median of the passes [lowest-highest]")
    mib = 2 ** 20
    setups, mem = [], []
    for label, sizes, activation, batch_norm in cases:
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(args.batch, sizes[0], generator=gen)
        y = torch.randint(0, sizes[-1], (args.batch,), generator=gen)
        runs = {v: build(v, sizes, activation, batch_norm) for v in VARIANTS}
        setups.append((runs, x, y))
        mem.append({v: memory_bytes(*runs[v], x, y) for v in VARIANTS})
    times = [[] for _ in cases]  # per case, one {variant: seconds per step} per pass
    for i in range(args.passes):  # pass-major: a slow spell of the machine hits every row alike
        for case, (runs, x, y) in enumerate(setups):
            times[case].append(time_steps(runs, x, y, args.reps, args.steps))
        print(f"  pass {i + 1}/{args.passes} done", flush=True)

    def ratio(case_times, variant):
        r = sorted(t[variant] / t["autograd"] for t in case_times)
        return f"{statistics.median(r):.2f}x [{r[0]:.2f}-{r[-1]:.2f}]"

    header = (f"{'network':<26} {'fused ms':>8} {'autograd ms':>11}  {'fused/autograd':>18}  "
              f"{'fused-aten/autograd':>19}  {'layers/autograd':>18}   {'kept MiB':>8} {'(autograd)':>10} "
              f"{'ratio':>6}   {'peak MiB':>8} {'(autograd)':>10} {'ratio':>6}")
    print(header)
    print("-" * len(header))
    for (label, *_), case_times, m in zip(cases, times, mem):
        ms = {v: statistics.median(t[v] for t in case_times) * 1e3 for v in VARIANTS}
        kept = {v: k / mib for v, (k, _) in m.items()}
        peak = {v: top / mib for v, (_, top) in m.items()}
        # Memory is reported for the fused default; the other manual variants keep the same tensors.
        print(f"{label:<26} {ms['fused']:>8.2f} {ms['autograd']:>11.2f}  {ratio(case_times, 'fused'):>18}  "
              f"{ratio(case_times, 'aten'):>19}  {ratio(case_times, 'layers'):>18}   "
              f"{kept['fused']:>8.2f} {kept['autograd']:>10.2f} {kept['fused'] / kept['autograd']:>5.2f}x   "
              f"{peak['fused']:>8.2f} {peak['autograd']:>10.2f} {peak['fused'] / peak['autograd']:>5.2f}x")
    print("fused: the default (oneDNN kernels in float32 on CPU); fused-aten: model.onednn=false, the same "
          "hand-written backward on torch's addmm/mm; layers: model.fused=false, one Function per layer.")

if __name__ == "__main__":
    main()
