"""Cost of callbacks.grad_noise: training steps of the CNN, the MLP and the RNN with the instrument on vs off, side by side.

    python scripts/bench_grad_noise.py                   # ~3 minutes on 2 shared CPU cores
    python scripts/bench_grad_noise.py --cycles 40 --threads 2 --models cnn

Per model, consecutive training steps (forward, loss, backward, Adam step) alternate between "off" (no hook
attached: what every non-logging step runs) and "on" (PerExampleTap attached for the step, then the callback's
reduction: per-layer ‖g‖², tr(Σ), ‖G‖², the norm test, one copy to the host). The logging step's extra cost is
the median over cycles of on/off - 1 (CPU time of the process, which load from other jobs inflates less than wall
time); at interval N it is paid once every N steps, so the overhead is that / N. Target: <= 3 % at the default
interval (64), <= 25 % logging every step.
    cnn   MnistCNN (model=cnn: channels-last), batch 64, 1x28x28: exact per-example norms for all four layers
    mlp   ManualMLP 784-256-128-10 relu, hand-written backward, one Function per layer, batch 64: exact
    rnn   SentimentRNN (model=rnn: bidirectional GRU 64, embedding 128, vocabulary 20,000), batch 64 x 128
          tokens: exact for the head, two-batch estimate (one extra backward of half the rows) for GRU + embedding
"""

import argparse
import platform
import statistics
import subprocess
import time

import torch
import torch.nn.functional as F

from gradlab.callbacks.grad_noise import PerExampleTap, noise_estimates, norm_test
from gradlab.models.cnn import MnistCNN
from gradlab.models.mlp import ManualMLP, classification_loss
from gradlab.models.rnn import SentimentRNN

INTERVALS = (1, 16, 64)


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def build(kind: str, batch: int):
    """(model, loss, inputs, target) on random data of the real shapes."""
    g = torch.Generator().manual_seed(0)
    if kind == "cnn":
        net = MnistCNN().to(memory_format=torch.channels_last)
        x = torch.randn(batch, 1, 28, 28, generator=g).contiguous(memory_format=torch.channels_last)
        return net, F.nll_loss, (x,), torch.randint(0, 10, (batch,), generator=g)
    if kind == "mlp":
        net = ManualMLP(784, [256, 128], 10, backend="manual")
        return net, classification_loss(10), (torch.randn(batch, 784, generator=g),), torch.randint(0, 10, (batch,))
    net = SentimentRNN(vocab_size=20000, embed_dim=128, hidden_size=64, cell="gru", dropout=0.5)
    tokens = torch.randint(1, 20000, (batch, 128), generator=g)
    y = torch.randint(0, 2, (batch,), generator=g).float()
    return net, F.binary_cross_entropy_with_logits, (tokens, torch.full((batch,), 128)), y


def step(net, loss_fn, inputs, target, opt, tap=None) -> None:
    opt.zero_grad(set_to_none=True)
    if tap is not None:
        tap.attach()
    loss_fn(net(*inputs), target).backward()
    if tap is not None:
        # what GradNoiseMonitor.on_before_optimizer_step does (less the one TensorBoard event)
        tap.detach()
        names, q, m, n = tap.collect()
        index = {name: i for i, (name, _, _) in enumerate(tap.layers)}
        sq = torch.stack([sum(p.grad.double().square().sum() for p in tap.layers[index[k]][2]) for k in names])
        trace, signal = noise_estimates(q.double(), m.double(), n, sq)
        torch.cat([trace, signal, trace / signal, norm_test(trace, sq, n)]).tolist()
    opt.step()


def bench(kind: str, cycles: int, batch: int) -> dict:
    torch.manual_seed(0)
    net, loss_fn, inputs, target = build(kind, batch)
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    tap = PerExampleTap(net)
    for _ in range(3):  # warm-up: allocator, oneDNN primitives, both paths
        step(net, loss_fn, inputs, target, opt)
        step(net, loss_fn, inputs, target, opt, tap)
    ratios, off_ms, on_ms = [], [], []
    for c in range(cycles):
        times = {}
        for mode in (("off", "on") if c % 2 == 0 else ("on", "off")):  # alternate the order too
            t0 = time.process_time()
            step(net, loss_fn, inputs, target, opt, tap if mode == "on" else None)
            times[mode] = time.process_time() - t0
        ratios.append(times["on"] / times["off"])
        off_ms.append(times["off"] * 1e3)
        on_ms.append(times["on"] * 1e3)
    extra = statistics.median(ratios) - 1
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    estimated = sorted(tap.layers[i][0] for i in tap.estimated)
    return {"model": kind, "off": statistics.median(off_ms), "on": statistics.median(on_ms), "extra": extra,
            "iqr": (q1 - 1, q3 - 1), "estimated": estimated}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=30, help="off/on step pairs per model")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--models", nargs="+", default=["cnn", "mlp", "rnn"])
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_model()}; torch {torch.__version__}, {args.threads} thread(s), batch {args.batch}, "
          f"{args.cycles} cycles; CPU time per step, median")
    rows = [bench(kind, args.cycles, args.batch) for kind in args.models]
    head = ["model", "off ms", "logging ms", "logging step +% (IQR)"] + [f"every {n}" for n in INTERVALS]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        lo, hi = r["iqr"]
        cells = [r["model"], f"{r['off']:.1f}", f"{r['on']:.1f}", f"{r['extra']:+.1%} ({lo:+.0%}..{hi:+.0%})"]
        cells += [f"{r['extra'] / n:+.1%}" for n in INTERVALS]
        print("| " + " | ".join(cells) + " |")
    for r in rows:
        if r["estimated"]:
            print(f"{r['model']}: two-batch estimate for {', '.join(r['estimated'])}")


if __name__ == "__main__":
    main()
