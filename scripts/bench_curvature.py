"""Cost of the curvature instruments on the MNIST CNN: a reading against a training step, side by side.

    python scripts/bench_curvature.py                    # a few minutes on 2 shared CPU cores
    python scripts/bench_curvature.py --cycles 5 --probe-sizes 64

Per cycle, in turn (so that load from other jobs falls on all of them alike): 10 training steps (forward, loss,
backward, Adam step; batch 64, CPU time of the process), one sharpness reading (20 Lanczos iterations, warm-started,
plus the preconditioned one that Adam adds), one trace reading (4 Rademacher probes), and one step with the gradient
tests' tap attached. Medians over cycles. A reading every N steps costs reading / (N · step) of the run; targets:
sharpness every 100 steps <= 5 %, trace and gradient tests at their default intervals (100, 64) <= 3 %.
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from gradlab.models.cnn import MnistCNN
from gradlab.observe.curvature import Hessian, flatten, hutchinson, layer_groups, preconditioner, rademacher, sharpness
from gradlab.observe.grad_tests import GradTestMonitor
from gradlab.run.precision import cpu_model


def cpu() -> float:
    return time.process_time()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--probe-sizes", type=int, nargs="+", default=[64, 256])
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = MnistCNN()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    x, y = torch.randn(512, 1, 28, 28), torch.randint(0, 10, (512,))
    _, params, groups = layer_groups(net)
    tests = GradTestMonitor(log_every_n_steps=1, strip_prefix="")

    def step(i: int, tap: bool = False) -> None:
        xb, yb = x[(i % 8) * 64:(i % 8 + 1) * 64], y[(i % 8) * 64:(i % 8 + 1) * 64]
        if tap:
            tests.attach(net)
        opt.zero_grad()
        F.cross_entropy(net(xb), yb).backward()
        if tap:
            tests.detach()
            tests.tests(*tests.collect())
        opt.step()

    for i in range(5):
        step(i)  # warm up, and give Adam a state
    starts: dict[int, torch.Tensor] = {}
    times: dict[str, list[float]] = {}
    for cycle in range(args.cycles):
        t = cpu()
        for i in range(10):
            step(i)
        times.setdefault("step", []).append((cpu() - t) / 10)
        t = cpu()
        step(cycle, tap=True)
        times.setdefault("tests", []).append(cpu() - t - times["step"][-1])
        for n in args.probe_sizes:
            net.eval()  # as the instrument measures: no dropout
            t = cpu()
            hessian = Hessian(F.cross_entropy(net(x[:n]), y[:n]), params)
            eig = sharpness(hessian, 20, starts.get(n), generator=torch.Generator().manual_seed(0))
            starts[n] = eig.vector
            times.setdefault(f"sharpness, probe {n}", []).append(cpu() - t)
            t = cpu()
            sharpness(hessian, 20, None, flatten(preconditioner(opt, params)).rsqrt(), torch.Generator().manual_seed(1))
            times.setdefault(f"+ preconditioned, probe {n}", []).append(cpu() - t)
            t = cpu()
            hessian = Hessian(F.cross_entropy(net(x[:n]), y[:n]), params)
            hutchinson(hessian, groups, rademacher(hessian.numel, 4, torch.Generator().manual_seed(2), params[0]))
            times.setdefault(f"trace (4 probes), probe {n}", []).append(cpu() - t)
            net.train()
    med = {k: statistics.median(v) for k, v in times.items()}
    s = med["step"]
    print(f"CPU: {cpu_model()}, {args.threads} thread(s), torch {torch.__version__}; CNN batch 64; "
          f"medians of {args.cycles} cycles, CPU time")
    print(f"{'what':<34} {'seconds':>8} {'steps':>7} {'every 100':>10} {'every 1000':>11}")
    print(f"{'training step (off)':<34} {s:8.4f} {1:7.2f}")
    for k, v in med.items():
        if k != "step":
            every = 64 if k == "tests" else 100
            print(f"{k:<34} {v:8.4f} {v / s:7.2f} {v / (100 * s):10.1%} {v / (1000 * s):11.2%}"
                  + (f"   (at its default 64: {v / (64 * s):.1%})" if every == 64 else ""))


if __name__ == "__main__":
    main()
