"""Training throughput in every run: Lightning's ThroughputMonitor, fitted to gradlab's batches, plus the run's mean.

    python train.py                                  # train/device/samples_per_sec in every logger
    python train.py experiment=imdb_gru              # also train/device/items_per_sec: real tokens/s
    python train.py callbacks.throughput=null        # off
    python scripts/bench_throughput_monitor.py       # what it costs

Curves (Lightning's names, rolling over `window_size` batches, so the first point comes after that many):
    train/device/samples_per_sec   samples/s of this device (train/samples_per_sec: all devices, under DDP)
    train/device/items_per_sec     tokens/s for text batches `(tokens (B, T), lengths (B,), target (B,))`: the
                                   tokens of the reviews, padding not counted
    train/samples, train/time      counters (validation time is left out of the training time)
    validate/*, test/*             the same for the evaluation loops
metrics.json and the results table get the means over the whole fit, for all devices:
    train/mean_samples_per_sec, train/mean_tokens_per_sec
"""

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ThroughputMonitor as LightningThroughputMonitor

from gradlab.observe.common import Instrument
from gradlab.observe.lightning_private import throughput_totals


def samples(batch: Any) -> int:
    return len(batch[-1])  # every gradlab batch ends with its targets, (B,)


def tokens(batch: Any) -> int:
    return int(batch[1].sum())  # (tokens (B, T), lengths (B,), target): the lengths count the real tokens


def is_text(batch: Any) -> bool:
    return isinstance(batch, (tuple, list)) and len(batch) == 3


class ThroughputMonitor(Instrument, LightningThroughputMonitor):
    """Samples/s for every model, tokens/s when the batches are text; `means()` for metrics.json.

    window_size: batches in the rolling average of the logged curves.
    """

    name = "throughput"

    def __init__(self, window_size: int = 50):
        super().__init__(batch_size_fn=samples, window_size=window_size)
        # gradlab's modules have no `flops_per_batch`: say so once here rather than warn in every run.
        self._module_has_flops = False

    # The first batch says whether there are tokens to count (Lightning calls length_fn when it is set).
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, *_: Any) -> None:
        self.length_fn = tokens if is_text(batch) else None

    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                                  *_: Any) -> None:
        self.length_fn = tokens if is_text(batch) else None

    def on_test_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, *_: Any) -> None:
        self.length_fn = tokens if is_text(batch) else None

    def means(self, trainer: pl.Trainer) -> dict[str, float]:
        """Samples (and tokens) per second over the whole fit, all devices (rank zero counts one device's)."""
        totals = throughput_totals(self)
        if not totals or totals["time"] <= 0:
            return {}
        seconds, world = totals["time"], trainer.world_size
        out = {"train/mean_samples_per_sec": totals["samples"] * world / seconds}
        if totals.get("lengths"):
            out["train/mean_tokens_per_sec"] = totals["lengths"] * world / seconds
        return out
