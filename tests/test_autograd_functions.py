"""The hand-written backward passes of gradlab.autograd against finite differences and against autograd.

Every case runs on CPU, and on CUDA too when there is a GPU (`device` fixture).
"""

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

import gradlab.autograd as M

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
F64, F32 = torch.float64, torch.float32
TOL = {F64: dict(rtol=1e-12, atol=1e-12), F32: dict(rtol=1e-5, atol=1e-6)}


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def away_from_zero(t: torch.Tensor, margin: float = 0.1) -> torch.Tensor:
    """Keep |t| >= margin: finite differences across relu's kink at 0 would measure a slope of 0.5."""
    return t + margin * torch.where(t >= 0, 1.0, -1.0).to(t)


def make_case(name: str, dtype, device, seed: int):
    """(manual fn, autograd reference fn, inputs) for one Function on random shapes."""
    g = torch.Generator().manual_seed(seed)
    batch, n_in, n_out = (int(v) for v in torch.randint(2, 7, (3,), generator=g))

    def rand(*shape, grad=True):
        return torch.randn(*shape, generator=g, dtype=F64).to(device, dtype).requires_grad_(grad)

    if name == "linear":
        return M.linear, F.linear, (rand(batch, n_in), rand(n_out, n_in), rand(n_out))
    if name == "linear_no_bias":
        return M.linear, F.linear, (rand(batch, n_in), rand(n_out, n_in))
    if name in ("sigmoid", "tanh"):
        return getattr(M, name), getattr(torch, name), (rand(batch, n_in),)
    if name == "relu":
        x = away_from_zero(rand(batch, n_in, grad=False)).requires_grad_()
        return M.relu, torch.relu, (x,)
    if name == "leaky_relu":
        x = away_from_zero(rand(batch, n_in, grad=False)).requires_grad_()
        return (lambda t: M.leaky_relu(t, 0.2)), (lambda t: F.leaky_relu(t, 0.2)), (x,)
    if name == "softmax_cross_entropy":
        target = torch.randint(0, n_out, (batch,), generator=g).to(device)
        return M.softmax_cross_entropy, F.cross_entropy, (rand(batch, n_out), target)
    if name == "bce_with_logits":
        target = torch.rand(batch, n_in, generator=g, dtype=F64).to(device, dtype).requires_grad_()
        return M.bce_with_logits, F.binary_cross_entropy_with_logits, (rand(batch, n_in), target)
    if name == "mse":
        return M.mse, F.mse_loss, (rand(batch, n_in), rand(batch, n_in))
    if name == "batch_norm":
        def ref(x, w, b):
            return F.batch_norm(x, None, None, w, b, training=True)
        return (lambda x, w, b: M.batch_norm(x, w, b)[0]), ref, (rand(batch, n_in), rand(n_in), rand(n_in))
    if name == "batch_norm_eval":
        # Statistics drawn from the case's generator and representable in float32, so that the float64 and
        # float32 cases see the same ones.
        mean = torch.randn(n_in, generator=g, dtype=F64).float().to(device, dtype)
        var = (torch.rand(n_in, generator=g, dtype=F64) + 0.5).float().to(device, dtype)

        def ref(x, w, b):
            return F.batch_norm(x, mean, var, w, b, training=False)
        return ((lambda x, w, b: M.batch_norm_eval(x, w, b, mean, var)), ref,
                (rand(batch, n_in), rand(n_in), rand(n_in)))
    raise KeyError(name)


CASES = ["linear", "linear_no_bias", "sigmoid", "tanh", "relu", "leaky_relu", "softmax_cross_entropy",
         "bce_with_logits", "mse", "batch_norm", "batch_norm_eval"]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", CASES)
def test_gradcheck_float64(name, seed, device):
    fn, _, inputs = make_case(name, F64, device, seed)
    assert gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("name", [c for c in CASES if c != "batch_norm"])
def test_double_backward_float64(name, device):
    """Every backward except batch norm's is differentiable itself (see the module docstrings)."""
    fn, _, inputs = make_case(name, F64, device, seed=3)
    assert gradgradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_batch_norm_double_backward_raises(device):
    x = torch.randn(4, 3, dtype=F64, device=device, requires_grad=True)
    w = torch.rand(3, dtype=F64, device=device, requires_grad=True)
    b = torch.zeros(3, dtype=F64, device=device, requires_grad=True)
    y = M.linear(M.batch_norm(x, w, b)[0], torch.randn(2, 3, dtype=F64, device=device, requires_grad=True))
    (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        gx.sum().backward()


def _forward_backward(fn, inputs, upstream=None):
    out = fn(*inputs)
    if upstream is None:
        upstream = torch.randn_like(out)
    grads = torch.autograd.grad(out, [t for t in inputs if t.requires_grad], upstream.to(out.dtype))
    return out, grads, upstream


@pytest.mark.parametrize("name", CASES)
def test_forward_and_backward_match_autograd_float64(name, device):
    fn, ref, inputs = make_case(name, F64, device, seed=7)
    ref_inputs = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    out, grads, upstream = _forward_backward(fn, inputs)
    ref_out, ref_grads, _ = _forward_backward(ref, ref_inputs, upstream)
    torch.testing.assert_close(out, ref_out, **TOL[F64])
    for ours, theirs in zip(grads, ref_grads, strict=True):
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
        torch.testing.assert_close(ours, theirs, **TOL[F64])


def _term_scales(name, inputs, upstream, truths):
    """Per output, the size of the largest term summed into it: the scale of float32's rounding there.

    Mostly the value itself. Batch norm's gradients are differences and sums of terms much larger than
    themselves (∂L/∂x = γ/σ·(g - mean(g) - x̂·mean(g·x̂)), ∂L/∂γ = Σ_b g·x̂), so their rounding error scales
    with those terms, which is also why it changes with the CPU's reduction order.
    """
    if name != "batch_norm":
        return [t.abs().max() for t in truths]
    x, w, b = (t.detach().double() for t in inputs)
    g = upstream.double()
    var = x.var(0, unbiased=False)
    xhat = (x - x.mean(0)) * torch.rsqrt(var + 1e-5)
    grad_x_terms = (w * torch.rsqrt(var + 1e-5)).abs() * (g.abs() + g.mean(0).abs()
                                                         + xhat.abs() * (g * xhat).mean(0).abs())
    return [((w * xhat).abs() + b.abs()).max(), grad_x_terms.max(), (g * xhat).abs().sum(0).max(),
            g.abs().sum(0).max()]


@pytest.mark.parametrize("name", CASES)
def test_forward_and_backward_float32_as_accurate_as_torch(name, device):
    """In float32 both ours and torch's ops round; each is compared with the float64 truth.

    Ours must be within 4x torch's own float32 error, plus a floor of 8 float32 ulps of the terms
    summed (`_term_scales`). A fixed elementwise tolerance failed on batch norm's input gradient on
    another CPU: 1.1e-6 off on a value of 3e-4 made of terms near 5.
    """
    fn, ref, inputs = make_case(name, F32, device, seed=7)
    _, ref64, _ = make_case(name, F64, device, seed=7)

    def copy(ts, dtype):
        return [t.detach().to(dtype).requires_grad_(t.requires_grad) if t.is_floating_point() else t for t in ts]

    out, grads, upstream = _forward_backward(fn, copy(inputs, F32))
    torch_out, torch_grads, _ = _forward_backward(ref, copy(inputs, F32), upstream)
    true_out, true_grads, _ = _forward_backward(ref64, copy(inputs, F64), upstream.to(F64))
    truths = (true_out, *true_grads)
    scales = _term_scales(name, inputs, upstream, truths)
    eps = torch.finfo(F32).eps
    for ours, theirs, truth, scale in zip((out, *grads), (torch_out, *torch_grads), truths, scales, strict=True):
        assert ours.dtype == F32 and ours.shape == truth.shape
        err, torch_err = (ours.double() - truth).abs().max(), (theirs.double() - truth).abs().max()
        assert err <= 4 * torch_err + 8 * eps * scale, (float(err), float(torch_err), float(scale))


# --- edge cases -------------------------------------------------------------------------------------

@pytest.mark.parametrize("fn, ref", [(M.sigmoid, torch.sigmoid), (M.tanh, torch.tanh)])
def test_saturated_inputs_give_finite_matching_gradients(fn, ref, device):
    x = torch.tensor([-1000.0, -40.0, -20.0, 0.0, 20.0, 40.0, 1000.0], dtype=F64, device=device, requires_grad=True)
    (ours,) = torch.autograd.grad(fn(x).sum(), x)
    (theirs,) = torch.autograd.grad(ref(x).sum(), x)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=0)  # atol 0: even the 1e-18 tails match
    assert ours[0] == 0 and ours[-1] == 0
    assert gradcheck(fn, (x[1:-1].detach().clone().requires_grad_(),))


def test_relu_subgradient_at_zero_is_zero_like_torch(device):
    x = torch.tensor([-1.0, 0.0, 0.0, 2.0], dtype=F64, device=device, requires_grad=True)
    (ours,) = torch.autograd.grad(M.relu(x).sum(), x)
    (theirs,) = torch.autograd.grad(torch.relu(x).sum(), x)
    assert ours.tolist() == theirs.tolist() == [0.0, 0.0, 0.0, 1.0]


def test_leaky_relu_subgradient_at_zero_is_the_slope_like_torch(device):
    x = torch.tensor([-1.0, 0.0, 2.0], dtype=F64, device=device, requires_grad=True)
    (ours,) = torch.autograd.grad(M.leaky_relu(x, 0.1).sum(), x)
    (theirs,) = torch.autograd.grad(F.leaky_relu(x, 0.1).sum(), x)
    assert ours.tolist() == theirs.tolist() == [0.1, 0.1, 1.0]


def test_leaky_relu_rejects_slopes_it_cannot_invert(device):
    with pytest.raises(ValueError, match="negative_slope"):
        M.leaky_relu(torch.randn(3, device=device), -0.1)


def test_batch_norm_with_a_batch_of_one_is_an_error_like_torch(device):
    x, w, b = torch.randn(1, 3, device=device), torch.ones(3, device=device), torch.zeros(3, device=device)
    with pytest.raises(ValueError, match="more than 1 value per feature"):
        M.batch_norm(x, w, b)
    with pytest.raises(ValueError):
        F.batch_norm(x, None, None, w, b, training=True)
    # Eval mode uses running statistics: one sample is fine, and equals torch.
    rm, rv = torch.randn(3, device=device), torch.rand(3, device=device) + 0.5
    torch.testing.assert_close(M.batch_norm_eval(x, w, b, rm, rv), F.batch_norm(x, rm, rv, w, b, training=False))


def test_bce_with_logits_is_stable_where_log_of_sigmoid_is_not(device):
    x = torch.tensor([-200.0, -30.0, 30.0, 200.0], device=device, requires_grad=True)
    t = torch.tensor([1.0, 1.0, 0.0, 0.0], device=device)
    loss = M.bce_with_logits(x, t)
    torch.testing.assert_close(loss, F.binary_cross_entropy_with_logits(x, t))
    assert loss.item() == pytest.approx((200 + 30 + 30 + 200) / 4, rel=1e-6)  # -log σ(-z) ≈ z for large z
    p = torch.sigmoid(x.detach())
    naive = -(t * torch.log(p + 1e-7) + (1 - t) * torch.log(1 - p + 1e-7)).mean()
    assert naive.item() < 20  # the eps caps each term near 16: the naive loss is badly wrong
    (grad,) = torch.autograd.grad(loss, x)
    torch.testing.assert_close(grad, torch.tensor([-0.25, -0.25, 0.25, 0.25], device=device))


def test_softmax_cross_entropy_is_stable_for_huge_logits(device):
    logits = torch.tensor([[1000.0, 0.0, -1000.0], [0.0, 1e4, 0.0]], device=device, requires_grad=True)
    target = torch.tensor([1, 1], device=device)
    loss = M.softmax_cross_entropy(logits, target)
    assert loss.item() == pytest.approx(500.0)
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("batch, classes", [(256, 10), (256, 2), (130, 15), (256, 16), (64, 10)])
def test_softmax_cross_entropy_every_kernel_path_matches_torch(batch, classes, dtype, device):
    """Short and long rows, small and big batches: torch's values and gradients (one_hot built per class count)."""
    g = torch.Generator().manual_seed(batch + classes)
    logits = (torch.randn(batch, classes, generator=g, dtype=dtype) * 5).to(device).requires_grad_()
    target = torch.randint(0, classes, (batch,), generator=g).to(device)
    loss = M.softmax_cross_entropy(logits, target)
    ref = F.cross_entropy(logits, target)
    torch.testing.assert_close(loss, ref, **TOL[dtype])
    grads = [torch.autograd.grad(v, logits)[0] for v in (loss, ref)]
    torch.testing.assert_close(grads[0], grads[1], **TOL[dtype])


# --- what is saved, what is computed -----------------------------------------------------------------

def saved_storages(fn, *inputs):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fn(*inputs)
    return out, {t.untyped_storage().data_ptr() for t in saved}


@pytest.mark.parametrize("fn", [M.sigmoid, M.tanh, M.relu, M.leaky_relu])
def test_activations_save_only_their_output(fn, device):
    x = torch.randn(4, 5, device=device, requires_grad=True)
    y, saved = saved_storages(fn, x)
    assert saved == {y.untyped_storage().data_ptr()}


def test_linear_saves_only_what_its_backward_needs(device):
    x, w, b = torch.randn(4, 3, device=device), torch.randn(2, 3, device=device), torch.randn(2, device=device)
    ptr = {name: t.untyped_storage().data_ptr() for name, t in (("x", x), ("w", w))}
    _, saved = saved_storages(M.linear, x, w.requires_grad_(), b)          # first layer: no dL/dx
    assert saved == {ptr["x"]}
    _, saved = saved_storages(M.linear, x.requires_grad_(), w.requires_grad_(False), b)  # frozen layer
    assert saved == {ptr["w"]}
    x.grad = None
    M.linear(x, w, b).sum().backward()
    assert x.grad is not None and w.grad is None and b.grad is None


# --- autocast and torch.compile ----------------------------------------------------------------------

def amp_dtype(device):
    return torch.bfloat16 if device == "cpu" else torch.float16


def test_autocast_matches_autograd_under_autocast(device):
    torch.manual_seed(0)
    x = torch.randn(16, 8, device=device)
    target = torch.randint(0, 4, (16,), device=device)
    w1, b1 = torch.randn(6, 8, device=device), torch.randn(6, device=device)
    w2, b2 = torch.randn(4, 6, device=device), torch.randn(4, device=device)
    params = [w1, b1, w2, b2]

    def run(linear, act, loss):
        ps = [p.clone().requires_grad_() for p in params]
        with torch.autocast(device, dtype=amp_dtype(device)):
            hidden = act(linear(x, ps[0], ps[1]))
            logits = linear(hidden, ps[2], ps[3])
            value = loss(logits, target)
        value.backward()
        return hidden, logits, value, [p.grad for p in ps]

    hidden, logits, loss, grads = run(M.linear, M.sigmoid, M.softmax_cross_entropy)
    r_hidden, r_logits, r_loss, r_grads = run(F.linear, torch.sigmoid, F.cross_entropy)
    assert hidden.dtype == logits.dtype == r_logits.dtype == amp_dtype(device)  # matmuls ran in 16 bits
    assert loss.dtype == r_loss.dtype == torch.float32                         # the loss did not
    torch.testing.assert_close(loss, r_loss, rtol=1e-3, atol=1e-3)
    for ours, theirs, p in zip(grads, r_grads, params, strict=True):
        assert ours.dtype == p.dtype == torch.float32
        torch.testing.assert_close(ours, theirs, rtol=2e-2, atol=2e-2)


def test_batch_norm_under_autocast_computes_in_float32(device):
    x = (torch.randn(32, 5, device=device) * 100 + 1000).to(amp_dtype(device)).requires_grad_()
    w, b = torch.ones(5, device=device, requires_grad=True), torch.zeros(5, device=device, requires_grad=True)
    with torch.autocast(device, dtype=amp_dtype(device)):
        y, mean, var = M.batch_norm(x, w, b)
    assert y.dtype == x.dtype and mean.dtype == var.dtype == torch.float32
    ref = F.batch_norm(x.detach().float(), None, None, w.detach(), b.detach(), training=True)
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2)
    y.float().square().sum().backward()
    assert x.grad.dtype == x.dtype and w.grad.dtype == torch.float32 and torch.isfinite(w.grad).all()
