"""The network and loss of Cohen et al.'s (ICLR 2021) edge-of-stability figures: fc-tanh with square loss.

    python train.py experiment=edge_of_stability
"""

import torch
import torch.nn.functional as F
from torch import nn


class FCTanh(nn.Module):
    """in_features → hidden[0] → … → num_classes, tanh between, with torch's default nn.Linear init (uniform,
    ±1/√fan_in), as in the paper: Xavier's larger weights (ManualMLP's) start the sharpness several times higher.
    Inputs of any shape are flattened to (B, in_features)."""

    def __init__(self, in_features: int, hidden: list[int], num_classes: int):
        super().__init__()
        sizes = [in_features, *hidden]
        layers: list[nn.Module] = [nn.Flatten()]
        for a, b in zip(sizes, sizes[1:]):
            layers += [nn.Linear(a, b), nn.Tanh()]
        layers.append(nn.Linear(sizes[-1], num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)  # (B, num_classes)


class OneHotMSE(nn.Module):
    """½·Σ_c (z_c − onehot(t)_c)², averaged over the batch: logits z (B, C), class indices t (B,)."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        one_hot = F.one_hot(target, self.num_classes).to(logits.dtype)  # (B, C)
        return 0.5 * (logits - one_hot).square().sum(1).mean()
