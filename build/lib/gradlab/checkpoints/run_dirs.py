"""Run folders: a new one for every run, which checkpoint `ckpt_path=last` or `ckpt_path=<run folder>` means, and
where a resumed run writes.

    logs/train/runs/<time>/checkpoints/last.ckpt       # `last`: the newest of these, by modification time
    logs/train/runs/<time>/checkpoints/epoch_NNN.ckpt  # a run folder, for eval/predict: its best (metrics.json)
    logs/train/runs/<time>_01/                         # a second run started in the same second
"""

import glob
import json
import os
import sys
import time

from omegaconf import DictConfig, OmegaConf

from gradlab.errors import EXIT_USER_ERROR, UserError

# A name taken by another run gets the first free suffix: <time>, <time>_01, <time>_02, ... (two digits, so that
# names still sort by time up to 99 runs a second).
MAX_CLAIMS = 10_000


def claim_dir(parent: str, name: str = "") -> str:
    """`parent/<name>`, or else a new folder `parent/<now>[_NN]` that this process alone created.

    os.mkdir is atomic (also on NFS): of the runs that start in the same second, on this machine or on others
    sharing the filesystem, exactly one creates a given name; the others take the next suffix. A given `name` (the
    SLURM job id, the same for every rank of the job and again after a requeue) is shared, not claimed.
    """
    try:
        if name:
            return os.path.join(parent, name)  # Hydra creates it, or finds it from an earlier rank or attempt
        os.makedirs(parent, exist_ok=True)
        stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
        for n in range(MAX_CLAIMS):
            path = os.path.join(parent, stamp if n == 0 else f"{stamp}_{n:02d}")
            try:
                os.mkdir(path)
                return path
            except FileExistsError:
                continue
    except OSError as err:
        raise UserError(f"Cannot create a run folder under {parent}: {err.strerror or err}. Nothing was started. "
                        "Fix: make it writable, or point paths.log_dir (or paths.root_dir, or GRADLAB_ROOT) at a "
                        "folder you can write to.") from None
    raise UserError(f"{parent} already holds {MAX_CLAIMS} run folders named {stamp}*; wait a second and retry.")


def _claim_dir_or_exit(parent: str, name: str = "") -> str:
    # Resolved by Hydra before the task starts, where an exception would come out as an interpolation traceback.
    try:
        return claim_dir(str(parent), "" if name is None else str(name))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


def register_resolver() -> None:
    """`${gradlab.claim_dir:<parent>[,<name>]}` for conf/hydra/default.yaml. Cached (like `${now:}`): Hydra and
    HydraConfig.get() read hydra.run.dir more than once, and a sweep's jobs (local, submitit, SLURM) copy the
    resolved sweep dir from the launching process's config instead of claiming one each."""
    if not OmegaConf.has_resolver("gradlab.claim_dir"):
        OmegaConf.register_new_resolver("gradlab.claim_dir", _claim_dir_or_exit, use_cache=True)


def read_metrics(path: str) -> dict:
    """A run's metrics.json as a dict (train.py writes it), or a UserError naming the file."""
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read(MAX_RECORD_BYTES + 1).decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise UserError(f"{path} is not a readable metrics.json ({_reason(err)}). train.py writes it at the end "
                        "of a run: delete it (the run then counts as unfinished) or copy it again.") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a metrics.json: it holds a JSON {type(data).__name__}, not an object.")
    return data


def read_overrides(path: str) -> list[str]:
    """A job's .hydra/overrides.yaml as a list of `key=value` strings, or a UserError naming the file."""
    import yaml

    try:
        with open(path, "rb") as f:
            data = yaml.safe_load(f.read(MAX_RECORD_BYTES + 1).decode("utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError, ValueError, RecursionError) as err:
        raise UserError(f"{path} is not a readable overrides.yaml ({_reason(err)}). Hydra writes it into every "
                        "run folder: copy the folder again, or remove that run.") from None
    data = [] if data is None else data
    if not isinstance(data, list) or not all(isinstance(o, str) for o in data):
        raise UserError(f"{path} is not a Hydra overrides.yaml: expected a list of key=value strings.")
    return data


# Both files are a few kB; a bigger one is not what train.py or Hydra wrote.
MAX_RECORD_BYTES = 10 * 2**20


def _reason(err: BaseException) -> str:
    if isinstance(err, OSError):
        return err.strerror or type(err).__name__
    text = " ".join(str(err).split())[:160]
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


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
        chosen = read_metrics(metrics).get("best_checkpoint")
        # By name inside this folder, so that a run folder copied elsewhere still finds its own file.
        here = os.path.join(run_dir, "checkpoints", os.path.basename(chosen)) if isinstance(chosen, str) else ""
        if os.path.isfile(here):
            return here
    if os.path.isfile(last):
        return last
    raise UserError(f"ckpt_path={run_dir} is a folder without checkpoints/last.ckpt; pass a .ckpt file.")
