"""The gradient-flow picture (gradlab.observe.grad_flow_picture) as a TensorBoard image, at every validation epoch end and at
the end of fit.

    tensorboard --logdir logs/train/runs      # IMAGES tab: grad_flow, one picture per validation epoch
    python train.py callbacks.grad_flow=null  # no picture

It draws what the gradient callback has written so far, read back from the run's event file through
gradlab.observe.events (the reader scripts/plot_grad_flow.py uses on a finished run), so the image and the script's PNG
are the same picture. Rank 0 only; about half a second of matplotlib per picture.
"""

from typing import Optional

import lightning.pytorch as pl

from gradlab.observe.common import Instrument
from gradlab.observe.events import RunReader
from gradlab.observe.grad_flow_picture import png_size, render_png
from gradlab.observe.writer import flush, log_dir, log_image_png

TAG = "grad_flow"


class GradFlowImage(Instrument):
    """Logs the `grad_flow` image; `weights_only` leaves biases and norm parameters out of the picture."""

    name = "grad_flow"

    def __init__(self, weights_only: bool = False):
        self.weights_only = weights_only
        self.logged_steps: list[int] = []
        self._reader: Optional[RunReader] = None

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self._log(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The end of fit, while the logger is still open (on_fit_end comes after Lightning closed it).
        if trainer.global_step not in self.logged_steps:
            self._log(trainer)

    def _log(self, trainer: pl.Trainer) -> None:
        folder = log_dir(trainer)
        if not trainer.is_global_zero or folder is None:
            return
        flush(trainer)
        if self._reader is None or self._reader.path != folder:
            self._reader = RunReader(folder)
        scalars = self._reader.scalars()
        if not any(t.startswith("grad_norm/") and not t.startswith("grad_norm/total") for t in scalars):
            return  # nothing logged yet (or the gradient callback is off)
        title = f"step {trainer.global_step}"
        png = render_png(scalars, title, self.weights_only)
        log_image_png(trainer, TAG, png, *png_size(png), step=trainer.global_step)
        self.logged_steps.append(trainer.global_step)
