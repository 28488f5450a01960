"""A run's hyperparameters and final metrics in TensorBoard's HParams view, so a sweep's runs line up in one table.

    tensorboard --logdir logs/train/multiruns/<time>      # HPARAMS tab: one row per job

The HParams view takes each metric's value from the scalars the run already logged under that tag (its last
point). So only the hparams summary is written here, never the metric values again: a scalar written at an earlier
step than the curve's end makes TensorBoard drop the curve's later points as orphans.
"""

from typing import Any

import lightning.pytorch as pl
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch.utils.tensorboard.summary import hparams as hparams_summary

from gradlab.config.rules import METRICS
from gradlab.observe.writer import flush, log_summary, tensorboard_logger
from gradlab.run.trackers import flatten

# The config groups whose every value is a hyperparameter; other groups contribute only what a run overrides.
GROUPS = ("model", "optimizer", "scheduler")
KEYS = ("seed", "data.batch_size", "trainer.max_epochs", "trainer.precision", "trainer.gradient_clip_val")


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
            params.update({key: value for key, value in flatten(OmegaConf.to_container(node, resolve=True),
                                                                 f"{group}.").items()
                           if key.rpartition(".")[2] not in ("_target_", "_partial_", "_convert_")})
    for key in (*KEYS, *(k for k in overridden if not k.startswith("paths."))):  # where files go is no hparam
        value = OmegaConf.select(cfg, key, default=None)
        if key not in params and not isinstance(value, DictConfig):  # group choices are already in
            params[key] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    return {key: _scalar(value) for key, value in params.items()}


def log_hparams(trainer: pl.Trainer, cfg: DictConfig, metrics: dict[str, Any]) -> None:
    """Write the hparams summary into each TensorBoard logger's run (rank zero only: loggers write nowhere else)."""
    columns = {name: float(metrics[name]) for name in METRICS if isinstance(metrics.get(name), (int, float))}
    if not (trainer.is_global_zero and columns and tensorboard_logger(trainer)):
        return
    summaries = hparams_summary(run_hparams(cfg), columns)
    for summary in summaries:  # through the one writer: the events land in the run's own folder, beside its scalars
        log_summary(trainer, summary)
    flush(trainer)


def _scalar(value: Any) -> bool | int | float | str:
    """HParams takes numbers, bools and strings: lists and None become their text."""
    if isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
