"""Backpropagation by hand: torch.autograd.Functions whose backward is written out, with module wrappers.

    from gradlab.autograd import linear, sigmoid, softmax_cross_entropy
    loss = softmax_cross_entropy(linear(sigmoid(linear(x, w1, b1)), w2, b2), y)
    loss.backward()   # runs the backward methods written in this package
"""

from gradlab.autograd.activations import LeakyReLU, ReLU, Sigmoid, Tanh, leaky_relu, relu, sigmoid, tanh
from gradlab.autograd.batchnorm import BatchNorm, BatchNormEval, batch_norm, batch_norm_eval
from gradlab.autograd.linear import Linear, linear
from gradlab.autograd.losses import (BCEWithLogits, MSE, SoftmaxCrossEntropy, bce_with_logits, mse,
                                     softmax_cross_entropy)

__all__ = [
    "BCEWithLogits", "BatchNorm", "BatchNormEval", "LeakyReLU", "Linear", "MSE", "ReLU", "Sigmoid",
    "SoftmaxCrossEntropy", "Tanh", "batch_norm", "batch_norm_eval", "bce_with_logits", "leaky_relu", "linear",
    "mse", "relu", "sigmoid", "softmax_cross_entropy", "tanh",
]
