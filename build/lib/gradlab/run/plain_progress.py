"""Plain progress lines when stdout is not a terminal: a SLURM job's log file, `nohup`, CI.

    python train.py > run.out                                   # one line per epoch, and at least every 2 minutes
    python train.py callbacks.plain_progress.every_n_minutes=0.5
    python train.py callbacks.plain_progress.when=always        # also on a terminal, beside the rich bar

A line reads

    epoch 2/5  step 116/290  train/loss 0.2113  val/acc 0.9610  1,950 samples/s  ETA 0:00:09

train/loss is the mean over the steps since the previous line; val/acc the latest validation's (`-` before the
first); samples/s counts the training samples of this process's fit over its wall time (validation included);
ETA assumes the remaining optimizer steps go at the pace of those done so far in this process.

Without a terminal the rich progress bar draws nothing until the end and then prints its last frame, so when these
lines are on and stdout is not a terminal, the trainer's RichProgressBar is switched off: the lines take its place.
The lines go through Python logging, so under Hydra they land on the console and in the run's train.log.
"""

import datetime
import logging
import math
import time
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, RichProgressBar
from lightning.pytorch.utilities.data import extract_batch_size
from rich.console import Console

from gradlab.errors import UserError

log = logging.getLogger(__name__)
WHEN = ("auto", "always", "never")


def stdout_is_terminal() -> bool:
    """What rich decides for its own console (a TTY, FORCE_COLOR, Jupyter): where the rich bar would draw live."""
    console = Console()
    return console.is_terminal or console.is_jupyter


class PlainProgress(Callback):
    """One plain line at the end of each training epoch, and after any batch that ends `every_n_minutes` after the
    previous line.

    when: "auto" prints only when stdout is not a terminal; "always" and "never" say it outright.
    every_n_minutes: the longest wall-clock gap between two lines within an epoch; null: epoch ends only.
    """

    def __init__(self, when: str = "auto", every_n_minutes: Optional[float] = 2):
        if when not in WHEN:
            raise UserError(f"callbacks.plain_progress.when={when!r}: use one of {', '.join(WHEN)}.")
        if every_n_minutes is not None and every_n_minutes <= 0:
            raise UserError(f"callbacks.plain_progress.every_n_minutes must be > 0 or null, not {every_n_minutes}.")
        self.when = when
        self.every_s = every_n_minutes * 60 if every_n_minutes else None
        self.active = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        terminal = stdout_is_terminal()
        self.active = trainer.is_global_zero and (self.when == "always" or (self.when == "auto" and not terminal))
        if self.active and not terminal and isinstance(trainer.progress_bar_callback, RichProgressBar):
            trainer.progress_bar_callback.disable()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = self._last = time.monotonic()
        self._start_step = trainer.global_step  # a resumed run's pace counts only the steps it does itself
        self._total = trainer.estimated_stepping_batches  # optimizer steps of the whole fit; inf if unbounded
        self._samples, self._loss_sum, self._losses, self._loss = 0, torch.zeros(()), 0, None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self.active:
            return
        self._samples += extract_batch_size(batch)
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            # Summed on the loss's device: a .item() here would wait for the GPU at every step.
            self._loss_sum = self._loss_sum.to(loss.device) + loss.detach().float()
            self._losses += 1
        if self.every_s is not None and time.monotonic() - self._last >= self.every_s:
            self._line(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.active:
            self._line(trainer)  # validation at the epoch's end has run: val/acc is this epoch's

    def _line(self, trainer: pl.Trainer) -> None:
        now, total = time.monotonic(), self._total
        done = trainer.global_step - self._start_step
        eta = (total - trainer.global_step) * (now - self._start) / done if done and math.isfinite(total) else None
        if self._losses:  # else no step since the last line (an epoch's end just after a timed line): keep its loss
            self._loss = self._loss_sum.item() / self._losses
        val_acc = trainer.callback_metrics.get("val/acc")
        epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else "?"
        text = (f"epoch {trainer.current_epoch + 1}/{epochs}  "
                f"step {trainer.global_step}/{int(total) if math.isfinite(total) else '?'}  "
                f"train/loss {_number(self._loss)}  val/acc {_number(val_acc)}  "
                f"{self._samples / max(now - self._start, 1e-9):,.0f} samples/s  "
                f"ETA {datetime.timedelta(seconds=round(eta)) if eta is not None else '?'}")
        if logging.getLogger().handlers:  # Hydra's console and train.log
            log.info(text)
        else:
            print(text, flush=True)
        self._last, self._loss_sum, self._losses = now, torch.zeros(()), 0


def _number(value: Any) -> str:
    return "-" if value is None else f"{float(value):.4f}"
