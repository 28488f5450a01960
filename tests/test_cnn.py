"""MnistCNN is pytorch/examples' `Net`: same parameters, same outputs, same gradients, the same dropout masks."""

import pytest
import torch
import torch.nn.functional as F

from gradlab.models.cnn import MnistCNN
from gradlab.models.reference_net import Net


@pytest.fixture(scope="module")
def reference_net():
    return Net  # the pytorch/examples Net, verbatim


def twins(reference_net, dtype=torch.float64, channels_last=False):
    torch.manual_seed(0)
    ref = reference_net().to(dtype)
    ours = MnistCNN().to(dtype)
    ours.load_state_dict(ref.state_dict())  # same names and shapes, so the weights move across as they are
    if channels_last:
        ours = ours.to(memory_format=torch.channels_last)
    return ref, ours


def test_state_dict_is_the_reference_layout(reference_net):
    ref, ours = reference_net().state_dict(), MnistCNN().state_dict()
    assert {k: v.shape for k, v in ref.items()} == {k: v.shape for k, v in ours.items()}
    reference_net().load_state_dict(ours)  # and back


@pytest.mark.parametrize("channels_last", [False, True])
def test_same_function_and_gradients_as_reference(reference_net, channels_last):
    """Dropout off (p=0) both nets are deterministic: the pool-before-relu order must change nothing."""
    dtype = torch.float32 if channels_last else torch.float64
    tol = dict(rtol=1e-4, atol=1e-5) if channels_last else dict(rtol=1e-10, atol=1e-12)
    ref, ours = twins(reference_net, dtype, channels_last)
    for net in (ref, ours):
        net.dropout1.p = net.dropout2.p = 0.0
    x = torch.randn(16, 1, 28, 28, dtype=dtype)
    # Some inputs whose conv2 windows are all negative: there the relu/pool order must give 0 either way.
    x[:4] = -x[:4].abs() * 5
    y = torch.randint(0, 10, (16,))
    x_ours = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    out_ref, out_ours = ref.train()(x), ours.train()(x_ours)
    torch.testing.assert_close(out_ours, out_ref, **tol)
    F.nll_loss(out_ref, y).backward()
    F.nll_loss(out_ours, y).backward()
    for (name, p_ref), (_, p_ours) in zip(ref.named_parameters(), ours.named_parameters()):
        torch.testing.assert_close(p_ours.grad, p_ref.grad, **tol, msg=name)
    # and in eval mode with the real dropout rates
    for net in (ref, ours):
        net.dropout1.p, net.dropout2.p = 0.25, 0.5
    torch.testing.assert_close(ours.eval()(x_ours), ref.eval()(x), **tol)


def test_training_mode_draws_the_reference_dropout_masks(reference_net):
    """Dropout on: from the same seed, dropout after flatten draws the same masks as the reference's before it."""
    ref, ours = twins(reference_net)
    x = torch.randn(8, 1, 28, 28, dtype=torch.float64)
    y = torch.randint(0, 10, (8,))
    outs = []
    for net in (ref, ours):
        torch.manual_seed(5)
        out = net.train()(x)
        F.nll_loss(out, y).backward()
        outs.append(out)
    assert not torch.equal(outs[0], ref.eval()(x))  # dropout did act
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-10, atol=1e-12)
    for (name, p_ref), (_, p_ours) in zip(ref.named_parameters(), ours.named_parameters()):
        torch.testing.assert_close(p_ours.grad, p_ref.grad, rtol=1e-10, atol=1e-12, msg=name)
