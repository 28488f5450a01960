"""Experiment trackers beside TensorBoard: MLflow and Weights & Biases get every metric, the config and the results.

    python train.py logger=mlflow     then: mlflow ui --backend-store-uri sqlite:///logs/mlflow.db
    python train.py logger=wandb      offline; then: wandb sync logs/train/runs/<run>/wandb/offline-run-*
    python train.py logger=many       TensorBoard + CSV + MLflow

Every metric reaches them through Lightning's `log_metrics`: the module's `train/*`, `val/*`, `test/*`, and the
gradient callbacks' `grad_norm/*`, `param_norm/*`, `update_ratio/*` (GradNormMonitor's `_log` writes TensorBoard
directly and hands every other logger the same dict). `log_config` adds the resolved config as parameters when
the run starts; `record_results` adds metrics.json and the best checkpoint's path when it ends.
"""

import os
import re
import time
from collections.abc import Mapping
from typing import Any, Optional

from lightning.pytorch.loggers import MLFlowLogger as LightningMLFlowLogger
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf


class MLFlowLogger(LightningMLFlowLogger):
    """Lightning's MLFlowLogger, writing one batch per logging step instead of one per `log_metrics` call.

    A step's metrics arrive in several calls (the module's, GradNormMonitor's, ThroughputMonitor's) and every
    `log_batch` is one transaction of the tracking store, ~50 ms on SQLite whatever its size. So values wait
    here until a later step arrives and at least `flush_every_s` seconds have passed since the last write
    (0: write each step as soon as the next one starts), and at the end of fit and test (`finalize`).
    """

    def __init__(self, experiment_name: str = "lightning_logs", run_name: Optional[str] = None,
                 tracking_uri: Optional[str] = None, tags: Optional[dict[str, Any]] = None,
                 artifact_location: Optional[str] = None, log_model: bool | str = False, prefix: str = "",
                 run_id: Optional[str] = None, flush_every_s: float = 5.0):
        # Named arguments (no **kwargs), so that the config check catches a mistyped key in conf/logger/mlflow.yaml.
        super().__init__(experiment_name=experiment_name, run_name=run_name, tracking_uri=tracking_uri, tags=tags,
                         artifact_location=artifact_location, log_model=log_model, prefix=prefix, run_id=run_id)
        self.flush_every_s = flush_every_s
        self._pending: dict[int, dict[str, float]] = {}  # step -> {key: value}, the latest value of each key
        self._last_write = time.monotonic()

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: Optional[int] = None) -> None:
        step = step or 0
        if self._pending and step not in self._pending and time.monotonic() - self._last_write >= self.flush_every_s:
            self.flush()
        self._pending.setdefault(step, {}).update(metrics)

    @rank_zero_only
    def flush(self) -> None:
        """Write every pending value in one `log_batch` (MLflow splits it into chunks of 1,000 metrics)."""
        from mlflow.entities import Metric

        pending, self._pending = self._pending, {}
        self._last_write = time.monotonic()
        if not pending:
            return
        timestamp_ms = int(time.time() * 1000)
        batch = [Metric(key=_clean_key(self._prefix + key), value=float(value), timestamp=timestamp_ms, step=step)
                 for step, values in pending.items() for key, value in values.items() if not isinstance(value, str)]
        self.experiment.log_batch(run_id=self.run_id, metrics=batch, **self._log_batch_kwargs)

    def finalize(self, status: str = "success") -> None:
        self.flush()
        super().finalize(status)


def _clean_key(key: str) -> str:
    # Only the characters MLflow allows in metric names, as Lightning's MLFlowLogger keeps them.
    return re.sub("[^a-zA-Z0-9_/. -]+", "", key)


def log_config(loggers: list[Any], cfg: DictConfig) -> None:
    """The resolved config, flattened to dotted keys (`optimizer.lr`), as MLflow params / W&B config."""
    flat = _flatten(OmegaConf.to_container(cfg, resolve=True))
    for logger in loggers:
        if isinstance(logger, (LightningMLFlowLogger, WandbLogger)):
            logger.log_hyperparams(flat)


@rank_zero_only
def record_results(loggers: list[Any], metrics: dict[str, Any], metrics_path: str) -> None:
    """metrics.json as an artifact / file of the run, the best checkpoint's path and the status as tags / summary."""
    best = metrics.get("best_checkpoint") or ""
    for logger in loggers:
        if isinstance(logger, LightningMLFlowLogger):
            if isinstance(logger, MLFlowLogger):
                logger.flush()
            client, run_id = logger.experiment, logger.run_id
            client.log_artifact(run_id, metrics_path)
            for key, value in (("best_checkpoint", best), ("status", metrics.get("status", ""))):
                client.set_tag(run_id, key, str(value))
        elif isinstance(logger, WandbLogger):
            run = logger.experiment
            run.summary.update({k: v for k, v in metrics.items() if isinstance(v, (int, float, str))})
            run.summary["best_checkpoint"] = best
            run.save(metrics_path, base_path=os.path.dirname(os.path.abspath(metrics_path)), policy="now")
            # One W&B run per job: a sweep's next job in this process would otherwise reuse this run.
            run.finish()


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
