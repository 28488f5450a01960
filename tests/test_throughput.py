"""ThroughputMonitor in every run: counts read back from TensorBoard equal the data's own counts."""

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from gradlab.data.imdb import IMDBDataModule
from gradlab.models.classifier import ClassifierModule
from gradlab.models.rnn import SentimentRNN
from gradlab.observe.events import read_scalars
from gradlab.observe.throughput import ThroughputMonitor
from helpers import write_aclimdb


def last(series):
    return series[-1][1]


def test_rnn_counts_real_tokens_and_reports_the_mean(tmp_path, one_thread):
    torch.manual_seed(0)
    dm = IMDBDataModule(root=str(write_aclimdb(tmp_path / "data", n_train=40, n_test=5)), download=False,
                        val_size=16, batch_size=8, max_vocab_size=64, max_len=12)
    dm.prepare_data()
    dm.setup("fit")
    # The reference: every training review's real tokens (after truncation to max_len), padding left out.
    tokens = sum(int(lengths.sum()) for _, lengths, _ in dm.train_dataloader())
    reviews = len(dm.train_set)
    module = ClassifierModule(SentimentRNN(vocab_size=64, embed_dim=8, hidden_size=8, dropout=0.0),
                              torch.nn.BCEWithLogitsLoss(), num_classes=1,
                              optimizer=lambda params: torch.optim.Adam(params, lr=1e-2))
    monitor = ThroughputMonitor(window_size=2)
    trainer = pl.Trainer(max_epochs=2, log_every_n_steps=1, accelerator="cpu", logger=TensorBoardLogger(
        tmp_path, name="", version=""), callbacks=[monitor], enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False)
    trainer.fit(module, datamodule=dm)

    tb = read_scalars(tmp_path)
    assert last(tb["train/samples"]) == 2 * reviews and last(tb["train/lengths"]) == 2 * tokens
    # The logged rate is the window's tokens over its seconds (window 2: the last two counter points).
    (_, l0), (_, l1) = tb["train/lengths"][-2:]
    (_, t0), (_, t1) = tb["train/time"][-2:]
    assert last(tb["train/device/items_per_sec"]) == pytest.approx((l1 - l0) / (t1 - t0), rel=1e-4)
    assert "validate/samples" in tb  # the evaluation loops are counted apart
    means = monitor.means(trainer)
    assert means["train/mean_tokens_per_sec"] == pytest.approx(2 * tokens / last(tb["train/time"]), rel=1e-5)
    assert means["train/mean_samples_per_sec"] == pytest.approx(2 * reviews / last(tb["train/time"]), rel=1e-5)


def test_cnn_run_counts_images_and_no_tokens(cnn_run):
    run_dir, metrics, _ = cnn_run
    tb = read_scalars(run_dir / "tensorboard")
    assert last(tb["train/samples"]) == 2 * 200  # 2 epochs of 240 - 40 (val) images
    assert not any(t.startswith("train/lengths") or "items_per_sec" in t for t in tb)
    assert metrics["train/mean_samples_per_sec"] > 0 and "train/mean_tokens_per_sec" not in metrics
