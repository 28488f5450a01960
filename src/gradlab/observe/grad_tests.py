"""Cockpit's inner-product and orthogonality tests per layer (Bollapragada, Byrd & Nocedal 2018), from exact
per-example projections ⟨gᵢ, g⟩.

    python train.py 'callbacks=[default,curvature]'                    # with the curvature instruments
    python train.py 'callbacks=[default,curvature]' callbacks.grad_tests.log_every_n_steps=8

Tags (a contract, like train/loss), per linear or conv layer (weight and bias together) and `total` (over those):
    grad_tests/inner/<layer>  √(Var_i⟨gᵢ, g⟩ / (B‖g‖⁴)): does the batch gradient point downhill? (< 1: reliably)
    grad_tests/ortho/<layer>  √(Var_i‖gᵢ − (⟨gᵢ, g⟩/‖g‖²)g‖² / (B‖g‖²)): the noise orthogonal to g, relative to ‖g‖
with gᵢ the example's gradient, g their mean (the step's gradient), B the examples in the step, and the sample
variances Var_i⟨gᵢ,g⟩ = (Σᵢ⟨gᵢ,g⟩² − B‖g‖⁴)/(B−1), Var_⊥ = (Σᵢ‖gᵢ‖² − Σᵢ⟨gᵢ,g⟩²/‖g‖²)/(B−1) (Cockpit's
InnerTest and OrthoTest). Cockpit's norm test is grad_noise/snr (gradlab.observe.grad_noise).

Where ⟨gᵢ, g⟩ comes from: the layer's input aᵢ (forward hook) and output gradient δᵢ (tensor hook), kept for the
step, and g = `.grad` once the step's backward is done: for a linear layer gᵢ(W) = δᵢaᵢᵀ, so ⟨gᵢ, G⟩ = δᵢᵀ·G·aᵢ
(+ δᵢ·g_b); for a conv, ⟨gᵢ, G⟩ = ⟨δᵢ, conv(aᵢ, G)⟩, the layer's own op with G as its kernel. ‖gᵢ‖² comes from
grad_noise's exact forms. Other layers (recurrent, embeddings, a layer called twice, any model with batch norm in
training mode, where an example's gradient depends on the rest of its batch) are left out of the tests and their
total, and named once. Under gradient accumulation every micro-batch's examples count; under DDP the sums are
all-reduced (one packed tensor), since g is the all-reduced gradient.
"""

from typing import Any, Optional

import torch
import torch.nn.functional as F
from rich.console import Console
from torch import nn

from gradlab.config.rules import require
from gradlab.observe.common import Instrument, interval, tag
from gradlab.observe.grad_noise import conv2d_sq, exact_kind, linear_sq
from gradlab.observe.writer import log_scalars

PREFIX = "grad_tests/"


def inner_test(proj_sq: torch.Tensor, n: float, g_sq: torch.Tensor) -> torch.Tensor:
    """√(Var⟨gᵢ,g⟩/(n‖g‖⁴)) from Σᵢ⟨gᵢ,g⟩², n examples and ‖g‖²."""
    var = (proj_sq - n * g_sq ** 2) / (n - 1)
    return torch.sqrt(var.clamp(min=0) / (n * g_sq ** 2))


def ortho_test(norm_sq: torch.Tensor, proj_sq: torch.Tensor, n: float, g_sq: torch.Tensor) -> torch.Tensor:
    """√(Var_⊥/(n‖g‖²)) from Σᵢ‖gᵢ‖², Σᵢ⟨gᵢ,g⟩², n examples and ‖g‖²."""
    var = (norm_sq - proj_sq / g_sq) / (n - 1)
    return torch.sqrt(var.clamp(min=0) / (n * g_sq))


def projections(module: nn.Module, kind: str, a: torch.Tensor, d: torch.Tensor, gw: torch.Tensor,
                gb: Optional[torch.Tensor]) -> torch.Tensor:
    """⟨δᵢaᵢᵀ, G⟩ (+ the bias's ⟨δᵢ, g_b⟩) per example, (B,), for the layer's weight gradient G and bias gradient g_b;
    `module` gives a conv's geometry."""
    if kind == "linear":
        p = ((d @ gw) * a).sum(1)                                  # δᵢᵀ·G·aᵢ: (B, out)·(out, in) -> (B, in) · aᵢ
        return p + d @ gb if gb is not None else p                 # + δᵢ·g_b
    out = F.conv2d(a, gw, None, module.stride, module.padding, module.dilation)  # aᵢ through the op with G: (B, O, H', W')
    p = (out * d).sum((1, 2, 3))
    return p + d.sum((2, 3)) @ gb if gb is not None else p


class GradTestMonitor(Instrument):
    """Logs grad_tests/{inner,ortho}/<layer> and /total every `log_every_n_steps` optimizer steps (the interval
    convention: gradlab.observe.common)."""

    name = "grad_tests"

    def __init__(self, log_every_n_steps: Optional[int] = 128, strip_prefix: str = "net."):
        require("callbacks.grad_tests.log_every_n_steps", log_every_n_steps)
        self.log_every_n_steps, self.strip_prefix = log_every_n_steps, strip_prefix
        self._handles: list[Any] = []
        self.last: dict[str, float] = {}
        self._told = False

    # -- the tap: one step's (aᵢ, δᵢ) of every exact layer
    def attach(self, model: nn.Module, scale: float = 1.0) -> None:
        self.scale, self.seen = scale, {}
        self.layers = []
        for name, m in model.named_modules():
            if any(p.requires_grad for p in m.parameters(recurse=False)):
                self.layers.append((tag(name, self.strip_prefix) or "model", m, exact_kind(m)))
        self.batch_norm = any(m.training for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
        for i, (name, m, kind) in enumerate(self.layers):
            if kind:
                self._handles.append(m.register_forward_hook(self.guarded(self._forward(i), layer=name)))

    def _forward(self, i: int):
        def hook(module, args, out):
            if not (torch.is_tensor(out) and out.requires_grad and args and torch.is_tensor(args[0])):
                return
            calls = self.seen.setdefault(i, [])
            calls.append([args[0].detach(), None])
            entry = calls[-1]

            def grad(d):
                entry[1] = d.detach()
            out.register_hook(grad)
        return hook

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    switch_off = detach  # after a failure (gradlab.observe.common.Instrument)

    def collect(self) -> tuple[list[str], torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """(layers, Σᵢ⟨gᵢ,g⟩² (L,), Σᵢ‖gᵢ‖² (L,), ‖g‖² (L,), Σᵢ⟨gᵢ,g⟩_total², examples), float64, after backward."""
        names, proj, norm, gsq, total = [], [], [], [], None
        n = None
        with torch.no_grad():
            for i, (name, m, kind) in enumerate(self.layers):
                calls = self.seen.get(i, [])
                if not kind or self.batch_norm or m.weight.grad is None or not calls or any(d is None for _, d in calls):
                    continue
                if n is not None and sum(a.shape[0] for a, _ in calls) != n:
                    continue  # called twice per forward, or on other rows: not one row per example
                if any(a.dim() != (2 if kind == "linear" else 4) for a, _ in calls):
                    continue
                p_rows, sq = [], 0.0
                gw = m.weight.grad.double()
                gb = m.bias.grad.double() if m.bias is not None and m.bias.grad is not None else None
                for a, d in calls:  # one per micro-batch; δ carries 1/(k·rows) of the mean loss: f brings gᵢ back
                    a, d = a.double(), d.double()
                    f = self.scale * a.shape[0]
                    p_rows.append(projections(m, kind, a, d, gw, gb) * f)
                    sq = sq + (linear_sq(a, d, m.bias is not None) if kind == "linear"
                               else conv2d_sq(m, a, d)).sum() * f * f
                p = torch.cat(p_rows)  # (N,)
                n = p.shape[0]
                names.append(name)
                proj.append(p.square().sum())
                norm.append(sq)
                gsq.append(sum(q.grad.double().square().sum() for q in m.parameters(recurse=False)
                               if q.grad is not None))
                total = p if total is None else total + p
        if not names:
            return [], *(torch.zeros(0, dtype=torch.float64),) * 3, torch.zeros((), dtype=torch.float64), 0
        return names, torch.stack(proj), torch.stack(norm), torch.stack(gsq), total.square().sum(), n

    # -- the callback
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        every = interval(self.log_every_n_steps, trainer)
        if every and trainer.global_step % every == 0 and not self._handles:
            scaler = getattr(trainer.precision_plugin, "scaler", None)
            self.attach(pl_module, trainer.accumulate_grad_batches / (scaler.get_scale() if scaler else 1.0))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not self._handles:
            return
        self.detach()
        names, proj, norm, gsq, proj_total, n = self.collect()
        self.seen = {}
        if not names:
            return
        if trainer.world_size > 1:  # per-example sums add over ranks; g (and ‖g‖²) is already the all-reduced one
            packed = trainer.strategy.reduce(torch.cat([proj, norm, proj_total[None], proj.new_tensor([n])]),
                                             reduce_op="sum")
            L = len(names)
            proj, norm, proj_total, n = packed[:L], packed[L:2 * L], packed[2 * L], int(packed[-1].item())
        metrics = self.tests(names, proj, norm, gsq, proj_total, n)
        self.last = metrics
        if trainer.is_global_zero:
            log_scalars(trainer, metrics, trainer.global_step)
            if not self._told:
                left = [t for t, _, _ in self.layers if t not in names]
                if left:
                    Console(stderr=True).print(f"[bold]grad_tests[/]: no exact per-example gradients for "
                                               f"{', '.join(left)}: left out of the tests and their total.",
                                               highlight=False)
        self._told = True

    @staticmethod
    def tests(names, proj, norm, gsq, proj_total, n) -> dict[str, float]:
        g_total = gsq.sum()
        inner = torch.cat([inner_test(proj, n, gsq), inner_test(proj_total, n, g_total)[None]])
        ortho = torch.cat([ortho_test(norm, proj, n, gsq), ortho_test(norm.sum(), proj_total, n, g_total)[None]])
        tags = [*names, "total"]
        values = torch.cat([inner, ortho]).tolist()
        out = {f"{PREFIX}inner/{t}": v for t, v in zip(tags, values[:len(tags)])}
        out.update({f"{PREFIX}ortho/{t}": v for t, v in zip(tags, values[len(tags):])})
        return out

