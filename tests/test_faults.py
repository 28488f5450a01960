"""Failing disks and Ctrl-C: what was written before the fault stays whole and readable, and the user gets one message.

Disk faults are injected into the real write path of gradlab.checkpoints.atomic_io (tests/faults.py FailingDisk: half of
the bytes, then ENOSPC or EIO), in-process through the code train.py runs.
"""

import json
import os
import signal
from pathlib import Path

import pytest
import torch

import gradlab.checkpoints.atomic_io
from conftest import ONE_THREAD
from gradlab.checkpoints.load import load
from gradlab.errors import EXIT_USER_ERROR
from helpers import compose_config, only_run_dir, run_cli, run_entry, tiny_mnist_args

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

TESTS = Path(__file__).resolve().parent
COMPARED = ("train/loss", "train/acc", "val/loss", "val/acc", "val/acc_best", "test/loss", "test/acc", "epochs",
            "steps")


@pytest.fixture
def restore_open():
    yield
    vars(gradlab.checkpoints.atomic_io).pop("open", None)  # the fault shadows the built-in there


@pytest.mark.parametrize("error, at_save, reason", [
    ("ENOSPC", 3, "No space left on device (ENOSPC)"),
    ("EIO", 4, "Input/output error (EIO)"),
])
def test_a_failing_checkpoint_write_keeps_the_previous_checkpoints_and_says_so(
        mnist_root, tmp_path, capsys, restore_open, error, at_save, reason):
    """Epoch 0 writes epoch_000.ckpt (save 1) and last.ckpt (2); one of epoch 1's saves (3: its best, 4: last) fails."""
    out = tmp_path / "out"
    args = [*tiny_mnist_args(mnist_root, tmp_path), "trainer.max_epochs=3", "callbacks.grad_norm=null",
            "logger=csv", "callbacks.model_checkpoint.monitor=val/loss", "callbacks.model_checkpoint.mode=min",
            "+callbacks.zz_disk._target_=faults.FailingDisk", f"+callbacks.zz_disk.at_save={at_save}",
            f"+callbacks.zz_disk.error={error}"]
    cfg = compose_config("train", args, out)
    with pytest.raises(SystemExit) as exit_info:
        run_entry("gradlab.run.train", cfg)
    assert exit_info.value.code == EXIT_USER_ERROR
    err = capsys.readouterr().err
    message = err[err.index("error: "):]
    assert "Traceback" not in message and message.count("error: ") == 1
    failed = "epoch_001.ckpt" if at_save == 3 else "last.ckpt"
    assert f"Could not write checkpoint {out / 'checkpoints' / failed}: {reason}" in message
    # What was there stays whole: the best so far and last.ckpt (still epoch 0's end) load.
    best = "epoch_000.ckpt" if at_save == 3 else "epoch_001.ckpt"  # save 3 replaced the best before save 4 failed
    assert f"The checkpoints already in {out / 'checkpoints'} are unchanged: {best}, last.ckpt." in message
    assert "ckpt_path=last" in message
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == [best, "last.ckpt"]  # and no half-written temp file
    assert load(str(ckpts / "last.ckpt"))["global_step"] == 7
    assert load(str(ckpts / best))["global_step"] == (7 if at_save == 3 else 14)
    assert not (out / "metrics.json").exists()


def test_saves_are_atomic_replacements(tmp_path):
    """The temp file is renamed over the target: a reader holding the old file keeps reading the old bytes."""
    from gradlab.checkpoints.atomic_io import AtomicCheckpointIO

    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, path)
    inode = path.stat().st_ino
    with open(path, "rb") as old:
        io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)
        assert torch.load(old, weights_only=True)["state_dict"]["w"].sum() == 0
    assert path.stat().st_ino != inode and os.listdir(tmp_path) == ["last.ckpt"]
    assert torch.load(path, weights_only=True)["state_dict"]["w"].sum() == 3


def env() -> dict:
    return {**ONE_THREAD, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}


@pytest.mark.slow
def test_ctrl_c_in_the_test_stage_keeps_the_fit_and_a_resume_only_tests(cnn_run, tmp_path):
    """Ctrl-C while testing: the checkpoints and the fit's metrics stay (status "testing", no partial test/*);
    `ckpt_path=last` then trains nothing, tests, and ends with the uninterrupted run's metrics, number for number."""
    _, reference, args = cnn_run
    args = [a for a in args if not a.startswith("paths.root_dir=")] + [f"paths.root_dir={tmp_path}"]
    first = run_cli("train.py", *args, "+callbacks.zz_int._target_=faults.SignalInTest", "+callbacks.zz_int.batch=1",
                    cwd=tmp_path, env=env())
    assert first.returncode == 1, first.stderr[-3000:]  # Lightning: "Detected KeyboardInterrupt", exit 1
    run_dir = only_run_dir(tmp_path)
    partial = json.loads((run_dir / "metrics.json").read_text())
    assert partial["status"] == "testing" and not [k for k in partial if k.startswith("test/")]
    assert {k: partial[k] for k in COMPARED if not k.startswith("test/")} == \
        {k: reference[k] for k in COMPARED if not k.startswith("test/")}
    for ckpt in (run_dir / "checkpoints").glob("*.ckpt"):
        load(str(ckpt))

    second = run_cli("train.py", *args, "ckpt_path=last", cwd=tmp_path, env=env())
    assert second.returncode == 0, second.stderr[-3000:]
    resumed = json.loads((run_dir / "metrics.json").read_text())
    assert resumed["status"] == "completed"
    assert {k: resumed[k] for k in COMPARED} == {k: reference[k] for k in COMPARED}


@pytest.mark.slow
def test_ctrl_c_during_a_sweep_keeps_every_finished_job(mnist_root, tmp_path):
    """Ctrl-C in job 1 of 3: job 0's results stay whole, job 1 saves its last.ckpt and stops, job 2 never starts."""
    args = [*tiny_mnist_args(mnist_root, tmp_path), "trainer.max_epochs=1", "callbacks.grad_norm=null",
            "logger=csv", "+callbacks.zz_int._target_=faults.SignalAtStep", "+callbacks.zz_int.signal_name=SIGINT",
            "+callbacks.zz_int.step=999,3,999"]  # only job 1 reaches its step
    proc = run_cli("train.py", "-m", *args, cwd=tmp_path, env=env())
    assert proc.returncode == 128 + signal.SIGINT, proc.stderr[-3000:]
    assert "SIGINT received: saved" in proc.stderr
    (sweep,) = (tmp_path / "logs" / "train" / "multiruns").iterdir()
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")) == ["0", "1"]
    done = json.loads((sweep / "0" / "metrics.json").read_text())
    assert done["status"] == "completed" and done["steps"] == 7 and "test/acc" in done
    for ckpt in (sweep / "0" / "checkpoints").glob("*.ckpt"):
        load(str(ckpt))
    assert load(str(sweep / "1" / "checkpoints" / "last.ckpt"))["global_step"] in (3, 4)
    stopped = sweep / "1" / "metrics.json"
    assert not stopped.exists() or json.loads(stopped.read_text())["status"] != "completed"
