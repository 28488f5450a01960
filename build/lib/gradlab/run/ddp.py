"""DDP under Hydra: the ranks Lightning starts itself must join this job, in this job's run dir.

With `strategy: ddp` and no cluster launcher, Lightning starts ranks 1..N-1 as new `python train.py` processes, built
from `sys.argv` plus `hydra.run.dir=<HydraConfig run.dir>`. That is right for a single run but not in a multirun:
argv still holds `-m` and the sweep lists (every child would start the whole sweep again), and `hydra.run.dir` is
not the job's dir under the sweep dir. So while a job runs, Lightning sees only that job's overrides and its output
dir. Afterwards, what the launch left in this process (rank variables, thread count, the process group) is undone,
so that the sweep's next job starts its own ranks instead of waiting for the last job's.

Under SLURM (srun starts every rank) and torchrun, no process is started here and none of this applies.
"""

import os
import sys
from contextlib import contextmanager
from typing import Iterator

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, read_write

# Set in the launching process by Lightning's subprocess launcher; a leftover LOCAL_RANK makes the next job
# believe its ranks were started externally.
LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "OMP_NUM_THREADS")
# Hydra's command-line flags that take a value (argparse accepts "--flag value" and "--flag=value").
VALUE_FLAGS = {"--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd"}


def child_argv(argv: list[str], task_overrides: list[str]) -> list[str]:
    """`argv` with its overrides replaced by this job's own, `-m` dropped and the run mode forced to RUN."""
    kept, i = [argv[0]], 1
    while i < len(argv):
        arg = argv[i]
        if arg in VALUE_FLAGS:
            kept += argv[i:i + 2]
            i += 2
            continue
        if arg.startswith("-") and arg not in ("-m", "--multirun"):
            kept.append(arg)
        i += 1
    # hydra.mode=RUN: an hparams_search config sets MULTIRUN, and a child must train, not start a search.
    return kept + list(task_overrides) + ["hydra.mode=RUN"]


@contextmanager
def ddp_children_join_this_job(output_dir: str) -> Iterator[None]:
    launching = HydraConfig.initialized() and "LOCAL_RANK" not in os.environ
    saved_env = {key: os.environ.get(key) for key in LAUNCH_ENV}
    saved_argv, saved_threads = sys.argv, torch.get_num_threads()
    if launching:
        hydra_cfg = HydraConfig.get()
        # Unresolved: in a multirun, resolving it would claim a run folder nobody uses (conf/hydra/default.yaml).
        saved_run_dir = OmegaConf.to_container(hydra_cfg.run, resolve=False)["dir"]
        sys.argv = child_argv(sys.argv, list(hydra_cfg.overrides.task))
        with read_write(hydra_cfg.run):
            hydra_cfg.run.dir = output_dir  # Lightning appends hydra.run.dir=<this>
    try:
        yield
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        if launching:
            sys.argv = saved_argv
            with read_write(hydra_cfg.run):
                hydra_cfg.run.dir = saved_run_dir
            for key, value in saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            torch.set_num_threads(saved_threads)
