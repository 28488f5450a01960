"""MNIST, Fashion-MNIST and KMNIST through torchvision, decoded once into normalized tensors in memory."""

import os
from typing import Optional

import torch
from torchvision import datasets

from gradlab.data.idx import check_pair
from gradlab.data.tensor_loader import InMemoryDataModule, TensorBatches
from gradlab.config import require, val_count
from gradlab.errors import UserError

# name -> (torchvision class, mean, std of the training pixels in [0, 1])
DATASETS = {
    "mnist": (datasets.MNIST, 0.1307, 0.3081),
    "fashion_mnist": (datasets.FashionMNIST, 0.2860, 0.3530),
    "kmnist": (datasets.KMNIST, 0.1918, 0.3483),
}


def raw_folder(root: str, name: str) -> str:
    return os.path.join(root, DATASETS[name][0].__name__, "raw")


def expected_files(name: str) -> list[str]:
    """The four uncompressed IDX files torchvision reads, e.g. `train-images-idx3-ubyte`."""
    return [os.path.splitext(os.path.basename(url))[0] for url, _ in DATASETS[name][0].resources]


def missing_data_message(root: str, name: str, reason: str) -> str:
    folder = raw_folder(root, name)
    return (
        f"{name} data not found at {folder} ({reason}). Expected the IDX files "
        f"{', '.join(expected_files(name))} (or their .gz downloads) in that folder. "
        f"Fix: copy them there, point `data.root=` at a folder that holds "
        f"{DATASETS[name][0].__name__}/raw/, or run once with internet access so they download."
    )


class MNISTDataModule(InMemoryDataModule):
    """The MNIST family with a seeded train/val split of the official training set.

    Images are decoded from IDX once and kept as one normalized float tensor (N, 1, 28, 28): no per-sample
    PIL transform in the training loop, which is where a CPU epoch otherwise loses its time.
    `batch_size` is per device: under DDP the effective batch is `batch_size x devices x nodes`.
    """

    def __init__(self, root: str = "data", dataset: str = "mnist", batch_size: int = 64, val_size: int | float = 5000,
                 split_seed: int = 12345, num_workers: int = 0, pin_memory: bool = False, download: bool = True,
                 num_classes: int = 10, input_dim: int = 784):
        super().__init__()
        if dataset not in DATASETS:
            raise UserError(f"data.dataset={dataset!r} is not known; choose one of {sorted(DATASETS)}.")
        require("data.val_size", val_size)
        self.save_hyperparameters(logger=False)

    def prepare_data(self) -> None:
        cls = DATASETS[self.hparams.dataset][0]
        root, name = self.hparams.root, self.hparams.dataset
        for train in (True, False):
            self._check_files(train)
            try:
                cls(root, train=train, download=self.hparams.download)
            except RuntimeError as err:
                reason = "download failed: no internet?" if self.hparams.download else "download is off"
                if "Dataset not found" not in str(err) and "Error downloading" not in str(err):
                    raise UserError(f"Could not read {name} from {raw_folder(root, name)}: {err}") from err
                raise UserError(missing_data_message(root, name, reason)) from None

    def _load(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        cls, mean, std = DATASETS[self.hparams.dataset]
        self._check_files(train)
        try:
            ds = cls(self.hparams.root, train=train, download=False)
        except RuntimeError as err:
            raise UserError(missing_data_message(self.hparams.root, self.hparams.dataset, str(err))) from None
        images = ds.data.unsqueeze(1).float().div_(255).sub_(mean).div_(std)  # (N, 1, 28, 28)
        return images, ds.targets.long()

    def _check_files(self, train: bool) -> None:
        # Missing files get missing_data_message (via torchvision); present but damaged ones get their own.
        names = expected_files(self.hparams.dataset)
        images, labels = (os.path.join(raw_folder(self.hparams.root, self.hparams.dataset), f)
                          for f in (names[:2] if train else names[2:]))
        if os.path.exists(images) and os.path.exists(labels):
            try:
                check_pair(images, labels, self.hparams.num_classes)
            except UserError as err:
                raise UserError(f"{err} Fix: replace the file (delete it and run with data.download=true to fetch "
                                "it again, or copy it anew).") from None

    def setup(self, stage: Optional[str] = None) -> None:
        if stage in (None, "fit", "validate") and self.train_set is None:
            x, y = self._load(train=True)
            n_val = self._val_count(len(x))
            perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.hparams.split_seed))
            val_idx, train_idx = perm[:n_val], perm[n_val:]
            self.train_set = TensorBatches(x[train_idx], y[train_idx])
            self.val_set = TensorBatches(x[val_idx], y[val_idx])
        if stage in (None, "test") and self.test_set is None:
            self.test_set = TensorBatches(*self._load(train=False))

    def _val_count(self, n: int) -> int:
        return val_count(self.hparams.val_size, n, "images of the training set")
