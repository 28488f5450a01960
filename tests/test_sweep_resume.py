"""Sweeps killed for real (SIGKILL to the sweep's whole process group) and resumed with +sweep.resume=true: the
resumed sweep ends with the results of the sweep that was never interrupted. Tiny MLP runs on tiny IDX data."""

import csv
import json
import os
import resource
import shlex
import signal
import time
from pathlib import Path

import optuna
import pytest
import torch
import yaml

from helpers import load_script, run_cli, start_cli, tiny_mnist_args

sweep_report = load_script("sweep_report")

TESTS = Path(__file__).resolve().parent
ENV = {"PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
# The test callback that holds a chosen job at a chosen step until the test kills the sweep (tests/faults.py). It
# is in every command, so that the sweep killed and the sweep resumed have the same overrides.
HOLD = ["+callbacks.zz_hold._target_=faults.HoldAtStep", "+callbacks.zz_hold.output_dir=${paths.output_dir}"]
FAST = ["callbacks.grad_noise=null", "trainer.log_every_n_steps=1"]
COMPARED = ("train/loss", "val/loss", "val/acc", "val/acc_best", "test/loss", "test/acc", "epochs", "steps",
            "overrides", "status")


def start_and_kill(args: list[str], cwd: Path, job: str, step: int) -> None:
    """Starts `train.py args` in a process group of its own; once job folder `job` holds at optimizer step `step`,
    SIGKILLs the whole group (the sweep process and any child), as a power cut or `scancel` would."""
    marker = cwd / "held"
    proc = start_cli("train.py", *args, cwd=cwd, env={**ENV, "GRADLAB_TEST_HOLD": f"{job}:{step}:{marker}"},
                     new_session=True)
    deadline = time.monotonic() + 300
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    stdout, stderr = proc.communicate()
    assert marker.exists(), (stdout + stderr)[-3000:]
    assert proc.returncode == -signal.SIGKILL


def timed(*args, cwd: Path):
    """Runs train.py; (the finished process, its wall time, its CPU time: user + system, in seconds)."""
    start, before = time.monotonic(), resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = run_cli("train.py", *args, cwd=cwd, env=ENV, timeout=600)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, time.monotonic() - start, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def metrics_of(job_dir: Path) -> dict:
    return json.loads((job_dir / "metrics.json").read_text())


def snapshot(folder: Path) -> dict:
    """Every file under `folder` with its bytes and modification time."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))
            if p.is_file()}


def launches(sweep: Path) -> list[dict]:
    return json.loads((sweep / "sweep_state.json").read_text())["launches"]


@pytest.mark.slow
def test_killed_grid_resumes_only_its_unfinished_jobs_to_the_uninterrupted_metrics(mnist_root, tmp_path, capsys):
    """4 jobs of 14 steps (2 epochs), last.ckpt every 3 steps. The sweep is killed in job 3 (folder 2) after step
    11, so job 3 continues from step 9 (mid-epoch 1) and job 4 has never started."""
    args = [*tiny_mnist_args(mnist_root, tmp_path), *FAST, "model=mlp", "optimizer=sgd", "trainer.max_epochs=2",
            "callbacks.resume.every_n_train_steps=3", *HOLD, "optimizer.lr=0.2,0.1,0.05,0.02"]
    reference, fresh_s, fresh_cpu = timed("-m", *args, f"hydra.sweep.dir={tmp_path / 'reference'}", cwd=tmp_path)

    sweep = tmp_path / "sweep"
    start_and_kill(["-m", *args, f"hydra.sweep.dir={sweep}"], tmp_path, job="2", step=11)
    assert [metrics_of(sweep / j)["status"] for j in ("0", "1")] == ["completed", "completed"]
    assert torch.load(sweep / "2" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 9
    assert not (sweep / "2" / "metrics.json").exists() and not (sweep / "3").exists()

    # A changed sweep stops, naming the difference, and so does a rerun without the flag: nothing is touched.
    before = snapshot(sweep)
    changed = run_cli("train.py", "-m", *args[:-1], "optimizer.lr=0.2,0.1,0.05", "trainer.max_epochs=3",
                      f"hydra.sweep.dir={sweep}", "+sweep.resume=true", cwd=tmp_path, env=ENV)
    assert changed.returncode == 2
    assert "optimizer.lr: 0.2,0.1,0.05,0.02 in the sweep, 0.2,0.1,0.05 now" in changed.stderr
    assert "trainer.max_epochs: 2 in the sweep, 3 now" in changed.stderr
    again = run_cli("train.py", "-m", *args, f"hydra.sweep.dir={sweep}", cwd=tmp_path, env=ENV)
    assert again.returncode == 2 and "already holds a sweep" in again.stderr and "+sweep.resume=true" in again.stderr
    assert snapshot(sweep) == before

    # The report says what is left and prints the command that resumes the sweep: the one run next.
    assert sweep_report.main([str(sweep), "--todo"]) == 0
    left = capsys.readouterr().out
    assert "2 of 4 jobs completed; 2 to run." in left
    assert "  2: resumes from its checkpoint: " in left and "  3: not started: " in left
    command = shlex.split(left.split("Resume with:\n")[1])
    assert command[:2] == ["python", "train.py"] and command[-2:] == [f"hydra.sweep.dir={sweep}", "+sweep.resume=true"]

    finished = {j: snapshot(sweep / j) for j in ("0", "1")}
    resumed, resume_s, resume_cpu = timed(*command[2:], cwd=tmp_path)
    output = resumed.stdout + resumed.stderr
    assert "Launching 2 jobs locally" in output
    assert f"Resuming from {sweep / '2' / 'checkpoints' / 'last.ckpt'}" in output
    assert launches(sweep)[-1]["jobs"] == {"0": "skipped", "1": "skipped", "2": "resumed", "3": "new"}
    assert {j: snapshot(sweep / j) for j in ("0", "1")} == finished  # skipped: not a byte rewritten
    for job in ("0", "1", "2", "3"):
        got, want = metrics_of(sweep / job), metrics_of(tmp_path / "reference" / job)
        assert {k: got[k] for k in COMPARED} == {k: want[k] for k in COMPARED}, job
    assert sweep_report.main([str(sweep), "--out", str(tmp_path)]) == 0
    with open(tmp_path / "sweep_report.csv") as f:
        assert {r["job"]: r["resume"] for r in csv.DictReader(f)} == launches(sweep)[-1]["jobs"]
    # Startup (Python, torch, Lightning) is paid by both; the jobs skipped are not. CPU time, not wall time: on a
    # shared machine the load can change between the two runs (both are printed).
    print(f"fresh sweep {fresh_s:.1f} s ({fresh_cpu:.1f} CPU-s), resume {resume_s:.1f} s ({resume_cpu:.1f} CPU-s)")
    assert resume_cpu < fresh_cpu, (resume_cpu, fresh_cpu)


def optuna_trials(sweep: Path) -> list[optuna.trial.FrozenTrial]:
    state = json.loads((sweep / "sweep_state.json").read_text())
    return optuna.load_study(study_name=state["study_name"], storage=state["storage"]).trials


@pytest.mark.slow
def test_killed_optuna_study_retries_its_dead_trial_and_ends_as_the_uninterrupted_one(mnist_root, tmp_path):
    """8 trials of TPE (seeded, modelling from the 4th trial on), killed while trial 4 (folder 3) runs, after
    its step-2 last.ckpt. The resume marks it FAIL, retries its values first from that checkpoint and runs 4 more."""
    args = ["hparams_search=mlp_optuna", "hydra.sweeper.n_trials=8", "hydra.sweeper.sampler.n_startup_trials=3",
            "optimized_metric=val/loss", "hydra.sweeper.direction=minimize", "model.hidden=[32]",
            "model.activation=relu", "model.batch_norm=false", "test=false",
            *tiny_mnist_args(mnist_root, tmp_path), *FAST, "trainer.max_epochs=1",
            "callbacks.resume.every_n_train_steps=2", *HOLD]
    timed(*args, f"hydra.sweep.dir={tmp_path / 'reference'}", cwd=tmp_path)
    sweep = tmp_path / "sweep"
    start_and_kill([*args, f"hydra.sweep.dir={sweep}"], tmp_path, job="3", step=3)
    states = [t.state for t in optuna_trials(sweep)]
    assert states == [optuna.trial.TrialState.COMPLETE] * 3 + [optuna.trial.TrialState.RUNNING]

    resumed, _, _ = timed(*args, f"hydra.sweep.dir={sweep}", "+sweep.resume=true", cwd=tmp_path)
    assert f"Resuming from {sweep / '3' / 'checkpoints' / 'last.ckpt'}" in resumed.stdout + resumed.stderr
    trials = optuna_trials(sweep)
    dead = trials[3]
    assert dead.state == optuna.trial.TrialState.FAIL and "sweep process died" in dead.user_attrs["interrupted"]
    retry = trials[4]
    assert retry.params == dead.params and retry.user_attrs["retry_of"] == 3 and retry.user_attrs["job_dir"] == "3"
    finished = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(trials) == 9 and len(finished) == 8  # n_trials: the finished ones; the killed one does not count

    reference = optuna_trials(tmp_path / "reference")
    assert [(t.params, t.value) for t in finished] == [(t.params, t.value) for t in reference]
    assert sorted(p.name for p in sweep.iterdir() if p.name.isdigit()) == [str(i) for i in range(8)]
    for t in finished:  # each trial's value is its job's metrics.json
        assert metrics_of(sweep / t.user_attrs["job_dir"])["val/loss"] == t.value
    results = [yaml.safe_load((s / "optimization_results.yaml").read_text()) for s in (sweep, tmp_path / "reference")]
    assert results[0]["best_value"] == results[1]["best_value"]
    assert results[0]["best_params"] == results[1]["best_params"]


def test_jobs_match_on_overrides_and_a_new_job_never_takes_another_jobs_folder():
    from gradlab.checkpoints.sweeps import JobDir
    from hydra_plugins.gradlab_grid_sweeper.grid_sweeper import plan_jobs

    grid = [["a=1", "b=1"], ["a=1", "b=2"], ["a=2", "b=1"], ["a=2", "b=2"]]
    # The sweep was started as `b=1,2 a=1,2`: its folders hold other jobs than this order's numbers say.
    found = [JobDir("0", ["b=1", "a=1"], {"status": "completed"}), JobDir("1", ["b=1", "a=2"], {}, checkpoint=True),
             JobDir("2", ["b=2", "a=1"], {"status": "failed"})]
    plan = plan_jobs(grid, found, planned=[])
    assert [(d, action) for _, d, action in plan] == [("0", "skipped"), ("2", "new"), ("1", "resumed"), ("3", "new")]
    planned = [{"dir": "3", "overrides": ["b=2", "a=2"]}]
    assert plan_jobs(grid, found[:1], planned)[3][1:] == ("3", "new")  # the folder it was planned in
    # Folder 3 planned for another job: the job never started takes the next free number.
    other = [{"dir": "3", "overrides": ["a=9"]}]
    assert [d for _, d, _ in plan_jobs(grid, found, other)] == ["0", "2", "1", "4"]


def test_a_sweep_without_a_state_file_is_compared_through_its_multirun_yaml(tmp_path):
    """A sweep started before sweep_state.json existed: Hydra's multirun.yaml holds its overrides and params (with
    ${...} text kept as written); the flag of an earlier resume is not part of the sweep."""
    from gradlab.checkpoints.sweeps import check_same_sweep, definition
    from gradlab.errors import UserError

    overrides = ["model=mlp", "optimizer.lr=0.1,0.01", "+callbacks.x.dir=${paths.output_dir}", "+sweep.resume=true"]
    (tmp_path / "multirun.yaml").write_text(yaml.safe_dump(
        {"hydra": {"sweeper": {"params": {"seed": "1,2"}}, "overrides": {"task": overrides, "hydra": []}}}))
    same = definition({"seed": "1,2"}, ["optimizer.lr=0.1,0.01", "+callbacks.x.dir=${paths.output_dir}", "model=mlp"])
    check_same_sweep(str(tmp_path), same)
    with pytest.raises(UserError) as err:
        check_same_sweep(str(tmp_path), definition({"seed": "1,2,3"}, overrides[:2]))
    assert "seed: 1,2 in the sweep, 1,2,3 now" in str(err.value)
    assert "+callbacks.x.dir: ${paths.output_dir} in the sweep, (not set) now" in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["multirun.yaml"]


class Died(BaseException):
    """The sweep process dying mid-trial (nothing after it runs, as after a SIGKILL)."""


def test_optuna_sweeper_counts_finished_trials_retries_the_dead_one_and_proposes_the_same_points(tmp_path):
    """The sweeper's own loop, with a launcher that scores the overrides at once (no training): 8 trials of seeded
    TPE, against the same study killed in its 5th trial and resumed by a new sweeper."""
    from hydra.core.utils import JobReturn, JobStatus
    from omegaconf import OmegaConf

    from hydra_plugins.gradlab_optuna_sweeper.optuna_sweeper import OptunaSweeper

    class ScoringLauncher:
        def __init__(self, die_at=None):
            self.calls, self.die_at = 0, die_at

        def launch(self, batch, initial_job_idx):
            self.calls += 1
            if self.calls == self.die_at:
                raise Died()
            values = [dict(o.split("=", 1) for o in job if not o.startswith(("hydra.", "++hydra."))) for job in batch]
            return [JobReturn(overrides=job, status=JobStatus.COMPLETED,
                              _return_value=-(float(v["lr"]) - 0.3) ** 2 - (float(v["m"]) - 0.6) ** 2)
                    for job, v in zip(batch, values)]

    def sweeper(sweep_dir, launcher):
        params = {"lr": "interval(0.0, 1.0)", "m": "interval(0.0, 1.0)"}
        sampler = {"_target_": "optuna.samplers.TPESampler", "seed": 7, "n_startup_trials": 3}
        cfg = OmegaConf.create({"optimized_metric": "val/acc", "hydra": {
            "sweep": {"dir": str(sweep_dir)}, "sweeper": {"sampler": sampler, "params": params},
            "overrides": {"task": [], "hydra": []}}})
        made = OptunaSweeper(sampler=optuna.samplers.TPESampler(seed=7), n_trials=8, params=OmegaConf.create(params))
        made.config, made.launcher, made.sampler_cfg = cfg, launcher, cfg.hydra.sweeper.sampler
        made.validate_batch_is_legal = lambda batch: None  # no Hydra config loader here
        return made

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sweeper(tmp_path / "reference", ScoringLauncher()).sweep([])
    with pytest.raises(Died):
        sweeper(tmp_path / "sweep", ScoringLauncher(die_at=5)).sweep([])
    sweeper(tmp_path / "sweep", ScoringLauncher()).sweep(["+sweep.resume=true"])

    trials, reference = optuna_trials(tmp_path / "sweep"), optuna_trials(tmp_path / "reference")
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4 + ["FAIL"] + ["COMPLETE"] * 4
    assert "interrupted" in trials[4].user_attrs and trials[5].user_attrs["retry_of"] == 4
    assert trials[5].params == trials[4].params
    finished = [t for t in trials if t.state.name == "COMPLETE"]
    assert [(t.params, t.value) for t in finished] == [(t.params, t.value) for t in reference]
    # Trials 4-7 are TPE's (3 random ones first): the modelled points too are the uninterrupted study's.
    assert len({t.params["lr"] for t in reference}) == 8
    state = json.loads((tmp_path / "sweep" / "sweep_state.json").read_text())
    assert [launch["resume"] for launch in state["launches"]] == [False, True]
