"""Bad data, bad files, bad numbers: one clear message, exit code 2, and nothing already written touched.

The entry points run in-process here (Hydra's compose, then `gradlab.config.cli.checked`, the code train.py,
eval.py and predict.py run), so that each case costs a fraction of a second, not a fresh interpreter.
"""

import json
import math
import shutil
from pathlib import Path

import lightning.pytorch  # noqa: F401  (imported at collection: its log handler then binds to the session's stderr)
import pytest
import torch

from conftest import ONE_THREAD
from helpers import (
    compose_config,
    fails,
    fake_digits,
    run_cli,
    run_entry,
    snapshot,
    tiny_mnist_args,
    write_idx,
    write_mnist,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

QUIET = ["callbacks.grad_norm=null", "logger=csv"]




@pytest.fixture
def tiny(tmp_path):
    return write_mnist(tmp_path / "data", n_train=60, n_test=20)


def train_args(data: Path, out: Path, val_size: int = 20) -> list[str]:
    args = [a for a in tiny_mnist_args(data, out) if not a.startswith("data.val_size=")]
    return [*args, f"data.val_size={val_size}", *QUIET]


# ---- MNIST IDX files --------------------------------------------------------------------------------------------
def truncate(path: Path, cut: int = 10) -> None:
    path.write_bytes(path.read_bytes()[:-cut])


def wrong_magic(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[:4] = b"\x1f\x8b\x08\x00"  # the start of a gzip file
    path.write_bytes(bytes(data))


def fewer_labels(path: Path) -> None:
    write_idx(path.parent / "train-labels-idx1-ubyte", fake_digits(59, seed=0)[1])


def label_out_of_range(path: Path) -> None:
    images, labels = fake_digits(60, seed=0)
    labels[7] = 12
    write_idx(path.parent / "train-labels-idx1-ubyte", labels)


@pytest.mark.parametrize("damage, expected", [
    (truncate, "train-images-idx3-ubyte is truncated: its header promises 60 x 28 x 28 bytes"),
    (wrong_magic, "train-images-idx3-ubyte is not an IDX file of 3-D unsigned bytes: it starts with 1f 8b 08 00"),
    (fewer_labels, "holds 60 images but"),
    (label_out_of_range, "contains label 12, but this dataset has 10 classes"),
])
def test_damaged_idx_files(tiny, tmp_path, capsys, damage, expected):
    damage(tiny / "MNIST" / "raw" / "train-images-idx3-ubyte")
    err = fails("gradlab.run.train", compose_config("train", train_args(tiny, tmp_path), tmp_path / "out"), capsys)
    assert expected in err
    assert not list((tmp_path / "out").rglob("*.ckpt")) and not (tmp_path / "out" / "metrics.json").exists()


# ---- checkpoints ------------------------------------------------------------------------------------------------
@pytest.fixture
def run_copy(cnn_run, tmp_path):
    """A copy of the shared run's folder, which the failing commands below must leave byte for byte as it was."""
    run_dir, metrics, _ = cnn_run
    copy = tmp_path / "logs" / "train" / "runs" / run_dir.name
    shutil.copytree(run_dir, copy)
    before = snapshot(copy)
    yield copy
    after = snapshot(copy)
    assert {k: after.get(k) for k in before} == before, "a failing command changed files of an existing run"


def test_resuming_with_another_model_names_the_mismatch(run_copy, mnist_root, tmp_path, capsys):
    args = [*train_args(mnist_root, tmp_path, val_size=40), f"ckpt_path={run_copy / 'checkpoints' / 'last.ckpt'}",
            "model.hidden=64", "+resume.force=true"]  # past the finished-run guard, to the weights' check
    err = fails("gradlab.run.train", compose_config("train", args, tmp_path / "new"), capsys)
    assert "does not fit this model" in err
    assert "net.fc1.weight: (128, 9216) in the checkpoint, (64, 9216) here" in err
    assert "model.net.hidden=128 in the checkpoint vs 64 now" in err


def test_resuming_with_damaged_data_leaves_the_run_alone(run_copy, mnist_root, tmp_path, capsys):
    data = tmp_path / "damaged"
    shutil.copytree(mnist_root, data)
    truncate(data / "MNIST" / "raw" / "t10k-labels-idx1-ubyte")
    # Other overrides than the finished run's (logger, callbacks): +resume.force=true gets past the finished-run guard.
    args = [*train_args(data, tmp_path, val_size=40), f"ckpt_path={run_copy / 'checkpoints' / 'last.ckpt'}",
            "+resume.force=true"]
    err = fails("gradlab.run.train", compose_config("train", args, tmp_path / "new"), capsys)
    assert "t10k-labels-idx1-ubyte is truncated" in err


@pytest.mark.parametrize("entry", ["eval", "predict"])
@pytest.mark.parametrize("damage, expected", [
    (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "is not a readable checkpoint"),
    (lambda p: p.write_bytes(b""), "is not a readable checkpoint"),
    (lambda p: p.write_text("hello"), "is not a readable checkpoint"),
])
def test_corrupted_checkpoint(run_copy, tmp_path, capsys, entry, damage, expected):
    bad = tmp_path / "bad.ckpt"
    shutil.copy(run_copy / "checkpoints" / "last.ckpt", bad)
    damage(bad)
    cfg = compose_config(entry, [f"ckpt_path={bad}", f"input={tmp_path}"] if entry == "predict" else [f"ckpt_path={bad}"],
                 tmp_path / "out")
    assert expected in fails(f"gradlab.run.{'evaluate' if entry == 'eval' else 'predict'}", cfg, capsys)


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_checkpoints_never_run_code(run_copy, tmp_path, capsys):
    """A pickled object in the file, or a config naming any callable: both refused before anything runs."""
    checkpoint = torch.load(run_copy / "checkpoints" / "last.ckpt", weights_only=True)
    checkpoint["extra"] = Payload()
    torch.save(checkpoint, tmp_path / "pickled.ckpt")
    err = fails("gradlab.run.predict", compose_config("predict", [f"ckpt_path={tmp_path / 'pickled.ckpt'}", f"input={tmp_path}"],
                                          tmp_path / "out"), capsys)
    assert "Refusing to load" in err and "this must never run" not in err

    del checkpoint["extra"]
    checkpoint["gradlab_config"]["model"]["net"]["_target_"] = "os.system"
    torch.save(checkpoint, tmp_path / "target.ckpt")
    err = fails("gradlab.run.evaluate", compose_config("eval", [f"ckpt_path={tmp_path / 'target.ckpt'}"], tmp_path / "out"), capsys)
    assert "model.net._target_='os.system'" in err and "not on the list of what a checkpoint may build" in err


def test_an_image_that_is_not_an_image(run_copy, tmp_path, capsys):
    fake = tmp_path / "digit.png"
    fake.write_text("<html>not a picture</html>")
    cfg = compose_config("predict", [f"ckpt_path={run_copy}", f"input={fake}"], tmp_path / "out")
    err = fails("gradlab.run.predict", cfg, capsys)
    assert f"{fake}: not an image file PIL can read" in err
    missing = compose_config("predict", [f"ckpt_path={run_copy}", f"input={tmp_path / 'nope.png'}"], tmp_path / "out")
    assert "nope.png: no such file or folder" in fails("gradlab.run.predict", missing, capsys)


# ---- non-finite loss ------------------------------------------------------------------------------------------
def nan_at(steps: str) -> list[str]:
    return ["+callbacks.zz_nan._target_=faults.NaNInputAtSteps", f"+callbacks.zz_nan.steps={steps}"]


def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    # 40 training images in batches of 32: 2 steps an epoch; last.ckpt after every step.
    args = [*train_args(tiny, tmp_path), "trainer.max_epochs=3", "callbacks.resume.every_n_train_steps=1",
            *nan_at("[3]")]
    err = fails("gradlab.run.train", compose_config("train", args, out), capsys)
    assert "the training loss is nan at step 3 (epoch 1)" in err and "model.on_nonfinite_loss=skip" in err
    last = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 3  # written after the update of the batch before, the last one before the NaN
    assert all(torch.isfinite(t).all() for t in last["state_dict"].values() if t.is_floating_point())
    assert not (out / "metrics.json").exists()


def test_nonfinite_loss_skip_drops_only_those_batches(tiny, tmp_path):
    out = tmp_path / "out"
    args = [*train_args(tiny, tmp_path), "trainer.max_epochs=2", "model.on_nonfinite_loss=skip", *nan_at("[0,1]")]
    with pytest.warns(UserWarning) as warned:
        run_entry("gradlab.run.train", compose_config("train", args, out))
    skipped = [str(w.message) for w in warned if "Skipped a batch" in str(w.message)]
    assert [s.split(":")[0] for s in skipped] == ["Skipped a batch at step 0 (epoch 0)",
                                                   "Skipped a batch at step 1 (epoch 0)"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "completed" and math.isfinite(metrics["train/loss"]) and metrics["steps"] == 4


# ---- aclImdb tree -----------------------------------------------------------------------------------------------
def not_utf8(acl: Path) -> None:
    (acl / "train" / "pos" / "3_9.txt").write_bytes("Un film magnifique, très émouvant.".encode("latin-1"))


def empty_label_folder(acl: Path) -> None:
    for review in (acl / "train" / "neg").iterdir():
        review.unlink()


def half_extracted(acl: Path) -> None:
    shutil.rmtree(acl / "train" / "neg")


def empty_tree(acl: Path) -> None:
    shutil.rmtree(acl)
    acl.mkdir()


@pytest.mark.parametrize("damage, expected", [
    (not_utf8, "3_9.txt is not UTF-8 text (byte 0xe8 at offset 22)"),  # "Un film magnifique, tr" + "è"
    (empty_label_folder, "train/neg holds no reviews"),
    (half_extracted, "IMDB data not found at"),
    (empty_tree, "IMDB data not found at"),
])
def test_damaged_aclimdb_tree(tmp_path, capsys, damage, expected):
    from helpers import write_aclimdb

    root = write_aclimdb(tmp_path / "data", n_train=10, n_test=4)
    damage(root / "aclImdb")
    args = ["model=rnn", "data=imdb", f"paths.data_dir={root}", f"paths.root_dir={tmp_path}", "data.download=false",
            "data.val_size=4", "data.batch_size=8", "data.max_vocab_size=100", *QUIET,
            "callbacks.progress_bar=null", "callbacks.model_summary=null"]
    err = fails("gradlab.run.train", compose_config("train", args, tmp_path / "out"), capsys)
    assert expected in err
    assert not list((tmp_path / "out").rglob("*.ckpt"))


def test_user_error_raised_inside_a_constructor_is_one_message(tmp_path):
    """Hydra's instantiate wraps a data module's own UserError; the user still gets just that message."""
    proc = run_cli("train.py", "data=toy", "data.task=moons", "model=mlp", "debug=fdr",
                   f"paths.root_dir={tmp_path}", cwd=tmp_path, env=ONE_THREAD)
    assert proc.returncode == 2
    assert "data.input_dim=2" in proc.stderr
    assert "Traceback" not in proc.stderr and "Error in call to target" not in proc.stderr


def test_metrics_json_stays_strict_json_when_a_metric_is_not_finite(tmp_path):
    from gradlab.run.results import write_metrics

    path = write_metrics(str(tmp_path / "run"), {"train/loss": float("inf"), "val/loss": float("nan"),
                                                 "test/acc": 0.5, "epochs": 2})

    def reject(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    data = json.loads(Path(path).read_text(), parse_constant=reject)  # a strict parser reads it
    assert data["train/loss"] is None and data["val/loss"] is None
    assert data["nonfinite"] == {"train/loss": "inf", "val/loss": "nan"}
    assert data["test/acc"] == 0.5 and data["epochs"] == 2


def test_health_json_follows_the_same_nan_policy(tmp_path):
    """One JSON writer, one NaN policy: a nested non-finite value is null too, and named by its path."""
    from gradlab.observe.health_rules import Report, Thresholds

    Report(thresholds=Thresholds(exploding=float("inf"))).write_json(tmp_path / "health.json")
    data = json.loads((tmp_path / "health.json").read_text(), parse_constant=lambda c: 1 / 0)
    assert data["thresholds"]["exploding"] is None
    assert data["nonfinite"] == {"thresholds.exploding": "inf"}
    assert data["thresholds"]["dead"] == Thresholds().dead
