"""Kill a run, resume it, and get the metrics of the run that was never interrupted: exactly, on CPU."""

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from conftest import ONE_THREAD
from helpers import only_run_dir, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

TESTS = Path(__file__).resolve().parent
COMPARED = ("train/loss", "train/acc", "val/loss", "val/acc", "val/acc_best", "test/loss", "test/acc",
            "epochs", "steps")


def with_root(args: list[str], root: Path) -> list[str]:
    return [a for a in args if not a.startswith("paths.root_dir=")] + [f"paths.root_dir={root}"]


def signal_at(step: int, name: str) -> list[str]:
    # A callback of the tests folder that sends the process `name` after optimizer step `step`.
    return ["+callbacks.zz_signal._target_=faults.SignalAtStep", f"+callbacks.zz_signal.step={step}",
            f"+callbacks.zz_signal.signal_name={name}"]


def saved_step(path: Path) -> int:
    return torch.load(path, weights_only=True, map_location="cpu")["global_step"]


@pytest.mark.slow
def test_sigterm_then_sigkill_then_resume_ends_with_the_uninterrupted_metrics(cnn_run, tmp_path):
    """7 steps an epoch, 2 epochs; last.ckpt every 3 steps. SIGTERM after step 4 saves mid-epoch 0 and exits;
    the resumed run is SIGKILLed after step 11, so it resumes again from step 9 (mid-epoch 1)."""
    reference_dir, reference, args = cnn_run
    args = with_root(args, tmp_path) + ["callbacks.resume.every_n_train_steps=3"]
    env = {**ONE_THREAD, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}

    first = run_cli("train.py", *args, *signal_at(4, "SIGTERM"), cwd=tmp_path, env=env)
    assert first.returncode == 128 + signal.SIGTERM, first.stderr[-3000:]
    assert "SIGTERM received: saved" in first.stderr
    run_dir = only_run_dir(tmp_path)
    last = run_dir / "checkpoints" / "last.ckpt"
    # Saved because of the signal, at the end of the batch it arrived in: not a multiple of 3, not an epoch end.
    assert saved_step(last) in (4, 5)
    assert not (run_dir / "metrics.json").exists()

    second = run_cli("train.py", *args, *signal_at(11, "SIGKILL"), "ckpt_path=last", cwd=tmp_path, env=env)
    assert second.returncode == -signal.SIGKILL, second.stderr[-3000:]
    assert saved_step(last) == 9  # the step-interval checkpoint before the kill

    third = run_cli("train.py", *args, "ckpt_path=last", cwd=tmp_path, env=env)
    assert third.returncode == 0, third.stderr[-3000:]
    # Every resume continued in the first run's folder; the later Hydra folders only hold their config.
    runs = sorted((tmp_path / "logs" / "train" / "runs").iterdir())
    assert [r for r in runs if (r / "checkpoints").exists()] == [run_dir]
    resumed = json.loads((run_dir / "metrics.json").read_text())
    assert {k: resumed[k] for k in COMPARED} == {k: reference[k] for k in COMPARED}
    assert resumed["status"] == "completed"
    # test/* come from the epoch-1 checkpoint, written after both resumes: the comparison covers them too.
    assert Path(resumed["best_checkpoint"]).name == Path(reference["best_checkpoint"]).name == "epoch_001.ckpt"


def test_last_resolves_to_the_newest_run_and_resume_rejects_a_missing_file(tmp_path):
    from omegaconf import OmegaConf

    from gradlab.checkpoints.run_dirs import resolve_checkpoint
    from gradlab.errors import UserError

    runs = tmp_path / "logs" / "train" / "runs"
    for name, mtime in (("2024-01-01_00-00-00", 100), ("2024-01-02_00-00-00", 200)):
        (runs / name / ".hydra").mkdir(parents=True)
        ckpt = runs / name / "checkpoints" / "last.ckpt"
        ckpt.parent.mkdir()
        ckpt.write_bytes(b"x")
        os.utime(ckpt, (mtime, mtime))
    cfg = OmegaConf.create({"task_name": "train", "ckpt_path": "last",
                            "paths": {"log_dir": str(tmp_path / "logs"), "output_dir": str(tmp_path / "new")}})
    resolve_checkpoint(cfg)
    assert cfg.ckpt_path == str(runs / "2024-01-02_00-00-00" / "checkpoints" / "last.ckpt")
    assert cfg.paths.output_dir == str(runs / "2024-01-02_00-00-00")  # the run continues in its own folder

    cfg.ckpt_path = str(tmp_path / "nope.ckpt")
    with pytest.raises(UserError, match="nope.ckpt: no such file"):
        resolve_checkpoint(cfg)
    empty = OmegaConf.create({"task_name": "train", "ckpt_path": "last", "paths": {"log_dir": str(tmp_path / "x")}})
    with pytest.raises(UserError, match="ckpt_path=last: no run under"):
        resolve_checkpoint(empty)


def test_resumable_loader_restarts_at_the_saved_batch_of_the_same_epoch():
    """Against an independent reference: the batches of an uninterrupted epoch, from the same seeded order."""
    from gradlab.data.resumable import shuffled_loader

    data = torch.arange(50)
    full = shuffled_loader(data, batch_size=8, seed=3)
    full.sampler.set_epoch(2)
    expected = [b.tolist() for b in full]

    interrupted = shuffled_loader(data, batch_size=8, seed=3)
    interrupted.sampler.set_epoch(2)
    it = iter(interrupted)
    seen = [next(it).tolist() for _ in range(3)]
    state = interrupted.state_dict()
    assert state == {"epoch": 2, "served": 3}

    resumed = shuffled_loader(data, batch_size=8, seed=3)
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(2)
    assert seen + [b.tolist() for b in resumed] == expected
    # The next epoch starts from its beginning, in a different order.
    resumed.sampler.set_epoch(3)
    next_epoch = [b.tolist() for b in resumed]
    assert len(next_epoch) == len(expected) and next_epoch != expected
    assert sorted(sum(next_epoch, [])) == list(range(50))


def test_imdb_training_batches_resume_mid_epoch(tmp_path):
    """Bucketed, shuffled IMDB batches: the same epoch's order again, and the rest of it after a restore."""
    from gradlab.data.imdb import IMDBDataModule
    from helpers import write_aclimdb

    dm = IMDBDataModule(root=str(write_aclimdb(tmp_path, n_train=30, n_test=2)), download=False, val_size=10,
                        batch_size=4, bucket_batches=2, min_freq=1)
    dm.prepare_data()
    dm.setup("fit")

    def loader(epoch: int):
        made = dm.train_dataloader()
        made.batch_sampler.sampler.set_epoch(epoch)  # what Lightning does before every epoch
        return made

    expected = [b[0].tolist() for b in loader(1)]
    assert expected == [b[0].tolist() for b in loader(1)]
    assert expected != [b[0].tolist() for b in loader(2)]
    interrupted = loader(1)
    it = iter(interrupted)
    head = [next(it)[0].tolist() for _ in range(5)]
    resumed = loader(1)
    resumed.load_state_dict(interrupted.state_dict())
    assert head + [b[0].tolist() for b in resumed] == expected


def test_sigusr1_is_noted_passed_on_and_its_handler_restored(tmp_path):
    """SIGUSR1 takes the SIGTERM path (save at the end of the batch, then exit); a handler that was there before
    (Lightning's SLURM requeue) still runs, right after that save, and is back in place after training."""
    from types import SimpleNamespace

    from gradlab.checkpoints.resume import ResumeCheckpoint

    seen = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: seen.append(signum))
    try:
        before = signal.getsignal(signal.SIGUSR1)
        callback = ResumeCheckpoint(dirpath=str(tmp_path), signals=["SIGUSR1"])
        trainer = SimpleNamespace(fast_dev_run=False)
        callback.on_train_start(trainer, None)
        assert signal.getsignal(signal.SIGUSR1) != before
        os.kill(os.getpid(), signal.SIGUSR1)
        assert callback._received == signal.SIGUSR1 and seen == []  # put off to the end of the batch
        saved = []
        trainer = SimpleNamespace(fast_dev_run=False, sanity_checking=False, global_step=7, num_training_batches=10,
                                  current_epoch=0, is_global_zero=True,
                                  strategy=SimpleNamespace(reduce_boolean_decision=lambda decision, all: decision),
                                  save_checkpoint=lambda path, weights_only: saved.append((path, list(seen))))
        with pytest.raises(SystemExit) as stopped:
            callback.on_train_batch_end(trainer, None, None, None, batch_idx=3)
        # Our last.ckpt first, then Lightning's handler (its hpc checkpoint, from the same whole state; the requeue).
        assert saved == [(callback.path, [])] and seen == [signal.SIGUSR1]
        assert stopped.value.code == 128 + signal.SIGUSR1
        callback.on_train_end(trainer, None)
        assert signal.getsignal(signal.SIGUSR1) == before
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_each_rank_gets_its_own_rng_state_back():
    from types import SimpleNamespace

    from gradlab.checkpoints.resume import ResumeCheckpoint, _rng_for_rank, _rng_state

    states = []
    for seed in (11, 22):
        torch.manual_seed(seed)
        states.append(_rng_state())
    expected = [torch.rand(3, generator=torch.Generator().manual_seed(s)) for s in (11, 22)]
    saved = {"rng": states[0], "rng_per_rank": states}
    assert _rng_for_rank(saved, 2, 1) is states[1] and _rng_for_rank(saved, 2, 0) is states[0]
    assert _rng_for_rank(saved, 4, 1) is None  # another world size: no stream to give back
    assert _rng_for_rank({"rng": states[0]}, 1, 0) is states[0]  # a single-process checkpoint
    assert _rng_for_rank({"rng": states[0]}, 2, 1) is None
    for rank in (0, 1):
        callback = ResumeCheckpoint(dirpath="unused")
        callback.load_state_dict(saved)
        torch.manual_seed(999)
        callback.on_train_batch_start(SimpleNamespace(world_size=2, global_rank=rank), None, None, 0)
        torch.testing.assert_close(torch.rand(3), expected[rank])  # the stream of that rank's seed
