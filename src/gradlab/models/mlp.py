"""A multilayer perceptron whose backward pass is written by hand (gradlab.autograd), or by autograd.

    python train.py model=mlp                                   # 784-256-128-10 relu MLP on MNIST
    python train.py model=mlp model.activation=tanh model.hidden=[512,256] model.batch_norm=true
    python train.py model=mlp model.backend=autograd            # the same network from nn.Linear & co.
    python train.py model=mlp model.fused=false                 # one hand-written Function per layer
    python train.py model=mlp model.onednn=false                # fused, but torch's addmm/mm kernels
    python train.py experiment=toy_xor                          # the textbook 3-4-2 sigmoid net, seconds

Both backends build the same layers with the same parameter names, shapes and init, so a state_dict
moves between them and their losses and gradients can be compared on identical weights.
"""

from collections import OrderedDict
from typing import Sequence

import torch
from torch import nn

from gradlab.autograd import modules as manual
from gradlab.autograd.stack import mlp_stack
from gradlab.errors import UserError

ACTIVATIONS = {
    # name: (manual module, autograd module)
    "sigmoid": (manual.Sigmoid, nn.Sigmoid),
    "tanh": (manual.Tanh, nn.Tanh),
    "relu": (manual.ReLU, nn.ReLU),
    "leaky_relu": (manual.LeakyReLU, nn.LeakyReLU),
}
BACKENDS = ("manual", "autograd")


def _check_choice(key: str, value: str, choices) -> None:
    if value not in choices:
        raise UserError(f"model.{key}={value!r} is not known; choose one of {', '.join(choices)}.")


class ManualMLP(nn.Module):
    """in_features → hidden[0] → … → hidden[-1] → num_classes; each hidden layer is
    linear [→ batch norm] → activation.

    Inputs of any shape are flattened to (B, in_features), so MNIST images (B, 1, 28, 28) work directly.
    Returns logits (B, num_classes), or (B,) when num_classes == 1 (binary, for BCE-with-logits).
    Init is matched to the activation: Xavier/Glorot for sigmoid and tanh (keeps the variance of
    saturating units' inputs near 1), Kaiming/He for relu (doubles it back after relu zeroes half).

    backend="manual" runs the hand-written backward; with `fused=True` (default) the whole stack is one
    autograd node (gradlab.autograd.stack.MLPStack: the fastest), with `fused=False` each layer is its
    own Function as in the textbook (use it for second derivatives). Eval with batch norm, and forward
    under torch.compile, always run per layer. `onednn=True` (default) lets the fused stack run its
    matmuls, with the activation fused in, on oneDNN in float32 on CPU (see gradlab.autograd.stack).
    """

    def __init__(self, in_features: int, hidden: Sequence[int], num_classes: int, activation: str = "relu",
                 batch_norm: bool = False, backend: str = "manual", negative_slope: float = 0.01,
                 fused: bool = True, onednn: bool = True):
        super().__init__()
        _check_choice("activation", activation, ACTIVATIONS)
        _check_choice("backend", backend, BACKENDS)
        hidden = list(hidden)
        if in_features < 1 or num_classes < 1 or any(h < 1 for h in hidden):
            raise UserError(f"ManualMLP needs positive sizes, got in_features={in_features}, "
                            f"hidden={hidden}, num_classes={num_classes}.")
        self.activation, self.backend, self.num_classes = activation, backend, num_classes
        self.batch_norm, self.negative_slope = batch_norm, negative_slope
        self.fused = fused and backend == "manual"
        self.onednn = onednn
        is_manual = backend == "manual"
        Linear = manual.Linear if is_manual else nn.Linear
        BatchNorm = manual.BatchNorm1d if is_manual else nn.BatchNorm1d
        Act = ACTIVATIONS[activation][0 if is_manual else 1]
        act_kwargs = {"negative_slope": negative_slope} if activation == "leaky_relu" else {}

        layers = OrderedDict()
        sizes = [in_features, *hidden]
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:]), start=1):
            layers[f"fc{i}"] = Linear(n_in, n_out, bias=not batch_norm)  # batch norm's β replaces the bias
            if batch_norm:
                layers[f"bn{i}"] = BatchNorm(n_out)
            layers[f"act{i}"] = Act(**act_kwargs)
        layers["out"] = Linear(sizes[-1], num_classes)
        self.layers = nn.Sequential(layers)
        self.reset_parameters(negative_slope)

    @torch.no_grad()
    def reset_parameters(self, negative_slope: float = 0.01) -> None:
        for name, module in self.layers.named_children():
            if not isinstance(module, nn.Linear):
                continue
            if name == "out":
                nn.init.xavier_uniform_(module.weight)  # feeds a softmax/sigmoid loss: no activation gain
            elif self.activation in ("sigmoid", "tanh"):
                nn.init.xavier_uniform_(module.weight, gain=nn.init.calculate_gain(self.activation))
            else:
                nn.init.kaiming_normal_(module.weight, a=negative_slope if self.activation == "leaky_relu" else 0,
                                        nonlinearity=self.activation)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)                             # (B, in_features)
        # Under torch.compile the per-layer Functions are traced instead: the compiler fuses them itself.
        if self.fused and (self.training or not self.batch_norm) and not torch.compiler.is_compiling():
            out = self._stack_forward(x)
        else:
            out = self.layers(x)                     # (B, num_classes)
        return out.squeeze(1) if self.num_classes == 1 else out

    def _stack_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The same layers' parameters through one MLPStack node; running statistics updated as per layer."""
        layers = self.layers._modules
        params, running, eps = [], [], 1e-5
        for i in range(1, len(layers)):
            fc, bn = layers.get(f"fc{i}"), layers.get(f"bn{i}")
            if fc is None:
                break
            if bn is None:
                params += [fc.weight, fc.bias, None, None]
                continue
            params += [fc.weight, fc.bias, bn.weight, bn.bias]
            eps = bn.eps
            if self.training:
                # momentum None: a cumulative average, as in nn.BatchNorm1d
                momentum = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked + 1)
                running.append((bn.running_mean, bn.running_var, momentum))
        params += [layers["out"].weight, layers["out"].bias]
        out = mlp_stack(x, params, self.activation, self.negative_slope, self.batch_norm, eps, running or None,
                        onednn=self.onednn)
        for i in range(1, len(running) + 1):
            layers[f"bn{i}"].num_batches_tracked.add_(1)
        return out


def classification_loss(num_classes: int, backend: str = "manual") -> nn.Module:
    """The criterion matching ManualMLP's output: softmax cross-entropy on (B, C) logits and long targets,
    or BCE-with-logits on (B,) logits and float targets when num_classes == 1. Hand-written or torch's."""
    _check_choice("backend", backend, BACKENDS)
    if num_classes == 1:
        return manual.BCEWithLogitsLoss() if backend == "manual" else nn.BCEWithLogitsLoss()
    return manual.SoftmaxCrossEntropyLoss() if backend == "manual" else nn.CrossEntropyLoss()
