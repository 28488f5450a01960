"""Every private or undocumented attribute of Lightning (and torch's SummaryWriter) that gradlab reads or writes,
in one place, each with why no public route exists. tests/test_lightning_private.py fails loudly when an upgrade
moves one of them.

| attribute | used for | why no public route |
| --- | --- | --- |
| `trainer.fit_loop.min_epochs`, `trainer.fit_loop.epoch_loop.min_steps` | grad_norm's non-finite stop ends the run now | `trainer.should_stop` waits for `min_epochs`/`min_steps`; the trainer has no public setter for them |
| `ThroughputMonitor._throughputs[stage]` | the run's mean samples/s and tokens/s for metrics.json | the callback keeps its `Throughput` objects private; their `compute()` is public |
| `SummaryWriter._get_file_writer()` | one Summary proto holding every scalar of a step (observe/writer.py) | `add_scalar` costs a queue hand-off per tag; the writer has no public "add this Summary" |

`ModelCheckpoint.save_top_k` and `.save_last` are its public constructor arguments, kept as public attributes.
"""

from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import RunningStage

TRAINING = RunningStage.TRAINING


def stop_now(trainer: pl.Trainer) -> None:
    """End fit at the end of this batch, whatever `min_epochs`/`min_steps` ask for."""
    trainer.should_stop = True
    trainer.fit_loop.min_epochs = 0
    trainer.fit_loop.epoch_loop.min_steps = 0


def keep_checkpoints(trainer: pl.Trainer) -> list[str]:
    """No checkpoint callback writes from here on; returns the checkpoint files kept on disk."""
    kept: list[str] = []
    for cb in trainer.callbacks:
        if isinstance(cb, ModelCheckpoint):
            cb.save_top_k, cb.save_last = 0, False
            kept += [path for path in (cb.last_model_path, cb.best_model_path) if path and path not in kept]
        elif callable(getattr(cb, "stop_periodic", None)):
            cb.stop_periodic()  # gradlab's ResumeCheckpoint: its periodic last.ckpt would be the diverged state
    return kept


def throughput_totals(monitor: Any, stage: RunningStage = TRAINING) -> Optional[dict[str, float]]:
    """{time, samples[, lengths]} since the stage started (Lightning's Throughput.compute()), or None before."""
    throughput = monitor._throughputs.get(stage)
    if throughput is None:
        return None
    try:
        return throughput.compute()
    except IndexError:  # no update yet
        return None


def file_writer(experiment: Any) -> Any:
    """The SummaryWriter's FileWriter, which takes a ready Summary proto."""
    return experiment._get_file_writer()
