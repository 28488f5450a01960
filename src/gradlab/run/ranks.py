"""Every rank of a distributed run states what it sees, and the ranks check that they agree, before the first step.

Multi-node failures users report are disagreements nobody saw: ranks writing to different run folders (a folder
named by the clock on each node), different seeds, the same data shard on every rank (no DistributedSampler), a
MASTER_ADDR one node cannot reach. Here every rank prints one line (in its own task log under SLURM):

    rank 1/2 on n2 (local rank 0): run dir /runs/0, seed 3, master n1:15417, train shard 400 of 800 samples

and all ranks exchange those facts (one all_gather_object over the process group that DDP just made). Where the run
dir or the seed differ, or two shards overlap, every rank stops with the same error, rather than rank 0 alone (the
others would then wait in their next all-reduce until the process-group timeout).
"""

import os
import socket
from typing import Any

import lightning.pytorch as pl
import torch.distributed as dist

from gradlab.errors import UserError


def _shard(trainer: pl.Trainer) -> list[int]:
    """This rank's sample indices for the coming epoch (its DistributedSampler's), [] if there is no sampler."""
    loader = trainer.train_dataloader
    sampler = getattr(loader, "sampler", None)
    if sampler is None or not hasattr(sampler, "num_replicas"):
        sampler = getattr(getattr(loader, "batch_sampler", None), "sampler", None)
    return list(iter(sampler)) if sampler is not None and hasattr(sampler, "num_replicas") else []


class RanksAgree(pl.Callback):
    def __init__(self, run_dir: str, seed: Any) -> None:
        self.run_dir, self.seed = os.path.realpath(run_dir), seed

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
            return
        shard = _shard(trainer)
        size = len(getattr(trainer.train_dataloader, "dataset", []) or [])
        me = {"rank": trainer.global_rank, "host": socket.gethostname(), "local_rank": trainer.local_rank,
              "run_dir": self.run_dir, "seed": self.seed, "shard": shard,
              "master": f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"}
        print(f"rank {me['rank']}/{trainer.world_size} on {me['host']} (local rank {me['local_rank']}): run dir "
              f"{me['run_dir']}, seed {me['seed']}, master {me['master']}, train shard {len(shard)} of {size} samples",
              flush=True)
        everyone: list[Any] = [None] * trainer.world_size
        dist.all_gather_object(everyone, me)
        problems = []
        for key in ("run_dir", "seed", "master"):
            if len({str(r[key]) for r in everyone}) > 1:
                problems.append(f"{key} differs: " + ", ".join(f"rank {r['rank']} {r[key]}" for r in everyone))
        seen: set[int] = set()
        overlap = 0
        for r in everyone:
            overlap += len(seen.intersection(r["shard"]))
            seen.update(r["shard"])
        # DistributedSampler pads the last round with repeated samples when the data does not split evenly.
        padded = sum(len(r["shard"]) for r in everyone) - size
        if overlap > max(padded, 0):
            problems.append(f"the ranks' train shards share {overlap} samples: each rank would train on the same data")
        if problems:
            raise UserError("the ranks of this distributed run disagree (every rank stops here, before training):\n  "
                            + "\n  ".join(problems))
        if trainer.is_global_zero:
            shards = "+".join(str(len(r["shard"])) for r in everyone)
            hosts = ",".join(sorted({r["host"] for r in everyone}))
            print(f"ranks agree: {trainer.world_size} ranks on {hosts}, master {me['master']}: run dir {self.run_dir}, "
                  f"seed {self.seed}; train shards {shards} of {size} samples, {len(seen)} distinct", flush=True)
