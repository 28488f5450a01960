"""Resuming an interrupted sweep in place, for both sweepers (grid: hydra/sweeper=gradlab_grid, the default; Optuna).

    python train.py -m model=mlp optimizer.lr=0.1,0.01,0.001                      # killed at job 2, then:
    python train.py -m model=mlp optimizer.lr=0.1,0.01,0.001 \
        hydra.sweep.dir=logs/train/multiruns/<time> +sweep.resume=true            # jobs 0-1 skipped, 2 resumed, ...
    python scripts/sweep_report.py logs/train/multiruns/<time> --todo             # what is left

Jobs match on their overrides (a job folder's .hydra/overrides.yaml), never on their position. Each job is
  skipped  when its metrics.json says "completed": it is not run again, and its value is reused;
  resumed  when its folder holds checkpoints/last.ckpt (or Lightning's hpc_ckpt_<n>.ckpt) and no final metrics:
           it runs again in that folder and fit continues from the newest checkpoint there (gradlab.checkpoints.run_dirs);
  new      otherwise (never started, failed, or killed before its first checkpoint): it runs from the start.
The sweep itself must be the same: its overrides and hydra.sweeper.params are compared with those it was started
with, and a difference is one error naming it, before anything in the sweep dir is touched. A rerun into a sweep
dir that already holds a sweep, without +sweep.resume=true, stops too: it would overwrite the finished jobs.

`+sweep.resume=true` is read by the sweeper and removed from the jobs' overrides, so a resumed job's recorded
overrides (and metrics.json) are those of the uninterrupted job. The sweeper tells a resumed job to continue through
the environment (hydra.job.env_set, which Hydra applies around the job wherever it runs: here, submitit, SLURM).
`sweep_state.json` in the sweep dir keeps the sweep's definition, every job's folder and each launch's plan.
"""

import glob
import json
import os
import re
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from gradlab.checkpoints.run_dirs import read_metrics, read_overrides
from gradlab.errors import UserError

RESUME_KEY = "sweep.resume"       # +sweep.resume=true on the command line
RESUME_ENV = "GRADLAB_SWEEP_RESUME"  # set in a resumed job: continue from its folder's newest checkpoint
STATE_FILE = "sweep_state.json"
SKIPPED, RESUMED, NEW = "skipped", "resumed", "new"


# ---- the command line ------------------------------------------------------------------------------------------
def split_resume_flag(arguments: list[str]) -> tuple[bool, list[str]]:
    """(whether `+sweep.resume=true` is among the sweep's overrides, the overrides without it)."""
    resume, kept = False, []
    for arg in arguments:
        key, _, value = arg.partition("=")
        if key.lstrip("+~") != RESUME_KEY:
            kept.append(arg)
        elif value.lower() in ("true", "false"):
            resume = value.lower() == "true"
        else:
            raise UserError(f"{arg}: sweep.resume takes true or false.")
    return resume, kept


def definition(params: Optional[dict], arguments: list[str]) -> list[str]:
    """What makes the sweep this sweep: hydra.sweeper.params as overrides, then the command line's (without the
    resume flag). The order of the keys does not matter (the same jobs), so it is kept sorted."""
    return sorted([f"{k}={v}" for k, v in (params or {}).items()] + list(arguments))


def job_key(overrides: list[str]) -> tuple[str, ...]:
    return tuple(sorted(overrides))


def resume_overrides(job_dir: str, resumed: bool) -> list[str]:
    """Hydra overrides that put a launched job into `job_dir` (relative to the sweep dir) and, when `resumed`,
    have it continue from its checkpoint. Hydra overrides: not recorded as the job's own."""
    extra = [f"hydra.sweep.subdir={_quoted(job_dir)}"]
    return extra + ([f"++hydra.job.env_set.{RESUME_ENV}=1"] if resumed else [])


def _quoted(text: str) -> str:
    return text if re.fullmatch(r"[\w.\-]+", text) else "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


# ---- the job's side ------------------------------------------------------------------------------------------
def resume_checkpoint(cfg: Any) -> Optional[str]:
    """In a job its resumed sweep launched again: the newest checkpoint in its folder (last.ckpt, or an
    hpc_ckpt_<n>.ckpt that Lightning wrote before a SLURM requeue), else None (it starts from the beginning)."""
    if os.environ.get(RESUME_ENV) != "1":
        return None
    output_dir = glob.escape(str(cfg.paths.output_dir))
    found = glob.glob(os.path.join(output_dir, "checkpoints", "last.ckpt"))
    found += glob.glob(os.path.join(output_dir, "hpc_ckpt_*.ckpt"))
    return max(found, key=os.path.getmtime) if found else None


# ---- the sweep dir -------------------------------------------------------------------------------------------
@dataclass
class JobDir:
    dir: str                      # relative to the sweep dir: "0", "1", ...
    overrides: list[str]
    metrics: dict = field(default_factory=dict)
    checkpoint: bool = False      # last.ckpt or an hpc_ckpt_<n>.ckpt to continue from

    @property
    def complete(self) -> bool:
        return self.metrics.get("status") == "completed"

    @property
    def action(self) -> str:
        return SKIPPED if self.complete else RESUMED if self.checkpoint else NEW


def job_dirs(sweep_dir: str) -> list[JobDir]:
    """Every job folder under the sweep dir (any depth: a custom hydra.sweep.subdir), by name."""
    jobs = []
    for overrides_file in sorted(Path(sweep_dir).rglob(".hydra/overrides.yaml")):
        folder = overrides_file.parent.parent
        if ".submitit" in folder.parts:
            continue
        metrics = folder / "metrics.json"
        ckpts = [folder / "checkpoints" / "last.ckpt", *folder.glob("hpc_ckpt_*.ckpt")]
        jobs.append(JobDir(str(folder.relative_to(sweep_dir)), read_overrides(str(overrides_file)),
                           read_metrics(str(metrics)) if metrics.is_file() else {},
                           any(c.is_file() for c in ckpts)))
    return jobs


def by_overrides(jobs: list[JobDir]) -> dict[tuple[str, ...], JobDir]:
    """One folder per job: where several hold the same overrides, the completed one, else one to resume."""
    found: dict[tuple[str, ...], JobDir] = {}
    rank = {SKIPPED: 0, RESUMED: 1, NEW: 2}
    for job in jobs:
        key = job_key(job.overrides)
        if key not in found or rank[job.action] < rank[found[key].action]:
            found[key] = job
    return found


def holds_a_sweep(sweep_dir: str) -> bool:
    if not os.path.isdir(sweep_dir):
        return False
    records = any(os.path.exists(os.path.join(sweep_dir, name)) for name in ("multirun.yaml", STATE_FILE))
    return records or bool(job_dirs(sweep_dir))


def refuse_to_overwrite(sweep_dir: str) -> None:
    """A sweep started into a folder that already holds one would overwrite its finished jobs."""
    if holds_a_sweep(sweep_dir):
        raise UserError(f"hydra.sweep.dir={sweep_dir} already holds a sweep; starting it again there would overwrite "
                        "its jobs. To continue it, add +sweep.resume=true (with the same overrides); for a new "
                        "sweep, leave hydra.sweep.dir out or name a new folder. Nothing was changed.")


def check_same_sweep(sweep_dir: str, now: list[str]) -> None:
    """Stops, naming the difference, unless `now` (a definition()) is the one the sweep was started with."""
    if not holds_a_sweep(sweep_dir):
        raise UserError(f"+sweep.resume=true: {sweep_dir} holds no sweep to resume (no multirun.yaml, "
                        f"{STATE_FILE} or job folders). Pass the old sweep's folder as hydra.sweep.dir=<folder>.")
    before = recorded_definition(sweep_dir)
    if before is None or before == now:
        return
    old, new = _by_key(before), _by_key(now)
    lines = []
    for key in list(dict.fromkeys([*old, *new])):
        if old.get(key) != new.get(key):
            lines.append(f"{key}: {old.get(key, '(not set)')} in the sweep, {new.get(key, '(not set)')} now")
    raise UserError(f"+sweep.resume=true: this command's sweep is not the one in {sweep_dir}:\n  " + "\n  ".join(lines)
                    + "\nA resumed sweep is the same sweep: repeat its overrides exactly "
                    f"(python scripts/sweep_report.py {sweep_dir} --todo prints the command), or start a new sweep "
                    "without +sweep.resume. Nothing in the sweep dir was changed.")


def _by_key(overrides: list[str]) -> dict[str, str]:
    return {o.split("=", 1)[0]: o.split("=", 1)[1] if "=" in o else "" for o in overrides}


def recorded_definition(sweep_dir: str) -> Optional[list[str]]:
    """The definition the sweep was started with: from sweep_state.json, else from Hydra's multirun.yaml."""
    state = read_state(sweep_dir)
    if state.get("definition") is not None:
        return list(state["definition"])
    multirun = os.path.join(sweep_dir, "multirun.yaml")
    if not os.path.isfile(multirun):
        return None
    import yaml  # plain YAML: the recorded overrides may hold ${...} text, which is not to be resolved here

    try:
        with open(multirun) as f:
            hydra = (yaml.safe_load(f) or {}).get("hydra") or {}
    except (OSError, yaml.YAMLError, AttributeError) as err:
        raise UserError(f"{multirun} is not the multirun.yaml Hydra wrote ({type(err).__name__}); "
                        "without it, the sweep's overrides cannot be compared.") from None
    params = (hydra.get("sweeper") or {}).get("params") or {}
    return definition(params, split_resume_flag(list((hydra.get("overrides") or {}).get("task") or []))[1])


# ---- sweep_state.json ----------------------------------------------------------------------------------------
def read_state(sweep_dir: str) -> dict:
    path = os.path.join(sweep_dir, STATE_FILE)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            state = json.load(f)
    except (OSError, ValueError) as err:
        raise UserError(f"{path} is not readable JSON ({type(err).__name__}); the sweeper writes it. Delete it "
                        "to resume from the job folders alone.") from None
    return state if isinstance(state, dict) else {}


def write_state(sweep_dir: str, state: dict) -> None:
    path = os.path.join(sweep_dir, STATE_FILE)
    os.makedirs(sweep_dir, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(state, f, indent=2)
    os.replace(path + ".tmp", path)  # never a half-written state


def new_launch(state: dict, resume: bool) -> dict:
    """Appends this process's launch to the state (who, when, and each job's action, filled in by the sweeper)."""
    launch = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "host": socket.gethostname(), "pid": os.getpid(),
              "script": os.path.basename(sys.argv[0]), "resume": resume, "jobs": {}}
    state.setdefault("launches", []).append(launch)
    return launch


def still_running(state: dict) -> Optional[str]:
    """The latest launch's process, when it runs on this machine still (two sweepers in one folder would each
    relaunch the other's running jobs)."""
    launches = state.get("launches") or []
    if not launches:
        return None
    last = launches[-1]
    if last.get("host") != socket.gethostname() or not isinstance(last.get("pid"), int) or last["pid"] == os.getpid():
        return None
    try:
        with open(f"/proc/{last['pid']}/cmdline", "rb") as f:
            cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None
    mine = "python" in cmdline and str(last.get("script") or "python") in cmdline  # not a reused pid
    return f"pid {last['pid']} ({cmdline.strip()[:120]})" if mine else None


def check_not_running(sweep_dir: str) -> None:
    running = still_running(read_state(sweep_dir))
    if running:
        raise UserError(f"+sweep.resume=true: the sweep in {sweep_dir} is still running here, {running}. "
                        "Wait for it or stop it first. Nothing was changed.")


def job_value(metrics: dict, metric: Optional[str]) -> Any:
    """A finished job's return value as train.py returned it: its metrics.json's optimized_metric."""
    value = metrics.get(metric or "")
    return float(value) if isinstance(value, (int, float)) else None
