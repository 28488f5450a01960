"""The foundation end to end: real CLI, real torchvision loaders on tiny IDX files, real outputs read back."""

import json
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from helpers import only_run_dir, run_cli, tiny_mnist_args

CONTRACT = {"train/loss", "train/acc", "val/loss", "val/acc"}


def scalar_tags(run_dir: Path) -> set[str]:
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return set(acc.Tags()["scalars"])


@pytest.fixture(scope="module")
def one_epoch_run(mnist_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    proc = run_cli("train.py", *tiny_mnist_args(mnist_root, out), "trainer.max_epochs=1",
                   "trainer.log_every_n_steps=1", cwd=out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return only_run_dir(out), proc


def test_one_epoch_writes_metrics_checkpoints_and_events(one_epoch_run):
    run_dir, proc = one_epoch_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {"test/acc", "test/loss", "val/acc", "val/acc_best", "train/loss"} <= metrics.keys()
    assert metrics["epochs"] == 1 and metrics["steps"] == 7  # ceil(200 train images / 32)
    assert metrics["status"] == "completed"
    assert "trainer.max_epochs=1" in metrics["overrides"]
    assert 0.0 <= metrics["test/acc"] <= 1.0

    ckpts = {p.name for p in (run_dir / "checkpoints").iterdir()}
    assert "last.ckpt" in ckpts and "epoch_000.ckpt" in ckpts
    assert metrics["best_checkpoint"].endswith("epoch_000.ckpt")
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["gradlab_config"]["model"]["net"]["_target_"] == "gradlab.models.cnn.MnistCNN"
    assert (run_dir / ".hydra" / "config.yaml").exists()

    assert CONTRACT | {"test/acc", "test/loss"} <= scalar_tags(run_dir)
    assert "Results" in proc.stdout and "test/acc" in proc.stdout


def test_best_checkpoint_reproduces_test_metrics(one_epoch_run, mnist_root):
    """test/* in metrics.json come from the best checkpoint: recompute them by hand from that file."""
    from gradlab.data.mnist import MNISTDataModule
    from gradlab.models.cnn import MnistCNN

    run_dir, _ = one_epoch_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    state = torch.load(metrics["best_checkpoint"], weights_only=True)["state_dict"]
    net = MnistCNN()
    net.load_state_dict({k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")})
    dm = MNISTDataModule(root=str(mnist_root), download=False, val_size=40)
    dm.setup("test")
    x, y = dm.test_set.tensors
    with torch.no_grad():
        out = net.eval()(x)
    assert (out.argmax(1) == y).float().mean().item() == pytest.approx(metrics["test/acc"], abs=1e-6)
    assert torch.nn.functional.nll_loss(out, y).item() == pytest.approx(metrics["test/loss"], rel=1e-4)


def test_seeded_run_is_repeatable(one_epoch_run, mnist_root, tmp_path):
    run_dir, _ = one_epoch_run
    proc = run_cli("train.py", *tiny_mnist_args(mnist_root, tmp_path), "trainer.max_epochs=1",
                   "trainer.log_every_n_steps=1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = json.loads((run_dir / "metrics.json").read_text())
    second = json.loads((only_run_dir(tmp_path) / "metrics.json").read_text())
    for key in ("train/loss", "val/loss", "val/acc", "test/loss", "test/acc"):
        assert first[key] == second[key], key


def test_debug_trainer_runs_every_stage(mnist_root, tmp_path):
    proc = run_cli("train.py", *tiny_mnist_args(mnist_root, tmp_path), "debug=fdr", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((only_run_dir(tmp_path) / "metrics.json").read_text())
    assert metrics["steps"] == 1 and "test/acc" in metrics


def test_missing_data_is_one_clear_message(tmp_path):
    empty = tmp_path / "nothing-here"
    proc = run_cli("train.py", f"paths.data_dir={empty}", f"paths.root_dir={tmp_path}", "data.download=false",
                   cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert str(empty / "MNIST" / "raw") in proc.stderr
    assert "train-images-idx3-ubyte" in proc.stderr and "data.root=" in proc.stderr


@pytest.mark.parametrize("override, named", [("trainer.max_epoch=1", "max_epoch"),
                                             ("optimizer.lrr=0.1", "lrr"),
                                             ("model=cnnn", "cnnn")])
def test_config_typo_fails_naming_the_key(tmp_path, override, named):
    proc = run_cli("train.py", override, f"paths.root_dir={tmp_path}", cwd=tmp_path)
    assert proc.returncode != 0
    assert named in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "logs").exists() or not any((tmp_path / "logs").rglob("*.ckpt"))
