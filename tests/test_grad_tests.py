"""The inner-product and orthogonality tests against a brute force over per-example gradients from torch.func
(vmap(grad)), in float64, per layer and in total; also over two accumulated micro-batches."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from gradlab.models.mlp import ManualMLP, classification_loss
from gradlab.observe.grad_tests import GradTestMonitor


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3)                      # 7x7 -> 5x5
        self.conv2 = nn.Conv2d(3, 4, 3, stride=2, padding=1)  # 5x5 -> 3x3
        self.fc = nn.Linear(36, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv2(torch.tanh(self.conv1(x)))).flatten(1))


def make(kind: str):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    n = 20
    if kind == "cnn":
        net = TinyCNN().double()
        x = torch.randn(n, 1, 7, 7, generator=g, dtype=torch.float64)
        return net, net, F.cross_entropy, x, torch.randint(0, 3, (n,), generator=g)
    # the hand-written MLP is tapped; its autograd twin (same names, same weights) gives vmap's reference
    manual = ManualMLP(5, [6, 4], 3, activation="tanh", backend="manual").double()
    twin = ManualMLP(5, [6, 4], 3, activation="tanh", backend="autograd").double()
    twin.load_state_dict(manual.state_dict())
    x = torch.randn(n, 5, generator=g, dtype=torch.float64)
    return manual, twin, classification_loss(3, "manual"), x, torch.randint(0, 3, (n,), generator=g)


def brute(net, x, y) -> dict[str, float]:
    params = {k: v.detach() for k, v in net.named_parameters()}

    def loss_i(p, xi, yi):
        return F.cross_entropy(functional_call(net, p, (xi[None],)), yi[None])
    per = vmap(grad(loss_i), in_dims=(None, 0, 0))(params, x, y)          # {name: (N, ...)}
    layers = {}
    for name, g in per.items():
        layers.setdefault(name.rsplit(".", 1)[0], []).append(g.flatten(1))
    layers = {k: torch.cat(v, 1) for k, v in layers.items()}              # {layer: (N, D)}
    layers["total"] = torch.cat(list(layers.values()), 1)
    out, n = {}, x.shape[0]
    for name, gi in layers.items():
        g = gi.mean(0)
        p = gi @ g                                                          # ⟨gᵢ, g⟩ (N,)
        gg = g @ g
        var_p = ((p - gg) ** 2).sum() / (n - 1)                             # the sample variance, as written
        orth = gi - p[:, None] * g / gg                                     # the part of gᵢ orthogonal to g
        var_o = orth.square().sum() / (n - 1)
        out[f"grad_tests/inner/{name}"] = (var_p / (n * gg ** 2)).sqrt().item()
        out[f"grad_tests/ortho/{name}"] = (var_o / (n * gg)).sqrt().item()
    return out


@pytest.mark.parametrize("kind", ["mlp_manual", "cnn"])
@pytest.mark.parametrize("micro", [1, 2])
def test_inner_and_orthogonality_tests_equal_the_brute_force(kind, micro):
    net, twin, loss, x, y = make(kind)
    monitor = GradTestMonitor(log_every_n_steps=1, strip_prefix="")
    monitor.attach(net, scale=float(micro))
    for xs, ys in zip(x.chunk(micro), y.chunk(micro)):  # Lightning's accumulation: each mean loss over k
        (loss(net(xs), ys) / micro).backward()
    monitor.detach()
    got = monitor.tests(*monitor.collect())
    ref = brute(twin, x, y)
    assert set(got) == set(ref)
    for tag, value in ref.items():
        assert got[tag] == pytest.approx(value, rel=1e-6, abs=1e-12), tag
