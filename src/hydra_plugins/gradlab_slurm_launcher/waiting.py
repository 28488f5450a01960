"""While a SLURM sweep waits: jobs that can never start end it with one error, the others are reported.

Used by hydra/launcher=slurm (src/hydra_plugins/gradlab_slurm_launcher). submitit waits for each job's result in
turn; a job SLURM keeps PENDING forever (it asks for more CPUs or memory than any node of the partition has:
Reason=PartitionConfig) made the sweep wait forever, silently. Here, at every state poll (2, 4, 8, ... s after
submitting, then every minute):
- a job pending for a reason that never clears ends the sweep: every job of it is cancelled and one error names
  the reason, what the job asked for, what the partition offers, and the hydra.launcher key to change;
- while jobs pend for reasons that do clear (Priority, Resources, a group limit), a status line every few minutes
  says how many jobs pend and why, run and are done;
- a job cancelled from outside (scancel) ends its part of the sweep at the next poll, recorded as cancelled.
"""

import json
import logging
import re
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import CompactHydraException

from gradlab.errors import UserError
from hydra_plugins.gradlab_slurm_launcher.queue import GONE

log = logging.getLogger(__name__)

# Pending reasons that no amount of waiting clears: the request exceeds what the partition (or the account's or
# QOS's per-job limit) allows, names a node that is not there, or a constraint no node has. SLURM accepts such
# jobs (EnforcePartLimits=NO, the default) and leaves them PENDING. Group limits (AssocGrp*, QOSGrp*) and
# AssocMaxJobsLimit do clear, when the account's other jobs end.
NEVER_CLEARS = {
    "PartitionConfig": "the request exceeds what the partition's nodes have: CPUs, memory or GPUs",
    "PartitionNodeLimit": "the job asks for more nodes than the partition allows or has",
    "PartitionTimeLimit": "the time limit asked for exceeds the partition's MaxTime",
    "ReqNodeNotAvail": "a node the job needs is down, drained or not in the partition",
    "BadConstraints": "no node has the features (constraints) the job asks for",
    "InvalidAccount": "the account does not exist or is not yours",
    "InvalidQOS": "the QOS does not exist or is not allowed to you",
    "MaxMemPerLimit": "the memory asked for exceeds the partition's MaxMemPer* limit",
}
STATUS_EVERY_S = 180.0


def _reason_name(reason: str) -> str:
    """squeue's %r as a reason name: it prints most by name, ReqNodeNotAvail as its description."""
    if reason.startswith("Nodes required for job are DOWN"):
        return "ReqNodeNotAvail"
    return reason.split(",")[0].strip()


def never_clears(reason: str) -> Optional[str]:
    """What `reason` (squeue's %r) means, if it is one that never clears; None otherwise."""
    name = _reason_name(reason)
    if name in NEVER_CLEARS:
        return NEVER_CLEARS[name]
    if name.startswith(("Assoc", "QOS")) and "PerJob" in name:  # e.g. AssocMaxCpuPerJobLimit, QOSMaxNodePerJobLimit
        return "the request exceeds a per-job limit of your account or QOS"
    return None


def _scontrol(kind: str, name: str) -> dict[str, str]:
    """`scontrol show -o <kind> <name>` as a dict (a value with spaces keeps only its first word)."""
    try:
        out = subprocess.run(["scontrol", "show", "-o", kind, name], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return dict(tok.split("=", 1) for tok in out.split() if "=" in tok)


def _mb(text: str) -> Optional[float]:
    """SLURM's memory sizes ("64G", "22899M", "22899") in MB."""
    match = re.fullmatch(r"([\d.]+)([KMGT]?)", text or "")
    if not match:
        return None
    return float(match[1]) * {"K": 1 / 1024, "": 1, "M": 1, "G": 1024, "T": 1024 ** 2}[match[2]]


def _partition_nodes(partition: str) -> list[tuple[str, int, float, str]]:
    """(node, CPUs, memory MB, GRES) of every node of `partition`, from sinfo."""
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-p", partition, "-o", "%N|%c|%m|%G"], capture_output=True,
                             text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    nodes = []
    for line in sorted(set(out.splitlines())):
        name, cpus, mem, gres = (line.split("|") + ["", "", "", ""])[:4]
        if cpus.isdigit():
            nodes.append((name, int(cpus), _mb(mem) or 0.0, gres))
    return nodes


def explain_never_starting(job_id: str, reason: str) -> str:
    """The error for a job pending for `reason`: what it asked for, what its partition offers, the knob."""
    job = _scontrol("job", job_id)
    partition = job.get("Partition", "?")
    part = _scontrol("partition", partition)
    nodes = _partition_nodes(partition)
    n_nodes = int(job.get("NumNodes", "1").split("-")[0] or 1)
    cpus_node = int(job.get("NumCPUs", "0") or 0) // max(n_nodes, 1)
    mem_node = _mb(job.get("MinMemoryNode", "")) or 0.0
    asked = (f"{n_nodes} node(s) x {job.get('NtasksPerN:B:S:C', '?').split(':')[0]} task(s), {cpus_node} CPUs and "
             f"{mem_node / 1024:g} GB per node, time limit {job.get('TimeLimit', '?')}, TRES {job.get('TRES', '?')}")
    offers = ", ".join(f"{n} ({c} CPUs, {m / 1024:.1f} GB{'' if g in ('(null)', '') else ', ' + g})"
                       for n, c, m, g in nodes) or "no nodes (sinfo)"
    offered = (f"{len(nodes)} node(s): {offers}; MaxNodes={part.get('MaxNodes', '?')}, "
               f"MaxTime={part.get('MaxTime', '?')}, MaxMemPerNode={part.get('MaxMemPerNode', '?')}")
    knobs = []
    if nodes and cpus_node > max(c for _, c, _, _ in nodes):
        knobs.append(f"hydra.launcher.cpus_per_task ({cpus_node} CPUs per node with tasks_per_node; the largest "
                     f"node has {max(c for _, c, _, _ in nodes)})")
    if nodes and mem_node > max(m for _, _, m, _ in nodes):
        knobs.append(f"hydra.launcher.mem_gb ({mem_node / 1024:g} GB per node; the largest node has "
                     f"{max(m for _, _, m, _ in nodes) / 1024:.1f} GB)")
    max_nodes = part.get("MaxNodes", "UNLIMITED")
    if nodes and (n_nodes > len(nodes) or (max_nodes.isdigit() and n_nodes > int(max_nodes))):
        knobs.append(f"hydra.launcher.nodes ({n_nodes}; the partition has {len(nodes)}, MaxNodes={max_nodes})")
    if "gres/gpu" in job.get("TRES", "") and not any("gpu" in g for _, _, _, g in nodes):
        knobs.append("hydra.launcher.gpus_per_node (the partition's nodes have no GPUs: 0 for CPU nodes)")
    if reason.startswith("PartitionTimeLimit"):
        knobs.append("hydra.launcher.timeout_min")
    if not knobs:
        knobs.append("hydra.launcher.partition, nodes, tasks_per_node, cpus_per_task, mem_gb, gpus_per_node, "
                     "timeout_min, account or qos")
    return (f"SLURM job {job_id} can never start: it is PENDING with reason {reason}: "
            f"{never_clears(reason)}.\n  asked for: {asked}\n  partition {partition} offers: {offered}\n"
            f"  change: {'; '.join(knobs)}")


def _waits_for_a_failed_node(job_id: str, reason: str) -> bool:
    """A job SLURM requeued (Restarts > 0) that waits for a node which went down under it: that clears when the
    node returns (or SLURM gives the job others), so it is reported, not ended."""
    return _reason_name(reason) == "ReqNodeNotAvail" and int(_scontrol("job", job_id).get("Restarts", "0") or 0) > 0


def _status_line(states: dict[str, dict[str, str]]) -> str:
    pending: dict[str, int] = {}
    running = done = 0
    for info in states.values():
        state = info.get("State", "UNKNOWN")
        if state == "PENDING":
            reason = info.get("Reason", "") or "?"
            pending[reason] = pending.get(reason, 0) + 1
        elif state in ("RUNNING", "COMPLETING", "REQUEUED"):
            running += 1
        elif state not in ("UNKNOWN", ""):
            done += 1
    why = ", ".join(f"{n} {r}" for r, n in sorted(pending.items()))
    return f"SLURM sweep: {sum(pending.values())} job(s) pending ({why}), {running} running, {done} done"


def wait_for(jobs: Sequence[Any], overrides: Sequence[Sequence[str]], watcher: Any,
             run_dirs: Sequence[Optional[Path]] = (), status_every_s: float = STATUS_EVERY_S,
             clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep
             ) -> list[JobReturn]:
    """Each job's JobReturn once all are done (submitit Jobs, with the sweep's overrides and run dir of each)."""
    last_status, cancelled = clock(), set()
    while True:
        done = [job.done() for job in jobs]  # polls the cluster when a poll is due (submitit's schedule)
        states = {job.job_id: watcher.get_info(job.job_id, mode="cache") for job in jobs}
        for (job_id, info), run_dir, job_overrides in zip(states.items(), list(run_dirs) or [None] * len(jobs),
                                                           overrides):
            reason, state = info.get("Reason", ""), info.get("State", "")
            if state == "PENDING" and never_clears(reason) and not _waits_for_a_failed_node(job_id, reason):
                message = explain_never_starting(job_id, reason)
                array = sorted({job.job_id.split("_")[0] for job in jobs})
                subprocess.run(["scancel", *array], capture_output=True, timeout=60)
                raise UserError(f"{message}\nEvery job of this sweep was cancelled (scancel {' '.join(array)}); none "
                                "of them ran.")
            if _cancelled(info) and job_id not in cancelled:
                cancelled.add(job_id)
                state = _cancelled(info)
                log.info(f"SLURM job {job_id} was cancelled ({state}): {' '.join(job_overrides)}")
                _record_cancelled(run_dir, job_id, state, job_overrides)
        if all(done):
            break
        if clock() - last_status >= status_every_s and any(i.get("State") == "PENDING" for i in states.values()):
            log.info(_status_line(states))
            last_status = clock()
        sleep(1.0)
    return [_result(job, job_overrides, watcher) for job, job_overrides in zip(jobs, overrides)]


def _record_cancelled(run_dir: Optional[Path], job_id: str, state: str, overrides: Sequence[str]) -> None:
    """metrics.json {"status": "cancelled"} in the job's run dir, for sweep reports; never over one it wrote."""
    if run_dir is None:
        return
    path = run_dir / "metrics.json"
    if path.exists():
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"status": "cancelled", "error": f"SLURM job {job_id} was cancelled ({state})",
                                "overrides": list(overrides), "slurm": {"job_id": job_id}}, indent=2))


def _cancelled(info: dict[str, str]) -> Optional[str]:
    """How the job was cancelled, if it was: squeue says CANCELLED for a job that ran; a pending one that is
    cancelled leaves the queue at once (hydra_plugins.gradlab_slurm_launcher.queue's watcher then says GONE, last seen PENDING)."""
    state = info.get("State", "")
    if state.startswith("CANCELLED"):
        return state
    if state == GONE and info.get("LastState") == "PENDING":
        return "left the queue while PENDING"
    return None


def _result(job: Any, overrides: Sequence[str], watcher: Any) -> JobReturn:
    state = _cancelled(watcher.get_info(job.job_id, mode="cache"))
    cancelled = state is not None
    if not (cancelled and not job.paths.result_pickle.exists()):
        try:
            result = job.results()[0]
        except Exception as err:  # submitit's UncompletedJobError: no result (killed, out of memory, ...)
            result = JobReturn(overrides=list(overrides), status=JobStatus.FAILED, _return_value=err)
        if not cancelled or result.status == JobStatus.COMPLETED:
            return result
    # Cancelled from outside (scancel): before it started, or stopped by SIGTERM mid-run.
    return JobReturn(overrides=list(overrides), status=JobStatus.FAILED,
                     _return_value=JobCancelled(f"SLURM job {job.job_id} was cancelled ({state}) before it finished"
                                                f" (overrides: {' '.join(overrides)})"))


class JobCancelled(CompactHydraException):
    """A sweep job that scancel ended: recorded as cancelled, the sweep's other jobs go on (Hydra prints the
    message, without a traceback, once they have run)."""
