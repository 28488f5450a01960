"""Sharpness and Hessian trace against the dense float64 Hessian (torch.autograd.functional.hessian); the stability
thresholds against gradient descent on a quadratic; training bit-identical with the instrument on or off."""


import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from gradlab.models.classifier import ClassifierModule
from gradlab.models.mlp import ManualMLP, classification_loss
from gradlab.models.rnn import SentimentRNN
from gradlab.observe.curvature import (
    CurvatureMonitor,
    Hessian,
    flatten,
    hutchinson,
    layer_groups,
    preconditioner,
    sharpness,
    stability,
)

F64 = torch.float64


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)       # 6x6 -> 4x4
        self.fc = nn.Linear(3 * 2 * 2, 3)    # after 2x2 max pool: (B, 12)

    def forward(self, x):
        return self.fc(F.max_pool2d(torch.tanh(self.conv(x)), 2).flatten(1))


class TinyRNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = SentimentRNN(vocab_size=12, embed_dim=3, hidden_size=3, cell="gru", bidirectional=False,
                                dropout=0.0, pooling="max")

    def forward(self, x):
        return self.net(x, torch.full((x.shape[0],), x.shape[1]))


def make(kind: str, seed: int = 0):
    """(net, loss(out, y), x, y) in float64, with tens to a hundred-odd parameters."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    n = 32
    if kind == "cnn":
        net, loss = TinyCNN(), F.cross_entropy
        x, y = torch.randn(n, 1, 6, 6, generator=g), torch.randint(0, 3, (n,), generator=g)
    elif kind == "rnn":
        net, loss = TinyRNN(), F.binary_cross_entropy_with_logits
        x = torch.randint(1, 12, (n, 5), generator=g)
        y = (x[:, 0] < 6).double()
    else:  # mlp_manual: the hand-written Functions' backward, differentiated once more; mlp_autograd: torch's
        backend = kind.split("_")[1]
        net, loss = ManualMLP(5, [6, 4], 3, activation="tanh", backend=backend), classification_loss(3, backend)
        x, y = torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)
    x = x.double() if x.is_floating_point() else x
    return net.double(), loss, x, y


def dense_hessian(net, loss, x, y) -> torch.Tensor:
    """The (n, n) Hessian of loss(net(x), y) in the flattened parameters, by torch.autograd.functional.hessian."""
    names = [n for n, p in net.named_parameters()]
    shapes = [p.shape for p in net.parameters()]
    sizes = [p.numel() for p in net.parameters()]

    def f(flat):
        params = {n: t.view(s) for n, t, s in zip(names, torch.split(flat, sizes), shapes)}
        return loss(functional_call(net, params, (x,)), y)
    flat = torch.cat([p.detach().flatten() for p in net.parameters()])
    return torch.autograd.functional.hessian(f, flat)


@pytest.mark.parametrize("kind", ["mlp_manual", "mlp_autograd", "cnn", "rnn"])
def test_sharpness_equals_the_dense_hessians_top_eigenvalue(kind):
    net, loss, x, y = make(kind)
    h = dense_hessian(net, loss, x, y)
    exact = torch.linalg.eigvalsh(h)
    hessian = Hessian(loss(net(x), y), list(net.parameters()))
    eig = sharpness(hessian, iters=30, generator=torch.Generator().manual_seed(1))
    assert h.shape[0] > 30  # 30 Lanczos steps do not simply span the whole space
    assert eig.top == pytest.approx(exact[-1].item(), rel=1e-4)
    assert eig.bottom >= exact[0].item() - 1e-9  # a Ritz value lies inside the spectrum
    # the Ritz vector is an eigenvector: Hv = λv
    assert torch.allclose(h @ eig.vector, eig.top * eig.vector, atol=1e-4 * abs(eig.top))


def test_warm_start_converges_in_a_few_iterations():
    net, loss, x, y = make("mlp_autograd")
    exact = torch.linalg.eigvalsh(dense_hessian(net, loss, x, y))[-1].item()
    hessian = Hessian(loss(net(x), y), list(net.parameters()))
    first = sharpness(hessian, iters=30, generator=torch.Generator().manual_seed(1))
    again = sharpness(hessian, iters=3, start=first.vector)
    assert again.top == pytest.approx(exact, rel=1e-6)


@pytest.mark.parametrize("kind", ["mlp_manual", "cnn"])
def test_preconditioned_sharpness_equals_eigvalsh_of_p_half_h_p_half(kind):
    net, loss, x, y = make(kind)
    params = list(net.parameters())
    # P from a real Adam state after 3 steps, checked against v̂ computed here from the gradients themselves
    opt = torch.optim.Adam(params, lr=1e-2, betas=(0.9, 0.99), eps=1e-8)
    v = [torch.zeros_like(p) for p in params]
    for t in range(1, 4):
        opt.zero_grad()
        loss(net(x[t:]), y[t:]).backward()
        v = [0.99 * vi + 0.01 * p.grad.square() for vi, p in zip(v, params)]
        opt.step()
    p_ref = flatten([(vi / (1 - 0.99 ** 3)).sqrt() + 1e-8 for vi in v])
    p = flatten(preconditioner(opt, params))
    assert torch.allclose(p, p_ref, rtol=1e-10, atol=0)
    h = dense_hessian(net, loss, x, y)
    d = p_ref.rsqrt()
    exact = torch.linalg.eigvalsh(d[:, None] * h * d[None, :])[-1].item()
    hessian = Hessian(loss(net(x), y), params)
    eig = sharpness(hessian, iters=40, scale=p.rsqrt(), generator=torch.Generator().manual_seed(2))
    assert eig.top == pytest.approx(exact, rel=1e-4)


@pytest.mark.parametrize("kind", ["mlp_manual", "cnn", "rnn"])
def test_hutchinson_trace_per_layer_within_three_standard_errors(kind):
    net, loss, x, y = make(kind)
    h = dense_hessian(net, loss, x, y)
    names, params, groups = layer_groups(net)
    sizes = [p.numel() for p in params]
    offsets = torch.tensor([0, *sizes]).cumsum(0)
    hessian = Hessian(loss(net(x), y), params)
    g = torch.Generator().manual_seed(3)
    probes = (torch.randint(0, 2, (64, hessian.numel), generator=g) * 2 - 1).double()
    trace, se, total, total_se = hutchinson(hessian, groups, probes)
    diag = torch.diagonal(h)
    for j, group in enumerate(groups):
        exact = sum(diag[offsets[i]:offsets[i + 1]].sum() for i in group)
        assert abs(trace[j] - exact) <= 3 * se[j] + 1e-12, names[j]
        assert se[j] > 0 or exact == 0
    assert abs(total - diag.sum()) <= 3 * total_se
    assert torch.isclose(total, trace.sum())


def test_hutchinson_is_exact_on_two_parameters_with_every_sign_pattern():
    """E[vvᵀ] = I for Rademacher v; the four sign patterns of two coordinates attain it exactly."""
    w = torch.tensor([0.7, -1.3], dtype=F64, requires_grad=True)
    a = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=F64)
    loss = 0.5 * w @ a @ w + torch.sin(w[0] * w[1])  # H = A + ∂²sin(w₀w₁): full, not diagonal
    h = torch.autograd.functional.hessian(lambda t: 0.5 * t @ a @ t + torch.sin(t[0] * t[1]), w.detach())
    probes = torch.tensor([[1, 1], [1, -1], [-1, 1], [-1, -1]], dtype=F64)
    _, _, total, _ = hutchinson(Hessian(loss, [w]), [[0]], probes)
    assert total.item() == pytest.approx(torch.trace(h).item(), rel=1e-14)
    assert h[0, 1].abs() > 0.1  # the off-diagonal part the patterns cancel is there


@pytest.mark.parametrize("momentum,nesterov", [(0.0, False), (0.9, False), (0.5, True)])
def test_sgd_threshold_is_where_gradient_descent_on_a_quadratic_stops_converging(momentum, nesterov):
    lr = 0.1
    opt0 = torch.optim.SGD([torch.zeros(1)], lr=lr, momentum=momentum, nesterov=nesterov)
    edge = stability(opt0).threshold
    for factor, diverges in ((0.95, False), (1.05, True)):
        x = torch.ones(1, dtype=F64, requires_grad=True)
        opt = torch.optim.SGD([x], lr=lr, momentum=momentum, nesterov=nesterov)
        lam = edge * factor
        for _ in range(600):
            opt.zero_grad()
            (0.5 * lam * x.square()).sum().backward()
            opt.step()
        assert (abs(x.item()) > 1) == diverges, (factor, x.item())


def test_adam_threshold_is_38_over_lr():
    opt = torch.optim.Adam([torch.zeros(1)], lr=1e-3, betas=(0.9, 0.999))
    edge = stability(opt)
    assert edge.preconditioned and edge.threshold == pytest.approx(38 / 1e-3)


# ---- the callback in a real Lightning run ---------------------------------------------------------------------
class DropoutMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.drop, self.fc2 = nn.Linear(6, 8), nn.Dropout(0.3), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(self.drop(torch.tanh(self.fc1(x))))


def fit(callbacks, optimizer, accumulate: int = 1, steps: int = 6):
    pl.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 6, generator=g), torch.randint(0, 3, (96,), generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    module = ClassifierModule(DropoutMLP(), nn.CrossEntropyLoss(), 3, optimizer=optimizer)
    trainer = pl.Trainer(max_steps=steps, accumulate_grad_batches=accumulate, callbacks=callbacks, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0, accelerator="cpu", devices=1)
    trainer.fit(module, train_dataloaders=loader)
    return module, trainer, (x, y)


@pytest.mark.parametrize("opt,accumulate", [("sgd", 1), ("adam", 2)])
def test_training_is_bit_identical_with_the_instrument_on_or_off(opt, accumulate):
    make_opt = (lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9)) if opt == "sgd" else \
        (lambda params: torch.optim.Adam(params, lr=1e-2))
    off, _, _ = fit([], make_opt, accumulate)
    rng_off = torch.random.get_rng_state()
    monitor = CurvatureMonitor(log_every_n_steps=1, lanczos_iters=5, trace_probes=2, probe_size=32, strip_prefix="net.")
    on, _, _ = fit([monitor], make_opt, accumulate)
    assert monitor.last.get("curv/sharpness", 0) > 0  # it did measure, at every step
    assert ("curv/precond_sharpness" in monitor.last) == (opt == "adam")
    for (name, a), (_, b) in zip(off.state_dict().items(), on.state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.equal(torch.random.get_rng_state(), rng_off)  # the run's stream is where it would have been


def test_the_callbacks_reading_is_the_dense_value_on_its_probe_batch():
    monitor = CurvatureMonitor(log_every_n_steps=2, lanczos_iters=40, trace_probes=0, probe_size=40)
    module, trainer, _ = fit([monitor], lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9), steps=4)
    (x, y) = monitor.probe
    assert x.shape[0] == 40
    net = module.net.double()
    exact = torch.linalg.eigvalsh(dense_hessian(net.eval(), F.cross_entropy, x.double(), y))[-1].item()
    module.double()
    monitor.probe = (x.double(), y)
    reading = monitor.measure(module, trainer.optimizers[0], trainer, do_trace=False)
    assert reading["curv/sharpness"] == pytest.approx(exact, rel=1e-4)
    assert reading["curv/threshold"] == pytest.approx(3.8 / 0.1)
    assert reading["curv/max_stable_lr"] == pytest.approx(3.8 / exact, rel=1e-4)
    assert set(monitor.final_metrics()) >= {"curv/sharpness", "curv/threshold", "curv/max_stable_lr"}


def test_the_report_names_the_steps_above_the_edge_and_the_lr_that_clears_them():
    from gradlab.observe.health_rules import curvature_findings

    scalars = {"curv/edge": [(0, 0.5), (100, 1.2), (200, 1.5), (300, 0.9)],
               "curv/max_stable_lr": [(0, 0.2), (100, 0.083), (200, 0.066), (300, 0.11)]}
    (finding,) = curvature_findings(scalars)
    assert finding.steps == (100, 200) and "2 of 4 readings" in finding.evidence
    assert "lower optimizer.lr to <= 0.066" in finding.fix
    assert curvature_findings({"curv/edge": [(0, 0.5)]}) == []
