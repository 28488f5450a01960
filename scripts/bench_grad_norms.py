"""Cost of the gradient callback: MNIST CNN training step time with GradNormMonitor logging every step vs off,
in the same run, the default logging interval derived from it, and Lightning's own `grad_norm` for reference.

    python scripts/bench_grad_norms.py                  # 1-2 minutes on 2 shared CPU cores
    python scripts/bench_grad_norms.py --cycles 100 --threads 2

One training run of MnistCNN (the `model=cnn` config: channels-last, NLL loss, Adam, batch 64, TensorBoard
logger) on MNIST-shaped tensors. Consecutive steps rotate through the modes below, so every mode sees the
same machine; a step is timed from on_train_batch_start to on_train_batch_end (forward, backward, optimizer
step, every hook).
    off       no gradient callback
    logging   GradNormMonitor writes this step: per-layer norms, totals, update ratios (log_every_n_steps=1)
    guard     a non-logging step of the default on_nonfinite=stop: one fused norm and a finiteness check
    lightning `self.log_dict(grad_norm(self, 2))`, the recipe in Lightning's docs
    control   no gradient callback again: its "overhead" is the noise floor of the end-to-end comparison
Times are CPU time of the process (all its threads, the event writer's included), which other jobs on a
shared machine do not inflate as much as wall time (printed too). Two overheads: "direct" = time inside the
gradient hooks / median "off" step, precise; "end to end" = median over rotation cycles of (step of that mode
/ "off" step of the same cycle) - 1, which also catches indirect costs but carries the noise the control row
shows. The default interval (log every 50 steps, guard on the others) is 49/50 guard + 1/50 logging.
Target: <= 3 % when logging every step.
"""

import argparse
import logging
import statistics
import tempfile
import time
import warnings
from functools import partial

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import grad_norm
from torch import nn

from gradlab.callbacks.grad_norm import GradNormMonitor
from gradlab.data.tensor_loader import TensorBatches, identity_collate
from gradlab.models.classifier import ClassifierModule
from gradlab.models.cnn import MnistCNN

MODES = ("off", "logging", "guard", "lightning", "control")
DEFAULT_INTERVAL = 50  # conf/trainer/default.yaml log_every_n_steps, which the callback follows by default
NEVER = 10**12  # a logging interval no run reaches after its step 0 (a warm-up step here)


class Rotation(pl.Callback):
    """Runs step k in mode MODES[k % len(MODES)]; records its time and the time spent in gradient hooks."""

    def __init__(self, warmup: int):
        self.warmup = warmup
        self.monitor = GradNormMonitor(log_every_n_steps=1)
        # clock -> mode -> one value per measured cycle
        self.step = {c: {m: [] for m in MODES} for c in CLOCKS}
        self.hooks = {c: {m: [] for m in MODES} for c in CLOCKS}
        self._mode, self._t0, self._hook = "off", {}, {}

    def on_train_start(self, trainer, pl_module):
        self.monitor.on_train_start(trainer, pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._mode = MODES[trainer.global_step % len(MODES)]
        self.monitor._every = 1 if self._mode == "logging" else NEVER
        self._hook = dict.fromkeys(CLOCKS, 0.0)
        self._t0 = now()

    def _timed(self, fn, *args) -> None:
        t = now()
        fn(*args)
        t1 = now()
        for c in CLOCKS:
            self._hook[c] += t1[c] - t[c]

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self._mode in ("logging", "guard"):
            self._timed(self.monitor.on_before_optimizer_step, trainer, pl_module, optimizer)
        elif self._mode == "lightning":
            self._timed(lambda: pl_module.log_dict(grad_norm(pl_module, norm_type=2)))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._mode in ("logging", "guard"):
            self._timed(self.monitor.on_train_batch_end, trainer, pl_module, outputs, batch, batch_idx)
        end = now()
        if trainer.global_step > self.warmup * len(MODES):  # global_step has already counted this step
            for c in CLOCKS:
                self.step[c][self._mode].append(end[c] - self._t0[c])
                self.hooks[c][self._mode].append(self._hook[c])


CLOCKS = ("cpu", "wall")


def now() -> dict[str, float]:
    return {"cpu": time.process_time(), "wall": time.perf_counter()}


def summarize(step: dict[str, list[float]], hooks: dict[str, list[float]]) -> dict[str, tuple[float, ...]]:
    """mode -> (median step, median time in hooks, paired overhead vs the same cycle's "off" step)."""
    rows = {}
    for mode in MODES:
        paired = statistics.median(s / o - 1 for s, o in zip(step[mode], step["off"]))
        rows[mode] = (statistics.median(step[mode]), statistics.median(hooks[mode]), paired)
    k = DEFAULT_INTERVAL
    rows["default"] = tuple(((k - 1) * g + l) / k for g, l in zip(rows["guard"], rows["logging"]))
    return rows


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=60, help="measured rotations of the modes (default 60)")
    parser.add_argument("--warmup", type=int, default=3, help="rotations left out first (default 3)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on cores shared with other jobs, 2 threads wait on "
                             "each other and a step's time jumps by whole scheduler slices)")
    parser.add_argument("--batch-size", type=int, default=64, help="default 64, as conf/data/mnist.yaml")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")  # Lightning's notes on workers and intervals do not matter here
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    steps = (args.cycles + args.warmup) * len(MODES)
    n = steps * args.batch_size
    g = torch.Generator().manual_seed(0)
    data = TensorBatches(torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g))
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, collate_fn=identity_collate)
    torch.manual_seed(0)
    module = ClassifierModule(MnistCNN(), nn.NLLLoss(), num_classes=10, channels_last=True,
                              optimizer=partial(torch.optim.Adam, lr=1e-3))
    rotation = Rotation(args.warmup)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, log_every_n_steps=DEFAULT_INTERVAL,
                             logger=TensorBoardLogger(tmp, name="", version=""), callbacks=[rotation],
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(module, loader)

    cpu = summarize(rotation.step["cpu"], rotation.hooks["cpu"])
    wall = summarize(rotation.step["wall"], rotation.hooks["wall"])
    k = DEFAULT_INTERVAL
    labels = {"off": "callback off",
              "logging": "GradNormMonitor, logging every step",
              "guard": "GradNormMonitor, a non-logging step (on_nonfinite=stop guard)",
              "default": f"GradNormMonitor, default interval: {k - 1} guard steps + 1 logging step, per step",
              "lightning": "Lightning `log_dict(grad_norm(...))` every step (reference)",
              "control": "control: callback off again (noise floor)"}
    off = cpu["off"][0]
    print(f"\nMnistCNN training step, CPU, {args.threads} torch thread(s), batch {args.batch_size}, Adam; modes "
          f"rotating step by step in one run, {args.cycles} cycles after {args.warmup} warm-up; medians")
    print("| mode | step, CPU (ms) | in gradient hooks, CPU (ms) | **overhead, direct** | overhead, end to end "
          "(CPU) | step, wall (ms) |")
    print("|---|---:|---:|---:|---:|---:|")
    for mode in ("off", "logging", "guard", "default", "lightning", "control"):
        (step, hooks, paired), wstep = cpu[mode], wall[mode][0]
        if mode == "off":
            print(f"| {labels[mode]} | {step * 1e3:.1f} | – | – | – | {wstep * 1e3:.1f} |")
        else:
            print(f"| {labels[mode]} | {step * 1e3:.1f} | {hooks * 1e3:.2f} | **{hooks / off * 100:+.2f} %** | "
                  f"{paired * 100:+.1f} % | {wstep * 1e3:.1f} |")
    return {mode: cpu[mode][1] / off for mode in cpu}


if __name__ == "__main__":
    main()
