"""Hydra's submitit SLURM launcher, with what a real cluster showed it needs.

    python train.py -m hydra/launcher=slurm hydra.launcher.partition=gpu optimizer.lr=0.1,0.01

- The launcher's values are checked before anything is submitted (gradlab.config.rules.check_launcher): a bad one is a
  one-paragraph error (exit code 2), not an sbatch traceback after the sweep has started.
- Job states: submitit asks `sacct`, which fails where the cluster keeps no accounting (many small clusters,
  scripts/slurm_local.sh); it then warned three lines on every poll and could not tell a job that died without a
  result. Here states come from `squeue` in that case, said once.
"""

import contextlib
import os
from typing import Any, Sequence

from hydra.core.utils import JobReturn
from hydra_plugins.hydra_submitit_launcher import submitit_launcher

TRAP_USR1 = "trap '' USR1"


class SlurmLauncher(submitit_launcher.SlurmLauncher):
    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        # SIGUSR1 asks the training to checkpoint and requeue (Lightning's SLURM handler). Sent to the batch
        # shell too (`scancel --signal=USR1 --full`, `--signal=B:USR1@...`), it would kill bash, and with it
        # the job step, before the requeue: the shell ignores it (srun's tasks are not its children).
        self.params["setup"] = [TRAP_USR1, *(self.params.get("setup") or [])]

    def setup(self, *, hydra_context: Any, task_function: Any, config: Any) -> None:
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
        from gradlab.config.cli import fail
        from gradlab.config.rules import check_launcher
        from gradlab.errors import UserError

        try:
            check_launcher(self.params)
        except UserError as err:
            # The sweep folder was claimed when Hydra resolved its name; a sweep stopped before submitting leaves
            # none behind (rmdir: only an empty folder is ever removed).
            with contextlib.suppress(OSError):
                os.rmdir(str(config.hydra.sweep.dir))
            fail(str(err))

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from hydra_plugins.gradlab_slurm_launcher.queue import watch_states_with_squeue_if_no_accounting

        watch_states_with_squeue_if_no_accounting()  # before submitting: jobs register with the watcher then
        return super().launch(job_overrides, initial_job_idx)

