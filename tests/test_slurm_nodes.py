"""Across a node boundary: DDP over two SLURM nodes, sweeps of 2-node jobs, and what is decided before submitting.

    scripts/slurm_local.sh --nodes 2                 # as root: nodes n1, n2 in network namespaces (CI starts it)
    python -m pytest -q tests/test_slurm_nodes.py    # the tests marked slurm skip, with one reason, without it

The cluster is found through SLURM_CONF=/tmp/gradlab-slurm2/slurm.conf (beside the one-node cluster, which stays
/etc/slurm's). Each node is its own network namespace with its own hostname and address (10.77.0.11, .12): gloo's
traffic between the ranks crosses a veth pair and a bridge, as it would cross a switch.
"""

import os
import re
import shutil
import subprocess
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
