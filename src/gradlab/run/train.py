"""The training run behind train.py: build everything from the config, fit, test the best checkpoint, report."""

import json
import os
import time
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from gradlab.checkpoints.finished_run import guard as guard_finished_run
from gradlab.checkpoints.run_dirs import lock_run, unlock_run
from gradlab.config.cli import after_import
from gradlab.errors import UserError
from gradlab.observe.throughput import ThroughputMonitor
from gradlab.run.ddp import ddp_children_join_this_job
from gradlab.run.hparams import log_hparams
from gradlab.run.job_record import requeued_checkpoint, slurm_ids
from gradlab.run.lr_find import log_lr_find, lr_find
from gradlab.run.precision import resolve as resolve_precision
from gradlab.run.ranks import RanksAgree
from gradlab.run.results import print_results, write_metrics
from gradlab.run.trackers import log_config, record_results


def build_module(cfg: DictConfig) -> pl.LightningModule:
    """The model config's ClassifierModule, with the optimizer and scheduler factories of their groups."""
    scheduler = instantiate(cfg.scheduler) if cfg.get("scheduler") else None
    return instantiate(cfg.model, optimizer=instantiate(cfg.optimizer), scheduler=scheduler,
                       scheduler_interval=cfg.get("scheduler_interval", "epoch"), _convert_="object")


def build_trainer(cfg: DictConfig, callbacks: list[Any], loggers: list[Any]) -> pl.Trainer:
    """The trainer config's Trainer. A progress bar or model summary switched off in the callbacks group stays
    off: Lightning would otherwise put its own default one in its place (unless the trainer config says)."""
    from lightning.pytorch.callbacks import ModelSummary, ProgressBar

    switches = {}
    if "enable_progress_bar" not in cfg.trainer and not any(isinstance(c, ProgressBar) for c in callbacks):
        switches["enable_progress_bar"] = False
    if "enable_model_summary" not in cfg.trainer and not any(isinstance(c, ModelSummary) for c in callbacks):
        switches["enable_model_summary"] = False
    # trainer.precision=auto becomes bf16-mixed or 32-true here, the one place (gradlab.run.precision).
    precision = resolve_precision(cfg.trainer.get("precision", "32-true"), cfg.trainer.get("accelerator", "auto"))
    return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, precision=precision, **switches)


def instantiate_group(group: Optional[DictConfig]) -> list[Any]:
    """Every entry of a dict-of-objects group (callbacks, loggers); an entry set to null is switched off."""
    return [instantiate(conf) for conf in (group or {}).values() if conf is not None and "_target_" in conf]


def hydra_overrides() -> list[str]:
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def output_dir(cfg: DictConfig) -> str:
    return cfg.paths.output_dir


def run(cfg: DictConfig) -> Optional[float]:
    after_import(cfg)
    lock_run(output_dir(cfg))  # the run folder is this process's until the run ends (ckpt_path=last skips it)
    try:
        guard_finished_run(cfg, output_dir(cfg))
        with ddp_children_join_this_job(output_dir(cfg)):
            return _run(cfg)
    finally:
        unlock_run(output_dir(cfg))


def _run(cfg: DictConfig) -> Optional[float]:
    start = time.time()
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule: pl.LightningDataModule = instantiate(cfg.data)
    module = build_module(cfg)
    found = _tune(cfg, module, datamodule)
    if found:
        # Random numbers from here on as in a run without the range test (and the same initial weights).
        pl.seed_everything(cfg.seed, workers=True, verbose=False)
        if cfg.tune.apply:
            cfg.optimizer.lr = found["suggested_lr"]
            module = build_module(cfg)
    # The whole resolved config rides in every checkpoint, so eval/predict can rebuild the model.
    module.run_config = OmegaConf.to_container(cfg, resolve=True)
    # Distributed: each rank states its run dir, seed and shard, and all must agree (nothing when on one process)
    callbacks = [*instantiate_group(cfg.get("callbacks")), RanksAgree(output_dir(cfg), cfg.seed)]
    loggers = instantiate_group(cfg.get("logger"))
    trainer = build_trainer(cfg, callbacks, loggers)
    log_config(loggers, cfg)  # MLflow params / W&B config: the whole resolved config
    if found:
        log_lr_find(trainer, found)

    metrics: dict[str, Any] = {}
    if cfg.get("train", True):
        # A job SLURM requeued without a preemption checkpoint continues from its own last.ckpt.
        ckpt_path = cfg.get("ckpt_path") or requeued_checkpoint(output_dir(cfg))
        if ckpt_path and not cfg.get("ckpt_path"):
            print(f"SLURM requeued this job (restart {os.environ.get('SLURM_RESTART_COUNT')}): resuming from {ckpt_path}")
        # weights_only=True: resuming never unpickles (AtomicCheckpointIO enforces it too, whatever the caller says).
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        metrics.update(_scalars(trainer.callback_metrics))
        metrics.update(_throughput(trainer))
        if trainer.is_global_zero and not trainer.interrupted:
            metrics = _fit_metrics_of_finished_fit(metrics, output_dir(cfg), trainer)
    best = _best_checkpoint(trainer, output_dir(cfg))
    if cfg.get("test", True):
        if best is None and cfg.get("train", True) and not trainer.fast_dev_run:
            print("No best checkpoint was saved; testing the weights at the end of training.")
        trainer.test(module, datamodule=datamodule, ckpt_path=best, weights_only=True)
        metrics.update(_scalars(trainer.callback_metrics))

    if getattr(datamodule, "data_note", None):  # e.g. MNIST's shipped sample stood in for the real thing
        metrics["data"] = datamodule.data_note
    if found:
        metrics["suggested_lr"] = found["suggested_lr"]
    metrics.update({
        "best_checkpoint": best,
        "epochs": trainer.current_epoch,
        "steps": trainer.global_step,
        "wall_time_s": round(time.time() - start, 2),
        "overrides": hydra_overrides(),
        "status": "interrupted" if trainer.interrupted else "completed",
        **slurm_ids(),
    })
    for callback in callbacks:  # instruments with a summary for metrics.json (grad_noise: B_simple, a reading)
        if hasattr(callback, "final_metrics"):
            metrics.update(callback.final_metrics())
    log_hparams(trainer, cfg, metrics)
    if trainer.is_global_zero:
        record_results(loggers, metrics, write_metrics(output_dir(cfg), metrics))
        print_results(metrics, output_dir(cfg))
    value = metrics.get(cfg.get("optimized_metric") or "")
    return float(value) if isinstance(value, (int, float)) else None


def _fit_metrics_of_finished_fit(metrics: dict[str, Any], run_dir: str, trainer: pl.Trainer) -> dict[str, Any]:
    """Records the fit's metrics (status "testing") before the test stage. A run killed during its test stage and
    resumed from its last.ckpt trains no step again, so its own fit metrics would be those of an empty epoch:
    the ones recorded when this same fit (same folder, same step) finished are kept instead."""
    try:
        with open(os.path.join(run_dir, "metrics.json")) as f:
            before = json.load(f)
    except (OSError, ValueError):
        before = {}
    if isinstance(before, dict) and before.get("status") == "testing" and before.get("steps") == trainer.global_step:
        metrics = {**metrics, **{k: v for k, v in before.items() if "/" in k and not k.startswith("test/")}}
    write_metrics(run_dir, {**metrics, "steps": trainer.global_step, "epochs": trainer.current_epoch, "status": "testing"})
    return metrics


def _tune(cfg: DictConfig, module: pl.LightningModule, datamodule: pl.LightningDataModule) -> Optional[dict]:
    """`+tune=lr_find`: the learning-rate range test before training (not when resuming: the run has its lr)."""
    if not cfg.get("tune"):
        return None
    if cfg.get("ckpt_path"):
        print("tune=lr_find is skipped when resuming (ckpt_path): the run goes on with its learning rate.")
        return None
    return lr_find(cfg, module, datamodule, output_dir(cfg))


def _scalars(metrics: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if torch.is_tensor(v) and v.numel() == 1}


def _throughput(trainer: pl.Trainer) -> dict[str, float]:
    return next((cb.means(trainer) for cb in trainer.callbacks if isinstance(cb, ThroughputMonitor)), {})


def _best_checkpoint(trainer: pl.Trainer, run_dir: str) -> Optional[str]:
    """The best checkpoint to test: only a file in this run's own checkpoints/ folder. Lightning restores
    best_model_path from a resumed checkpoint's state, which a crafted or foreign file may point anywhere."""
    ckpt = trainer.checkpoint_callback
    path = getattr(ckpt, "best_model_path", "") if ckpt is not None else ""
    if not path or not os.path.exists(path):
        return None
    # The folder this run's ModelCheckpoint writes to (conf/callbacks: <run>/checkpoints), from the user's config.
    own = os.path.realpath(getattr(ckpt, "dirpath", None) or os.path.join(run_dir, "checkpoints"))
    if os.path.dirname(os.path.realpath(path)) != own:
        raise UserError(f"The best checkpoint to test, {path}, lies outside this run's checkpoints folder {own} "
                        "(its path came from the state of the checkpoint the run resumed from); it is not tested. "
                        "The fit's metrics are in metrics.json (status: testing); test the run with python eval.py "
                        f"ckpt_path={own}/<file>.ckpt.")
    return path

