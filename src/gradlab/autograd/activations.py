"""Elementwise activations with hand-written backward: each saves its *output*, never its input.

The output is what the next layer's `linear` saves anyway, so saving it costs no memory, and each local
derivative can be written in terms of it: σ' = σ(1-σ), tanh' = 1-tanh², relu' = [y > 0].

Double backward works: every backward is built from differentiable torch ops on saved inputs/outputs,
so with `create_graph=True` autograd differentiates the backward itself (tested with `gradgradcheck`).
"""

import torch
import torch.nn.functional as F
from torch.autograd import Function


# Local derivative × upstream gradient, written in terms of the output y = act(x). Each allocates one
# tensor and finishes in place: fewer temporaries alive at the backward's memory peak. Bool masks
# (y > 0) are avoided because comparing and promoting them costs several extra passes on CPU.
# In-place ops on a fresh tensor keep double backward working (autograd records them too).
def sigmoid_grad(grad_y, y):
    return (1 - y).mul_(y).mul_(grad_y)  # dσ/dx = σ(1 - σ); exactly 0 where saturated (y = 0 or 1)


def tanh_grad(grad_y, y):
    return torch.square(y).neg_().add_(1).mul_(grad_y)  # dtanh/dx = 1 - tanh²


def relu_grad(grad_y, y):
    return torch.sign(y).mul_(grad_y)  # drelu/dx = [x > 0], which is sign(y) because y >= 0


def leaky_relu_grad(grad_y, y, negative_slope: float):
    # dleaky/dx = 1 if x > 0 else slope; sign(y) is 1, 0 or -1 and the slope is in [0, 1], so that is
    # max(sign(y), slope). At x = 0 it gives the slope, as torch does.
    return torch.sign(y).clamp_(min=negative_slope).mul_(grad_y)


# The same derivatives finished in the caller's own buffer `g` (which holds the upstream gradient and
# becomes the result), for code that owns its intermediate gradients: the fused stack in stack.py.
# Never call these on a gradient autograd hands to a backward: it may be shared. None allocates a
# tensor of g's size: where a mask is needed it is written over y itself when the caller says y is no
# longer needed (`y_free`).
def sigmoid_grad_(g, y, y_free=False):
    return g.mul_(y).addcmul_(g, y, value=-1)  # g·σ - (g·σ)·σ = g·σ(1 - σ)


def tanh_grad_(g, y, y_free=False):
    return g.addcmul_(g, y, value=-1).addcmul_(g, y)  # g(1 - tanh) + g(1 - tanh)·tanh = g·(1 - tanh²)


def relu_grad_(g, y, y_free=False):
    return g.mul_(y.sign_() if y_free else torch.sign(y))  # g·[x > 0]


def leaky_relu_grad_(g, y, negative_slope: float, y_free=False):
    return g.mul_((y.sign_() if y_free else torch.sign(y)).clamp_(min=negative_slope))


class Sigmoid(Function):
    @staticmethod
    def forward(ctx, x):
        y = torch.sigmoid(x)  # stable for large |x|, unlike 1 / (1 + exp(-x)) in float16
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        (y,) = ctx.saved_tensors
        return sigmoid_grad(grad_y, y)


class Tanh(Function):
    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        (y,) = ctx.saved_tensors
        return tanh_grad(grad_y, y)


class ReLU(Function):
    """relu'(0) := 0, the subgradient torch uses too: a unit exactly at 0 passes no gradient."""

    @staticmethod
    def forward(ctx, x):
        y = torch.relu(x)
        ctx.save_for_backward(y)  # y > 0 exactly where x > 0, and y is saved by the next layer anyway
        return y

    @staticmethod
    def backward(ctx, grad_y):
        (y,) = ctx.saved_tensors
        return relu_grad(grad_y, y)


class LeakyReLU(Function):
    """leaky'(0) := negative_slope, as in torch. Autograd's leaky_relu keeps its input alive for
    backward; this one keeps only the output (y has the sign of x for a slope in [0, 1]), which
    saves one activation-sized tensor per layer."""

    @staticmethod
    def forward(ctx, x, negative_slope: float):
        if not 0 <= negative_slope <= 1:
            raise ValueError(f"negative_slope must be in [0, 1] (got {negative_slope}): backward reads the "
                             "sign of the input from the output, and the derivative as max(sign, slope)")
        y = F.leaky_relu(x, negative_slope)
        ctx.save_for_backward(y)
        ctx.negative_slope = negative_slope
        return y

    @staticmethod
    def backward(ctx, grad_y):
        (y,) = ctx.saved_tensors
        return leaky_relu_grad(grad_y, y, ctx.negative_slope), None  # the slope is a constant


def sigmoid(x: torch.Tensor) -> torch.Tensor:
    return Sigmoid.apply(x)


def tanh(x: torch.Tensor) -> torch.Tensor:
    return Tanh.apply(x)


def relu(x: torch.Tensor) -> torch.Tensor:
    return ReLU.apply(x)


def leaky_relu(x: torch.Tensor, negative_slope: float = 0.01) -> torch.Tensor:
    return LeakyReLU.apply(x, negative_slope)
