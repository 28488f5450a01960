"""Test-only callbacks that inject the faults the reliability tests need, at a chosen optimizer step."""

import math
import os
import signal

from lightning.pytorch.callbacks import Callback


class SignalAtStep(Callback):
    """Sends this process `signal_name` after optimizer step `step`, as a cluster scheduler would."""

    def __init__(self, step: int, signal_name: str = "SIGKILL"):
        self.step, self.signum = step, getattr(signal, signal_name)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


class NaNInputAtSteps(Callback):
    """Fills the inputs of the batches trained at the given steps with NaN, so their loss is NaN."""

    def __init__(self, steps: list[int]):
        self.steps = set(steps)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step in self.steps:
            batch[0].fill_(math.nan)
