"""Every option of every config group composes and instantiates into the object it promises."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate

from gradlab.run.train import build_module, build_trainer, instantiate_group
from helpers import ROOT, compose_config

CONF = ROOT / "conf"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_with(overrides: list[str], tmp_path: Path):
    # paths.log_dir: logger=mlflow's database
    return compose_config("train", [*overrides, f"paths.data_dir={tmp_path / 'data'}",
                                    f"paths.log_dir={tmp_path / 'logs'}"], tmp_path)


@pytest.mark.parametrize("group", ["data", "model", "optimizer", "scheduler", "trainer", "logger",
                                   "callbacks", "experiment", "debug"])
def test_every_option_instantiates(group, tmp_path):
    assert options(group), f"conf/{group} has no options"
    for option in options(group):
        # model=rnn reads token ids: it comes with its data (the experiment=imdb_* recipes pair them the same way)
        pair = {"model=rnn": ["data=imdb"], "data=imdb": ["model=rnn"]}.get(f"{group}={option}", [])
        cfg = compose_with([f"{group}={option}", *pair], tmp_path)
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

    cfg = compose_with(["callbacks.progress_bar=null", "callbacks.model_summary=null"], tmp_path)
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
    assert "EarlyStopping" not in {type(c).__name__ for c in instantiate_group(cfg.callbacks)}
    cfg = compose_with(["callbacks=[default,early_stopping]"], tmp_path)
    assert "EarlyStopping" in {type(c).__name__ for c in instantiate_group(cfg.callbacks)}


def test_every_target_node_instantiates_with_plain_hydra(tmp_path):
    """No gradlab-only switch (`enabled`, `interval`) inside a `_target_` node: hydra.utils.instantiate builds each."""
    from hydra.utils import instantiate

    cfg = compose_with(["callbacks=[default,early_stopping]", "scheduler=onecycle", "logger=csv"], tmp_path)
    for group in ("callbacks", "logger"):
        for name, node in cfg[group].items():
            assert type(instantiate(node)).__name__, name
    optimizer = instantiate(cfg.optimizer)(params=[torch.nn.Parameter(torch.zeros(2))])
    scheduler = instantiate(cfg.scheduler)(optimizer=optimizer, total_steps=10)
    assert isinstance(scheduler, torch.optim.lr_scheduler.OneCycleLR) and cfg.scheduler_interval == "step"


def test_optional_local_config_is_merged_last(tmp_path):
    """conf/local/default.yaml (machine-specific, never committed) wins over the defaults; the command line over it."""
    import shutil

    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    (conf / "local").mkdir(exist_ok=True)
    (conf / "local" / "default.yaml").write_text("# @package _global_\npaths:\n  data_dir: /datasets\n"
                                                 "data:\n  batch_size: 128\n")
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(conf), version_base="1.3"):
        cfg = compose("train", overrides=["data.batch_size=32"])
        assert cfg.paths.data_dir == "/datasets" and cfg.data.batch_size == 32
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF), version_base="1.3"):  # the repository's own: no local file, no change
        if not (CONF / "local" / "default.yaml").exists():
            assert compose("train").paths.data_dir.endswith("/data")
