"""One LightningModule for every classification task: the network is a plain `nn.Module` passed in."""

import math
from typing import Any, Callable, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torchmetrics import MaxMetric
from torchmetrics.classification import BinaryAccuracy, MulticlassAccuracy

from gradlab.checkpoints.load import check_state_dict
from gradlab.config.rules import require
from gradlab.errors import UserError


class ClassifierModule(pl.LightningModule):
    """Trains `net` with `criterion`; logs `{train,val,test}/{loss,acc}`.

    Every batch is a tuple `(*inputs, target)`: the module calls `net(*inputs)`. With `num_classes == 1`
    the task is binary: `net` returns (B,) logits and the target is float 0/1.

    `tta_flip` evaluates (val, test) each image and its left-right mirror and averages the two class
    probabilities: right for clothing, wrong for digits (a mirrored 2 is no digit), so it is off by default.
    `gradient_clip_val` is the model's default clipping (total-norm), used when `trainer.gradient_clip_val`
    is null. `on_nonfinite_loss` decides what a NaN/inf training loss does: `stop` ends the run with a
    message naming the step, before that step changes any weight; `skip` drops the batch and goes on.
    Extra keyword arguments (the user-facing knobs of a model config such as `activation` or `cell`)
    are only recorded as hyperparameters.
    """

    def __init__(
        self,
        net: nn.Module,
        criterion: nn.Module,
        num_classes: int,
        optimizer: Optional[Callable[..., torch.optim.Optimizer]] = None,
        scheduler: Optional[Callable[..., Any]] = None,
        scheduler_interval: str = "epoch",
        channels_last: bool = False,
        gradient_clip_val: Optional[float] = None,
        on_nonfinite_loss: str = "stop",
        tta_flip: bool = False,
        **hparams: Any,
    ):
        super().__init__()
        require("model.on_nonfinite_loss", on_nonfinite_loss)
        if tta_flip and num_classes == 1:
            raise UserError("model.tta_flip=true averages class probabilities over mirrored images, which needs "
                            "num_classes >= 2 (images); this task is binary. Set model.tta_flip=false.")
        # Factories and modules stay out of the checkpoint's hyperparameters, which then load with
        # `weights_only=True`; the full run config travels in the checkpoint separately.
        self.save_hyperparameters(ignore=["net", "criterion", "optimizer", "scheduler"], logger=False)
        self.net = net
        self.criterion = criterion
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.binary = num_classes == 1
        if channels_last:
            # NHWC: tensor cores without transposes on GPU; on CPU oneDNN's NHWC conv and max pool are faster.
            self.net = self.net.to(memory_format=torch.channels_last)
        # validate_args=False: the check calls torch.unique on every batch's targets, a host sync per step on a
        # GPU; the data modules check label ranges when they load, and the loss rejects a label out of range.
        metric = (BinaryAccuracy(validate_args=False) if self.binary
                  else MulticlassAccuracy(num_classes, average="micro", validate_args=False))
        self.train_acc, self.val_acc, self.test_acc = metric.clone(), metric.clone(), metric.clone()
        self.val_acc_best = MaxMetric()
        for metric in (self.train_acc, self.val_acc, self.test_acc, self.val_acc_best):
            # Checkpoints carry the running counts, so a run resumed mid-epoch reports the same accuracy.
            metric.persistent(True)
        self.skipped_batches = 0
        self.run_config: Optional[dict] = None  # the resolved run config, stored in every checkpoint

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        if self.hparams.channels_last and inputs[0].dim() == 4:
            inputs = (inputs[0].contiguous(memory_format=torch.channels_last), *inputs[1:])
        return self.net(*inputs)

    def predict_proba(self, *inputs: torch.Tensor) -> torch.Tensor:
        """(B, C) class probabilities, or (B,) positive-class probabilities for a binary task."""
        out = self(*inputs)
        if self.binary:
            return torch.sigmoid(out)
        return torch.softmax(out, dim=-1)  # softmax of log-probs equals the probs themselves

    def _shared_step(self, batch, stage: str) -> torch.Tensor:
        *inputs, target = batch
        out = self(*inputs)
        if self.hparams.tta_flip and stage != "train":
            out = self._mirror_average(out, *inputs)
        loss = self.criterion(out, target)
        if stage == "train" and self._nonfinite(loss):
            return None  # Lightning then skips backward and the optimizer step
        # Probabilities for binary: torchmetrics guesses logits vs probs from the value range otherwise.
        preds = torch.sigmoid(out.detach()) if self.binary else out.detach()
        acc = getattr(self, f"{stage}_acc")
        acc(preds, target.long() if self.binary else target)
        # Training loss per step (the curve to watch); val/test loss averaged over the epoch.
        train = stage == "train"
        # Under DDP, epoch-level val/test losses are averaged over the ranks too (sync_dist), as the accuracies are.
        self.log(f"{stage}/loss", loss, on_step=train, on_epoch=not train, prog_bar=True, batch_size=target.shape[0],
                 sync_dist=not train)
        self.log(f"{stage}/acc", acc, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def _mirror_average(self, out: torch.Tensor, images: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        """log of the mean of p(class | image) and p(class | mirrored image): (B, C) log-probabilities, which
        every classification criterion here takes as logits (log_softmax leaves log-probabilities unchanged)."""
        both = torch.stack([out.log_softmax(-1), self(images.flip(-1), *rest).log_softmax(-1)])  # (2, B, C)
        return torch.logsumexp(both, dim=0) - math.log(2)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch, batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        self.val_acc_best(self.val_acc.compute())
        # Equal on all ranks already (val_acc syncs itself); sync_dist only spares Lightning's DDP warning.
        self.log("val/acc_best", self.val_acc_best.compute(), prog_bar=False, sync_dist=True)

    def on_train_start(self) -> None:
        # The sanity check ran validation on an untrained model: forget it (a resumed run keeps the real best).
        if self.trainer.ckpt_path is None:
            self.val_acc_best.reset()

    def _nonfinite(self, loss: torch.Tensor) -> bool:
        # One host sync per step; under DDP every rank takes the same decision, so none waits for the others.
        bad = self.trainer.strategy.reduce_boolean_decision(not bool(torch.isfinite(loss)), all=False)
        if not bad:
            return False
        step, epoch = self.trainer.global_step, self.trainer.current_epoch
        if self.hparams.on_nonfinite_loss == "stop":
            dirs = sorted({str(cb.dirpath) for cb in self.trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)})
            where = f" in {', '.join(dirs)}" if dirs else ""
            raise UserError(
                f"Training stopped: the training loss is {loss.item()} at step {step} (epoch {epoch}), before this "
                f"step changed any weight. The checkpoints already written{where} are kept; continue from the last "
                "good one with ckpt_path=last and a lower optimizer.lr or gradient clipping "
                "(trainer.gradient_clip_val=1.0), or skip such batches with model.on_nonfinite_loss=skip.")
        self.skipped_batches += 1
        if self.skipped_batches <= 3 or self.skipped_batches % 100 == 0:
            rank_zero_warn(f"Skipped a batch at step {step} (epoch {epoch}): the training loss is {loss.item()} "
                           f"(model.on_nonfinite_loss=skip; {self.skipped_batches} skipped so far).")
        return True

    def test_step(self, batch, batch_idx: int) -> None:
        self._shared_step(batch, "test")

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        # `trainer.gradient_clip_val` wins; otherwise the model's own default (the RNN clips by default).
        if gradient_clip_val is None:
            gradient_clip_val = self.hparams.gradient_clip_val
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.run_config is not None:
            checkpoint["gradlab_config"] = self.run_config

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Before Lightning loads the weights: a checkpoint of another model fails with a message, not a size dump.
        check_state_dict(self, checkpoint["state_dict"], self.trainer.ckpt_path if self._trainer else None,
                         checkpoint.get("gradlab_config"), self.run_config)

    def configure_optimizers(self):
        if self.optimizer_factory is None:
            raise ValueError("ClassifierModule needs an optimizer factory (the `optimizer` config group).")
        optimizer = self.optimizer_factory(params=self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        kwargs = {}
        if getattr(self.scheduler_factory, "func", None) is torch.optim.lr_scheduler.OneCycleLR and \
                "total_steps" not in self.scheduler_factory.keywords:
            # OneCycle must know the run's length, which only the trainer knows.
            kwargs["total_steps"] = int(self.trainer.estimated_stepping_batches)
        scheduler = self.scheduler_factory(optimizer=optimizer, **kwargs)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": self.hparams.scheduler_interval,
                             "monitor": "val/loss"},
        }
