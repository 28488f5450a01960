"""Cost of callbacks.grad_noise: training steps of the CNN, the MLP and the RNN with the instrument on vs off, side by side.

    python scripts/bench_grad_noise.py                   # ~3 minutes on 2 shared CPU cores
    python scripts/bench_grad_noise.py --cycles 40 --threads 2 --models cnn

Per model, consecutive training steps (forward, loss, backward, Adam step) alternate between "off" (no hook
attached: what every non-logging step runs) and "on" (PerExampleTap attached for the step, then the callback's
reduction: per-layer ‖g‖², tr(Σ), ‖G‖², the norm test, one copy to the host). The logging step's extra cost is
the median over cycles of on/off - 1 (CPU time of the process, which load from other jobs inflates less than wall
time); at interval N it is paid once every N steps, so the overhead is that / N. Target: <= 3 % at the default
interval (64), <= 25 % logging every step. Under 16 steps, conv_sample=auto and estimate_every=auto trade
per-reading precision for cost (a quarter of the rows for conv norms, the two-batch estimate every 4th reading):
the "dense" rows time exactly that, the "full" rows what sparser intervals run.
    cnn   MnistCNN (model=cnn: channels-last), batch 64, 1x28x28: exact per-example norms for all four layers
    mlp   ManualMLP 784-256-128-10 relu, hand-written backward, one Function per layer, batch 64: exact
    rnn   SentimentRNN (model=rnn: bidirectional GRU 64, embedding 128, vocabulary 20,000), batch 64 x 128
          tokens: exact for the head, two-batch estimate (one extra backward of half the rows) for GRU + embedding
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from gradlab.models.cnn import MnistCNN
from gradlab.models.mlp import ManualMLP, classification_loss
from gradlab.models.rnn import SentimentRNN
from gradlab.observe.grad_noise import PerExampleTap, noise_estimates, norm_test, sq_norm
from gradlab.run.precision import cpu_model

INTERVALS = (1, 16, 64)



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


def step(net, loss_fn, inputs, target, opt, tap=None, micro: int = 1, estimate: bool = True) -> None:
    """One optimizer step; `micro` > 1: over that many micro-batches, each loss / micro (Lightning's accumulation)."""
    opt.zero_grad(set_to_none=True)
    if tap is not None:
        tap.attach(scale=micro, grouped=micro >= 2, estimate=estimate)
    for chunk in range(micro):
        rows = slice(chunk * len(target) // micro, (chunk + 1) * len(target) // micro)
        (loss_fn(net(*(x[rows] for x in inputs)), target[rows]) / micro).backward()
    if tap is not None:
        # what GradNoiseMonitor.on_before_optimizer_step does (less the one TensorBoard event)
        tap.detach()
        names, q, m, n = tap.collect()
        index = {name: i for i, (name, _, _) in enumerate(tap.layers)}
        sq = torch.stack([sum(sq_norm(p.grad) for p in tap.layers[index[k]][2]) for k in names])
        trace, signal = noise_estimates(q.double(), m.double(), n, sq)
        torch.cat([trace, signal, trace / signal, norm_test(trace, sq, n)]).tolist()
    opt.step()


def bench(kind: str, cycles: int, batch: int) -> list[dict]:
    """One row per setting of the instrument, each step timed against the same step with no hook attached:
        full   all rows, the two-batch estimate at every reading: what log_every_n_steps >= 16 runs
        dense  what auto runs under 16: conv norms from a quarter of the rows, the estimate every 4th reading
               (its logging step is the mean of one step with the estimate and three without)
        2 micro-batches (the RNN): the full setting on the same update split in two, where the groups come free
    Steps of every mode alternate, in forward and reverse order, `cycles` times."""
    torch.manual_seed(0)
    net, loss_fn, inputs, target = build(kind, batch)
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    full, dense = PerExampleTap(net), PerExampleTap(net, conv_sample=0.25)
    modes = {"off": {}, "full": {"tap": full},
             "dense, with the estimate": {"tap": dense}, "dense, without": {"tap": dense, "estimate": False}}
    if kind == "rnn":
        modes["off, 2 micro-batches"] = {"micro": 2}
        modes["2 micro-batches"] = {"tap": full, "micro": 2}
    for _ in range(3):  # warm-up: allocator, oneDNN primitives, every path
        for mode in modes.values():
            step(net, loss_fn, inputs, target, opt, **mode)
    ms = {name: [] for name in modes}
    order = list(modes)
    for c in range(cycles):
        for name in (order if c % 2 == 0 else order[::-1]):
            t0 = time.process_time()
            step(net, loss_fn, inputs, target, opt, **modes[name])
            ms[name].append((time.process_time() - t0) * 1e3)
    med = {name: statistics.median(v) for name, v in ms.items()}

    def ratios(name, base="off"):
        return [on / off - 1 for on, off in zip(ms[name], ms[base])]

    estimated = sorted(full.layers[i][0] for i in full.estimated)
    rows = [{"setting": "full", "extra": ratios("full"), "on": med["full"], "off": med["off"], "at": (16, 64)}]
    dense_extra = ratios("dense, with the estimate")
    on = med["dense, with the estimate"]
    if estimated:  # one reading in 4 takes the estimate
        dense_extra = [(w + 3 * wo) / 4 for w, wo in zip(dense_extra, ratios("dense, without"))]
        on = (on + 3 * med["dense, without"]) / 4
    if not estimated and not any(isinstance(m, torch.nn.Conv2d) for m in net.modules()):
        rows[0]["at"] = INTERVALS  # nothing to sample or spread: dense is full (the MLP)
    else:
        rows.append({"setting": "dense (auto)", "extra": dense_extra, "on": on, "off": med["off"], "at": (1,)})
    if kind == "rnn":
        rows.append({"setting": "2 micro-batches", "extra": ratios("2 micro-batches", "off, 2 micro-batches"),
                     "on": med["2 micro-batches"], "off": med["off, 2 micro-batches"], "at": (1, 16, 64),
                     "accumulation": med["off, 2 micro-batches"] / med["off"] - 1})
    for r in rows:
        q1, _, q3 = statistics.quantiles(r["extra"], n=4)
        r.update(model=kind, extra=statistics.median(r["extra"]), iqr=(q1, q3), estimated=estimated)
    return rows


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
    rows = [row for kind in args.models for row in bench(kind, args.cycles, args.batch)]
    head = ["model", "setting", "off ms", "logging ms", "logging step +% (IQR)"] + [f"every {n}" for n in INTERVALS]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        lo, hi = r["iqr"]
        cells = [r["model"], r["setting"], f"{r['off']:.1f}", f"{r['on']:.1f}",
                 f"{r['extra']:+.1%} ({lo:+.0%}..{hi:+.0%})"]
        cells += [f"{r['extra'] / n:+.1%}" if n in r["at"] else "" for n in INTERVALS]
        print("| " + " | ".join(cells) + " |")
    print("Settings: full = all rows, the estimate at every reading (auto from 16 steps on); dense = conv norms from a "
          "quarter of the rows and the estimate every 4th reading (auto under 16). An empty cell: auto does not "
          "use that setting at that interval.")
    for r in rows:
        if r["estimated"] and r["setting"] == "full":
            print(f"{r['model']}: two-batch estimate for {', '.join(r['estimated'])}")
        if "accumulation" in r:
            print(f"{r['model']}, 2 micro-batches of {args.batch // 2}: against the same micro-batches untapped; "
                  f"those cost {r['accumulation']:+.1%} against one batch of {args.batch}, instrument or not")


if __name__ == "__main__":
    main()
