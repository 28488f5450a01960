"""The affine layer y = x·Wᵀ + b with hand-written backward (weights laid out (out, in) like nn.Linear)."""

import torch
from torch.autograd import Function

from gradlab.autograd.amp import autocast_backward, autocast_forward


class Linear(Function):
    @staticmethod
    @autocast_forward
    def forward(ctx, x, weight, bias=None):
        # x (B, in), weight (out, in), bias (out,) or None
        if x.dim() != 2:
            raise ValueError(f"linear expects a (batch, features) input, got shape {tuple(x.shape)}; flatten it first")
        need_x, need_w, _ = ctx.needs_input_grad
        # Save only what backward will read: x for dL/dW, W for dL/dx. The first layer (input without
        # grad) keeps no W reference; a frozen layer keeps no activation.
        ctx.save_for_backward(x if need_w else None, weight if need_x else None)
        if bias is None:
            return x.mm(weight.t())               # (B, out)
        return torch.addmm(bias, x, weight.t())   # (B, out): bias add fused into the matmul

    @staticmethod
    @autocast_backward
    def backward(ctx, grad_y):
        # grad_y (B, out)
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        grad_x = grad_y.mm(weight) if need_x else None       # ∂y/∂x = W:   (B, out)·(out, in) = (B, in)
        grad_w = grad_y.t().mm(x) if need_w else None        # ∂y/∂W = x:   (out, B)·(B, in) = (out, in)
        grad_b = grad_y.sum(0) if need_b else None           # ∂y/∂b = 1, summed over the batch: (out,)
        return grad_x, grad_w, grad_b


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return Linear.apply(x, weight, bias)
