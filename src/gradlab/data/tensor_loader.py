"""In-memory datasets that hand a DataLoader whole batches by fancy indexing, not sample by sample."""

from typing import Optional

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset


class TensorBatches(Dataset):
    """Like `TensorDataset`, plus `__getitems__`: the DataLoader fetches a batch with one index op per tensor.

    Works with any sampler (shuffling, `DistributedSampler` under DDP) because only the fetch changes.
    """

    def __init__(self, *tensors: torch.Tensor):
        if any(t.shape[0] != tensors[0].shape[0] for t in tensors):
            raise ValueError("all tensors need the same first dimension")
        self.tensors = tensors

    def __len__(self) -> int:
        return self.tensors[0].shape[0]

    def __getitem__(self, index):
        return tuple(t[index] for t in self.tensors)

    def __getitems__(self, indices: list[int]):
        index = torch.as_tensor(indices)
        return tuple(t[index] for t in self.tensors)


class MirroredBatches(TensorBatches):
    """`TensorBatches` of images (N, C, H, W) whose fetched batches have a random half flipped left-right: the
    augmentation for data whose mirror image is the same class (clothing, not digits). Draws from torch's global
    generator, which `seed` fixes."""

    def __getitems__(self, indices: list[int]):
        x, *rest = super().__getitems__(indices)  # x: a fresh (B, C, H, W) copy, safe to change in place
        flip = torch.rand(len(indices)) < 0.5  # (B,)
        x[flip] = x[flip].flip(-1)
        return (x, *rest)


def pin_batches(datamodule: pl.LightningDataModule, setting: Optional[bool]) -> bool:
    """`data.pin_memory`; null pins when the trainer trains on a GPU. A batch in pinned host memory goes to the
    GPU asynchronously; from ordinary (pageable) memory the copy waits for the GPU's queued work, a host sync
    per step."""
    if setting is not None:
        return setting
    trainer = datamodule.trainer
    return trainer is not None and trainer.strategy.root_device.type == "cuda"


def identity_collate(batch):
    """The batch from `__getitems__` is already stacked."""
    return batch


class InMemoryDataModule(pl.LightningDataModule):
    """The loaders of a data module whose splits are `TensorBatches` (`train_set`, `val_set`, `test_set`).

    Training shuffles resumably (`gradlab.data.resumable`); val and test keep their order.
    """

    train_set: Optional[TensorBatches] = None
    val_set: Optional[TensorBatches] = None
    test_set: Optional[TensorBatches] = None

    def _loader(self, dataset: TensorBatches, shuffle: bool) -> DataLoader:
        from gradlab.data.resumable import ordered_loader, shuffled_loader

        make = shuffled_loader if shuffle else ordered_loader
        return make(dataset, batch_size=self.hparams.batch_size, num_workers=self.hparams.num_workers,
                    pin_memory=pin_batches(self, self.hparams.pin_memory), collate_fn=identity_collate,
                    persistent_workers=self.hparams.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)
