"""Switches dropout off for a whole run: debug=overfit uses it, so that memorizing a few batches can reach ~0 loss.

With dropout on, the training loss of memorized batches keeps a noise floor (a different mask each step),
which hides the one thing the overfit check asks: can this model and loss fit these batches at all?
"""

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch import nn


class NoDropout(Callback):
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for module in pl_module.modules():
            if isinstance(module, nn.modules.dropout._DropoutNd):
                module.p = 0.0
            elif isinstance(module, nn.RNNBase):
                module.dropout = 0.0  # between stacked recurrent layers
