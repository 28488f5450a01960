"""The config resolvers gradlab registers on import: `${gradlab.claim_dir:...}` (gradlab.checkpoints.run_dirs) names run folders;
names derived from a run's folder, for the experiment trackers' configs (conf/logger/mlflow.yaml, wandb.yaml).

    ${run_name:${paths.output_dir}}                   logs/train/runs/2026-12-01_09-00-00  -> 2026-12-01_09-00-00
    ${run_group:${paths.output_dir},${paths.log_dir}} logs/train/runs/2026-12-01_09-00-00  -> train/runs
                                                      logs/train/multiruns/<time>/3        -> train/multiruns/<time>

So MLflow's experiments and W&B's groups mirror the folders under logs/: all single runs of a task side by side,
and each sweep on its own, one run per job.
"""

import os

from omegaconf import OmegaConf


def run_name(output_dir: str) -> str:
    return os.path.basename(os.path.normpath(str(output_dir)))


def run_group(output_dir: str, log_dir: str) -> str:
    """The folder above the run, relative to the log dir (absolute when the run lies elsewhere)."""
    parent = os.path.dirname(os.path.abspath(str(output_dir)))
    rel = os.path.relpath(parent, os.path.abspath(str(log_dir)))
    return parent if rel.startswith("..") else rel.replace(os.sep, "/")


def register() -> None:
    from gradlab.checkpoints.run_dirs import register_resolver  # ${gradlab.claim_dir:...}: each run's own folder

    register_resolver()
    OmegaConf.register_new_resolver("run_name", run_name, replace=True)
    OmegaConf.register_new_resolver("run_group", run_group, replace=True)
