"""nn.Module faces of the hand-written Functions.

Linear and BatchNorm1d subclass their torch twins, so parameters, buffers, init and state_dict keys
are identical: weights load across the manual and autograd backends unchanged. Only forward differs.
"""

import torch
from torch import nn

from gradlab.autograd.activations import leaky_relu, relu, sigmoid, tanh
from gradlab.autograd.batchnorm import batch_norm, batch_norm_eval
from gradlab.autograd.linear import linear
from gradlab.autograd.losses import bce_with_logits, softmax_cross_entropy


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class BatchNorm1d(nn.BatchNorm1d):
    """(B, H) inputs only; always affine with running statistics (the nn.BatchNorm1d defaults)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, **kwargs):
        if not kwargs.get("affine", True) or not kwargs.get("track_running_stats", True):
            raise ValueError("gradlab BatchNorm1d supports only affine=True, track_running_stats=True")
        super().__init__(num_features, eps=eps, momentum=momentum, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return batch_norm_eval(x, self.weight, self.bias, self.running_mean, self.running_var, self.eps)
        y, mean, var = batch_norm(x, self.weight, self.bias, self.eps)
        self.update_running_stats(mean, var, x.shape[0])
        return y

    @torch.no_grad()
    def update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, n: int) -> None:
        """Fold one batch's mean and biased variance (n samples) into the running averages."""
        self.num_batches_tracked += 1
        # momentum=None means a cumulative average, as in nn.BatchNorm1d
        m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        self.running_mean.lerp_(mean, m)
        self.running_var.lerp_(var * (n / (n - 1)), m)  # running variance is unbiased, as in torch


class Sigmoid(nn.Module):
    def forward(self, x):
        return sigmoid(x)


class Tanh(nn.Module):
    def forward(self, x):
        return tanh(x)


class ReLU(nn.Module):
    def forward(self, x):
        return relu(x)


class LeakyReLU(nn.Module):
    def __init__(self, negative_slope: float = 0.01):
        super().__init__()
        self.negative_slope = negative_slope

    def forward(self, x):
        return leaky_relu(x, self.negative_slope)

    def extra_repr(self) -> str:
        return f"negative_slope={self.negative_slope}"


class SoftmaxCrossEntropyLoss(nn.Module):
    """Takes logits (B, C) and long targets (B,), like nn.CrossEntropyLoss with its defaults."""

    def forward(self, logits, target):
        return softmax_cross_entropy(logits, target)


class BCEWithLogitsLoss(nn.Module):
    def forward(self, logits, target):
        return bce_with_logits(logits, target)
