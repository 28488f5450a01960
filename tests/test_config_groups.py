"""Every option of every config group composes and instantiates into the object it promises."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import open_dict

from gradlab.train import build_module, build_trainer, instantiate_group

CONF = Path(__file__).resolve().parents[1] / "conf"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_with(overrides: list[str], tmp_path: Path):
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
        cfg.paths.data_dir = str(tmp_path / "data")
        cfg.paths.log_dir = str(tmp_path / "logs")  # logger=mlflow's database
    return cfg


@pytest.mark.parametrize("group", ["data", "model", "optimizer", "scheduler", "trainer", "logger",
                                   "callbacks", "experiment", "debug"])
def test_every_option_instantiates(group, tmp_path):
    assert options(group), f"conf/{group} has no options"
    for option in options(group):
        cfg = compose_with([f"{group}={option}"], tmp_path)
        datamodule = instantiate(cfg.data)
        module = build_module(cfg)
        optimizer = module.optimizer_factory(params=module.parameters())
        assert isinstance(optimizer, torch.optim.Optimizer)
        if module.scheduler_factory is not None:
            extra = {} if "total_steps" in getattr(module.scheduler_factory, "keywords", {}) else {"total_steps": 10}
            extra = extra if "OneCycle" in str(module.scheduler_factory) else {}
            assert hasattr(module.scheduler_factory(optimizer=optimizer, **extra), "step")
        assert datamodule.hparams.batch_size == cfg.data.batch_size
        if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
            # A GPU trainer cannot be built here; what can be checked is that it asks for GPUs.
            assert cfg.trainer.devices not in (None, 0), (group, option)
            continue
        trainer = build_trainer(cfg, instantiate_group(cfg.callbacks), instantiate_group(cfg.logger))
        expected_epochs = 1 if cfg.trainer.get("fast_dev_run") else cfg.trainer.max_epochs
        assert trainer.max_epochs == expected_epochs, (group, option)


def test_group_choice_reaches_the_object(tmp_path):
    cfg = compose_with(["optimizer=sgd", "optimizer.lr=0.123", "scheduler=step", "scheduler.gamma=0.5"], tmp_path)
    module = build_module(cfg)
    optimizer = module.optimizer_factory(params=module.parameters())
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["lr"] == 0.123
    scheduler = module.scheduler_factory(optimizer=optimizer)
    assert isinstance(scheduler, torch.optim.lr_scheduler.StepLR) and scheduler.gamma == 0.5
    assert module.hparams.scheduler_interval == "epoch"


def test_experiment_overlay_sets_the_recipe(tmp_path):
    cfg = compose_with(["experiment=mnist_cnn"], tmp_path)
    assert cfg.optimizer._target_ == "torch.optim.Adadelta" and cfg.optimizer.lr == 1.0
    assert cfg.scheduler.gamma == 0.7 and cfg.trainer.max_epochs == 14 and cfg.data.batch_size == 64


def test_callbacks_can_be_switched_off(tmp_path):
    from lightning.pytorch.callbacks import ModelSummary, RichModelSummary, RichProgressBar

    def trainer_callbacks(trainer):
        return {type(c) for c in trainer.callbacks}

    cfg = compose_with(["callbacks.progress_bar.enabled=false", "callbacks.model_summary.enabled=false"], tmp_path)
    names = {type(c).__name__ for c in instantiate_group(cfg.callbacks)}
    assert "RichProgressBar" not in names and "ModelCheckpoint" in names
    trainer = build_trainer(cfg, instantiate_group(cfg.callbacks), [])
    # off means off: Lightning does not slip its default bar or summary in
    assert trainer.progress_bar_callback is None
    assert not any(isinstance(c, ModelSummary) for c in trainer.callbacks)
    cfg = compose_with([], tmp_path)
    trainer = build_trainer(cfg, instantiate_group(cfg.callbacks), [])
    assert isinstance(trainer.progress_bar_callback, RichProgressBar)
    assert RichModelSummary in trainer_callbacks(trainer)
    cfg = compose_with(["callbacks.early_stopping.enabled=true"], tmp_path)
    assert "EarlyStopping" in {type(c).__name__ for c in instantiate_group(cfg.callbacks)}
