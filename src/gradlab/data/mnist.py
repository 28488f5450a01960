"""MNIST, Fashion-MNIST and KMNIST: downloaded by torchvision, read once from their IDX files (plain or .gz) into
normalized tensors in memory.

Without internet plain MNIST falls back to the 5,000 real digits shipped in gradlab/data/sample (docs/usage.md,
"Data: the shipped sample"): `data.allow_sample=false`, what cluster jobs should use, makes that an error instead.
"""

import contextlib
import io
import logging
import os
import socket
from typing import Optional

import torch
from torchvision import datasets

from gradlab.config.rules import require, val_count
from gradlab.data.idx import check_pair, read_idx
from gradlab.data.tensor_loader import InMemoryDataModule, MirroredBatches, TensorBatches
from gradlab.errors import UserError

log = logging.getLogger(__name__)

# name -> (torchvision class, mean, std of the training pixels in [0, 1])
DATASETS = {
    "mnist": (datasets.MNIST, 0.1307, 0.3081),
    "fashion_mnist": (datasets.FashionMNIST, 0.2860, 0.3530),
    "kmnist": (datasets.KMNIST, 0.1918, 0.3483),
}
FULL_TRAIN = 60_000  # images in each full training set: what an integer data.val_size is counted against
SAMPLE_ROOT = os.path.join(os.path.dirname(__file__), "sample")  # MNIST/raw/*.gz: 4,000 train / 1,000 test digits
SAMPLE_TRAIN = 4000
SAMPLE_NOTE = ("mnist sample (4,000 train / 1,000 test real digits shipped with gradlab; "
               "full MNIST could not be downloaded)")
DOWNLOAD_TIMEOUT_S = 30  # per connection: a network that drops packets must not hang the run for minutes


def raw_folder(root: str, name: str) -> str:
    return os.path.join(root, DATASETS[name][0].__name__, "raw")


def expected_files(name: str) -> list[str]:
    """The four uncompressed IDX files torchvision reads, e.g. `train-images-idx3-ubyte`."""
    return [os.path.splitext(os.path.basename(url))[0] for url, _ in DATASETS[name][0].resources]


def split_files(folder: str, name: str, train: bool) -> Optional[tuple[str, str]]:
    """(images, labels) of one split in `folder`, each the IDX file or else its .gz download; None if one is missing."""
    found = []
    for file in expected_files(name)[:2] if train else expected_files(name)[2:]:
        path = os.path.join(folder, file)
        if not os.path.exists(path):
            path += ".gz"  # as downloaded: read through gzip, never extracted (the folder may be read-only)
            if not os.path.exists(path):
                return None
        found.append(path)
    return found[0], found[1]


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
    Only the train split must be there; a missing test split fails only when the run tests (`test=false` avoids it).
    """

    def __init__(self, root: str = "data", dataset: str = "mnist", batch_size: int = 64, val_size: int | float = 5000,
                 split_seed: int = 12345, num_workers: int = 0, pin_memory: Optional[bool] = None, download: bool = True,
                 allow_sample: bool = True, num_classes: int = 10, input_dim: int = 784,
                 mirror_symmetric: bool = False, hflip: bool = False):
        super().__init__()
        if dataset not in DATASETS:
            raise UserError(f"data.dataset={dataset!r} is not known; choose one of {sorted(DATASETS)}.")
        require("data.val_size", val_size)
        if hflip and not mirror_symmetric:
            raise UserError(f"data.hflip=true flips training images left-right, but {dataset} is not mirror-"
                            f"symmetric (a mirrored digit or character is another shape, or none): set "
                            f"data.hflip=false. Clothing is (data=fashion_mnist).")
        self.save_hyperparameters(logger=False)
        # What the run read instead of the configured data, if anything: train.py records it in metrics.json.
        self.data_note: Optional[str] = None
        self._download_tried = False
        self._announced = False

    def prepare_data(self) -> None:
        """Download what is missing (once), then check every file there, so a damaged test file fails before fit."""
        hp = self.hparams
        folder = raw_folder(hp.root, hp.dataset)
        complete = all(split_files(folder, hp.dataset, train) for train in (True, False))
        if not complete and hp.download and not self._download_tried:
            self._download_tried = True
            _download(DATASETS[hp.dataset][0], hp.root)
        folder = self._folder()
        if self.data_note and not self._announced:
            self._announced = True
            _announce_sample(raw_folder(hp.root, hp.dataset), n_val=self._val_count(SAMPLE_TRAIN))
        for train in (True, False):
            self._check_files(folder, train)

    def _folder(self) -> str:
        """The raw folder to read: data.root's, or the shipped sample when the download left no train split there."""
        hp = self.hparams
        folder = raw_folder(hp.root, hp.dataset)
        if split_files(folder, hp.dataset, train=True):
            return folder
        if hp.download and hp.allow_sample and hp.dataset == "mnist":
            # Every DDP rank decides alike: the files are still missing after local rank 0's prepare_data.
            self.data_note = SAMPLE_NOTE
            return raw_folder(SAMPLE_ROOT, "mnist")
        reason = "download is off" if not hp.download else "download failed: no internet?"
        raise UserError(missing_data_message(hp.root, hp.dataset, reason))

    def _load(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        _, mean, std = DATASETS[self.hparams.dataset]
        folder = self._folder()
        files = self._check_files(folder, train)
        if files is None:
            test_files = ", ".join(expected_files(self.hparams.dataset)[2:])
            raise UserError(f"The {self.hparams.dataset} test split is missing: {folder} has no {test_files} "
                            f"(nor their .gz), as in a train-only folder. Fix: copy them there, or run with "
                            f"test=false to train and validate only.")
        images, labels = read_idx(files[0], 3), read_idx(files[1], 1)  # (N, 28, 28), (N,) unsigned bytes
        x = torch.from_numpy(images).unsqueeze(1).float().div_(255).sub_(mean).div_(std)  # (N, 1, 28, 28)
        return x, torch.from_numpy(labels).long()

    def _check_files(self, folder: str, train: bool) -> Optional[tuple[str, str]]:
        """The split's (images, labels) once checked, None if it is missing; damaged files get their own message."""
        files = split_files(folder, self.hparams.dataset, train)
        if files is not None:
            try:
                check_pair(*files, self.hparams.num_classes)
            except UserError as err:
                raise UserError(f"{err} Fix: replace the file (delete it and run with data.download=true to fetch "
                                "it again, or copy it anew).") from None
        return files

    def setup(self, stage: Optional[str] = None) -> None:
        if stage in (None, "fit", "validate") and self.train_set is None:
            x, y = self._load(train=True)
            n_val = self._val_count(len(x))
            perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.hparams.split_seed))
            val_idx, train_idx = perm[:n_val], perm[n_val:]
            self.train_set = (MirroredBatches if self.hparams.hflip else TensorBatches)(x[train_idx], y[train_idx])
            self.val_set = TensorBatches(x[val_idx], y[val_idx])
            if split_files(self._folder(), self.hparams.dataset, train=False) is None:
                log.warning("%s: %s has no test split: training works, testing will not (run with test=false, "
                            "or copy the t10k-* files there).", self.hparams.dataset, self._folder())
        if stage in (None, "test") and self.test_set is None:
            self.test_set = TensorBatches(*self._load(train=False))

    def _val_count(self, n: int) -> int:
        size = self.hparams.val_size
        if self.data_note and not (isinstance(size, float) and size < 1):
            size = round(size * n / FULL_TRAIN)  # a count is meant for the full 60,000: the sample keeps its share
        return val_count(size, n, "images of the training set")


def _download(cls: type, root: str) -> None:
    """Fetch the dataset's four .gz files (torchvision's mirrors and MD5s), quietly; whatever is still missing
    afterwards, the caller reports in one line. They are kept compressed: gradlab.data.idx reads .gz with its caps,
    so nothing is ever unpacked to disk (torchvision's download would decompress each file whole)."""
    from torchvision.datasets.utils import download_url

    folder = os.path.join(root, cls.__name__, "raw")
    log.info("Downloading %s to %s", cls.__name__, folder)
    chatter = io.StringIO()
    timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)  # torchvision's urlopen calls take no timeout of their own
    try:
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            for filename, md5 in cls.resources:
                for mirror in cls.mirrors:
                    try:
                        download_url(f"{mirror}{filename}", folder, filename, md5)
                        break
                    except (RuntimeError, OSError):  # torchvision's "Error downloading ..."; URLError is an OSError
                        continue
    finally:
        socket.setdefaulttimeout(timeout)


def _announce_sample(folder: str, n_val: int) -> None:
    """The one loud line of a run that trains on the shipped sample instead of MNIST."""
    from rich.console import Console

    Console(stderr=True).print(
        f"MNIST could not be downloaded, so this run uses the {SAMPLE_TRAIN + 1000:,} real digits shipped "
        f"with gradlab ({SAMPLE_TRAIN - n_val:,} train / {n_val:,} val / 1,000 test): accuracy will be below full "
        f"MNIST's. For the real thing put MNIST's files in {folder}; data.allow_sample=false makes this an error.",
        style="bold yellow", markup=False, highlight=False, soft_wrap=True)
