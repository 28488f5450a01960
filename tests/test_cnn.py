"""MnistCNN is pytorch/examples' `Net`: same parameters, same outputs, same gradients; its Dropout has the same law."""

import pytest
import torch
import torch.nn.functional as F

from gradlab.models.cnn import Dropout, MnistCNN
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


def test_dropout_mask_law_and_gradient():
    p, n = 0.25, 1_000_000
    x = torch.ones(n, requires_grad=True)
    torch.manual_seed(1)
    out = Dropout(p)(x)
    assert torch.unique(out.detach()).tolist() == pytest.approx([0.0, 1 / (1 - p)])
    kept = (out != 0).double().mean().item()
    assert kept == pytest.approx(1 - p, abs=0.005)  # ~11 standard deviations
    assert out.mean().item() == pytest.approx(1.0, abs=0.01)  # expectation preserved
    out.backward(torch.full((n,), 2.0))
    torch.testing.assert_close(x.grad, 2.0 * out.detach())  # d(x*mask)/dx = mask
    torch.manual_seed(1)
    assert torch.equal(Dropout(p)(torch.ones(n)), out.detach())  # seeded, repeatable


def test_dropout_edge_rates_eval_and_inplace():
    x = torch.randn(1000)
    assert torch.equal(Dropout(0.0)(x), x)
    assert torch.equal(Dropout(1.0)(x), torch.zeros_like(x))
    assert torch.equal(Dropout(0.5).eval()(x), x)
    y = x.clone()
    torch.manual_seed(3)
    out = Dropout(0.5, inplace=True)(y)
    assert out.data_ptr() == y.data_ptr() and torch.equal(out, y)
    torch.manual_seed(3)
    torch.testing.assert_close(Dropout(0.5)(x), out)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dropout_keep_rate_is_exact_in_16_bit(dtype):
    """A uniform drawn in bfloat16 keeps ~0.25% too few at p=0.25 (its grid near 0.25 is coarse)."""
    n = 4_000_000
    torch.manual_seed(2)
    out = Dropout(0.25)(torch.ones(n, dtype=dtype))
    assert out.dtype == dtype
    kept = (out != 0).double().mean().item()
    assert kept == pytest.approx(0.75, abs=0.0011)  # 5 standard deviations
