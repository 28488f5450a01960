"""A multilayer perceptron whose backward pass is written by hand (gradlab.autograd), or by autograd.

    python train.py model=mlp                                   # 784-256-128-10 relu MLP on MNIST
    python train.py model=mlp model.activation=tanh model.hidden=[512,256] model.batch_norm=true
    python train.py model=mlp model.backend=autograd            # the same network from nn.Linear & co.
    python train.py experiment=toy_xor                          # the textbook 3-4-2 sigmoid net, seconds

Both backends build the same layers with the same parameter names, shapes and init, so a state_dict
moves between them and their losses and gradients can be compared on identical weights.
"""

from collections import OrderedDict
from typing import Sequence

import torch
from torch import nn

from gradlab.autograd import modules as manual
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

    backend="manual" builds every layer from a hand-written Function (gradlab.autograd): linear, batch norm
    and activation are each one autograd node whose backward is the derivative in docs/backprop.md.
    """

    def __init__(self, in_features: int, hidden: Sequence[int], num_classes: int, activation: str = "relu",
                 batch_norm: bool = False, backend: str = "manual", negative_slope: float = 0.01):
        super().__init__()
        _check_choice("activation", activation, ACTIVATIONS)
        _check_choice("backend", backend, BACKENDS)
        hidden = list(hidden)
        if in_features < 1 or num_classes < 1 or any(h < 1 for h in hidden):
            raise UserError(f"ManualMLP needs positive sizes, got in_features={in_features}, "
                            f"hidden={hidden}, num_classes={num_classes}.")
        self.activation, self.backend, self.num_classes = activation, backend, num_classes
        self.batch_norm, self.negative_slope = batch_norm, negative_slope
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
        out = self.layers(x.flatten(1))              # (B, in_features) -> (B, num_classes)
        return out.squeeze(1) if self.num_classes == 1 else out


def classification_loss(num_classes: int, backend: str = "manual") -> nn.Module:
    """The criterion matching ManualMLP's output: softmax cross-entropy on (B, C) logits and long targets,
    or BCE-with-logits on (B,) logits and float targets when num_classes == 1. Hand-written or torch's."""
    _check_choice("backend", backend, BACKENDS)
    if num_classes == 1:
        return manual.BCEWithLogitsLoss() if backend == "manual" else nn.BCEWithLogitsLoss()
    return manual.SoftmaxCrossEntropyLoss() if backend == "manual" else nn.CrossEntropyLoss()
