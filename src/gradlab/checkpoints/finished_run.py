"""Resuming a run that already finished: refused when the settings changed, unless asked; then its results are kept.

    python train.py ckpt_path=logs/train/runs/<run> trainer.max_epochs=20                   # error: names the changes
    python train.py ckpt_path=logs/train/runs/<run> trainer.max_epochs=20 +resume.force=true # goes on; the finished
                                                                      # run's metrics.json and best checkpoint stay in
                                                                      # <run>/kept/<time>/

A finished run (metrics.json says `completed`) is a result someone may cite. Going on with other settings would
rewrite its metrics.json and let ModelCheckpoint delete its best checkpoint, while .hydra/config.yaml still shows
the old settings. Resuming an unfinished run (killed, preempted, interrupted) is what resuming is for: no check.
"""

import os
import shutil
import time
from typing import Any

from omegaconf import DictConfig, OmegaConf

from gradlab.checkpoints.load import _differences, load
from gradlab.checkpoints.run_dirs import read_metrics
from gradlab.errors import UserError

# Where a run is, what it resumes from, and this guard's own switch: not settings of the run.
NOT_SETTINGS = ("ckpt_path", "paths", "resume")


def guard(cfg: DictConfig, run_dir: str) -> None:
    """UserError when `cfg` resumes the finished run in `run_dir` with other settings, unless `+resume.force=true`;
    with it, the run's metrics.json and best checkpoint are first kept (hard links or copies) in <run>/kept/<time>/."""
    ckpt_path = cfg.get("ckpt_path")
    metrics_path = os.path.join(run_dir, "metrics.json")
    if not ckpt_path or not os.path.isfile(metrics_path):
        return
    if os.path.dirname(os.path.dirname(os.path.abspath(str(ckpt_path)))) != os.path.abspath(run_dir):
        return  # a new run started from a checkpoint: nothing of another run is written
    metrics = read_metrics(metrics_path)
    if metrics.get("status") != "completed":
        return
    saved = load(str(ckpt_path))["gradlab_config"]
    current = OmegaConf.to_container(cfg, resolve=True)
    # Where things are is not a setting: paths under the run folder (checkpoint dirpath, logger save_dir) follow
    # the folder when it was moved, and data.root follows paths.data_dir; the longest old path is replaced first.
    old_paths, new_paths = saved.get("paths") or {}, current.get("paths") or {}
    for key in sorted(old_paths, key=lambda k: -len(str(old_paths[k]))):
        if isinstance(old_paths[key], str) and old_paths[key] and isinstance(new_paths.get(key), str):
            saved = _moved(saved, old_paths[key], new_paths[key])
    stored, current = _settings(saved), _settings(current)
    changes = _differences(stored, current, "")
    if not changes:
        return
    shown = "; ".join(c.lstrip(".") for c in changes[:8]) + (f"; and {len(changes) - 8} more" if len(changes) > 8 else "")
    force = bool((cfg.get("resume") or {}).get("force", False))
    if not force:
        raise UserError(f"{run_dir} is a finished run (metrics.json: completed), and this command changes its "
                        f"settings: {shown}. Going on would overwrite its results. Nothing was written. Start a new "
                        "run instead (drop ckpt_path), or add +resume.force=true to go on anyway: its metrics.json "
                        "and best checkpoint are then kept in <run>/kept/<time>/.")
    kept = keep_results(run_dir, metrics)
    print(f"+resume.force=true: resuming the finished run {run_dir} with changed settings ({shown}); its results "
          f"are kept in {kept}.")


def keep_results(run_dir: str, metrics: dict[str, Any]) -> str:
    """Hard-link (or copy) metrics.json and the best checkpoint into <run>/kept/<time>/; the folder they lie in."""
    kept = os.path.join(run_dir, "kept", time.strftime("%Y-%m-%d_%H-%M-%S"))
    os.makedirs(kept, exist_ok=True)
    best = metrics.get("best_checkpoint")
    files = [os.path.join(run_dir, "metrics.json")]
    if isinstance(best, str):  # by name in this folder, as _checkpoint_of_run finds it
        files.append(os.path.join(run_dir, "checkpoints", os.path.basename(best)))
    for file in files:
        if not os.path.isfile(file):
            continue
        target = os.path.join(kept, os.path.basename(file))
        try:
            os.link(file, target)  # the checkpoint writer replaces files (a new inode): the link keeps the old one
        except OSError:
            shutil.copy2(file, target)
    return kept


def _moved(value: Any, old: str, new: str) -> Any:
    if isinstance(value, dict):
        return {k: _moved(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [_moved(v, old, new) for v in value]
    return new + value[len(old):] if isinstance(value, str) and value.startswith(old) else value


def _settings(config: Any) -> dict:
    return {k: v for k, v in config.items() if k not in NOT_SETTINGS} if isinstance(config, dict) else {}
