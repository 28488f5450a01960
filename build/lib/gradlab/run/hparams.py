"""A run's hyperparameters and final metrics in TensorBoard's HParams view, so a sweep's runs line up in one table.

    tensorboard --logdir logs/train/multiruns/<time>      # HPARAMS tab: one row per job

The HParams view takes each metric's value from the scalars the run already logged under that tag (its last
point). So only the hparams summary is written here, never the metric values again: a scalar written at an earlier
step than the curve's end makes TensorBoard drop the curve's later points as orphans.
"""

from typing import Any

import lightning.pytorch as pl
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf
from torch.utils.tensorboard.summary import hparams as hparams_summary

from gradlab.observe.lightning_private import file_writer

# The config groups whose every value is a hyperparameter; other groups contribute only what a run overrides.
GROUPS = ("model", "optimizer", "scheduler")
KEYS = ("seed", "data.batch_size", "trainer.max_epochs", "trainer.precision", "trainer.gradient_clip_val")
# Final metrics shown as columns (when the run logged them).
METRICS = ("val/acc", "val/acc_best", "val/loss", "test/acc", "test/loss", "train/loss", "train/acc")


def run_hparams(cfg: DictConfig) -> dict[str, Any]:
    """{"optimizer": "sgd", "optimizer.lr": 0.01, ...}: group choices, the GROUPS and KEYS values, overridden keys."""
    params: dict[str, Any] = {}
    overridden: list[str] = []
    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        params.update({group: choice for group, choice in hydra_cfg.runtime.choices.items()
                       if choice is not None and not group.startswith(("hydra", "paths"))})
        overridden = [o.split("=", 1)[0].lstrip("+~") for o in hydra_cfg.overrides.task if "=" in o]
    for group in GROUPS:
        node = OmegaConf.select(cfg, group)
        if isinstance(node, DictConfig):
            params.update(_flatten(OmegaConf.to_container(node, resolve=True), group))
    for key in (*KEYS, *(k for k in overridden if not k.startswith("paths."))):  # where files go is no hparam
        value = OmegaConf.select(cfg, key, default=None)
        if key not in params and not isinstance(value, DictConfig):  # group choices are already in
            params[key] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    return {key: _scalar(value) for key, value in params.items()}


def log_hparams(trainer: pl.Trainer, cfg: DictConfig, metrics: dict[str, Any]) -> None:
    """Write the hparams summary into each TensorBoard logger's run (rank zero only: loggers write nowhere else)."""
    columns = {name: float(metrics[name]) for name in METRICS if isinstance(metrics.get(name), (int, float))}
    loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
    if not (trainer.is_global_zero and columns and loggers):
        return
    summaries = hparams_summary(run_hparams(cfg), columns)
    for logger in loggers:
        # The experiment's file writer: the events land in the run's own folder, beside its scalars.
        writer = file_writer(logger.experiment)
        for summary in summaries:
            writer.add_summary(summary)
        logger.experiment.flush()


def _flatten(tree: dict, prefix: str) -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if key in ("_target_", "_partial_", "_convert_"):
            continue
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}.{key}"))
        else:
            flat[f"{prefix}.{key}"] = value
    return flat


def _scalar(value: Any) -> bool | int | float | str:
    """HParams takes numbers, bools and strings: lists and None become their text."""
    if isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
