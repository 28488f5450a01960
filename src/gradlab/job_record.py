"""A Hydra callback that leaves a metrics.json in the dir of every job that fails, wherever it failed.

Configured in conf/hydra/default.yaml. A finished run writes its own metrics.json (gradlab.train.run); a job that
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


class RecordFailedJob(Callback):
    def __init__(self) -> None:
        self.start = time.time()

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.start = time.time()

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if job_return.status != JobStatus.FAILED or _global_rank() != 0:
            return
        err = job_return._return_value  # `.return_value` would re-raise it
        if isinstance(err.__cause__, UserError):  # gradlab.cli.JobError: record the user's error itself
            err = err.__cause__
        record = {"status": "failed", "error": f"{type(err).__name__}: {err}",
                  "wall_time_s": round(time.time() - self.start, 2), "overrides": list(job_return.overrides or [])}
        path = os.path.join(config.hydra.runtime.output_dir, "metrics.json")
        with open(path + ".tmp", "w") as f:
            json.dump(record, f, indent=2, sort_keys=True)
        os.replace(path + ".tmp", path)
