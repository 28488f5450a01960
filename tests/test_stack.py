"""The fused MLP stack (one hand-written Function for the whole network) against finite differences, the
per-layer Functions and autograd: values, gradients, running statistics, memory, autocast, misuse."""

import platform

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck
from torch.utils._python_dispatch import TorchDispatchMode

from gradlab.autograd import stack
from gradlab.autograd.stack import _onednn_linear, mlp_stack
from gradlab.models.mlp import ManualMLP, classification_loss
from helpers import load_script

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
ACTIVATIONS = ["sigmoid", "tanh", "relu", "leaky_relu"]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def stack_params(sizes, batch_norm, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        w = torch.randn(n_out, n_in, generator=g, dtype=dtype) / n_in ** 0.5
        b = torch.randn(n_out, generator=g, dtype=dtype) * 0.1
        last = i == len(sizes) - 2
        if last or not batch_norm:
            params += [w, b] if last else [w, b, None, None]
        else:
            gamma = 1 + 0.1 * torch.randn(n_out, generator=g, dtype=dtype)
            params += [w, None, gamma, 0.1 * torch.randn(n_out, generator=g, dtype=dtype)]
    return [p.to(device).requires_grad_() if p is not None else None for p in params]


@pytest.mark.parametrize("batch_norm", [False, True])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradcheck_float64(activation, batch_norm, device):
    params = stack_params([5, 4, 3, 2], batch_norm, torch.float64, device)
    x = torch.randn(6, 5, dtype=torch.float64, device=device, requires_grad=True)

    def logits(x, *params):
        return mlp_stack(x, params, activation, 0.05, batch_norm)

    # Random float64 pre-activations sit ~never within gradcheck's eps of relu's kink.
    assert gradcheck(logits, (x, *params), eps=1e-6, atol=1e-8)


def test_no_hidden_layer_is_a_linear_map():
    w, b = torch.randn(3, 4, dtype=torch.float64, requires_grad=True), torch.randn(3, dtype=torch.float64,
                                                                                   requires_grad=True)
    x = torch.randn(5, 4, dtype=torch.float64)
    torch.testing.assert_close(mlp_stack(x, [w, b]), F.linear(x, w, b))
    assert gradcheck(lambda w, b: mlp_stack(x, [w, b]), (w, b))


def nets(activation, batch_norm, dtype=torch.float64, device="cpu"):
    """fused stack, per-layer Functions, autograd: one network, three implementations, same weights."""
    out = {}
    for name, backend, fused in (("fused", "manual", True), ("layers", "manual", False),
                                 ("autograd", "autograd", False)):
        torch.manual_seed(0)
        out[name] = ManualMLP(12, [16, 8], 5, activation, batch_norm=batch_norm, backend=backend,
                              fused=fused).to(device, dtype)
    return out


@pytest.mark.parametrize("batch_norm", [False, True])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_fused_equals_per_layer_and_autograd(activation, batch_norm, device):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(10, 12, generator=g, dtype=torch.float64).to(device)
    y = torch.randint(0, 5, (10,), generator=g).to(device)
    results = {}
    for name, net in nets(activation, batch_norm, device=device).items():
        xi = x.clone().requires_grad_()
        loss = classification_loss(5, net.backend)(net(xi), y)
        loss.backward()
        results[name] = (loss, xi.grad, {k: p.grad for k, p in net.named_parameters()}, net.state_dict())
    for name in ("fused", "layers"):
        loss, x_grad, grads, state = results[name]
        ref_loss, ref_x_grad, ref_grads, ref_state = results["autograd"]
        tol = dict(rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(loss, ref_loss, **tol)
        torch.testing.assert_close(x_grad, ref_x_grad, **tol)
        for k in ref_grads:
            torch.testing.assert_close(grads[k], ref_grads[k], **tol, msg=f"{name} {k}")
        for k in ref_state:  # running mean/var and num_batches_tracked updated alike
            torch.testing.assert_close(state[k], ref_state[k], **tol, msg=f"{name} {k}")


def test_fused_keeps_and_peaks_no_more_memory_than_autograd():
    """Measured with the benchmark's own counter of live tensor bytes (deterministic, not a timing)."""
    bench = load_script("bench_autograd")
    x, y = torch.randn(64, 32), torch.randint(0, 10, (64,))
    mem = {v: bench.memory_bytes(*bench.build(v, [32] + [48] * 6 + [10], "tanh", False), x, y)
           for v in bench.VARIANTS}
    kept, peak = {v: m[0] for v, m in mem.items()}, {v: m[1] for v, m in mem.items()}
    activations = 6 * 64 * 48 * 4  # the six hidden outputs, what both must keep
    for fused in ("fused", "aten"):  # on oneDNN's kernels and on torch's
        assert activations <= kept[fused] <= kept["autograd"]
        assert peak[fused] <= peak["autograd"] * 1.01  # the activations are freed layer by layer in backward
        # without that release the peak would carry all six activations on top
        assert peak[fused] < peak["autograd"] + activations / 2


@pytest.mark.parametrize("fused", [True, False])
def test_backward_twice_needs_retain_graph_as_in_autograd(fused):
    torch.manual_seed(0)
    x, y = torch.randn(4, 12), torch.randint(0, 5, (4,))
    net = ManualMLP(12, [8, 6], 5, fused=fused)
    loss = classification_loss(5)(net(x), y)
    loss.backward(retain_graph=True)
    first = net.layers.fc1.weight.grad.clone()
    loss.backward()  # the activations were kept for it
    torch.testing.assert_close(net.layers.fc1.weight.grad, 2 * first)
    with pytest.raises(RuntimeError, match="second time"):
        loss.backward()  # but not after a backward without retain_graph


def test_autocast_fused_matches_autograd(device):
    dtype = torch.bfloat16 if device == "cpu" else torch.float16
    all_nets = nets("relu", True, torch.float32, device)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(32, 12, generator=g).to(device)
    y = torch.randint(0, 5, (32,), generator=g).to(device)
    results = {}
    for name in ("fused", "autograd"):
        net = all_nets[name]
        with torch.autocast(device, dtype=dtype):
            logits = net(x)
            loss = classification_loss(5, net.backend)(logits, y)
        loss.backward()
        assert logits.dtype == dtype and loss.dtype == torch.float32
        results[name] = (loss, [p.grad for p in net.parameters()])
    torch.testing.assert_close(results["fused"][0], results["autograd"][0], rtol=2e-2, atol=2e-2)
    for ours, theirs in zip(results["fused"][1], results["autograd"][1], strict=True):
        assert ours.dtype == torch.float32
        torch.testing.assert_close(ours, theirs, rtol=5e-2, atol=5e-2)


def test_bad_stack_arguments_are_named():
    w = torch.randn(3, 4)
    with pytest.raises(ValueError, match="batch, features"):
        mlp_stack(torch.randn(2, 2, 4), [w, None])
    with pytest.raises(ValueError, match="swish"):
        mlp_stack(torch.randn(2, 4), [w, None], activation="swish")
    with pytest.raises(ValueError, match="4 slots per hidden layer"):
        mlp_stack(torch.randn(2, 4), [w, None, w])
    with pytest.raises(ValueError, match="more than 1 value per feature"):
        ManualMLP(4, [3], 2, batch_norm=True)(torch.randn(1, 4))


def test_cumulative_running_average_momentum_none_matches_torch():
    """momentum=None: running statistics are the plain average over batches, as nn.BatchNorm1d keeps them."""
    all_nets = nets("tanh", True)
    for net in all_nets.values():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.momentum = None
    g = torch.Generator().manual_seed(7)
    for _ in range(3):
        x = torch.randn(10, 12, generator=g, dtype=torch.float64)
        for net in all_nets.values():
            net(x)
    ref = all_nets["autograd"].state_dict()
    for name in ("fused", "layers"):
        for k, v in all_nets[name].state_dict().items():
            torch.testing.assert_close(v, ref[k], rtol=1e-12, atol=1e-12, msg=f"{name} {k}")
    assert ref["layers.bn1.num_batches_tracked"].item() == 3


# --- oneDNN kernels (float32 on CPU) ----------------------------------------------------------------


class OpNames(TorchDispatchMode):
    """The aten/mkldnn ops that run inside the mode."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def test_onednn_is_available_on_this_cpu():
    """The fast path must not silently vanish on x86 (where torch ships oneDNN): the probe accepts it."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip(f"oneDNN's fused linear is probed only on x86 here ({platform.machine()})")
    assert _onednn_linear() is not None


@pytest.mark.parametrize("activation, batch_norm, sizes", [
    *[(a, bn, [40, 32, 24, 10]) for a in ACTIVATIONS for bn in (False, True)],
    ("relu", False, [512, 24, 10]),  # 512 inputs: ∂W on oneDNN too
])
def test_onednn_float32_as_accurate_as_autograd(activation, batch_norm, sizes, monkeypatch):
    """The oneDNN path (fused linear + activation forward, oneDNN's ∂h = g·W in backward) against the
    float64 truth: logits and every gradient within 4x the error of torch's own float32 autograd, plus a
    floor. And it is the path taken: oneDNN's op runs, addmm does not (these matmuls are small, so the
    size threshold is lowered)."""
    if _onednn_linear() is None:
        pytest.skip("this torch has no usable oneDNN linear: the addmm path is what runs (tested above)")
    monkeypatch.setattr(stack, "ONEDNN_MIN_MACS", 0)
    n = 48
    params = stack_params(sizes, batch_norm, torch.float64, "cpu", seed=3)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(n, sizes[0], generator=g, dtype=torch.float64)
    target = torch.randint(0, sizes[-1], (n,), generator=g)

    def run(dtype, autograd, onednn=True):
        p = [q.detach().to(dtype).requires_grad_() if q is not None else None for q in params]
        xs = x.to(dtype)
        with OpNames() as ops:
            if autograd:
                h = xs
                for i in range(0, len(p) - 2, 4):
                    w, b, gamma, beta = p[i:i + 4]
                    h = F.linear(h, w, b)
                    if batch_norm:
                        h = F.batch_norm(h, None, None, gamma, beta, training=True)
                    h = F.leaky_relu(h, 0.05) if activation == "leaky_relu" else getattr(torch, activation)(h)
                logits = F.linear(h, *p[-2:])
            else:
                logits = mlp_stack(xs, p, activation, 0.05, batch_norm, onednn=onednn)
            F.cross_entropy(logits, target).backward()
        return [logits.detach()] + [q.grad for q in p if q is not None], ops.names

    truth, _ = run(torch.float64, autograd=True)
    reference, _ = run(torch.float32, autograd=True)
    ours, names = run(torch.float32, autograd=False)
    assert "mkldnn._linear_pointwise" in names and "aten.addmm" not in names, names
    plain, plain_names = run(torch.float32, autograd=False, onednn=False)
    assert "mkldnn._linear_pointwise" not in plain_names and "aten.addmm" in plain_names
    eps = torch.finfo(torch.float32).eps
    for i, (a, b, c, t) in enumerate(zip(ours, plain, reference, truth, strict=True)):
        err, ref_err = (a.double() - t).abs().max(), (c.double() - t).abs().max()
        assert err <= 4 * ref_err + 16 * eps * t.abs().max(), (i, float(err), float(ref_err))
        assert (b.double() - t).abs().max() <= 4 * ref_err + 16 * eps * t.abs().max(), i


def test_onednn_takes_strided_inputs_and_manual_mlp_switch():
    """A transposed (non-contiguous) input batch and ManualMLP(onednn=False/True): the same numbers."""
    torch.manual_seed(0)
    nets_ = [ManualMLP(12, [16, 8], 5, activation="tanh", onednn=flag) for flag in (True, False)]
    nets_[1].load_state_dict(nets_[0].state_dict())
    x = torch.randn(12, 30).t()                 # (30, 12), strides (1, 30)
    y = torch.randint(0, 5, (30,))
    criterion = classification_loss(5)
    for net in nets_:
        criterion(net(x), y).backward()
    torch.testing.assert_close(nets_[0](x), nets_[1](x), rtol=1e-5, atol=1e-6)
    for p, q in zip(nets_[0].parameters(), nets_[1].parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)


def test_onednn_only_from_the_size_where_it_pays(monkeypatch):
    """Small matmuls stay on addmm/mm (oneDNN's set-up costs ~13 µs a call); 128 x 256 x 256 takes oneDNN."""
    if _onednn_linear() is None:
        pytest.skip("this torch has no usable oneDNN linear: the addmm path is what runs (tested above)")
    for batch, expect in ((8, False), (128, True)):
        params = stack_params([256, 256, 256, 10], False, torch.float32, "cpu")
        with OpNames() as ops:
            mlp_stack(torch.randn(batch, 256), params, "relu").sum().backward()
        assert ("mkldnn._linear_pointwise" in ops.names) == expect, (batch, ops.names)
        assert "aten.addmm" in ops.names  # the 10-wide output layer (and at batch 8 every layer)
