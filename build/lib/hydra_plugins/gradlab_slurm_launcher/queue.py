"""SLURM job states for submitit where the cluster keeps no accounting (sacct fails): from squeue instead.

Used by hydra/launcher=slurm (src/hydra_plugins/gradlab_slurm_launcher). submitit polls `sacct` for the states of
the jobs it waits for; without accounting every poll failed with three lines of warnings, and a job that died
without writing its result (killed, out of memory) was never seen to end.
"""

import logging
import subprocess
from typing import Any, Optional

from submitit.slurm.slurm import SlurmInfoWatcher, SlurmJob

log = logging.getLogger(__name__)
GONE = "ENDED (no longer in squeue)"
STILL_RUNNING = {"REQUEUE_FED", "REQUEUE_HOLD", "CONFIGURING", "RESIZING", "SIGNALING", "STAGE_OUT", "SUSPENDED",
                 "RESV_DEL_HOLD", "STOPPED"}


def watch_states_with_squeue_if_no_accounting() -> None:
    if not isinstance(SlurmJob.watcher, SqueueWhenNoAccounting):
        SlurmJob.watcher = SqueueWhenNoAccounting(delay_s=60)


def _sacct_works() -> bool:
    try:
        return subprocess.run(["sacct", "-n", "-X", "-j", "1"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


class _DropSacctWarnings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Bypassing sacct error" not in record.getMessage()


class SqueueWhenNoAccounting(SlurmInfoWatcher):
    """submitit's SLURM state watcher: sacct where the cluster keeps accounting, else squeue.

    squeue lists a job until MinJobAge (300 s by default) after it ends, so a poll usually sees its final state
    (COMPLETED, FAILED, CANCELLED, ...); one that is gone by then has ended too. Only this user's jobs are listed.
    """

    def __init__(self, delay_s: int = 60) -> None:
        super().__init__(delay_s=delay_s)
        self._use_squeue: Optional[bool] = None

    def _make_command(self) -> Optional[list[str]]:
        command = super()._make_command()
        if command is None:
            return None
        if self._use_squeue is None:
            self._use_squeue = not _sacct_works()
            if self._use_squeue:
                logging.getLogger("submitit").addFilter(_DropSacctWarnings())
                log.info("sacct fails (no accounting on this cluster): job states come from squeue")
        if not self._use_squeue:
            return command
        return ["squeue", "--me", "--noheader", "--array", "--states=all", "--format=%i|%T|%N"]

    def read_info(self, string: Any) -> dict[str, dict[str, str]]:
        if self._use_squeue:
            text = string.decode() if isinstance(string, bytes) else string
            string = "JobID|State|NodeList\n" + text  # sacct's --parsable2 layout, which the parser reads
        info = super().read_info(string)
        if self._use_squeue:
            # A job squeue listed before and lists no more ended over MinJobAge ago (between two polls): ended.
            # Its result file, if it wrote one, is what submitit reads; without one, the sweep reports it.
            for job_id in self._registered - self._finished:
                last = self._info_dict.get(job_id, {}).get("State")
                if job_id not in info and last is not None and last != GONE:
                    info[job_id] = {"JobID": job_id, "State": GONE, "NodeList": ""}
        for stats in info.values():
            # States squeue shows that submitit does not know as unfinished: a requeued job passes through
            # REQUEUE_FED on its way back to PENDING, and must not be taken for a job that ended without a result.
            if stats.get("State") in STILL_RUNNING:
                stats["State"] = "REQUEUED" if stats["State"].startswith("REQUEUE") else "RUNNING"
        return info
