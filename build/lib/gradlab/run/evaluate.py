"""The evaluation behind eval.py: rebuild a checkpoint's model and data, test them, write metrics.json."""

import os
import time
from typing import Any

import lightning.pytorch as pl
from hydra.utils import instantiate
from omegaconf import DictConfig

from gradlab.checkpoints import load as ckpt
from gradlab.errors import UserError
from gradlab.run.precision import resolve as resolve_precision
from gradlab.run.results import print_results
from gradlab.run.train import _write_json, hydra_overrides
from gradlab.config.cli import after_import


def run(cfg: DictConfig) -> dict[str, Any]:
    after_import(cfg)
    start = time.time()
    path = str(cfg.ckpt_path)
    checkpoint = ckpt.load(path)
    run_cfg = checkpoint["gradlab_config"]
    module = ckpt.build_module(checkpoint, path)
    datamodule = build_datamodule(run_cfg, cfg, path)
    trainer_cfg = run_cfg.get("trainer") or {}
    trainer = pl.Trainer(accelerator=cfg.accelerator or trainer_cfg.get("accelerator", "auto"), devices=1,
                         precision=resolve_precision(cfg.precision or trainer_cfg.get("precision", "32-true"),
                                                     cfg.accelerator or trainer_cfg.get("accelerator", "auto")),
                         logger=False,
                         enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
                         default_root_dir=cfg.paths.output_dir)
    # The same Lightning loop and metric code as the training run's test, hence the same numbers.
    evaluate = trainer.test if cfg.split == "test" else trainer.validate
    results = evaluate(module, datamodule=datamodule, verbose=False)[0]
    prefix = f"{cfg.split}/"
    metrics: dict[str, Any] = {k: v for k, v in _scalars_of(results).items() if k.startswith(prefix)}
    if getattr(datamodule, "data_note", None):  # as in train.py: the shipped MNIST sample stood in
        metrics["data"] = datamodule.data_note
    metrics.update({
        "checkpoint": os.path.abspath(path),
        "split": cfg.split,
        "epoch": checkpoint.get("epoch"),  # of the checkpoint: 0-based, as in its file name
        "step": checkpoint.get("global_step"),
        "wall_time_s": round(time.time() - start, 2),
        "overrides": hydra_overrides(),
    })
    _write_json(os.path.join(cfg.paths.output_dir, "metrics.json"), metrics)
    print_results(metrics, cfg.paths.output_dir)
    return metrics


def build_datamodule(run_cfg: dict, cfg: DictConfig, path: str) -> pl.LightningDataModule:
    data_cfg = dict(run_cfg.get("data") or {})
    if "_target_" not in data_cfg:
        raise UserError(f"{path} has no data section in its run config.")
    ckpt.check_targets(data_cfg, "data")
    if cfg.data_dir:
        if "root" not in data_cfg:
            raise UserError(f"data_dir={cfg.data_dir}: the data of {path} ({data_cfg['_target_']}) read no files.")
        data_cfg["root"] = str(cfg.data_dir)
    if cfg.batch_size:
        data_cfg["batch_size"] = int(cfg.batch_size)
    if "download" in data_cfg:
        data_cfg["download"] = False  # evaluating never downloads: a missing dataset is reported, with its path
    return instantiate(data_cfg, _convert_="object")


def _scalars_of(results: dict) -> dict[str, float]:
    return {k: float(v) for k, v in results.items() if isinstance(v, (int, float))}
