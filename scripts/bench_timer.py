"""A Lightning callback for benchmarks: when the first training step starts, and steady-state step rate."""

import json
import os
import time

import lightning.pytorch as pl


class StepTimer(pl.Callback):
    """Writes {first_step_s, samples_per_s, steps} to `out` when training ends.

    `first_step_s` counts from BENCH_T0 (set by the parent just before it started this process).
    The rate skips `warmup` steps, whose allocator and oneDNN kernel choice cost extra.
    """

    def __init__(self, out: str, warmup: int = 5):
        self.out, self.warmup = out, warmup
        self.first = self.t_start = None
        self.samples = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        now = time.perf_counter()
        if self.first is None:
            self.first = time.time() - float(os.environ.get("BENCH_T0", time.time()))
        if trainer.global_step == self.warmup:
            self.t_start, self.samples = now, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.t_start is not None:
            self.samples += batch[-1].shape[0]
            self.t_end = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        with open(self.out, "w") as f:
            json.dump({"first_step_s": self.first, "steps": trainer.global_step,
                       "samples_per_s": self.samples / (self.t_end - self.t_start)}, f)


class AccuracyClock(pl.Callback):
    """Appends one JSON line {s, samples, acc} to `out` after each validation (scripts/bench_time_to_accuracy.py).

    `s` is wall seconds since BENCH_T0 (imports, data loading and training included) minus the time spent in
    validation: the benchmark evaluates at fixed intervals, which is instrumentation, not part of either recipe.
    `cpu_s` is the same for the process's CPU time (all threads), which a busy shared machine disturbs less.
    """

    def __init__(self, out: str):
        self.out = out
        self.t0 = float(os.environ.get("BENCH_T0", time.time()))
        self.paused = self.cpu_paused = 0.0
        self.samples = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.samples += batch[-1].shape[0]

    def on_validation_start(self, trainer, pl_module):
        self.v_start, self.v_cpu = time.time(), time.process_time()

    def on_validation_end(self, trainer, pl_module):
        seconds = self.v_start - self.t0 - self.paused  # training time up to this validation
        cpu = self.v_cpu - self.cpu_paused
        self.paused += time.time() - self.v_start
        self.cpu_paused += time.process_time() - self.v_cpu
        if trainer.sanity_checking:
            return
        acc = float(trainer.callback_metrics["val/acc"])
        with open(self.out, "a") as f:
            f.write(json.dumps({"s": seconds, "cpu_s": cpu, "samples": self.samples, "acc": acc}) + "\n")
