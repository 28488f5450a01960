"""The learning-rate finder behind `python train.py +tune=lr_find` (conf/tune/lr_find.yaml), on Lightning's Tuner.

    python train.py +tune=lr_find                  # <run>/lr_find.png and lr_find.json, suggested lr in metrics.json
    python train.py +tune=lr_find tune.apply=true  # then trains with the suggested lr

The range test runs on a trainer of its own, without the run's callbacks and loggers, so none of them sees its
diverging steps; the module's weights and optimizer state are restored afterwards (Lightning does it).
"""

import os
from typing import Any, Optional

import lightning.pytorch as pl
from hydra.utils import instantiate
from omegaconf import DictConfig

from gradlab.checkpoints.files import write_json
from gradlab.errors import UserError

PLOT, CURVE, TAG = "lr_find.png", "lr_find.json", "lr_find/loss_vs_lr"


def lr_find(cfg: DictConfig, module: pl.LightningModule, datamodule: pl.LightningDataModule,
            out_dir: str) -> dict[str, Any]:
    """Run the range test; write the curve (JSON) and the plot (PNG). Returns {"suggested_lr", "figure"}."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no window
    from lightning.pytorch.tuner import Tuner

    tune = cfg.tune
    # Epochs do not limit the range test, its steps do (a small data set may hold fewer batches than that).
    trainer = instantiate(cfg.trainer, callbacks=[], logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False, max_epochs=None,
                          max_steps=tune.num_training)
    finder = Tuner(trainer).lr_find(module, datamodule=datamodule, min_lr=tune.min_lr, max_lr=tune.max_lr,
                                    num_training=tune.num_training, early_stop_threshold=tune.early_stop_threshold,
                                    update_attr=False)
    suggested: Optional[float] = finder.suggestion() if finder is not None else None
    if suggested is None:
        raise UserError(f"tune=lr_find: the range test recorded too few finite losses to suggest an lr "
                        f"(tune.num_training={tune.num_training}); give it more steps or a narrower "
                        f"tune.min_lr..tune.max_lr.")
    figure = finder.plot(suggest=True)
    figure.axes[0].set_title(f"suggested lr {suggested:.3g}")
    figure.savefig(os.path.join(out_dir, PLOT), dpi=120)
    write_json(os.path.join(out_dir, CURVE), {"lr": finder.results["lr"], "loss": finder.results["loss"],
                                              "suggested_lr": suggested})
    print(f"lr_find: suggested lr {suggested:.3g}; plot in {os.path.join(out_dir, PLOT)}"
          + ("" if tune.apply else f" (training with optimizer.lr={cfg.optimizer.lr}; tune.apply=true uses it)"))
    return {"suggested_lr": suggested, "figure": figure}


def log_lr_find(trainer: pl.Trainer, found: dict[str, Any]) -> None:
    """The plot as a TensorBoard image, and the suggestion as a scalar in every logger."""
    from gradlab.observe.writer import log_figure, log_scalars

    log_figure(trainer, TAG, found["figure"], 0)
    log_scalars(trainer, {"lr_find/suggested_lr": found["suggested_lr"]}, 0)
