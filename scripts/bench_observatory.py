"""The default instrument set (gradlab.observe.Observatory) against no instruments, on torchvision's resnet18 and a
decoder-only transformer LM at two sizes (a toy with 12-token contexts, and a character-level model's shape:
65 tokens, 64-token contexts, 4 layers of width 128), side by side in one process. Target: <= 3 % per step at the default interval.

    python scripts/bench_observatory.py                      # 300 steps per fit, 3 rounds
    python scripts/bench_observatory.py --steps 150 --rounds 2

Each round fits every (model, setting) pair once, in alternating order. Two figures per fit:
- per step: the wall time from the start of step `--warm` to the end of the last step, divided by the steps
  between. This is the cost that grows with a run: it holds every logging step (the trainer logs every 50 steps,
  Lightning's default; grad_noise reads every 64) and every step between them.
- fixed: the rest of the fit (set-up, the first steps, and the end-of-fit health report and gradient-flow picture
  with their imports), paid once per run, whatever its length.
- in the hooks: the time spent inside the instruments' own per-step hooks (each callback method timed), per
  step. It is what the instruments compute, read off directly, free of the machine's run-to-run noise (wall time
  of the same fit moves by 10 % on a shared machine); it leaves out what they attach to the model for a logging
  step's forward and backward (activation statistics, per-example gradient norms), which the wall time holds.
The table shows medians over rounds and the per-step ratio.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from gradlab.observe import Observatory  # noqa: E402
from gradlab.run.precision import cpu_model  # noqa: E402
from zoo import Classifier, LanguageModel, TinyGPT, class_data, loader, token_data  # noqa: E402


def models():
    import torchvision

    return {"resnet18 (B=16, 32x32)": (lambda: Classifier(torchvision.models.resnet18(num_classes=3)),
                                       class_data((3, 32, 32), n=64), 16),
            "GPT LM (2 layers, d=64, T=12)": (lambda: LanguageModel(TinyGPT(d=64, heads=4)), token_data(n=64), 16),
            "GPT LM (4 layers, d=128, T=64)": (lambda: LanguageModel(TinyGPT(vocab=65, d=128, heads=4, layers=4,
                                                                             context=64)),
                                               token_data(n=64, vocab=65, context=64), 16)}


# The per-step hooks of a Lightning callback; on_train_end (the report, the picture) is the fixed cost.
STEP_HOOKS = ("on_train_batch_start", "on_before_backward", "on_after_backward", "on_before_optimizer_step",
              "on_before_zero_grad", "on_train_batch_end")


class StepClock(pl.Callback):
    """Wall time from the start of optimizer step `warm` to the end of the last training batch, and the time spent
    inside the instruments' own per-step hooks over the same steps (`time_hooks`)."""

    def __init__(self, warm: int):
        self.warm, self.start, self.end, self.steps, self.in_hooks = warm, None, None, 0, 0.0

    def time_hooks(self, callbacks) -> None:
        for cb in callbacks:
            for name in STEP_HOOKS:
                setattr(cb, name, self._timed(getattr(cb, name)))

    def _timed(self, hook):
        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return hook(*args, **kwargs)
            finally:
                if self.start is not None:
                    self.in_hooks += time.perf_counter() - t
        return timed

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.warm and self.start is None:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.end, self.steps = time.perf_counter(), trainer.global_step - self.warm


def fit(make, dataset, batch, steps: int, warm: int, observed: bool) -> tuple[float, float, float]:
    """(seconds per step after `warm`, fixed seconds: the fit's total less steps x the per-step time, seconds per
    step inside the instruments' per-step hooks)."""
    torch.manual_seed(0)
    clock = StepClock(warm)
    with tempfile.TemporaryDirectory() as tmp:
        instruments = Observatory(out_dir=tmp) if observed else []
        clock.time_hooks(instruments)
        callbacks = [clock, *instruments]
        trainer = pl.Trainer(max_steps=steps, accelerator="cpu", log_every_n_steps=50, enable_progress_bar=False,
                             enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp,
                             logger=TensorBoardLogger(tmp), callbacks=callbacks)
        data = loader(dataset, batch)
        start = time.perf_counter()
        trainer.fit(make(), data)
        total = time.perf_counter() - start
    per_step = (clock.end - clock.start) / clock.steps
    return per_step, total - per_step * steps, clock.in_hooks / clock.steps


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warm", type=int, default=5, help="steps left out of the per-step time (warm-up)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    if args.steps <= args.warm + 64:
        parser.error(f"--steps must exceed --warm + 64 (one grad_noise reading after the warm-up), got {args.steps}")
    torch.set_num_threads(1)
    times = {}
    for r in range(args.rounds):
        for name, (make, dataset, batch) in models().items():
            for observed in ((False, True) if r % 2 == 0 else (True, False)):
                times.setdefault((name, observed), []).append(fit(make, dataset, batch, args.steps, args.warm,
                                                                  observed))
    print(f"{cpu_model()}, 1 thread, {args.steps} steps a fit (per step: steps {args.warm}-{args.steps}), "
          f"median of {args.rounds} rounds")
    print("| model | per step, off (ms) | per step, Observatory() (ms) | ratio | in the hooks (ms/step) | hooks / step "
          "| fixed, off (s) | fixed, on (s) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in models():
        off, on = ([statistics.median(x) for x in zip(*times[(name, observed)])] for observed in (False, True))
        print(f"| {name} | {off[0] * 1e3:.1f} | {on[0] * 1e3:.1f} | {on[0] / off[0]:.3f} | {on[2] * 1e3:.2f} | "
              f"{on[2] / off[0]:.1%} | {off[1]:.2f} | {on[1]:.2f} |")


if __name__ == "__main__":
    main()
