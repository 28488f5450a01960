"""Run folders: which checkpoint `ckpt_path=last` or `ckpt_path=<run folder>` means, and where a resumed run writes.

    logs/train/runs/<time>/checkpoints/last.ckpt       # `last`: the newest of these, by modification time
    logs/train/runs/<time>/checkpoints/epoch_NNN.ckpt  # a run folder, for eval/predict: its best (metrics.json)
"""

import glob
import json
import os

from omegaconf import DictConfig

from gradlab.errors import UserError


def resolve_checkpoint(cfg: DictConfig) -> None:
    """Turn `ckpt_path` (a file, a run folder or `last`) into a file; a resumed training run continues in its folder."""
    value = cfg.get("ckpt_path")
    if not value:
        return
    task = str(cfg.get("task_name") or "train")
    runs = os.path.join(str(cfg.paths.log_dir), "train", "runs")
    if value == "last":
        found = glob.glob(os.path.join(glob.escape(runs), "*", "checkpoints", "last.ckpt"))
        if not found:
            raise UserError(f"ckpt_path=last: no run under {runs} has a checkpoints/last.ckpt yet; "
                            "pass ckpt_path=<file.ckpt> instead.")
        path = max(found, key=os.path.getmtime)
    elif os.path.isdir(value):
        path = _checkpoint_of_run(value, best=task != "train")
    elif os.path.isfile(value):
        path = value
    else:
        raise UserError(f"ckpt_path={value}: no such file or folder.")
    cfg.ckpt_path = os.path.abspath(path)
    run_dir = os.path.dirname(os.path.dirname(cfg.ckpt_path))
    if task == "train" and os.path.basename(os.path.dirname(cfg.ckpt_path)) == "checkpoints" \
            and os.path.isdir(os.path.join(run_dir, ".hydra")):
        # Resuming continues the interrupted run in its own folder: one set of checkpoints (whose best-model
        # bookkeeping Lightning restores only for the same folder), one TensorBoard history, one metrics.json.
        cfg.paths.output_dir = run_dir
        print(f"Resuming from {cfg.ckpt_path}; outputs continue in {run_dir}")


def _checkpoint_of_run(run_dir: str, best: bool) -> str:
    """A run folder's best checkpoint (by its metrics.json) for eval/predict, or its last.ckpt to resume."""
    last = os.path.join(run_dir, "checkpoints", "last.ckpt")
    metrics = os.path.join(run_dir, "metrics.json")
    if best and os.path.isfile(metrics):
        with open(metrics) as f:
            chosen = json.load(f).get("best_checkpoint")
        # By name inside this folder, so that a run folder copied elsewhere still finds its own file.
        here = os.path.join(run_dir, "checkpoints", os.path.basename(chosen)) if chosen else ""
        if os.path.isfile(here):
            return here
    if os.path.isfile(last):
        return last
    raise UserError(f"ckpt_path={run_dir} is a folder without checkpoints/last.ckpt; pass a .ckpt file.")
