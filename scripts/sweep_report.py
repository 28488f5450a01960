"""A sweep's jobs side by side: swept values, metrics, status and wall time, best first.

    python scripts/sweep_report.py logs/train/multiruns/<time>
    python scripts/sweep_report.py logs/train/multiruns/<time> --metric val/loss     # sorts ascending for losses
    python scripts/sweep_report.py logs/train/multiruns/<time> --todo               # what is left, and the command

Reads every job's .hydra/overrides.yaml and metrics.json, prints a markdown table and writes sweep_report.csv and
sweep_report.png into the sweep dir (or --out): the metric against each swept parameter, on a log axis for learning
rates and for any positive parameter spanning two decades or more; failed jobs are red crosses along the bottom.
The metric defaults to the sweep's `optimized_metric`. A resumed sweep (+sweep.resume=true, gradlab.checkpoints.sweeps) gets a
`resume` column: what its latest launch did with each job (skipped, resumed from its checkpoint, new), and how often
SLURM requeued it. `--todo` lists the jobs still to run and prints the command that resumes the sweep.
"""

import argparse
import csv
import math
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from gradlab.checkpoints.run_dirs import read_metrics, read_overrides
from gradlab.checkpoints.sweeps import RESUME_KEY, SKIPPED, job_dirs, read_state
from gradlab.config.cli import fail
from gradlab.config.rules import METRICS as RUN_METRICS
from gradlab.errors import UserError

METRICS = tuple(m for m in RUN_METRICS if not m.startswith("train/"))  # the columns: what a sweep is judged by
LOG_KEYS = ("lr", "max_lr", "learning_rate", "weight_decay", "eps")


@dataclass
class Job:
    name: str                                   # the job's dir, relative to the sweep dir ("0", "1", ...)
    values: dict[str, str]                      # override key -> value as written on the command line
    metrics: dict = field(default_factory=dict)
    resume: Optional[str] = None                # skipped / resumed / new in the sweep's latest launch, if resumed

    @property
    def status(self) -> str:
        return self.metrics.get("status", "completed") if self.metrics else "no metrics.json"

    def number(self, key: str) -> Optional[float]:
        value = self.metrics.get(key)
        return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def read_jobs(sweep_dir: Path) -> list[Job]:
    if not sweep_dir.is_dir():
        raise UserError(f"{sweep_dir} is not a folder. Pass a sweep dir such as logs/train/multiruns/<time>.")
    jobs = []
    for overrides_file in sweep_dir.rglob(".hydra/overrides.yaml"):
        job_dir = overrides_file.parent.parent
        overrides = read_overrides(str(overrides_file))
        values = dict(o.lstrip("+~").split("=", 1) for o in overrides if "=" in o)
        metrics_file = job_dir / "metrics.json"
        metrics = read_metrics(str(metrics_file)) if metrics_file.exists() else {}
        jobs.append(Job(str(job_dir.relative_to(sweep_dir)), values, metrics))
    mark_resumed(jobs, read_state(str(sweep_dir)))
    if not jobs:
        raise UserError(f"No jobs under {sweep_dir}: a sweep dir holds one folder per job, each with "
                        ".hydra/overrides.yaml (python train.py -m ... writes them under logs/train/multiruns/).")
    return sorted(jobs, key=lambda j: [int(p) if p.isdigit() else p for p in Path(j.name).parts])


def mark_resumed(jobs: list[Job], state: dict) -> None:
    """Each job's action in the sweep's latest launch, once the sweep has been resumed (a job that launch did not
    run was finished before it: skipped); SLURM requeues from the job's metrics.json."""
    launches = state.get("launches") or []
    if not any(launch.get("resume") for launch in launches):
        return
    actions = launches[-1].get("jobs") or {}
    for job in jobs:
        job.resume = actions.get(job.name, SKIPPED)
        requeued = (job.metrics.get("slurm") or {}).get("restart_count") if isinstance(job.metrics, dict) else None
        if isinstance(requeued, int) and requeued > 0:
            job.resume += f", requeued {requeued}x"


def swept_keys(jobs: list[Job]) -> list[str]:
    """Override keys whose value differs between jobs, in command-line order."""
    keys = list(dict.fromkeys(k for job in jobs for k in job.values))
    return [k for k in keys if len({job.values.get(k) for job in jobs}) > 1]


def sweep_metric(sweep_dir: Path) -> str:
    multirun = sweep_dir / "multirun.yaml"
    try:
        config = yaml.safe_load(multirun.read_bytes().decode("utf-8")) if multirun.is_file() else {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError) as err:
        raise UserError(f"{multirun} is not readable YAML ({type(err).__name__}); "
                        "pass the metric with --metric.") from None
    metric = config.get("optimized_metric") if isinstance(config, dict) else None
    return metric if isinstance(metric, str) and metric else "val/acc"


def ranked(jobs: list[Job], metric: str, minimize: bool) -> list[Job]:
    """Jobs with a value of `metric`, best first; then the others (failed, missing) in job order."""
    scored = [j for j in jobs if j.number(metric) is not None]
    scored.sort(key=lambda j: j.number(metric), reverse=not minimize)
    return scored + [j for j in jobs if j.number(metric) is None]


def table(jobs: list[Job], keys: list[str], metrics: list[str]) -> tuple[list[str], list[list]]:
    failed = any(job.metrics.get("error") for job in jobs)
    resumed = any(job.resume for job in jobs)
    header = ["job", *keys, *metrics, "status"] + (["resume"] if resumed else []) + ["wall_time_s"] \
        + (["error"] if failed else [])
    rows = []
    for job in jobs:
        row = [job.name, *(job.values.get(k, "") for k in keys), *(job.number(m) for m in metrics), job.status]
        row += ([job.resume] if resumed else []) + [job.metrics.get("wall_time_s")]
        rows.append(row + ([job.metrics.get("error", "")] if failed else []))
    return header, rows


def markdown(header: list[str], rows: list[list]) -> str:
    def cell(value, column: str) -> str:
        if value is None:
            return ""
        if isinstance(value, float):
            return f"{value:.1f}" if column == "wall_time_s" else f"{value:.4f}"
        return " ".join(str(value).split()).replace("|", "\\|")[:120]

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v, c) for v, c in zip(row, header)) + " |" for row in rows]
    return "\n".join(lines)


def _as_float(text: Optional[str]) -> Optional[float]:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def plot(jobs: list[Job], keys: list[str], metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster node
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        numeric = all(_as_float(j.values.get(key)) is not None for j in jobs)
        categories = list(dict.fromkeys(j.values.get(key, "") for j in jobs))

        def x_of(job: Job, key=key, numeric=numeric, categories=categories) -> float:  # this axis's, bound now
            return _as_float(job.values[key]) if numeric else categories.index(job.values.get(key, ""))

        ok = sorted((j for j in jobs if j.number(metric) is not None), key=x_of)
        ax.scatter([x_of(j) for j in ok], [j.number(metric) for j in ok], color="tab:blue", zorder=3)
        if numeric and len(keys) == 1:  # one parameter: the points are a curve
            ax.plot([x_of(j) for j in ok], [j.number(metric) for j in ok], color="tab:blue", alpha=0.5)
        bad = [j for j in jobs if j.number(metric) is None]
        if bad:
            bottom = ax.get_ylim()[0]
            ax.scatter([x_of(j) for j in bad], [bottom] * len(bad), marker="x", color="tab:red", zorder=3,
                       label=f"failed ({len(bad)})", clip_on=False)
            ax.legend(loc="best", fontsize=8)
        xs = [x_of(j) for j in jobs]
        if numeric and min(xs) > 0 and (key.split(".")[-1] in LOG_KEYS or max(xs) / min(xs) >= 100):
            ax.set_xscale("log")
        if not numeric:
            ax.set_xticks(range(len(categories)), categories, rotation=30, ha="right")
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{metric} over {len(jobs)} jobs", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def todo(sweep_dir: Path) -> str:
    """What a resume of the sweep would still run, and the command that resumes it."""
    state = read_state(str(sweep_dir))
    found = {j.dir: j for j in job_dirs(str(sweep_dir))}
    lines = []
    if state.get("kind") == "optuna":
        import optuna

        from hydra_plugins.gradlab_optuna_sweeper.optuna_sweeper import finished

        trials = optuna.load_study(study_name=state["study_name"], storage=state["storage"]).trials
        done = sum(finished(t) for t in trials)
        lines.append(f"{done} of {state.get('n_trials')} trials finished; {max(0, state.get('n_trials', 0) - done)} to go.")
        for t in trials:
            if t.state == optuna.trial.TrialState.RUNNING:
                job = found.get(str(t.user_attrs.get("job_dir")))
                where = f"{job.dir}/, from its checkpoint" if job is not None and job.checkpoint else "from the start"
                lines.append(f"  trial {t.number} was running (or still is): retried first, {where}: {t.params}")
    else:
        planned = state.get("jobs") or [{"dir": d, "overrides": j.overrides} for d, j in found.items()]
        left = 0
        for job in planned:
            on_disk = found.get(job["dir"])
            if on_disk is not None and on_disk.complete:
                continue
            left += 1
            if on_disk is None:
                what = "not started"
            elif on_disk.checkpoint:
                what = "resumes from its checkpoint"
            else:
                error = on_disk.metrics.get("error")
                what = f"starts again (failed: {' '.join(str(error).split())[:100]})" if error else "starts again"
            lines.append(f"  {job['dir']}: {what}: {' '.join(job['overrides'])}")
        lines.insert(0, f"{len(planned) - left} of {len(planned)} jobs completed; {left} to run.")
    command = resume_command(sweep_dir)
    if "; 0 to " in lines[0]:
        lines.append("Nothing left to run.")
    elif command:
        lines.append(f"Resume with:\n  {command}")
    return "\n".join(lines)


def resume_command(sweep_dir: Path) -> Optional[str]:
    """The sweep's own command line (from multirun.yaml), pointed at its folder, with +sweep.resume=true."""
    multirun = sweep_dir / "multirun.yaml"
    if not multirun.is_file():
        return None
    config = yaml.safe_load(multirun.read_text()) or {}
    overrides = (config.get("hydra") or {}).get("overrides") or {}
    hydra = [o for o in overrides.get("hydra") or [] if o.split("=", 1)[0] not in ("hydra.mode", "hydra.sweep.dir")]
    task = [o for o in overrides.get("task") or [] if o.split("=", 1)[0].lstrip("+~") != RESUME_KEY]
    args = ["-m", *hydra, *task, f"hydra.sweep.dir={sweep_dir}", f"+{RESUME_KEY}=true"]
    return "python train.py " + " ".join(shlex.quote(a) for a in args)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="a multirun dir, e.g. logs/train/multiruns/<time>")
    parser.add_argument("--metric", help="the column to sort and plot by (default: the sweep's optimized_metric)")
    parser.add_argument("--mode", choices=("max", "min"), help="default: min for losses, max otherwise")
    parser.add_argument("--out", type=Path, help="where sweep_report.csv/png go (default: the sweep dir)")
    parser.add_argument("--todo", action="store_true", help="list the jobs still to run, and the resume command")
    args = parser.parse_args(argv)
    if args.todo:
        try:
            if not args.sweep_dir.is_dir():
                raise UserError(f"{args.sweep_dir} is not a folder. Pass a sweep dir such as logs/train/multiruns/<time>.")
            print(todo(args.sweep_dir))
        except UserError as err:
            fail(str(err))
        return 0
    try:
        jobs = read_jobs(args.sweep_dir)
        metric = args.metric or sweep_metric(args.sweep_dir)
    except UserError as err:
        fail(str(err))
    minimize = (args.mode or ("min" if "loss" in metric else "max")) == "min"
    keys = swept_keys(jobs)
    shown = [metric, *(m for m in METRICS if m != metric and any(j.number(m) is not None for j in jobs))]
    jobs = ranked(jobs, metric, minimize)
    header, rows = table(jobs, keys, shown)

    out = args.out or args.sweep_dir
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "sweep_report.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, *[["" if v is None else v for v in row] for row in rows]])
    print(markdown(header, rows))
    failed = [j for j in jobs if j.status != "completed"]
    print(f"\n{len(jobs)} jobs, {len(failed)} not completed; sorted by {metric} ({'min' if minimize else 'max'} first)")
    if keys:
        plot(jobs, keys, metric, out / "sweep_report.png")
        print(f"Wrote {out / 'sweep_report.csv'} and {out / 'sweep_report.png'}")
    else:
        print(f"Wrote {out / 'sweep_report.csv'} (no parameter differs between jobs: no plot)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
