"""Every run and every sweep gets its own folder, even when many start in the same second.

The runs below start at once with the clock frozen to one second (tests/frozen_clock/sitecustomize.py), so that
every one of them asks for the same name: only the exclusive mkdir in gradlab.checkpoints.run_dirs.claim_dir tells them apart.
"""

import json
import os
import subprocess
import threading
from pathlib import Path

import pytest
import yaml

from conftest import ONE_THREAD
from helpers import run_cli, start_cli

TESTS = Path(__file__).resolve().parent
STAMP = "2026-12-01_10-00-00"
TOY = ["experiment=toy_xor", "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
       "trainer.limit_test_batches=1", "data.n_train=64", "data.n_val=32", "data.n_test=32", "logger=csv",
       "callbacks.progress_bar=null", "callbacks.model_summary=null",
       "callbacks.grad_norm=null"]


def frozen_env() -> dict:
    return {**ONE_THREAD, "PYTHONPATH": os.pathsep.join([str(TESTS / "frozen_clock"), os.environ.get("PYTHONPATH", "")]),
            "GRADLAB_FROZEN_STAMP": STAMP}


def start_all(commands: list[list[str]], cwd: Path) -> list[subprocess.CompletedProcess]:
    procs = [start_cli("train.py", *args, cwd=cwd, env=frozen_env()) for args in commands]
    out = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        out.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    return out


def expected_names(n: int) -> list[str]:
    return [STAMP] + [f"{STAMP}_{i:02d}" for i in range(1, n)]


def test_claims_in_the_same_second_get_distinct_names_in_claim_order(tmp_path, monkeypatch):
    from gradlab.checkpoints.run_dirs import claim_dir

    real = __import__("time").strftime
    monkeypatch.setattr("time.strftime", lambda fmt, *a: STAMP if fmt == "%Y-%m-%d_%H-%M-%S" and not a else real(fmt, *a))
    got, start = [], threading.Barrier(24)

    def claim():
        start.wait()
        got.append(claim_dir(str(tmp_path / "runs")))

    threads = [threading.Thread(target=claim) for _ in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    names = sorted(os.path.basename(p) for p in got)
    assert names == expected_names(24) == sorted(os.listdir(tmp_path / "runs"))  # 24 folders, none shared
    assert sorted(names + ["2026-12-01_10-00-01"])[-1] == "2026-12-01_10-00-01"  # the next second sorts after all
    # A given name (the SLURM job id) is shared by every rank, and by the requeued job: never suffixed.
    assert claim_dir(str(tmp_path / "runs"), "4242") == claim_dir(str(tmp_path / "runs"), "4242")


def test_an_unwritable_log_dir_fails_before_anything_starts(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    proc = run_cli("train.py", *TOY, f"paths.log_dir={blocker}/logs", cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"Cannot create a run folder under {blocker}/logs/train/runs" in proc.stderr
    assert "paths.log_dir" in proc.stderr and "Traceback" not in proc.stderr
    assert "Epoch" not in proc.stdout + proc.stderr


@pytest.mark.slow
def test_eight_runs_started_at_once_get_eight_folders_each_with_its_own_results(tmp_path):
    seeds = list(range(1, 9))
    results = start_all([[*TOY, f"seed={s}", f"paths.root_dir={tmp_path}"] for s in seeds], tmp_path)
    for proc in results:
        assert proc.returncode == 0, proc.stderr[-3000:]
    runs = tmp_path / "logs" / "train" / "runs"
    assert sorted(p.name for p in runs.iterdir()) == expected_names(8)
    seen = {}
    for run in runs.iterdir():
        metrics = json.loads((run / "metrics.json").read_text())
        (seed,) = [o for o in metrics["overrides"] if o.startswith("seed=")]
        assert yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text()) == metrics["overrides"]
        assert metrics["status"] == "completed"
        # Its own checkpoints and logs: the best checkpoint lies in its own folder.
        assert Path(metrics["best_checkpoint"]).parent == run / "checkpoints"
        assert len(list((run / "csv").rglob("metrics.csv"))) == 1
        seen[seed] = run.name
    assert sorted(seen) == sorted(f"seed={s}" for s in seeds)


@pytest.mark.slow
def test_two_sweeps_started_at_once_get_two_sweep_folders(tmp_path):
    results = start_all([["-m", *TOY, "seed=1,2", f"optimizer.lr={lr}", f"paths.root_dir={tmp_path}"]
                         for lr in (0.1, 0.2)], tmp_path)
    for proc in results:
        assert proc.returncode == 0, proc.stderr[-3000:]
    sweeps = tmp_path / "logs" / "train" / "multiruns"
    assert sorted(p.name for p in sweeps.iterdir()) == expected_names(2)
    lrs = set()
    for sweep in sweeps.iterdir():
        jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
        assert jobs == ["0", "1"]
        overrides = [json.loads((sweep / j / "metrics.json").read_text())["overrides"] for j in jobs]
        assert [[x for x in o if x.startswith("seed=")] for o in overrides] == [["seed=1"], ["seed=2"]]
        (lr,) = {x for o in overrides for x in o if x.startswith("optimizer.lr=")}
        lrs.add(lr)
    assert lrs == {"optimizer.lr=0.1", "optimizer.lr=0.2"}  # one sweep per folder, not mixed
    # No stray run folders: a multirun claims only its sweep dir.
    assert not (tmp_path / "logs" / "train" / "runs").exists()
