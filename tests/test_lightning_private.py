"""The private or undocumented attributes listed in gradlab/observe/lightning_private.py still exist, with the
meaning the instruments rely on: an upgrade of Lightning or torch that moves one fails here, by name."""

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import RunningStage

from gradlab.observe.lightning_private import file_writer, keep_checkpoints, stop_now, throughput_totals
from gradlab.observe.throughput import ThroughputMonitor
from observed import LitClassifier, loader


def test_every_listed_attribute_is_where_it_was(tmp_path):
    monitor = ThroughputMonitor(window_size=2)
    trainer = pl.Trainer(max_steps=3, accelerator="cpu", logger=TensorBoardLogger(str(tmp_path)),
                         callbacks=[monitor], enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, log_every_n_steps=1)
    trainer.fit(LitClassifier(), loader())
    # fit_loop.min_epochs, fit_loop.epoch_loop.min_steps: plain attributes the loop reads
    assert hasattr(trainer.fit_loop, "min_epochs"), "Lightning moved fit_loop.min_epochs"
    assert hasattr(trainer.fit_loop.epoch_loop, "min_steps"), "Lightning moved fit_loop.epoch_loop.min_steps"
    stop_now(trainer)
    assert trainer.should_stop and trainer.fit_loop.min_epochs == 0 and trainer.fit_loop.epoch_loop.min_steps == 0
    # ThroughputMonitor._throughputs[stage]: a Throughput whose compute() counts the samples seen
    assert isinstance(monitor._throughputs, dict), "Lightning moved ThroughputMonitor._throughputs"
    totals = throughput_totals(monitor, RunningStage.TRAINING)
    assert totals is not None and totals["samples"] == 3 * 8 and totals["time"] > 0
    # SummaryWriter._get_file_writer(): takes a ready Summary proto
    writer = file_writer(trainer.logger.experiment)
    assert callable(getattr(writer, "add_summary", None)), "torch moved SummaryWriter._get_file_writer"
    assert keep_checkpoints(trainer) == []
