"""Hydra's basic sweeper (every combination of the comma-separated values), which can also continue a sweep in place.

    python train.py -m optimizer=sgd,adam optimizer.lr=0.1,0.01                        # 4 jobs: 0/ 1/ 2/ 3/
    python train.py -m optimizer=sgd,adam optimizer.lr=0.1,0.01 \
        hydra.sweep.dir=logs/train/multiruns/<time> +sweep.resume=true                 # continue it

A fresh sweep runs exactly as under Hydra's BasicSweeper (same job order, numbers and folders), and records its
jobs in sweep_state.json. Resumed, it skips the completed jobs (their values are reused), runs the interrupted ones
again in their folders from their checkpoints and starts the others: gradlab.checkpoints.sweeps says how jobs are matched.
"""

import logging
import os
from pathlib import Path
from typing import Any, Sequence

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf

log = logging.getLogger(__name__)


class GridSweeper(BasicSweeper):
    def sweep(self, arguments: list[str]) -> Any:
        from gradlab.checkpoints import sweeps
        from gradlab.config.cli import fail
        from gradlab.errors import UserError

        sweep_dir = str(self.config.hydra.sweep.dir)
        try:
            resume, arguments = sweeps.split_resume_flag(list(arguments))
            parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
            batches = self.split_arguments(parser.parse_overrides(self._parse_config() + arguments), None)
            jobs = [list(job) for batch in batches for job in batch]
            definition = sweeps.definition(self.params, arguments)
            if resume:
                # Checked before anything is written: a refused resume leaves the sweep dir as it was.
                sweeps.check_same_sweep(sweep_dir, definition)
                sweeps.check_not_running(sweep_dir)
                state = sweeps.read_state(sweep_dir)
                plan = plan_jobs(jobs, sweeps.job_dirs(sweep_dir), state.get("jobs") or [])
            else:
                sweeps.refuse_to_overwrite(sweep_dir)
                state, plan = {}, [(job, str(i), sweeps.NEW) for i, job in enumerate(jobs)]
        except UserError as err:
            fail(str(err))

        Path(sweep_dir).mkdir(parents=True, exist_ok=True)
        if not resume:  # the sweep's record stays the one it was started with
            OmegaConf.save(self.config, Path(sweep_dir) / "multirun.yaml")
        state.update(kind="grid", definition=definition,
                     jobs=[{"dir": d, "overrides": job} for job, d, _ in plan])
        launch = sweeps.new_launch(state, resume)
        launch["jobs"] = {d: action for _, d, action in plan}
        sweeps.write_state(sweep_dir, state)
        if resume:
            log.info(summary(plan, sweep_dir))

        returns: list[Sequence[JobReturn]] = []
        metric = self.config.get("optimized_metric")
        skipped = [JobReturn(overrides=job, working_dir=os.path.join(sweep_dir, d), task_name=self.config.hydra.job.name,
                             status=JobStatus.COMPLETED,
                             _return_value=sweeps.job_value(_metrics(sweep_dir, d), metric))
                   for job, d, action in plan if action == sweeps.SKIPPED]
        if skipped:
            returns.append(skipped)
        to_run = [p for p in plan if p[2] != sweeps.SKIPPED]
        for chunk in self.split_overrides_to_chunks(to_run, self.max_batch_size) if to_run else []:
            # Resumed, each job is told its folder: its number in a launch of only the unfinished jobs is not.
            batch = [job + (sweeps.resume_overrides(d, action == sweeps.RESUMED) if resume else [])
                     for job, d, action in chunk]
            self.validate_batch_is_legal(batch)
            first = chunk[0][1]
            results = self.launcher.launch(batch, initial_job_idx=int(first) if first.isdigit() else 0)
            for r in results:
                _ = r.return_value  # re-raises a failed job's error, once the whole batch has run
            returns.append(results)
        return returns


def plan_jobs(jobs: list[list[str]], found: list, planned: list[dict]) -> list[tuple[list[str], str, str]]:
    """(overrides, folder, action) for every job of the grid: a job found on disk keeps its folder and gets its
    action (skipped, resumed, new); a job never started gets the folder it was planned in, else its number in the
    grid, else the next free number: never a folder that holds another job."""
    from gradlab.checkpoints import sweeps

    on_disk = sweeps.by_overrides(found)
    owner = {j.dir: sweeps.job_key(j.overrides) for j in found}
    owner.update({p["dir"]: sweeps.job_key(p["overrides"]) for p in planned if p["dir"] not in owner})
    planned_dir = {sweeps.job_key(p["overrides"]): p["dir"] for p in planned}
    plan, used = [], set()
    for i, job in enumerate(jobs):
        key = sweeps.job_key(job)
        if key in on_disk:
            folder, action = on_disk[key].dir, on_disk[key].action
        else:
            folder, action = planned_dir.get(key, str(i)), sweeps.NEW
            n = len(jobs)
            while owner.get(folder, key) != key or folder in used:
                folder, n = str(n), n + 1
        used.add(folder)
        plan.append((job, folder, action))
    return plan


def summary(plan: list[tuple[list[str], str, str]], sweep_dir: str) -> str:
    from gradlab.checkpoints import sweeps

    parts = []
    for action, what in ((sweeps.SKIPPED, "skipped (completed)"), (sweeps.RESUMED, "resumed from their checkpoints"),
                         (sweeps.NEW, "started")):
        dirs = [d for _, d, a in plan if a == action]
        if dirs:
            parts.append(f"{len(dirs)} {what}: {', '.join(dirs)}")
    return f"Resuming the sweep in {sweep_dir}: " + "; ".join(parts)


def _metrics(sweep_dir: str, job_dir: str) -> dict:
    from gradlab.checkpoints.run_dirs import read_metrics

    return read_metrics(os.path.join(sweep_dir, job_dir, "metrics.json"))
