"""param_dist and the Adam-family state against the weights' own history: the step rebuilt from the state equals the
step the optimizer took, ‖m‖ and √v̂ equal moments accumulated here from the gradients."""

import pytest
import torch
from torch import nn

from gradlab.observe.curvature import layer_groups
from gradlab.observe.optimizer_state import adam_state, param_dist


@pytest.mark.parametrize("kind", ["adam", "adamw", "amsgrad"])
def test_state_equals_the_steps_taken_and_moments_accumulated_by_hand(kind):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    names, params, groups = layer_groups(net)
    make = {"adam": lambda: torch.optim.Adam(params, lr=0.05, betas=(0.8, 0.9), eps=0.1),
            "adamw": lambda: torch.optim.AdamW(params, lr=0.05, betas=(0.8, 0.9), eps=0.1, weight_decay=0.1),
            "amsgrad": lambda: torch.optim.Adam(params, lr=0.05, betas=(0.8, 0.9), eps=0.1, amsgrad=True)}
    opt = make[kind]()
    init = [p.detach().clone() for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    vmax = [torch.zeros_like(p) for p in params]
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)
    for t in range(1, 5):
        opt.zero_grad()
        ((net(x * t) - y) ** 2).mean().backward()
        before = [p.detach().clone() for p in params]
        opt.step()
        m = [0.8 * mi + 0.2 * p.grad for mi, p in zip(m, params)]
        v = [0.9 * vi + 0.1 * p.grad ** 2 for vi, p in zip(v, params)]
        vmax = [torch.maximum(a, b) for a, b in zip(vmax, v)]
    state = adam_state(opt, params, groups)
    steps = [b - p.detach() for b, p in zip(before, params)]   # minus the update just applied
    vhat = [(vm if kind == "amsgrad" else vi) / (1 - 0.9 ** 4) for vi, vm in zip(v, vmax)]
    for j, g in enumerate([*groups, list(range(len(params)))]):
        step = torch.cat([steps[i].flatten() for i in g])
        grad = torch.cat([params[i].grad.flatten() for i in g])
        assert state["step_norm"][j] == pytest.approx(step.norm().item(), rel=1e-9)
        assert state["cos_step_grad"][j] == pytest.approx(torch.cosine_similarity(step, grad, 0).item(), rel=1e-9)
        assert state["m_norm"][j] == pytest.approx(torch.cat([m[i].flatten() for i in g]).norm().item(), rel=1e-12)
        small = torch.cat([(vhat[i].sqrt() < 0.1).flatten() for i in g]).double().mean().item()
        assert state["eps_dominated"][j] == pytest.approx(small)
    assert 0 < state["eps_dominated"][-1] < 1  # the test sees both kinds of coordinate (ε = 0.1)
    dist = param_dist(params, init, groups)
    for j, g in enumerate(groups):
        d = torch.cat([(params[i].detach() - init[i]).flatten() for i in g]).norm()
        assert dist[j] == pytest.approx((d / torch.cat([init[i].flatten() for i in g]).norm()).item(), rel=1e-12)


def test_other_optimizers_have_no_adam_state():
    net = nn.Linear(2, 2)
    names, params, groups = layer_groups(net)
    assert adam_state(torch.optim.SGD(params, lr=0.1), params, groups) is None


def test_float32_sums_over_millions_of_elements_match_float64():
    # A plain float32 reduction over 10⁷ elements drifts by ~1e-3; the per-row sums must not.
    from gradlab.observe.optimizer_state import _sq, _sum

    g = torch.Generator().manual_seed(0)
    t, u = torch.randn(3_000_001, generator=g) + 0.5, torch.randn(3_000_001, generator=g)
    assert _sq(t).item() == pytest.approx(t.double().square().sum().item(), rel=1e-6)
    assert _sum(t * u).item() == pytest.approx((t.double() * u.double()).sum().item(), rel=1e-5, abs=1e-3)
