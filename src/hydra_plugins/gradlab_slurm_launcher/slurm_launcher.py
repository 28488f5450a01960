"""Hydra's submitit SLURM launcher, with what a real cluster showed it needs.

    python train.py -m hydra/launcher=slurm hydra.launcher.partition=gpu optimizer.lr=0.1,0.01

- The launcher's values are checked before anything is submitted (gradlab.config.rules.check_launcher): a bad one is a
  one-paragraph error (exit code 2), not an sbatch traceback after the sweep has started.
- Job states: submitit asks `sacct`, which fails where the cluster keeps no accounting (many small clusters,
  scripts/slurm_local.sh); it then warned three lines on every poll and could not tell a job that died without a
  result. Here states come from `squeue` in that case, said once.
- Waiting (hydra_plugins.gradlab_slurm_launcher.waiting): a job SLURM can never start (PartitionConfig, ...) ends the sweep with one error
  that names the knob, instead of a wait forever; a job cancelled with scancel ends its own part of the sweep.
"""

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Sequence

from hydra.core.utils import JobReturn
from hydra_plugins.hydra_submitit_launcher import submitit_launcher
from submitit.slurm.slurm import SlurmJob

TRAP_USR1 = "trap '' USR1"
log = logging.getLogger(__name__)


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

    def _check_ranks(self, job_overrides: Sequence[Sequence[str]]) -> None:
        """Each job's trainer must expect the ranks srun starts (gradlab.config.rules.check_ranks_fit_launcher): checked
        for the first job and for every job that sets trainer values itself (composing each costs a little)."""
        from omegaconf import OmegaConf

        from gradlab.config.cli import fail
        from gradlab.config.rules import check_ranks_fit_launcher
        from gradlab.errors import UserError

        checked = set()
        for i, overrides in enumerate(job_overrides):
            own = tuple(o for o in overrides if o.lstrip("+~").startswith("trainer"))
            if i > 0 and (not own or own in checked):
                continue
            checked.add(own)
            # Without Hydra's context (the launcher built by hand, as a test does) the sweep's own config stands in.
            cfg = (self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
                   if self.hydra_context is not None else self.config)
            trainer = OmegaConf.to_container(cfg.trainer, resolve=False)  # SLURM_* interpolations stay as they are
            try:
                check_ranks_fit_launcher(self.params, trainer, own if len(job_overrides) > 1 else ())
            except UserError as err:
                # A sweep folder that holds no job yet (only what Hydra and the sweeper wrote before launching:
                # multirun.yaml, sweep_state.json) is removed; one with jobs in it is never touched.
                sweep = Path(str(self.config.hydra.sweep.dir))
                with contextlib.suppress(OSError):
                    if {p.name for p in sweep.iterdir()} <= {"multirun.yaml", "sweep_state.json"}:
                        for name in ("multirun.yaml", "sweep_state.json"):
                            (sweep / name).unlink(missing_ok=True)
                    sweep.rmdir()
                fail(str(err))

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        """submitit's launch (executor, job array) up to the wait, which is waiting.py's: a job that
        can never start ends the sweep with one error, a cancelled one ends its own part."""
        import submitit
        from hydra.core.singleton import Singleton
        from hydra.core.utils import filter_overrides
        from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
        from omegaconf import OmegaConf

        from gradlab.config.cli import fail
        from gradlab.errors import UserError
        from hydra_plugins.gradlab_slurm_launcher.queue import watch_states_with_squeue_if_no_accounting
        from hydra_plugins.gradlab_slurm_launcher.waiting import wait_for

        self._check_ranks(job_overrides)
        watch_states_with_squeue_if_no_accounting()  # before submitting: jobs register with the watcher then
        init_keys = {"submitit_folder", "max_num_timeout"}
        executor = submitit.AutoExecutor(folder=self.params["submitit_folder"],
                                         slurm_max_num_timeout=self.params["max_num_timeout"], cluster="slurm")
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in self.params.items()
                                      if k not in init_keys})
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        log.info(f"Submitit 'slurm' sweep output dir : {sweep_dir}")
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
        job_params = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            job_params.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state()))
        jobs = executor.map_array(self, *zip(*job_params))
        # Each job's run dir, where a cancelled one's metrics.json goes (with the default subdir, the job number)
        default_subdir = OmegaConf.to_container(self.config.hydra.sweep, resolve=False)["subdir"] == "${hydra.job.num}"
        run_dirs = [sweep_dir / str(p[2]) if default_subdir else None for p in job_params]
        try:
            return wait_for(jobs, job_overrides, SlurmJob.watcher, run_dirs)
        except UserError as err:
            fail(str(err))
