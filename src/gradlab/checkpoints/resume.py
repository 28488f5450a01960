"""Resumable runs: `last.ckpt` mid-epoch every few minutes or steps and on SIGTERM/SIGUSR1/Ctrl-C, plus RNG state.

    python train.py trainer.max_epochs=20                     # killed at hour five, or preempted, then:
    python train.py trainer.max_epochs=20 ckpt_path=last      # continues the newest run where it stopped

The guarantee (tested on CPU with a seed, same machine and thread count): a run killed at any point and
resumed from its last.ckpt ends with the same metrics as the run never interrupted. What makes it hold:
  - Lightning restores weights, optimizer, scheduler and loop counters, and the training loader's
    position in the epoch (gradlab.data.resumable: a seeded order per epoch, skipped to the saved batch);
  - this callback stores the global RNG states (torch, CUDA, NumPy, Python) in every checkpoint and puts
    them back just before the first resumed batch, so dropout draws the same masks;
  - ClassifierModule keeps its accuracy counts and best val/acc in the checkpoint.
Under DDP every rank's RNG state is gathered into the checkpoint (the streams differ as soon as anything
draws differently per rank) and each rank gets its own back; resumed with another number of ranks, the streams start afresh (the data order and the
weights still resume exactly).

Checkpoints are written at the end of a training batch (never in the middle of one) and never at the
last batch of an epoch: that one is written by ModelCheckpoint after validation.
"""

import os
import random
import signal
import sys
import time
from typing import Any, Optional, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from gradlab.errors import UserError


class ResumeCheckpoint(Callback):
    """Writes `<dirpath>/last.ckpt` every `every_n_train_steps` steps, every `every_n_minutes` minutes and when
    one of `signals` arrives; after a signal, the run exits with code 128 + the signal number."""

    def __init__(self, dirpath: str, every_n_train_steps: Optional[int] = None, every_n_minutes: Optional[float] = 10,
                 signals: Sequence[str] = ("SIGTERM", "SIGUSR1", "SIGINT"), filename: str = "last"):
        if every_n_train_steps is not None and every_n_train_steps < 1:
            raise UserError(f"callbacks.resume.every_n_train_steps must be >= 1 or null, not {every_n_train_steps}.")
        if every_n_minutes is not None and every_n_minutes <= 0:
            raise UserError(f"callbacks.resume.every_n_minutes must be > 0 or null, not {every_n_minutes}.")
        unknown = [s for s in signals if not hasattr(signal, s)]
        if unknown:
            raise UserError(f"callbacks.resume.signals: {', '.join(unknown)} is not a signal here; "
                            "use names such as SIGTERM, SIGUSR1, SIGINT.")
        self.path = os.path.join(dirpath, f"{filename}.ckpt")
        self.every_n_train_steps = every_n_train_steps
        self.every_s = every_n_minutes * 60 if every_n_minutes else None
        self.signals = [getattr(signal, s) for s in signals]
        self._received: Optional[int] = None
        self._previous: dict[int, Any] = {}
        self._last_save = time.monotonic()
        self._rng_to_restore: Optional[dict] = None
        self._after_save: Optional[Any] = None  # a signal handler put off until our checkpoint is written

    def stop_periodic(self) -> None:
        """No periodic last.ckpt from here on (signals still write one): the weights have diverged."""
        self.every_n_train_steps = self.every_s = None

    # ---- signals ----------------------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_save = time.monotonic()
        if trainer.fast_dev_run:
            return
        for signum in self.signals:
            try:
                self._previous[signum] = signal.signal(signum, self._on_signal)
            except ValueError:  # not the main thread: signals cannot be caught here
                break

    def _on_signal(self, signum: int, frame: Any) -> None:
        # Only note it: the checkpoint is written at the end of the current batch, where the state is whole.
        self._received = signum
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once
            print("Ctrl-C: saving last.ckpt at the end of this batch, then exiting (Ctrl-C again: stop now).",
                  file=sys.stderr, flush=True)
        previous = self._previous.get(signum)
        # Lightning's own SIGTERM handler would stop the run at its next check, and Python's SIGINT handler
        # at once, both before our save; other handlers still run. Lightning's SLURM handler (SIGUSR1) runs
        # right after our save: it writes hpc_ckpt_<n>.ckpt, which the requeued job resumes from, so that one
        # too must hold a whole batch's state (and under DDP every rank must save at the same point).
        if callable(previous) and signum == signal.SIGUSR1:
            self._after_save = lambda: previous(signum, None)
        elif callable(previous) and signum not in (signal.SIGTERM, signal.SIGINT):
            previous(signum, frame)

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_handlers()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_handlers()  # and no checkpoint: the state at an exception may be half-updated

    # ---- saving ------------------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        if trainer.fast_dev_run or trainer.sanity_checking:
            return
        step = trainer.global_step
        signalled = self._received is not None
        due = signalled or bool(self.every_n_train_steps and step % self.every_n_train_steps == 0)
        due |= self.every_s is not None and time.monotonic() - self._last_save >= self.every_s
        # One collective per step under DDP (free on one device): all ranks save together or none does.
        if not trainer.strategy.reduce_boolean_decision(due, all=False):
            return
        if batch_idx + 1 >= trainer.num_training_batches:
            return  # ModelCheckpoint writes last.ckpt after this epoch's validation; a signal waits for it
        trainer.save_checkpoint(self.path, weights_only=False)
        self._last_save = time.monotonic()
        if self._after_save is not None:
            self._after_save, after_save = None, self._after_save
            after_save()
        if trainer.strategy.reduce_boolean_decision(signalled, all=False):
            name = signal.Signals(self._received or signal.SIGTERM).name
            if trainer.is_global_zero:
                print(f"{name} received: saved {self.path} at step {step} (epoch {trainer.current_epoch}); exiting. "
                      "Continue with the same command plus ckpt_path=last (or ckpt_path=<that file>).",
                      file=sys.stderr, flush=True)
            self._restore_handlers()
            raise SystemExit(128 + (self._received or signal.SIGTERM))

    # ---- RNG state ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        # Every rank takes part in saving a checkpoint (only rank 0 writes it), so under DDP the ranks' states
        # are gathered here: a rank's stream (its dropout masks) may differ from rank 0's.
        state = _rng_state()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            per_rank = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(per_rank, state)
            return {"rng": state, "rng_per_rank": per_rank}
        return {"rng": state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._rng_to_restore = state_dict

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx) -> None:
        # Here, not at load time: everything between load and the first step (the sanity check, building
        # iterators) must not see the restored stream, just as nothing used it in the uninterrupted run.
        if self._rng_to_restore is not None:
            state = _rng_for_rank(self._rng_to_restore, trainer.world_size, trainer.global_rank)
            if state is not None:
                _set_rng_state(state)
            self._rng_to_restore = None


def _rng_for_rank(saved: dict[str, Any], world_size: int, rank: int) -> Optional[dict[str, Any]]:
    """This rank's saved RNG state; None when the checkpoint has none for it (saved with another world size)."""
    per_rank = saved.get("rng_per_rank")
    if per_rank is not None:
        return per_rank[rank] if len(per_rank) == world_size else None
    return saved.get("rng") if world_size == 1 else None


def _rng_state() -> dict[str, Any]:
    # Plain tensors, ints and lists, so that the checkpoint still loads with `weights_only=True`.
    np_state = np.random.get_state(legacy=False)
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"key": np_state["state"]["key"].tolist(), "pos": int(np_state["state"]["pos"]),
                  "has_gauss": int(np_state["has_gauss"]), "gauss": float(np_state["gauss"])},
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937",
                         "state": {"key": np.array(np_state["key"], dtype=np.uint32), "pos": np_state["pos"]},
                         "has_gauss": np_state["has_gauss"], "gauss": np_state["gauss"]})
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
