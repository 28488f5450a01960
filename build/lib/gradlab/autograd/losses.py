"""Losses with hand-written backward, all averaged over their elements (reduction='mean').

Each saves only its inputs (the logits, which nothing else keeps, take the place of the log-probs
autograd would save: same size) and recomputes the cheap rest (a softmax, a sigmoid) in backward.
Because every backward is built from differentiable torch ops on saved inputs, double backward works.
Under autocast they compute in float32: 16-bit softmax sums and log1p lose the small differences.
"""

import torch
import torch.nn.functional as F
from torch.autograd import Function

from gradlab.autograd.amp import at_least_float32


class SoftmaxCrossEntropy(Function):
    """mean_b -log softmax(z_b)[t_b]: logits z (B, C), long targets t (B,). Same as F.cross_entropy.

    The forward uses torch's fused log_softmax (log p = z - log Σ exp z, stable because it subtracts
    the row max); on CPU it is several times faster than composing logsumexp by hand.
    """

    @staticmethod
    def forward(ctx, logits, target):
        if logits.dim() != 2 or target.shape != logits.shape[:1]:
            raise ValueError(f"expected logits (B, C) and targets (B,), "
                             f"got {tuple(logits.shape)} and {tuple(target.shape)}")
        ctx.save_for_backward(logits, target)
        log_p = torch.log_softmax(at_least_float32(logits), dim=1)  # (B, C)
        return F.nll_loss(log_p, target)                             # -mean_b log_p[b, t_b]

    @staticmethod
    def backward(ctx, grad_loss):
        logits, target = ctx.saved_tensors
        batch, classes = logits.shape
        softmax = torch.softmax(at_least_float32(logits), dim=1)         # (B, C)
        one_hot = F.one_hot(target, classes).to(softmax.dtype)           # (B, C)
        # ∂loss/∂z = (softmax - one_hot) / B: the famous "softmax minus one-hot"  (B, C)
        return grad_loss * (softmax - one_hot) / batch, None            # no gradient for class indices


class BCEWithLogits(Function):
    """mean(-t·log σ(x) - (1-t)·log(1-σ(x))) for logits x and targets t in [0, 1], any equal shapes.

    Written as max(x, 0) - x·t + log(1 + exp(-|x|)), the same value without ever forming σ(x) and then
    its log: `log(sigmoid(x) + eps)` is -inf or biased by eps for |x| beyond ~17 in float32.
    """

    @staticmethod
    def forward(ctx, logits, target):
        if logits.shape != target.shape:
            raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(target.shape)} must have the same shape")
        ctx.save_for_backward(logits, target)
        x, t = at_least_float32(logits), at_least_float32(target)
        return (x.clamp_min(0) - x * t + torch.log1p(torch.exp(-x.abs()))).mean()

    @staticmethod
    def backward(ctx, grad_loss):
        logits, target = ctx.saved_tensors
        x, t = at_least_float32(logits), at_least_float32(target)
        scale = grad_loss / x.numel()
        grad_x = (torch.sigmoid(x) - t) * scale if ctx.needs_input_grad[0] else None  # ∂/∂x = (σ(x) - t)/N  (x)
        grad_t = -x * scale if ctx.needs_input_grad[1] else None                       # ∂/∂t = -x/N  (t)
        return grad_x, grad_t


class MSE(Function):
    """mean((x - y)²) for equal shapes (no silent broadcasting)."""

    @staticmethod
    def forward(ctx, x, y):
        if x.shape != y.shape:
            raise ValueError(f"input {tuple(x.shape)} and target {tuple(y.shape)} must have the same shape")
        ctx.save_for_backward(x, y)
        return (at_least_float32(x) - at_least_float32(y)).square().mean()

    @staticmethod
    def backward(ctx, grad_loss):
        x, y = ctx.saved_tensors
        grad_x = (at_least_float32(x) - at_least_float32(y)) * (2 * grad_loss / x.numel())  # ∂/∂x = 2(x - y)/N
        return (grad_x if ctx.needs_input_grad[0] else None,
                -grad_x if ctx.needs_input_grad[1] else None)                               # ∂/∂y = -∂/∂x


def softmax_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return SoftmaxCrossEntropy.apply(logits, target)


def bce_with_logits(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return BCEWithLogits.apply(logits, target)


def mse(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return MSE.apply(x, y)
