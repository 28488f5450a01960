"""What the gradient and activation instruments cost: an overhead table in the style of Cockpit's, per instrument
and logging interval (1, 4, 16, 64 optimizer steps), measured side by side with "off" in one training run.

    python scripts/bench_grad_norms.py                  # a few minutes on 2 shared CPU cores
    python scripts/bench_grad_norms.py --cycles 80 --threads 2

One training run of MnistCNN (the `model=cnn` config: channels-last, NLL loss, Adam, batch 64, TensorBoard logger)
on MNIST-shaped tensors. Consecutive steps rotate through the step modes below, so every mode sees the same machine;
a step is timed from on_train_batch_start to on_train_batch_end (forward, backward, optimizer step, every hook), in
CPU time of the process (all its threads, the event writer's included), which other jobs on a shared machine do
not inflate as much as wall time.
    off          no instrument
    grad log     GradNormMonitor writes this step: per-layer norms, totals, update ratios, log10 copies
    grad quiet   a non-logging step of GradNormMonitor (the default on_nonfinite=stop guard: one fused norm)
    act log      ActivationMonitor watches this forward pass and writes act/* of every activation layer
    act quiet    a non-logging step of ActivationMonitor (nothing installed)
    all log      both write this step;  all quiet: a non-logging step of both
    lightning    `self.log_dict(grad_norm(self, 2))`, the recipe in Lightning's docs, every step (reference)
    control      no instrument again: its "overhead" is the noise floor of the comparison
Overhead of a mode = median over rotation cycles of (its step / the same cycle's "off" step) - 1. At logging
interval k an instrument costs ((k - 1) x quiet + 1 x log) / k per step. The default set (`conf/callbacks/
default.yaml`) is grad_norm + activations at the trainer's interval (50), plus what runs once per validation
epoch (the grad-flow image), once per run (the layout) and at the end of fit (the health report): those are timed
on their own and shown per occurrence and as a share of a full-MNIST epoch (55,000 images / 64 = 860 steps).
Targets: default set <= 3 % of step time on CPU; everything on at every step <= 15 %.
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

from gradlab.data.tensor_loader import TensorBatches, identity_collate
from gradlab.models.classifier import ClassifierModule
from gradlab.models.cnn import MnistCNN
from gradlab.observe.activations import ActivationMonitor
from gradlab.observe.events import read_scalars
from gradlab.observe.grad_flow_picture import render_png
from gradlab.observe.grad_norm import GradNormMonitor
from gradlab.observe.health_rules import diagnose
from gradlab.observe.layout import build_layout
from gradlab.observe.writer import log_layout
from gradlab.run.precision import cpu_model

MODES = ("off", "grad log", "grad quiet", "act log", "act quiet", "all log", "all quiet", "lightning", "control")
INTERVALS = (1, 4, 16, 64)
DEFAULT_INTERVAL = 50  # conf/trainer/default.yaml log_every_n_steps, which both callbacks follow by default
EPOCH_STEPS = 860  # full MNIST: 60,000 - 5,000 held out for validation, batch 64
NEVER = 10**12  # a logging interval no step reaches


class Rotation(pl.Callback):
    """Runs step k in mode MODES[k % len(MODES)] and records its CPU time."""

    def __init__(self, warmup: int):
        self.warmup = warmup
        self.grads = GradNormMonitor(log_every_n_steps=1)
        self.acts = ActivationMonitor(log_every_n_steps=1)
        self.step = {m: [] for m in MODES}
        self._mode, self._t0 = "off", 0.0

    def on_train_start(self, trainer, pl_module):
        self.grads.on_train_start(trainer, pl_module)
        self.acts.on_train_start(trainer, pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._mode = mode = MODES[trainer.global_step % len(MODES)]
        self.grads._every = 1 if mode in ("grad log", "all log") else NEVER
        self.acts._every = 1 if mode in ("act log", "all log") else NEVER
        self._t0 = time.process_time()
        if self._acts_on():
            self.acts.on_train_batch_start(trainer, pl_module, batch, batch_idx)

    def _grads_on(self) -> bool:
        return self._mode.startswith(("grad", "all"))

    def _acts_on(self) -> bool:
        return self._mode.startswith(("act", "all"))

    def on_before_backward(self, trainer, pl_module, loss):
        if self._acts_on():
            self.acts.on_before_backward(trainer, pl_module, loss)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self._grads_on():
            self.grads.on_before_optimizer_step(trainer, pl_module, optimizer)
        if self._acts_on():
            self.acts.on_before_optimizer_step(trainer, pl_module, optimizer)
        if self._mode == "lightning":
            pl_module.log_dict(grad_norm(pl_module, norm_type=2))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._grads_on():
            self.grads.on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._acts_on():
            self.acts.on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        end = time.process_time()
        if trainer.global_step > self.warmup * len(MODES):  # global_step has already counted this step
            self.step[self._mode].append(end - self._t0)


def paired(step: dict[str, list[float]], mode: str) -> float:
    return statistics.median(s / o - 1 for s, o in zip(step[mode], step["off"]))


def timed(fn, repeat: int = 3) -> float:
    """Median CPU seconds of fn()."""
    times = []
    for _ in range(repeat):
        t = time.process_time()
        fn()
        times.append(time.process_time() - t)
    return statistics.median(times)



def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=40, help="measured rotations of the modes (default 40)")
    parser.add_argument("--warmup", type=int, default=2, help="rotations left out first (default 2)")
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
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
        trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, log_every_n_steps=DEFAULT_INTERVAL,
                             logger=TensorBoardLogger(tmp, name="", version=""), callbacks=[rotation],
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(module, loader)
        trainer.loggers[0].experiment.flush()
        # What runs once per validation epoch, per run and per fit, on the scalars this run wrote.
        scalars = read_scalars(tmp)
        image_s = timed(lambda: render_png(scalars, "bench"))
        report_s = timed(lambda: diagnose(read_scalars(tmp)))
        params = [name for name, _ in MnistCNN().named_parameters()]
        layout_s = timed(lambda: log_layout(trainer, build_layout(params, rotation.acts.layers)))
        logged_steps = len(scalars["grad_norm/total"])
        trainer.loggers[0].experiment.close()  # the layout re-opened the event writer that fit had closed

    off = statistics.median(rotation.step["off"])
    over = {m: paired(rotation.step, m) for m in MODES if m != "off"}

    def at(instrument: str, k: int) -> float:
        return ((k - 1) * over[f"{instrument} quiet"] + over[f"{instrument} log"]) / k

    epoch_s = EPOCH_STEPS * off
    once = {"grad-flow image (every validation epoch)": image_s / epoch_s,
            "health report (end of fit)": report_s / epoch_s, "layout (once per run)": layout_s / epoch_s}
    default = at("all", DEFAULT_INTERVAL) + once["grad-flow image (every validation epoch)"]

    print(f"\nCPU: {cpu_model()}; MnistCNN training step, {args.threads} torch thread(s), batch {args.batch_size}, "
          f"Adam; {len(MODES)} modes rotating step by step in one run, {args.cycles} cycles after {args.warmup} "
          f"warm-up; CPU time, medians; \"off\" step {off * 1e3:.1f} ms")
    print("\n| instrument | " + " | ".join(f"every {k} steps" for k in INTERVALS) + " |")
    print("|---|" + "---:|" * len(INTERVALS))
    names = {"grad": "grad_norm (norms, update ratios, log10; guard on quiet steps)",
             "act": "activations (saturation, dead, mean, std)", "all": "both (everything on)"}
    for inst, label in names.items():
        print(f"| {label} | " + " | ".join(f"{at(inst, k) * 100:+.1f} %" for k in INTERVALS) + " |")
    print(f"| Lightning `log_dict(grad_norm(...))` (reference) | {over['lightning'] * 100:+.1f} % | | | |")
    print(f"| control: off again (noise floor) | {over['control'] * 100:+.1f} % | | | |")
    print("\n| once per ... | CPU time | share of a full-MNIST epoch (860 steps) |\n|---|---:|---:|")
    for label, share in once.items():
        seconds = share * epoch_s
        print(f"| {label} | {seconds * 1e3:.0f} ms | {share * 100:.2f} % |")
    print(f"\n(the image and the report drew {logged_steps} logged steps.) Default set at the default interval "
          f"({DEFAULT_INTERVAL}) plus one image per epoch: **{default * 100:+.2f} %** (target <= 3 %); everything "
          f"on at every step: **{at('all', 1) * 100:+.1f} %** (target <= 15 %).")
    return {"default": default, "everything": at("all", 1), **{m: v for m, v in over.items()}}


if __name__ == "__main__":
    main()
