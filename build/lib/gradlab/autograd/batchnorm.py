"""Batch normalization over the batch dimension of (B, H) activations, with hand-written backward.

Training normalizes with the batch's own statistics and returns them, so the module can update its
running averages; eval normalizes with those running averages (a fixed per-feature affine map).

Training-mode backward is `once_differentiable`: it reads the normalized input x̂ and 1/σ saved from
forward (intermediates, not inputs), which autograd cannot differentiate through. Second derivatives
through it raise "trying to differentiate twice a function that was marked with @once_differentiable".
"""

import torch
from torch.autograd import Function
from torch.autograd.function import once_differentiable

from gradlab.autograd.amp import at_least_float32


def _check_2d(x: torch.Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"batch_norm expects (batch, features), got shape {tuple(x.shape)}")


class BatchNorm(Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps: float):
        # x (B, H); weight γ, bias β (H,)
        _check_2d(x)
        if x.shape[0] < 2:
            # One sample has zero variance: x̂ would be 0/0-ish noise. torch refuses too.
            raise ValueError(f"batch_norm in training needs more than 1 value per feature, got input of shape "
                             f"{tuple(x.shape)}; use a batch of 2 or more, or eval mode (running statistics)")
        # Each (B, H) temporary costs a fresh allocation (above 128 KiB glibc maps new pages for it), so
        # x - μ becomes x̂ in place and y is one addcmul: 3 such tensors where the plain formulas make 6.
        xf = at_least_float32(x)
        mean = xf.mean(0)                                  # μ (H,)
        xhat = xf - mean                                   # x - μ, made x̂ below (B, H)
        var = xhat.square().mean(0)                        # σ², biased: what the batch is normalized with (H,)
        invstd = torch.rsqrt(var + eps)                    # 1/σ (H,)
        xhat.mul_(invstd)                                  # x̂ = (x - μ)/σ (B, H)
        y = torch.addcmul(bias, weight, xhat)              # γ·x̂ + β (B, H)
        ctx.save_for_backward(xhat, invstd, weight)
        ctx.mark_non_differentiable(mean, var)
        return y.to(x.dtype), mean, var

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, _grad_mean, _grad_var):
        xhat, invstd, weight = ctx.saved_tensors
        g = at_least_float32(grad_y)                       # (B, H)
        batch = g.shape[0]
        grad_bias = g.sum(0)                               # ∂y/∂β = 1, summed over the batch (H,)
        grad_weight = (g * xhat).sum(0)                    # ∂y/∂γ = x̂, summed over the batch (H,)
        grad_x = None
        if ctx.needs_input_grad[0]:
            # x reaches y directly and through μ and σ; the three paths sum to
            # ∂L/∂x = γ/σ · (g - mean_b g - x̂·mean_b g·x̂)  (B, H), in place: two (B, H) tensors, not five
            grad_x = g - grad_bias / batch
            grad_x -= xhat * (grad_weight / batch)
            grad_x *= weight * invstd
        return (grad_x,
                grad_weight if ctx.needs_input_grad[1] else None,
                grad_bias if ctx.needs_input_grad[2] else None,
                None)


class BatchNormEval(Function):
    """y = γ·(x - μ_run)/σ_run + β. Saves only inputs, so double backward works here."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps: float):
        _check_2d(x)
        ctx.eps = eps
        ctx.save_for_backward(x, weight, running_mean, running_var)
        xhat = (at_least_float32(x) - running_mean) * torch.rsqrt(running_var + eps)  # (B, H)
        return (weight * xhat + bias).to(x.dtype)                                    # γ·x̂ + β (B, H)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, running_mean, running_var = ctx.saved_tensors
        g = at_least_float32(grad_y)                                             # (B, H)
        invstd = torch.rsqrt(running_var + ctx.eps)
        grad_x = g * (weight * invstd) if ctx.needs_input_grad[0] else None      # ∂y/∂x = γ/σ_run
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (g * ((at_least_float32(x) - running_mean) * invstd)).sum(0)  # ∂y/∂γ = x̂
        grad_b = g.sum(0) if ctx.needs_input_grad[2] else None                   # ∂y/∂β = 1
        return grad_x, grad_w, grad_b, None, None, None


def batch_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5):
    """Training mode: returns (y, batch mean, biased batch variance)."""
    return BatchNorm.apply(x, weight, bias, eps)


def batch_norm_eval(x, weight, bias, running_mean, running_var, eps: float = 1e-5) -> torch.Tensor:
    return BatchNormEval.apply(x, weight, bias, running_mean, running_var, eps)
