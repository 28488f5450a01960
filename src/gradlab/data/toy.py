"""Tiny classification problems generated in code from a seed: nothing to download, an epoch in milliseconds.

    python train.py experiment=toy_xor                               # the 3-4-2 sigmoid net on 3-bit XOR
    python train.py data=toy data.task=moons data.input_dim=2 model=mlp
    python train.py data=toy data.task=spirals data.input_dim=2 data.num_classes=3 model=mlp model.hidden=[64,64]
"""

import math
from typing import Optional

import torch

from gradlab.data.tensor_loader import InMemoryDataModule, TensorBatches
from gradlab.errors import UserError

TASKS = ("xor", "moons", "spirals")


def xor(n: int, input_dim: int, noise: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Corners of the [-1, 1]^d cube plus Gaussian noise; the label is the parity of the corner's bits
    (d = 2 is XOR itself). No single hyperplane separates the classes: it needs a hidden layer.
    Centred corners, not {0, 1}: from 0/1 inputs the 3-4-2 sigmoid net sticks at 86% in half the seeds."""
    bits = torch.randint(0, 2, (n, input_dim), generator=gen)
    x = 2 * bits.float() - 1 + noise * torch.randn(n, input_dim, generator=gen)
    return x, bits.sum(1) % 2


def moons(n: int, noise: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two interleaving half circles (as sklearn.datasets.make_moons)."""
    y = torch.randint(0, 2, (n,), generator=gen)
    angle = math.pi * torch.rand(n, generator=gen)
    upper = torch.stack([torch.cos(angle), torch.sin(angle)], 1)             # class 0: centred at (0, 0)
    lower = torch.stack([1 - torch.cos(angle), 0.5 - torch.sin(angle)], 1)   # class 1: shifted, flipped
    x = torch.where(y[:, None] == 0, upper, lower)
    return x + noise * torch.randn(n, 2, generator=gen), y


def spirals(n: int, num_classes: int, noise: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`num_classes` spiral arms winding out of the origin (the CS231n spiral data); noise jitters the angle."""
    y = torch.randint(0, num_classes, (n,), generator=gen)
    radius = torch.rand(n, generator=gen)
    # Each arm turns 4 radians from the centre to the rim and starts 2π/K after the previous one.
    angle = 2 * math.pi * y / num_classes + 4 * radius + noise * torch.randn(n, generator=gen)
    return torch.stack([radius * torch.sin(angle), radius * torch.cos(angle)], 1), y


class ToyDataModule(InMemoryDataModule):
    """`n_train + n_val + n_test` points drawn once from `seed`, then split in that order.

    Batches are `(x (B, input_dim) float, y (B,))`; y is long, or float 0/1 when `num_classes == 1`
    (the binary setting: one logit and BCE-with-logits).
    """

    def __init__(self, task: str = "xor", input_dim: int = 3, num_classes: int = 2, noise: float = 0.1,
                 n_train: int = 800, n_val: int = 200, n_test: int = 200, seed: int = 0, batch_size: int = 32,
                 num_workers: int = 0, pin_memory: Optional[bool] = None):
        super().__init__()
        if task not in TASKS:
            raise UserError(f"data.task={task!r} is not known; choose one of {', '.join(TASKS)}.")
        if task in ("moons", "spirals") and input_dim != 2:
            raise UserError(f"data.task={task} makes 2-D points but data.input_dim={input_dim}; "
                            f"add data.input_dim=2 to the command.")
        if task in ("xor", "moons") and num_classes not in (1, 2):
            raise UserError(f"data.task={task} has two classes: use data.num_classes=2 (softmax over two "
                            f"logits) or 1 (one logit, BCE-with-logits), not {num_classes}.")
        if task == "spirals" and num_classes < 2:
            raise UserError(f"data.task=spirals needs data.num_classes >= 2 arms, got {num_classes}.")
        if input_dim < 1 or min(n_train, n_val, n_test) < 1 or noise < 0:
            raise UserError(f"data.input_dim, data.n_train, data.n_val and data.n_test must be positive and "
                            f"data.noise >= 0; got {input_dim}, {n_train}, {n_val}, {n_test}, {noise}.")
        self.save_hyperparameters(logger=False)

    def generate(self) -> tuple[torch.Tensor, torch.Tensor]:
        hp = self.hparams
        gen = torch.Generator().manual_seed(hp.seed)
        n = hp.n_train + hp.n_val + hp.n_test
        if hp.task == "xor":
            x, y = xor(n, hp.input_dim, hp.noise, gen)
        elif hp.task == "moons":
            x, y = moons(n, hp.noise, gen)
        else:
            x, y = spirals(n, hp.num_classes, hp.noise, gen)
        return x, (y.float() if hp.num_classes == 1 else y)

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is not None:
            return
        x, y = self.generate()
        a, b = self.hparams.n_train, self.hparams.n_train + self.hparams.n_val
        self.train_set, self.val_set, self.test_set = (TensorBatches(x[s], y[s]) for s in
                                                       (slice(0, a), slice(a, b), slice(b, None)))


def lesson_data(mnist: Optional[str], n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Data for the lesson scripts: (x (N, D), y (N,), number of classes).

    3-arm spirals generated from `seed`, or, given a folder holding MNIST/raw/, its training images flattened.
    """
    if mnist is None:
        x, y = spirals(n, num_classes=3, noise=0.2, gen=torch.Generator().manual_seed(seed))
        return x, y, 3
    from gradlab.data.mnist import MNISTDataModule

    dm = MNISTDataModule(root=mnist, download=False, val_size=0.1)
    dm.setup("fit")
    x, y = dm.train_set.tensors
    return x.flatten(1), y, 10
