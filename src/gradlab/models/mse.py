"""Square loss on one-hot targets, as Cohen et al. (2021) train their networks for the edge-of-stability figures.

    python train.py experiment=edge_of_stability
"""

import torch
import torch.nn.functional as F
from torch import nn


class OneHotMSE(nn.Module):
    """½·Σ_c (z_c − onehot(t)_c)², averaged over the batch: logits z (B, C), class indices t (B,).

    `num_classes` and `backend` are taken so that this can stand in for the model config's criterion (which passes
    both); the loss is built from torch ops either way, so it has a second derivative.
    """

    def __init__(self, num_classes: int, backend: str = "autograd"):
        super().__init__()
        self.num_classes = num_classes

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        one_hot = F.one_hot(target, self.num_classes).to(logits.dtype)  # (B, C)
        return 0.5 * (logits - one_hot).square().sum(1).mean()
