"""The cluster path on a real SLURM: sweeps, a CPU partition, DDP through srun, preemption and requeue.

    scripts/slurm_local.sh                        # as root: a one-node cluster on this machine (CI starts it)
    python -m pytest -q tests/test_slurm.py       # the tests marked slurm skip, with one reason, without a node

Every job goes through `python train.py -m hydra/launcher=slurm`, sbatch, srun and squeue, as a user's would.
"""

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

import helpers
from helpers import ROOT, run_cli

# A CPU node: no GPUs, one core and 1 GB per task (the launcher's defaults ask for a GPU node of 64 GB).
CPU_NODE = ["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=1",
            "hydra.launcher.mem_gb=1", "hydra.launcher.timeout_min=30"]
TOY = ["data=toy", "model=mlp", "callbacks.progress_bar=null", "callbacks.model_summary=null"]
# What a run's metrics.json holds that legitimately differs between two runs of the same training.
NOT_TRAINING = {"wall_time_s", "best_checkpoint", "overrides", "slurm"}  # and throughput (`*_per_sec`): timings


def _node_idle() -> bool:
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return any(state.strip() in ("idle", "mix") for state in out.splitlines())


@pytest.fixture(scope="session")
def slurm():
    """A SLURM node that takes jobs: the one already up (CI starts scripts/slurm_local.sh), else that script."""
    if not _node_idle() and shutil.which("slurmctld") and os.geteuid() == 0:
        subprocess.run([str(ROOT / "scripts" / "slurm_local.sh")], capture_output=True, timeout=300)
    if not _node_idle():
        pytest.skip("no idle SLURM node (sinfo): start one with scripts/slurm_local.sh (as root; it installs SLURM)")


def sweep_dir(out: Path) -> Path:
    (sweep,) = (out / "logs" / "train" / "multiruns").iterdir()
    return sweep


def metrics_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def training_metrics(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in NOT_TRAINING and not k.endswith("_per_sec")}


def start_cli(*args: str, cwd: Path, env: dict | None = None):
    """train.py in the background, as run_cli runs it (helpers.start_cli)."""
    return helpers.start_cli("train.py", *args, cwd=cwd, env=env)


def finish(proc: subprocess.Popen, timeout: int = 600) -> subprocess.CompletedProcess:
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        pytest.fail(f"train.py ran over {timeout} s:\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


# ---- no cluster needed: what is decided before anything is submitted ----------------------------------------
def test_cpu_node_gets_one_task_and_a_bad_launcher_value_stops_before_submitting(tmp_path):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=CPU_NODE, return_hydra_config=True)
        gpu = compose("train", overrides=["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=4"],
                      return_hydra_config=True)
    assert cfg.hydra.launcher.tasks_per_node == 1 and gpu.hydra.launcher.tasks_per_node == 4

    proc = run_cli("train.py", "-m", *CPU_NODE, *TOY, "hydra.launcher.tasks_per_node=0",
                   "hydra.launcher.signal_delay_s=3600", f"paths.root_dir={tmp_path}", "optimizer.lr=0.1,0.01",
                   cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "hydra.launcher.tasks_per_node=0: must be an integer >= 1" in proc.stderr
    assert "signal_delay_s=3600 is not less than hydra.launcher.timeout_min=30" in proc.stderr
    # no sweep dir, no .submitit folder, no file: nothing was submitted
    assert not [p for p in (tmp_path / "logs").rglob("*") if p.is_file() or p.parent.name == "multiruns"]


def test_job_states_from_squeue_keep_a_requeued_job_waited_for_and_see_a_vanished_one_ended():
    """The squeue lines the cluster prints (squeue --array --format=%i|%T|%N) as submitit's watcher reads them."""
    from hydra_plugins.gradlab_slurm_launcher.queue import SqueueWhenNoAccounting

    watcher = SqueueWhenNoAccounting()
    watcher._use_squeue = True  # what it decides when sacct fails
    for job_id in ("7_0", "7_1", "8"):
        watcher.register_job(job_id)
    watcher._info_dict.update(watcher.read_info(b"7_0|RUNNING|vm\n7_1|PENDING|\n"))
    assert not any(watcher.is_done(j, mode="cache") for j in ("7_0", "7_1", "8"))
    watcher._info_dict.update(watcher.read_info(b"7_1|REQUEUE_FED|vm\n"))  # 7_0 ended more than MinJobAge ago
    assert watcher.is_done("7_0", mode="cache")  # gone from squeue: ended (its result file says how)
    assert not watcher.is_done("7_1", mode="cache")  # on its way back to PENDING: still waited for
    assert not watcher.is_done("8", mode="cache")  # never listed yet: not taken for ended


# ---- on the cluster ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sweeps(slurm, tmp_path_factory):
    """Two 2-job sweeps on the CPU node, submitted together: one that works, one whose second job has a bad value."""
    good, bad = tmp_path_factory.mktemp("sweep_good"), tmp_path_factory.mktemp("sweep_bad")
    common = ["-m", *CPU_NODE, *TOY, "trainer.max_epochs=2"]
    procs = {out: start_cli(*common, f"paths.root_dir={out}", lr, cwd=out)
             for out, lr in ((good, "optimizer.lr=0.1,0.01"), (bad, "optimizer.lr=0.05,-1"))}
    return {out: finish(proc) for out, proc in procs.items()}, good, bad


@pytest.mark.slurm
@pytest.mark.slow
def test_sweep_runs_each_job_as_a_slurm_array_task_with_its_own_run_dir(sweeps):
    results, good, _ = sweeps
    proc = results[good]
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = sweep_dir(good)
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")) == ["0", "1"]
    ids = []
    for job, lr in (("0", "0.1"), ("1", "0.01")):
        metrics = metrics_of(sweep / job)
        assert metrics["status"] == "completed" and f"optimizer.lr={lr}" in metrics["overrides"]
        assert metrics["steps"] == 2 * 25  # 800 toy points / batch 32, 2 epochs
        ids.append(metrics["slurm"])
    # One job array: the same array job id, task ids 0 and 1, each task its own SLURM job id.
    assert ids[0]["array_job_id"] == ids[1]["array_job_id"]
    assert [i["array_task_id"] for i in ids] == [0, 1] and ids[0]["job_id"] != ids[1]["job_id"]
    # submitit's folder is named by the array job id (what squeue and scancel take).
    assert (sweep / ".submitit" / f"{ids[0]['array_job_id']}_0").is_dir()
    # Quiet: no sacct warnings per poll, and one line saying where job states come from.
    console = proc.stdout + proc.stderr
    assert "Bypassing sacct error" not in console and "sacct" not in proc.stderr
    assert console.count("job states come from squeue") == 1


@pytest.mark.slurm
@pytest.mark.slow
def test_a_job_with_a_bad_value_is_recorded_failed_while_the_other_completes(sweeps):
    results, _, bad = sweeps
    proc = results[bad]
    assert proc.returncode == 1  # Hydra re-raises the failure once every job has run
    assert "optimizer.lr=-1: must be a number > 0" in proc.stderr and "Traceback" not in proc.stderr
    assert "error: error:" not in proc.stderr  # the job's error came back from the cluster once, unmangled
    sweep = sweep_dir(bad)
    ok, failed = metrics_of(sweep / "0"), metrics_of(sweep / "1")
    assert ok["status"] == "completed" and "val/acc" in ok
    assert failed["status"] == "failed" and "optimizer.lr=-1: must be a number > 0" in failed["error"]
    assert failed["slurm"]["array_task_id"] == 1 and failed["slurm"]["array_job_id"] == ok["slurm"]["array_job_id"]


@pytest.mark.slurm
@pytest.mark.slow
def test_ddp_through_srun_equals_a_local_two_process_run(slurm, tmp_path):
    """2 srun tasks, gloo: Lightning's SLURM environment gives the ranks; the result is the local trainer=ddp_cpu's."""
    on_slurm, local = tmp_path / "slurm", tmp_path / "local"
    on_slurm.mkdir(), local.mkdir()
    run = [*TOY, "trainer=ddp_cpu", "trainer.max_epochs=2", "seed=3"]
    proc = start_cli("-m", *CPU_NODE, "hydra.launcher.tasks_per_node=2", *run, f"paths.root_dir={on_slurm}",
                     cwd=on_slurm)
    ref = run_cli("train.py", *run, f"paths.root_dir={local}", cwd=local, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    proc = finish(proc)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = sweep_dir(on_slurm)
    assert [p.name for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")] == ["0"]
    assert len(list(sweep.rglob("metrics.json"))) == 1 and not (on_slurm / "logs" / "train" / "runs").exists()
    (job_folder,) = [p for p in (sweep / ".submitit").iterdir() if p.is_dir()]
    logs = "".join(p.read_text() for p in job_folder.glob("*_log.*"))
    assert "global_rank=1(2)" in logs and "MEMBER: 2/2" in logs  # two srun tasks, one process group
    (ref_dir,) = (local / "logs" / "train" / "runs").iterdir()
    ddp, single_node = metrics_of(sweep / "0"), metrics_of(ref_dir)
    assert ddp["status"] == "completed" and ddp["steps"] == 2 * 13  # 400 points per rank / 32
    assert training_metrics(ddp) == training_metrics(single_node)


@pytest.mark.slurm
@pytest.mark.slow
def test_preempted_job_checkpoints_is_requeued_and_resumes_to_the_uninterrupted_result(slurm, tmp_path):
    """scancel --signal=USR1 --full mid-training: Lightning's HPC checkpoint and `scontrol requeue`; the same job
    runs again in the same dir, fit resumes, and metrics.json is the one of a run never interrupted."""
    on_slurm, local = tmp_path / "slurm", tmp_path / "local"
    on_slurm.mkdir(), local.mkdir()
    run = [*TOY, "trainer.max_epochs=10", "seed=5"]
    proc = start_cli("-m", *CPU_NODE, *run, f"paths.root_dir={on_slurm}", cwd=on_slurm)
    ref = start_cli(*run, f"paths.root_dir={local}", cwd=local)
    deadline = time.monotonic() + 540
    run_dir = None
    while time.monotonic() < deadline and proc.poll() is None:
        found = list(on_slurm.glob("logs/train/multiruns/*/0/checkpoints/epoch_000.ckpt"))
        if found:  # the first epoch is done: fit is under way
            run_dir = found[0].parents[1]
            break
        time.sleep(0.2)
    assert run_dir is not None, finish(proc).stderr[-3000:]
    (job_id,) = [p.name for p in (run_dir.parent / ".submitit").iterdir() if p.name.isdigit()]
    subprocess.run(["scancel", "--signal=USR1", "--full", job_id], check=True)
    proc, ref = finish(proc), finish(ref)
    assert proc.returncode == 0 and ref.returncode == 0, proc.stderr[-3000:] + ref.stderr[-3000:]

    metrics = metrics_of(run_dir)
    assert metrics["slurm"]["job_id"] == int(job_id) and metrics["slurm"]["restart_count"] == 1  # requeued once
    assert list(run_dir.glob("hpc_ckpt_*.ckpt"))
    # Lightning's log lines go where Hydra's logging prints them: the job's stdout
    log = "".join((run_dir.parent / ".submitit" / job_id / f"{job_id}_0_log.{kind}").read_text() for kind in ("out", "err"))
    assert "Requeued SLURM job" in log or "requeing job" in log
    assert "Restoring states from the checkpoint path at" in log and "hpc_ckpt_1.ckpt" in log
    (ref_dir,) = (local / "logs" / "train" / "runs").iterdir()
    assert metrics["steps"] == 10 * 25
    assert training_metrics(metrics) == training_metrics(metrics_of(ref_dir))


@pytest.mark.slurm
@pytest.mark.slow
def test_a_cancelled_array_task_is_the_only_one_resubmitted_when_the_sweep_resumes(slurm, tmp_path):
    """A 2-task array; task 1 is cancelled after its first epoch and the sweep ends in error once task 0 has
    finished. The same command plus +sweep.resume=true submits job 1 alone, which goes on from its checkpoint in
    its folder; job 0 is not submitted again."""
    sweep = tmp_path / "sweep"
    args = ["-m", *CPU_NODE, *TOY, "trainer.max_epochs=20", "seed=5", f"paths.root_dir={tmp_path}",
            f"hydra.sweep.dir={sweep}", "optimizer.lr=0.1,0.05"]
    proc = start_cli(*args, cwd=tmp_path)
    deadline = time.monotonic() + 540
    while time.monotonic() < deadline and proc.poll() is None:
        if (sweep / "1" / "checkpoints" / "epoch_000.ckpt").exists():
            break
        time.sleep(0.2)
    tasks = [p.name for p in (sweep / ".submitit").glob("*_1")]
    assert len(tasks) == 1, finish(proc).stderr[-3000:]
    subprocess.run(["scancel", tasks[0]], check=True)
    first = finish(proc)
    assert first.returncode != 0  # submitit reports the cancelled task once task 0 has finished
    assert metrics_of(sweep / "0")["status"] == "completed"
    assert not (sweep / "1" / "metrics.json").exists() or metrics_of(sweep / "1")["status"] != "completed"
    job0 = (sweep / "0" / "metrics.json").read_bytes()

    resumed = finish(start_cli(*args, "+sweep.resume=true", cwd=tmp_path))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    job1 = metrics_of(sweep / "1")
    assert job1["status"] == "completed" and job1["steps"] == 20 * 25
    # One job was submitted, job 1, as a new SLURM job; job 0 was not run again (its metrics.json is untouched).
    launched = [line for line in (resumed.stdout + resumed.stderr).splitlines() if "\t#" in line]
    assert len(launched) == 1 and "\t#1 : " in launched[0] and "optimizer.lr=0.05" in launched[0], launched
    assert (sweep / "0" / "metrics.json").read_bytes() == job0
    new_id = job1["slurm"]["job_id"]
    assert new_id not in (json.loads(job0)["slurm"]["array_job_id"], json.loads(job0)["slurm"]["job_id"])
    log = "".join(p.read_text() for p in (sweep / ".submitit").glob(f"{new_id}*/*_log.*"))  # submitit's job logs
    assert f"Resuming from {sweep / '1' / 'checkpoints'}" in log
    state = json.loads((sweep / "sweep_state.json").read_text())
    assert state["launches"][-1]["jobs"] == {"0": "skipped", "1": "resumed"}
