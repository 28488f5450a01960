"""In-memory datasets that hand a DataLoader whole batches by fancy indexing, not sample by sample."""

import torch
from torch.utils.data import Dataset


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


def identity_collate(batch):
    """The batch from `__getitems__` is already stacked."""
    return batch
