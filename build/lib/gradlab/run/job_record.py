"""A Hydra callback that leaves a metrics.json in the dir of every job that fails, wherever it failed.

Configured in conf/hydra/default.yaml. A finished run writes its own metrics.json (gradlab.run.train.run); a job that
raised (a bad value, a crash in fit) gets {"status": "failed", "error": ..., "overrides": ..., "wall_time_s": ...},
so scripts/sweep_report.py lists it beside the others. Hydra records the failure, runs the sweep's other jobs and
re-raises it at the end.
"""

import json
import os
import time
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from gradlab.errors import UserError


def _global_rank() -> int:
    """The process's rank from the variables launchers set (Lightning, torchrun, srun); 0 when not distributed."""
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        if key in os.environ:
            return int(os.environ[key])
    return 0


# metrics.json's "slurm" entry: which SLURM job ran the run (restart_count > 0: it was requeued, e.g. preempted).
SLURM_IDS = {"job_id": "SLURM_JOB_ID", "array_job_id": "SLURM_ARRAY_JOB_ID", "array_task_id": "SLURM_ARRAY_TASK_ID",
             "restart_count": "SLURM_RESTART_COUNT"}


def slurm_ids() -> dict[str, Any]:
    """{"slurm": {"job_id": ..., ...}} inside a SLURM job, {} elsewhere."""
    if "SLURM_JOB_ID" not in os.environ:
        return {}
    ids = {key: os.environ.get(var, "") for key, var in SLURM_IDS.items()}
    return {"slurm": {key: int(value) for key, value in ids.items() if value.isdigit()}}


class RecordFailedJob(Callback):
    def __init__(self) -> None:
        self.start = time.time()

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.start = time.time()

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if job_return.status != JobStatus.FAILED or _global_rank() != 0:
            return
        err = job_return._return_value  # `.return_value` would re-raise it
        if isinstance(err.__cause__, UserError):  # gradlab.config.cli.JobError: record the user's error itself
            err = err.__cause__
        record = {"status": "failed", "error": f"{type(err).__name__}: {err}",
                  "wall_time_s": round(time.time() - self.start, 2), "overrides": list(job_return.overrides or []),
                  **slurm_ids()}
        path = os.path.join(config.hydra.runtime.output_dir, "metrics.json")
        with open(path + ".tmp", "w") as f:
            json.dump(record, f, indent=2, sort_keys=True)
        os.replace(path + ".tmp", path)
