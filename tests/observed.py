"""Fitting a user's LightningModule with gradlab's instruments: the shared helpers of test_guard and test_zoo."""

import json
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from gradlab.observe import Observatory
from gradlab.observe.events import read_scalars

EVERY = dict(grad_norm={"log_every_n_steps": 1}, grad_noise={"log_every_n_steps": 1},
             activations={"log_every_n_steps": 1})


class LitClassifier(pl.LightningModule):
    """Written as in the Lightning docs: the network is a submodule, and training_step calls it directly."""

    def __init__(self, lr: float = 1e-2):
        super().__init__()
        self.lr = lr
        self.encoder = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 3))

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.encoder(x)
        loss = F.cross_entropy(logits, y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self.encoder(x), y))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def loader(n: int = 32, batch_size: int = 8, shape=(8,), classes: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, *shape, generator=g), torch.randint(0, classes, (n,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)


def fit(module: pl.LightningModule, data, tmp_path: Path, callbacks=None, val_dataloaders=None,
        **trainer_kwargs) -> pl.Trainer:
    kwargs = dict(max_steps=4, log_every_n_steps=1, accelerator="cpu", enable_progress_bar=False,
                  enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0)
    kwargs.update(trainer_kwargs)
    trainer = pl.Trainer(logger=TensorBoardLogger(str(tmp_path / "tb"), name="", version=""),
                         default_root_dir=str(tmp_path),
                         callbacks=Observatory(**EVERY, out_dir=str(tmp_path)) if callbacks is None else callbacks,
                         **kwargs)
    trainer.fit(module, data, val_dataloaders)
    return trainer


def scalars(tmp_path: Path) -> dict:
    return read_scalars(tmp_path / "tb")


def health(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "health.json").read_text())
