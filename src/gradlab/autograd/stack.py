"""A whole MLP, linear → [batch norm] → activation → … → linear, as one autograd node.

The per-layer Functions (linear.py, activations.py, batchnorm.py) are the textbook pieces: one node
each, composable anywhere. Through a deep stack the engine's per-node costs add up: each Python
`Function` pays ~10-20 µs per step (building its ctx in forward, a call back into Python in backward)
where autograd's C++ nodes pay ~1-3 µs. `MLPStack` runs the stack as a single Function (the idea of
NVIDIA apex's fused MLP), with the same derivative lines, and gains what a hand-written backward can:

* every intermediate lives in a buffer of its own, so each activation runs in place on the matmul's output
  in forward, and each activation's derivative is finished in place on the gradient buffer in backward
  (autograd allocates a new tensor for both): one activation-sized tensor less at the backward's peak;
* activations are freed layer by layer as backward passes them, as autograd frees its nodes' buffers;
* batch norm's forward is torch's kernel (statistics, output and running averages in two passes, where the
  explicit forward of batchnorm.py takes six); its backward is the hand-written one of batchnorm.py;
* on CPU in float32 its matmuls run on oneDNN (`torch.ops.mkldnn._linear_pointwise`, the fused kernel
  torch.compile's CPU backend emits), with the activation fused into the forward matmul as a post-op:
  linear → activation is one kernel, the activation computed while the output is still in cache. That op
  has no derivative in autograd, so only a hand-written backward can use it in training. The backward's
  ∂h = g·W goes through the same op, and ∂W = gᵀ·h where a layer has 512 inputs or more (oneDNN first
  copies gᵀ, which the faster GEMM repays only for wide inputs). Only matmuls of
  ONEDNN_MIN_MACS multiply-adds or more take this path (below, the op's set-up costs more than it saves).
  Elsewhere (float64, CUDA, autocast, a torch
  without the op) and with `onednn=False` the matmuls are `torch.addmm`/`mm`, the activation in place;
* it saves exactly what the per-layer Functions save: the input (if W₁ needs a gradient), each hidden
  output (read by the activation's derivative and the next layer's ∂W), the weights, and x̂, 1/σ for
  batch norm. Never more than autograd.

Backward is `once_differentiable` (it works in place on its own buffers); for second derivatives build
the network from the per-layer Functions (`ManualMLP(..., fused=False)`), whose backward is differentiable.
`retain_graph=True` works as in autograd: the activations then stay for the next backward.
"""

import functools

import torch
import torch.nn.functional as F
from torch.autograd import Function
from torch.autograd.function import once_differentiable

from gradlab.autograd.activations import leaky_relu_grad_, relu_grad_, sigmoid_grad_, tanh_grad_
from gradlab.autograd.amp import at_least_float32, autocast_backward, autocast_forward
from gradlab.autograd.batchnorm import batch_norm_train_backward

# activation: (in-place forward on z, in-place derivative of g given the output y)
ACTIVATIONS = {
    "sigmoid": (lambda z, slope: z.sigmoid_(), lambda g, y, slope, free: sigmoid_grad_(g, y)),
    "tanh": (lambda z, slope: z.tanh_(), lambda g, y, slope, free: tanh_grad_(g, y)),
    "relu": (lambda z, slope: z.relu_(), lambda g, y, slope, free: relu_grad_(g, y, free)),
    "leaky_relu": (lambda z, slope: F.leaky_relu_(z, slope), leaky_relu_grad_),
}
PER_HIDDEN = 4  # parameter slots per hidden layer: W, b (None with batch norm), γ, β (None without)
# activation: oneDNN post-op name, and whether it takes the slope as its scalar
POST_OPS = {"sigmoid": ("sigmoid", False), "tanh": ("tanh", False), "relu": ("relu", False),
            "leaky_relu": ("leaky_relu", True)}


@functools.cache
def _onednn_linear():
    """torch.ops.mkldnn._linear_pointwise (y = act(x·Wᵀ + b)), or None where this torch lacks it.

    A private op (the one torch.compile's CPU backend uses for linear + pointwise), so it is probed once:
    it must exist and agree with addmm on a small case; anything else falls back to addmm.
    """
    try:
        op = torch.ops.mkldnn._linear_pointwise
        if not torch.backends.mkldnn.is_available():
            return None
        x, w, b = torch.randn(3, 5), torch.randn(4, 5), torch.randn(4)
        ok = torch.allclose(op(x, w, b, "tanh", [], ""), torch.addmm(b, x, w.t()).tanh(), atol=1e-5)
        g = torch.randn(3, 4)                                      # transposed operands, as backward passes them
        ok &= torch.allclose(op(g.t(), x.t(), None, "none", [], ""), g.t().mm(x), atol=1e-5)
        return op if ok else None
    except (AttributeError, RuntimeError):
        return None


# oneDNN's op costs ~13 µs more per call than MKL's GEMM behind addmm/mm (the primitive's set-up), and
# wins 5-10% on the GEMM itself: it is used from this many multiply-adds (B·out·in) on, ~256x256x128.
ONEDNN_MIN_MACS = 1 << 23


def _use_onednn(requested: bool, x: torch.Tensor, params) -> bool:
    if not (requested and x.device.type == "cpu" and x.dtype == torch.float32) or torch.is_autocast_enabled("cpu"):
        return False
    if any(p is not None and p.dtype != torch.float32 for p in params):
        return False
    return _onednn_linear() is not None


class MLPStack(Function):
    """apply(x, (activation, negative_slope, batch_norm, eps, running, onednn), *params) -> logits.

    params: for each hidden layer W (out, in), b, γ, β (b None with batch norm; γ, β None without),
    then W_out, b_out. running: with batch norm, per hidden layer (running_mean, running_var, momentum)
    to update in place as nn.BatchNorm1d does (or None: no running statistics).
    """

    @staticmethod
    @autocast_forward
    def forward(ctx, x, spec, *params):
        activation, slope, batch_norm, eps, running, onednn = spec
        act_, _ = ACTIVATIONS[activation]
        dnn = _onednn_linear() if _use_onednn(onednn, x, params) else None
        post_op, takes_slope = POST_OPS[activation]
        scalars = [slope] if takes_slope else []
        hidden = [params[i:i + PER_HIDDEN] for i in range(0, len(params) - 2, PER_HIDDEN)]
        w_out, b_out = params[-2:]
        # Kept for backward: x (only if the first W needs a gradient) and the weights through
        # save_for_backward (inputs: autograd checks they are not modified in place before backward),
        # and per hidden layer [(x̂, 1/σ,) h] on ctx, which backward drops layer by layer as it goes,
        # so the activations are freed in the order autograd frees them. h, the activation's output, is
        # read by its derivative and by the next layer's ∂W.
        h, kept = x, []
        for i, (w, b, gamma, beta) in enumerate(hidden):
            layer = []
            if dnn is not None and not batch_norm and _big(h, w):
                h = dnn(h, w, b, post_op, scalars, "")  # h = act(h·Wᵀ + b) (B, out), one kernel
                kept.append((h,))
                continue
            # z = h·Wᵀ + b (B, out): the bias add fused into the matmul
            z = _linear(dnn, h, w, b)
            if batch_norm:
                z, xhat, invstd = _batch_norm_forward(z, gamma, beta, eps, *(running[i] if running else (None,) * 3))
                layer += [xhat, invstd]
            h = act_(z, slope)                          # in place: z is ours alone
            kept.append((*layer, h))
        out = _linear(dnn, h, w_out, b_out)
        ctx.save_for_backward(x if ctx.needs_input_grad[2] else None, *params)
        ctx.spec, ctx.kept, ctx.dnn = spec, kept, dnn
        return out

    @staticmethod
    @autocast_backward
    @once_differentiable
    def backward(ctx, grad_out):
        activation, slope, batch_norm, *_ = ctx.spec
        _, act_grad_ = ACTIVATIONS[activation]
        dnn = ctx.dnn
        if ctx.kept is None:
            raise RuntimeError("Trying to backward through MLPStack a second time, but its activations were freed "
                               "by the first backward. Specify retain_graph=True the first time, or build the net "
                               "with ManualMLP(..., fused=False).")
        kept = list(ctx.kept)
        free = not _graph_kept()                        # no later backward will read the activations
        if free:
            ctx.kept = None                             # from here on only this frame holds them
        x, *params = ctx.saved_tensors
        need_x, _, *need = ctx.needs_input_grad         # need: one flag per parameter slot
        grads = [None] * len(need)

        def layer_input(i):                             # what layer i read: x, or hidden layer i-1's output
            return kept[i - 1][-1] if i > 0 else x

        # Output layer: y = h·W_outᵀ + b_out, with g = ∂L/∂y (B, C)
        n = len(kept)
        g, w_out = grad_out, params[-2]
        # (each bias gradient is summed first, while g is still in cache from the pass that wrote it)
        if need[-1]:
            grads[-1] = g.sum(0)                        # ∂y/∂b = 1, summed over the batch: (C,)
        if need[-2]:
            grads[-2] = _grad_weight(dnn, g, layer_input(n))  # ∂y/∂W = h: (C, B)·(B, H) = (C, H)
        if n == 0 and not need_x:
            return (None, None, *grads)
        g = _grad_input(dnn, g, w_out)                  # ∂y/∂h = W_out: (B, C)·(C, H) = (B, H), a new buffer

        for i in reversed(range(n)):
            *bn, h = kept.pop()                         # this layer's activations, freed after this iteration
            slot = PER_HIDDEN * i
            w, gamma = params[slot], params[slot + 2]
            # g ← g·act'(z) = ∂L/∂z in place (B, H); h was last read by the layer above's ∂W, so a relu
            # mask may overwrite it
            act_grad_(g, h, slope, free)
            del h
            if batch_norm:                              # g ← ∂L/∂(pre-norm z), in g's buffer (float32: a new one)
                xhat, invstd = bn
                g, grad_gamma, grad_beta = batch_norm_train_backward(g, xhat, invstd, gamma, g_free=True)
                del xhat, invstd, bn
                grads[slot + 2] = grad_gamma if need[slot + 2] else None
                grads[slot + 3] = grad_beta if need[slot + 3] else None
            if need[slot + 1]:
                grads[slot + 1] = g.sum(0)              # ∂z/∂b = 1: (out,)
            if need[slot]:
                grads[slot] = _grad_weight(dnn, g, layer_input(i))  # ∂z/∂W = h_in: (out, B)·(B, in) = (out, in)
            if i > 0 or need_x:
                g = _grad_input(dnn, g, w)              # ∂z/∂h_in = W: (B, out)·(out, in) = (B, in)
        return (g if need_x else None, None, *grads)


def _big(a, w) -> bool:
    """Whether a (B, k) by W (n, k) matmul is large enough for oneDNN to pay off."""
    return a.shape[0] * w.shape[0] * w.shape[1] >= ONEDNN_MIN_MACS


def _linear(dnn, h, w, b):
    """h·Wᵀ + b: (B, in)·(in, out) = (B, out)."""
    if dnn is not None and _big(h, w):
        return dnn(h, w, b, "none", [], "")
    return torch.addmm(b, h, w.t()) if b is not None else h.mm(w.t())


def _grad_weight(dnn, g, h_in):
    """gᵀ·h_in: (out, B)·(B, in) = (out, in). oneDNN's op first copies gᵀ (B·out values): its faster GEMM
    (B·out·in multiply-adds) pays for that copy only from ~512 inputs on; below, MKL's GEMM."""
    if dnn is not None and h_in.shape[1] >= 512 and g.shape[0] * g.shape[1] * h_in.shape[1] >= ONEDNN_MIN_MACS:
        return dnn(g.t(), h_in.t(), None, "none", [], "")
    return g.t().mm(h_in)


def _grad_input(dnn, g, w):
    """g·W: (B, out)·(out, in) = (B, in)."""
    return dnn(g, w.t(), None, "none", [], "") if dnn is not None and _big(g, w) else g.mm(w)


def _batch_norm_forward(z, gamma, beta, eps, running_mean, running_var, momentum):
    """Training-mode batch norm of the matmul output z: (y, x̂, 1/σ).

    torch's kernel computes the statistics and y = γ·x̂ + β in two passes and updates the running averages
    (unbiased variance) in place, where the per-layer Function spends six passes and a Python update; the
    math is the same (see batchnorm.py). x̂ for backward is then built over z, which nothing else reads.
    """
    if z.shape[0] < 2:
        raise ValueError(f"batch_norm in training needs more than 1 value per feature, got input of shape "
                         f"{tuple(z.shape)}; use a batch of 2 or more, or eval mode (running statistics)")
    y, mean, invstd = torch.native_batch_norm(z, gamma, beta, running_mean, running_var, True,
                                              0.0 if momentum is None else momentum, eps)
    if z.dtype == invstd.dtype:
        xhat = torch.addcmul(-mean * invstd, z, invstd, out=z)   # x̂ = (z - μ)/σ, in z's buffer
    else:                                                        # 16-bit z under autocast: x̂ in float32
        xhat = (at_least_float32(z) - mean).mul_(invstd)
    return y, xhat, invstd


def _graph_kept() -> bool:
    """Whether this backward runs with retain_graph=True (then the activations must stay for the next one)."""
    try:
        return torch._C._autograd._get_current_graph_task_keep_graph()
    except (AttributeError, RuntimeError):  # a private torch API: if it moves, keep them (correct, more memory)
        return True


def mlp_stack(x: torch.Tensor, params, activation: str = "relu", negative_slope: float = 0.01,
              batch_norm: bool = False, eps: float = 1e-5, running=None, onednn: bool = True) -> torch.Tensor:
    """The whole stack in one node: the logits. With batch norm, `running` gives each hidden layer's
    (running_mean, running_var, momentum), updated in place like nn.BatchNorm1d's. onednn: use oneDNN's
    fused linear + activation where it applies (float32 on CPU, see the module docstring)."""
    if x.dim() != 2:
        raise ValueError(f"mlp_stack expects a (batch, features) input, got shape {tuple(x.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation {activation!r} is not one of {', '.join(ACTIVATIONS)}")
    if len(params) < 2 or (len(params) - 2) % PER_HIDDEN:
        raise ValueError(f"params: {PER_HIDDEN} slots per hidden layer then W_out, b_out; got {len(params)}")
    running = tuple(running) if running is not None else None
    return MLPStack.apply(x, (activation, negative_slope, batch_norm, eps, running, onednn), *params)
