"""Across a node boundary: DDP over two SLURM nodes, sweeps of 2-node jobs, and what is decided before submitting.

    scripts/slurm_local.sh --nodes 2                 # as root: nodes n1, n2 in network namespaces (CI starts it)
    python -m pytest -q tests/test_slurm_nodes.py    # the tests marked slurm skip, with one reason, without it

The cluster is found through SLURM_CONF=/tmp/gradlab-slurm2/slurm.conf (beside the one-node cluster, which stays
/etc/slurm's). Each node is its own network namespace with its own hostname and address (10.77.0.11, .12): gloo's
traffic between the ranks crosses a veth pair and a bridge, as it would cross a switch.
"""

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from helpers import ROOT, run_cli
from test_slurm import CPU_NODE, TOY, finish, metrics_of, start_cli, sweep_dir, training_metrics

CONF = "/tmp/gradlab-slurm2/slurm.conf"
ENV = {"SLURM_CONF": CONF}
TWO_NODES = [*CPU_NODE, "hydra.launcher.nodes=2", "trainer=ddp_cpu"]


def _nodes_idle() -> set[str]:
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-t", "idle,mix", "-o", "%N"], capture_output=True, text=True,
                             timeout=30, env={**os.environ, **ENV}).stdout
    except (OSError, subprocess.SubprocessError):
        return set()
    return set(out.split())


@pytest.fixture(scope="session")
def two_nodes():
    """Nodes n1 and n2 taking jobs: the cluster already up (CI starts it), else scripts/slurm_local.sh --nodes 2."""
    if _nodes_idle() != {"n1", "n2"} and shutil.which("slurmctld") and os.geteuid() == 0:
        subprocess.run([str(ROOT / "scripts" / "slurm_local.sh"), "--nodes", "2"], capture_output=True, timeout=300)
    if _nodes_idle() != {"n1", "n2"}:
        pytest.skip(f"no idle two-node SLURM cluster ({CONF}): start it with scripts/slurm_local.sh --nodes 2 (root)")


def task_logs(sweep: Path, job: str) -> str:
    """Every task's stdout and stderr of sweep job `job` (submitit: .submitit/<array id>_<job>/*_<task>_log.*)."""
    (folder,) = [p for p in (sweep / ".submitit").iterdir() if p.name.endswith(f"_{job}")]
    return "".join(p.read_text() for p in sorted(folder.glob("*_log.*")))


@pytest.mark.slurm
@pytest.mark.slow
def test_ddp_across_two_nodes_equals_one_node_two_processes_and_each_sweep_job_has_its_own_dir_and_port(
        two_nodes, tmp_path):
    """A 2-job sweep of 2-node jobs, one task per node (gloo over the bridge). Job 0's metrics.json equals a local
    2-process trainer=ddp_cpu run with the same seed and global batch (2 x 32); on every node the rank names the
    same run dir, seed and master, and the two shards are disjoint halves of the data."""
    on_slurm, local = tmp_path / "slurm", tmp_path / "local"
    on_slurm.mkdir(), local.mkdir()
    run = [*TOY, "trainer=ddp_cpu", "trainer.max_epochs=2", "seed=3"]
    proc = start_cli("-m", *TWO_NODES, *run, "optimizer.lr=0.1,0.05", f"paths.root_dir={on_slurm}", cwd=on_slurm,
                     env=ENV)
    ref = run_cli("train.py", *run, "optimizer.lr=0.1", f"paths.root_dir={local}", cwd=local, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    proc = finish(proc)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = sweep_dir(on_slurm)
    (ref_dir,) = (local / "logs" / "train" / "runs").iterdir()
    ddp = metrics_of(sweep / "0")
    assert ddp["status"] == "completed" and ddp["steps"] == 2 * 13  # 400 points per rank / 32
    assert training_metrics(ddp) == training_metrics(metrics_of(ref_dir))

    masters = []
    for job in ("0", "1"):
        assert metrics_of(sweep / job)["status"] == "completed"
        logs = task_logs(sweep, job)
        ranks = {m[0]: m[1:] for m in re.findall(r"rank (\d)/2 on (n\d) \(local rank 0\): run dir (\S+), seed 3, "
                                                 r"master (\S+), train shard 400 of 800 samples", logs)}
        assert sorted(ranks) == ["0", "1"], logs[-3000:]
        # rank 0 on one node, rank 1 on the other; both in this job's own dir, with one master
        assert {ranks["0"][0], ranks["1"][0]} == {"n1", "n2"}
        assert ranks["0"][1:] == ranks["1"][1:] and ranks["0"][1] == str((sweep / job).resolve())
        assert "train shards 400+400 of 800 samples, 800 distinct" in logs  # disjoint halves
        masters.append(ranks["0"][2])
    # MASTER_ADDR is the job's first node; the port comes from the job id, so two jobs running at once differ
    assert masters[0] != masters[1] and all(m.split(":")[0] in ("n1", "n2") for m in masters)


# ---- a job that can never start, one that is cancelled: no cluster needed for the rules -----------------------
def test_pending_reasons_that_never_clear_are_told_from_those_that_do():
    from hydra_plugins.gradlab_slurm_launcher.waiting import never_clears

    for reason in ("PartitionConfig", "PartitionNodeLimit", "PartitionTimeLimit", "BadConstraints",
                   "ReqNodeNotAvail, UnavailableNodes:n2", "AssocMaxCpuPerJobLimit", "QOSMaxNodePerJobLimit",
                   # squeue's %r for ReqNodeNotAvail
                   "Nodes required for job are DOWN, DRAINED or reserved for jobs in higher priority partitions"):
        assert never_clears(reason), reason
    for reason in ("Priority", "Resources", "BeginTime", "JobHeldUser", "AssocGrpCpuLimit", "AssocMaxJobsLimit",
                   "None", ""):
        assert never_clears(reason) is None, reason
    # the reason comes with the states, from squeue (no accounting) or sacct
    from hydra_plugins.gradlab_slurm_launcher.queue import SqueueWhenNoAccounting

    for use_squeue, column in ((True, "--format=%i|%T|%N|%r"), (False, "JobID,State,NodeList,Reason")):
        watcher = SqueueWhenNoAccounting()
        watcher._use_squeue = use_squeue
        watcher.register_job("5_0")
        assert column in watcher._make_command()


class _Job:
    """What wait_for uses of a submitit Job: its id, done(), its result file and results()."""

    def __init__(self, job_id: str, done_at: int, tmp_path: Path, result=None):
        self.job_id, self.done_at, self.polls, self.result = job_id, done_at, 0, result
        self.paths = type("Paths", (), {"result_pickle": tmp_path / f"{job_id}_result.pkl"})()

    def done(self):
        self.polls += 1
        return self.polls >= self.done_at

    def results(self):
        return [self.result]


def test_waiting_prints_pending_reasons_every_few_minutes_and_records_a_cancelled_job(tmp_path, caplog):
    """Job 7_0 pends (Resources) for 5 fake minutes, then completes; 7_1 is cancelled from outside at once."""
    import logging

    from hydra.core.utils import JobReturn, JobStatus

    from hydra_plugins.gradlab_slurm_launcher.waiting import JobCancelled, wait_for

    now = [0.0]
    done = JobReturn(overrides=["optimizer.lr=0.1"], status=JobStatus.COMPLETED, _return_value=0.9)
    jobs = [_Job("7_0", done_at=6, tmp_path=tmp_path, result=done), _Job("7_1", done_at=1, tmp_path=tmp_path)]
    jobs[0].paths.result_pickle.write_text("")  # its result file exists once done

    class Watcher:
        def get_info(self, job_id, mode):
            if job_id == "7_1":
                return {"State": "CANCELLED", "Reason": "None"}
            return {"State": "PENDING" if now[0] < 300 else "RUNNING", "Reason": "Resources"}

    def sleep(_):
        now[0] += 60.0

    run_dirs = [tmp_path / "0", tmp_path / "1"]
    with caplog.at_level(logging.INFO, logger="hydra_plugins.gradlab_slurm_launcher.waiting"):
        results = wait_for(jobs, [["optimizer.lr=0.1"], ["optimizer.lr=0.01"]], Watcher(), run_dirs,
                           status_every_s=180, clock=lambda: now[0], sleep=sleep)
    lines = [r.getMessage() for r in caplog.records]
    # one status line after 3 fake minutes (not every poll); none once nothing pends
    assert [line for line in lines if line.startswith("SLURM sweep:")] == [
        "SLURM sweep: 1 job(s) pending (1 Resources), 0 running, 1 done"]
    assert sum("SLURM job 7_1 was cancelled (CANCELLED): optimizer.lr=0.01" in line for line in lines) == 1
    assert results[0] is done
    assert results[1].status == JobStatus.FAILED and isinstance(results[1]._return_value, JobCancelled)
    record = json.loads((tmp_path / "1" / "metrics.json").read_text())
    assert record["status"] == "cancelled" and record["overrides"] == ["optimizer.lr=0.01"]
    assert not (tmp_path / "0" / "metrics.json").exists()  # a job's own metrics.json is its own


@pytest.mark.slurm
def test_a_sweep_that_can_never_start_ends_within_a_minute_naming_reason_request_offer_and_knob(two_nodes, tmp_path):
    """The launcher's defaults (8 CPUs and 64 GB per task) on nodes of 2 CPUs and half this machine's memory
    (more, on a bigger machine: as much as can never fit): SLURM keeps the jobs PENDING (PartitionConfig) forever;
    the sweep cancels them and says why."""
    cpus = max(8, 2 * os.cpu_count())
    mem_gb = max(64, 2 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2 ** 30)
    start = time.monotonic()
    proc = run_cli("train.py", "-m", "hydra/launcher=slurm", "hydra.launcher.gpus_per_node=0",
                   f"hydra.launcher.cpus_per_task={cpus}", f"hydra.launcher.mem_gb={mem_gb}", *TOY,
                   "optimizer.lr=0.1,0.01", f"paths.root_dir={tmp_path}", cwd=tmp_path, env=ENV, timeout=120)
    assert time.monotonic() - start < 60, proc.stderr[-3000:]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    err = proc.stderr
    assert re.search(r"SLURM job \d+_[01] can never start: it is PENDING with reason PartitionConfig", err), err
    assert f"asked for: 1 node(s) x 1 task(s), {cpus} CPUs and {mem_gb} GB per node" in err
    assert re.search(r"partition local offers: 2 node\(s\): n1 \(\d+ CPUs, [\d.]+ GB\), n2 \(\d+ CPUs", err)
    assert "hydra.launcher.cpus_per_task" in err and "hydra.launcher.mem_gb" in err
    array = re.search(r"scancel (\d+)\)", err)[1]
    squeue = subprocess.run(["squeue", "-h", "-j", array, "-o", "%T"], capture_output=True, text=True,
                            env={**os.environ, **ENV}).stdout.split()
    assert set(squeue) <= {"CANCELLED"}, squeue  # nothing left waiting


@pytest.mark.slurm
@pytest.mark.slow
def test_a_job_cancelled_from_outside_ends_its_part_and_the_sweep_goes_on(two_nodes, tmp_path):
    """Both jobs held at submission (pending, JobHeldUser: a reason that clears); job 1 is scancelled, job 0
    released: job 0 completes, job 1 is recorded cancelled, and the sweep exits 1 once job 0 is done."""
    proc = start_cli("-m", *CPU_NODE, *TOY, "trainer.max_epochs=1", "optimizer.lr=0.1,0.01",
                     "+hydra.launcher.additional_parameters.hold=true", f"paths.root_dir={tmp_path}", cwd=tmp_path,
                     env=ENV)
    deadline, folders = time.monotonic() + 120, []
    while time.monotonic() < deadline and proc.poll() is None and len(folders) < 2:
        folders = list(tmp_path.glob("logs/train/multiruns/*/.submitit/*_[01]"))
        time.sleep(0.5)
    assert len(folders) == 2, finish(proc).stderr[-3000:]
    array = folders[0].name.split("_")[0]
    env = {**os.environ, **ENV}
    subprocess.run(["scancel", f"{array}_1"], check=True, env=env)
    subprocess.run(["scontrol", "release", f"{array}_0"], check=True, env=env)
    proc = finish(proc)
    assert proc.returncode == 1, proc.stderr[-3000:]
    console = proc.stdout + proc.stderr
    # squeue drops a pending job at once when it is cancelled: the sweep saw it leave the queue while pending
    assert f"SLURM job {array}_1 was cancelled (left the queue while PENDING): " in console
    assert f"SLURM job {array}_1 was cancelled (left the queue while PENDING) before it finished" in proc.stderr
    sweep = sweep_dir(tmp_path)
    assert metrics_of(sweep / "0")["status"] == "completed"
    assert metrics_of(sweep / "1")["status"] == "cancelled"


def test_a_trainer_that_does_not_fit_the_allocation_is_one_error_before_anything_is_submitted(tmp_path):
    """nodes=2 x 1 task, but trainer.devices=2 (a sweep's second job) or the default trainer's num_nodes=1: one
    error naming both keys, exit 2, no sweep folder and no .submitit (sbatch never ran; no cluster needed)."""
    for case, expect in ((["trainer=ddp_cpu", "trainer.devices=1,2"], "trainer.devices=2 but hydra.launcher."
                                                                        "tasks_per_node=1"),
                         ([], "trainer.num_nodes=1 but hydra.launcher.nodes=2")):
        proc = run_cli("train.py", "-m", *CPU_NODE, "hydra.launcher.nodes=2", *TOY, *case,
                       f"paths.root_dir={tmp_path}", cwd=tmp_path, env={"SLURM_CONF": "/nonexistent/slurm.conf"})
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert expect in proc.stderr and "Nothing was submitted" in proc.stderr
        assert not [p for p in (tmp_path / "logs").rglob("*") if p.is_file() or p.parent.name == "multiruns"]
    # trainer=ddp_cpu as it is takes both from the allocation: nothing to object to (the launch then goes on)
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from gradlab.config.rules import check_ranks_fit_launcher

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["trainer=ddp_cpu"])
    check_ranks_fit_launcher({"nodes": 2, "tasks_per_node": 1}, OmegaConf.to_container(cfg.trainer, resolve=False))


# ---- preemption and a lost node, against one uninterrupted run --------------------------------------------------
LONG = [*TOY, "trainer=ddp_cpu", "trainer.max_epochs=8", "seed=5"]  # 8 x 13 steps: time to interrupt it


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The local 2-process run (trainer=ddp_cpu) that the interrupted 2-node runs must end up equal to."""
    local = tmp_path_factory.mktemp("uninterrupted")
    proc = run_cli("train.py", *LONG, f"paths.root_dir={local}", cwd=local, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = (local / "logs" / "train" / "runs").iterdir()
    return training_metrics(metrics_of(run_dir))


def wait_for_checkpoint(out: Path, proc, name: str, timeout: float = 300) -> Path:
    """The sweep's job 0 run dir once `checkpoints/<name>` exists in it (fit is under way)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        found = list(out.glob(f"logs/train/multiruns/*/0/checkpoints/{name}"))
        if found:
            return found[0].parents[1]
        time.sleep(0.2)
    pytest.fail(f"no {name} within {timeout} s:\n{finish(proc).stderr[-3000:]}")


@pytest.mark.slurm
@pytest.mark.slow
def test_a_preempted_two_node_job_is_requeued_and_resumes_to_the_uninterrupted_result(two_nodes, uninterrupted,
                                                                                       tmp_path):
    """scancel --signal=USR1 --full reaches both ranks (one per node) mid-training: the HPC checkpoint, `scontrol
    requeue`, the job again on whichever nodes SLURM gives it, fit restored, metrics as if never interrupted."""
    proc = start_cli("-m", *TWO_NODES, *LONG, f"paths.root_dir={tmp_path}", cwd=tmp_path, env=ENV)
    run_dir = wait_for_checkpoint(tmp_path, proc, "epoch_000.ckpt")
    (job_id,) = [p.name for p in (run_dir.parent / ".submitit").iterdir() if p.name.isdigit()]
    subprocess.run(["scancel", "--signal=USR1", "--full", job_id], check=True, env={**os.environ, **ENV})
    proc = finish(proc)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = metrics_of(run_dir)
    assert metrics["slurm"]["job_id"] == int(job_id) and metrics["slurm"]["restart_count"] == 1  # requeued once
    assert list(run_dir.glob("hpc_ckpt_*.ckpt"))
    logs = "".join(p.read_text() for p in (run_dir.parent / ".submitit" / job_id).glob("*_log.*"))
    assert "Restoring states from the checkpoint path at" in logs and "hpc_ckpt_1.ckpt" in logs
    # before and after the requeue: both ranks, one per node, agreeing on the run dir
    assert logs.count("ranks agree: 2 ranks on n1,n2") == 2
    assert logs.count(f"(local rank 0): run dir {run_dir.resolve()}, seed 5") == 4
    assert metrics["steps"] == 8 * 13
    assert training_metrics(metrics) == uninterrupted


@pytest.mark.slurm
@pytest.mark.slow
def test_a_lost_node_ends_the_step_and_the_requeued_job_resumes_to_the_uninterrupted_result(two_nodes, uninterrupted,
                                                                                            tmp_path):
    """Mid-training, node n2 dies: its slurmd, the job step and rank there are killed (every process in its
    namespace). Rank 0 on n1 does not hang: SLURM declares n2 down after SlurmdTimeout (30 s) and ends the step
    (srun: "Node failure on n2"), well inside the gloo timeout (120 s, trainer=ddp_cpu), and requeues the job,
    which waits for two nodes (the sweep says so, and does not give up on it). n2 comes back; the job runs again
    in the same run dir, continues from its last.ckpt (nothing written before is lost or redone from scratch),
    and ends with the metrics of a run never interrupted."""
    proc = start_cli("-m", *TWO_NODES, *LONG, f"paths.root_dir={tmp_path}", cwd=tmp_path, env=ENV)
    run_dir = wait_for_checkpoint(tmp_path, proc, "epoch_000.ckpt")
    epoch0 = (run_dir / "checkpoints" / "epoch_000.ckpt").read_bytes()
    (job_id,) = [p.name for p in (run_dir.parent / ".submitit").iterdir() if p.name.isdigit()]
    pids = subprocess.run(["ip", "netns", "pids", "gl-n2"], capture_output=True, text=True, check=True).stdout.split()
    assert len(pids) >= 3, pids  # slurmd, the step's slurmstepd, rank 1
    lost = time.monotonic()
    for pid in pids:
        subprocess.run(["kill", "-9", pid])
    env = {**os.environ, **ENV}
    state = ""
    while time.monotonic() - lost < 120 and state != "PENDING":
        state = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True,
                               env=env).stdout.strip()
        time.sleep(1)
    ended_s = time.monotonic() - lost
    assert state == "PENDING", state  # requeued by SLURM (node failure), not running on with a hung rank
    logs = "".join(p.read_text() for p in (run_dir.parent / ".submitit" / job_id).glob("*_log.*"))
    assert "Node failure on n2" in logs
    subprocess.run([str(ROOT / "scripts" / "slurm_local.sh"), "--nodes", "2"], capture_output=True, timeout=120,
                   check=True)
    proc = finish(proc)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "can never start" not in proc.stderr
    logs = "".join(p.read_text() for p in (run_dir.parent / ".submitit" / job_id).glob("*_log.*"))
    assert f"SLURM requeued this job (restart 1): resuming from {run_dir}/checkpoints/last.ckpt" in logs
    metrics = metrics_of(run_dir)
    assert metrics["slurm"]["restart_count"] == 1 and metrics["steps"] == 8 * 13
    assert (run_dir / "checkpoints" / "epoch_000.ckpt").read_bytes() == epoch0  # written before: kept
    assert training_metrics(metrics) == uninterrupted
    print(f"lost node: the job left RUNNING {ended_s:.0f} s after n2 died")
