"""A training DataLoader that a checkpoint can stop and restart mid-epoch at exactly the same batch.

Two things make a resumed epoch equal to the uninterrupted one:
  - the order of an epoch is a function of (seed, epoch) only (`SeededShuffle`), not of a random state
    that the interrupted process took with it;
  - the loader counts the batches it has handed out in the epoch; Lightning saves that count in every
    checkpoint (it does so for any loader with `state_dict`/`load_state_dict`) and, after a restore, the
    loader skips that many batches of the same epoch's order.
"""

import os
from typing import Any, Iterator, Optional

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class SeededShuffle(Sampler[int]):
    """A new random order each epoch, drawn from `seed + epoch` (as `DistributedSampler` does).

    Lightning calls `set_epoch` before every training epoch, also after a resume. Under DDP Lightning wraps
    this sampler and shards its order, so every rank must see the same order: it does, for the same seed.
    """

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


class ResumableLoader(DataLoader):
    """A DataLoader whose position in the epoch is part of Lightning's checkpoints.

    Skipped batches are fetched and dropped (an index operation each for in-memory data), so any
    sampler works whose order depends only on the epoch.
    """

    _served = 0  # batches handed out in the current epoch
    _epoch: Optional[int] = None  # the epoch those batches belong to
    _restore: Optional[dict] = None  # a saved position, applied at the next iteration

    def __iter__(self) -> Iterator[Any]:
        # A generator: this body runs at the first `next`, after Lightning's `set_epoch` for the epoch.
        iterator = super().__iter__()
        epoch, restore, self._restore = _sampler_epoch(self), self._restore, None
        skip = 0
        if restore and restore["served"] < len(self) and restore["epoch"] == epoch:
            skip = restore["served"]  # a mid-epoch checkpoint of this very epoch
        self._epoch, self._served = epoch, 0
        for batch in iterator:
            self._served += 1
            if self._served > skip:
                yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "served": self._served}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restore = dict(state_dict)


def _sampler_epoch(loader: DataLoader) -> Optional[int]:
    for sampler in (loader.sampler, loader.batch_sampler, getattr(loader.batch_sampler, "sampler", None)):
        if hasattr(sampler, "epoch"):
            return int(sampler.epoch)
    return None


def run_seed() -> int:
    """The run's seed as `seed_everything` published it (0 outside a run), for orders kept off the global RNG."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


def shuffled_loader(dataset: Dataset, batch_size: int, seed: Optional[int] = None, **kwargs: Any) -> ResumableLoader:
    """The training loader: a `SeededShuffle` order, resumable mid-epoch.

    `seed` defaults to the run's seed (`PL_GLOBAL_SEED`, set by `seed_everything`). The loader gets its own
    generator so that creating an iterator draws nothing from the global RNG, whose state (dropout masks)
    a resumed run restores.
    """
    seed = run_seed() if seed is None else seed
    return ResumableLoader(dataset, batch_size=batch_size, sampler=SeededShuffle(len(dataset), seed),
                           generator=torch.Generator().manual_seed(seed), **kwargs)


def ordered_loader(dataset: Dataset, batch_size: int, **kwargs: Any) -> DataLoader:
    """An evaluation loader in file order that, like `shuffled_loader`, leaves the global RNG alone."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, generator=torch.Generator().manual_seed(0),
                      **kwargs)
