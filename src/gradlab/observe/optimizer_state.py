"""Distance from initialization, and what an Adam-family optimizer's own state says about its steps.

    python train.py                                                   # on by default, every logging step
    python train.py callbacks.optimizer_state.log_every_n_steps=1     # every optimizer step
    python train.py callbacks.optimizer_state=null                    # off

Tags (a contract, like train/loss), per parameterized layer (weight and bias together) and `total`:
    param_dist/<layer>              ‖θₜ − θ₀‖/‖θ₀‖: how far the layer has moved from where it started
    optim/m_norm/<layer>            ‖m‖, Adam's first moment (the running mean of the gradient)
    optim/step_norm/<layer>         ‖Δθ‖ of the step just taken, rebuilt from the state: η·m̂/(√v̂ + ε) (+ η·λ·θ, AdamW)
    optim/cos_step_grad/<layer>     cos(−Δθ, g): 1 is plain gradient descent's direction; momentum and the
                                    per-coordinate scaling turn it away
    optim/eps_dominated/<layer>     the fraction of coordinates with √v̂ < ε, where Adam's step is η·m̂/ε: plain SGD
                                    with a rate η/ε, a huge one for the usual ε = 1e-8

No extra backward, no copy of the weights per step: the step is rebuilt from the optimizer's state after it
(m and v are updated before the weights are), g is `.grad` as the optimizer saw it (after clipping), and θ₀ is one
copy of the weights taken when training starts (it rides in checkpoints, so a resumed run measures from the same
θ₀). Optimizers other than Adam/AdamW get param_dist only.
"""

from typing import Any, Optional

import lightning.pytorch as pl
import torch

from gradlab.config.rules import require
from gradlab.observe.common import Instrument, interval
from gradlab.observe.curvature import layer_groups, multiline
from gradlab.observe.writer import log_scalars

STATE_KINDS = ("m_norm", "step_norm", "cos_step_grad", "eps_dominated")


def _layer_sums(values: list[torch.Tensor], groups: list[list[int]]) -> list[torch.Tensor]:
    return [sum(values[i] for i in g) for g in groups]


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    """Element-wise arithmetic in the tensor's own precision, never below float32 (bf16/fp16 states)."""
    return torch.promote_types(t.dtype, torch.float32)


ROW = 4096  # sums are taken per row of this many elements in the tensor's precision, then added in float64


def _sum(t: torch.Tensor, square: bool = False) -> torch.Tensor:
    """Σ t (or Σ t²) in float64, without a float64 copy: a float32 sum over 10⁷ elements in one run is off by
    ~1e-3 relative, one over a row of ROW elements by ~1e-7."""
    flat = t.reshape(-1).to(_work_dtype(t))
    n = flat.numel() // ROW * ROW
    rows, rest = flat[:n].view(-1, ROW), flat[n:]
    if square:
        return (torch.linalg.vector_norm(rows, dim=1).double().square().sum()
                + torch.linalg.vector_norm(rest).double().square())
    return rows.sum(1).double().sum() + rest.double().sum()


def _sq(t: torch.Tensor) -> torch.Tensor:
    return _sum(t, square=True)


class Scratch:
    """Two buffers the size of the largest tensor, reused for every tensor of every reading. A fresh tensor of tens
    of MB costs as much in page faults as the arithmetic on it (30 ms for 44 MB here)."""

    def __init__(self):
        self.buffers: list[torch.Tensor] = []

    def like(self, t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.buffers or self.buffers[0].numel() < t.numel() or self.buffers[0].dtype != dtype \
                or self.buffers[0].device != t.device:
            self.buffers = [torch.empty(t.numel(), dtype=dtype, device=t.device) for _ in range(2)]
        return tuple(b[: t.numel()].view(t.shape) for b in self.buffers)


def param_dist(params: list[torch.Tensor], init: list[torch.Tensor], groups: list[list[int]],
               base: Optional[list[torch.Tensor]] = None, scratch: Optional[Scratch] = None) -> list[float]:
    """‖θ − θ₀‖/‖θ₀‖ per group of parameter indices, and last the total over all of them (`base`: the Σ θ₀² per
    tensor, when the caller keeps them)."""
    scratch = scratch or Scratch()
    diff = [_sq(torch.sub(p.detach(), p0, out=scratch.like(p, p.dtype)[0])) for p, p0 in zip(params, init)]
    base = base if base is not None else [_sq(p0) for p0 in init]
    d, b = _layer_sums(diff, groups), _layer_sums(base, groups)
    d.append(sum(diff))
    b.append(sum(base))
    return [float((x / y).sqrt()) if y > 0 else float("nan") for x, y in zip(d, b)]


def adam_state(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], groups: list[list[int]],
               scratch: Optional[Scratch] = None) -> Optional[dict[str, list[float]]]:
    """{kind: [per group ..., total]} for STATE_KINDS from an Adam/AdamW state after its step; None otherwise."""
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return None
    where = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    sums = {k: [] for k in ("mm", "ss", "sg", "gg", "eps", "n")}
    scratch = scratch or Scratch()
    for p in params:
        state, group = optimizer.state.get(p, {}), where.get(id(p))
        if "exp_avg" not in state or group is None or p.grad is None:
            return None
        lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
        t = float(state["step"])
        dtype = _work_dtype(state["exp_avg"])  # the state's own precision; the sums below in float64
        m, v = state["exp_avg"].to(dtype), state["exp_avg_sq"].to(dtype)
        if group.get("amsgrad"):
            v = state["max_exp_avg_sq"].to(dtype)
        denom, step = scratch.like(p, dtype)
        torch.div(v, 1 - beta2 ** t, out=denom).sqrt_()                    # √v̂
        eps_count = torch.count_nonzero(denom < eps).double()  # (a bool tensor's .sum() is 6x slower)
        torch.div(m, denom.add_(eps), out=step).mul_(lr / (1 - beta1 ** t))  # η·m̂/(√v̂ + ε): minus the update
        if isinstance(optimizer, torch.optim.AdamW) and group["weight_decay"]:
            # decoupled decay first: θ' = θ(1 − ηλ) − u, so θ = (θ' + u)/(1 − ηλ) and the decay's share is
            # ηλθ = k(θ' + u) with k = ηλ/(1 − ηλ): the whole step is (1 + k)u + kθ'
            k = lr * group["weight_decay"] / (1 - lr * group["weight_decay"])
            step.mul_(1 + k).add_(p.detach().to(dtype), alpha=k)
        g = p.grad.to(dtype)
        sums["mm"].append(_sq(m))
        sums["ss"].append(_sq(step))
        sums["sg"].append(_sum(step.mul_(g)))  # last use of step
        sums["gg"].append(_sq(g))
        sums["eps"].append(eps_count)
        sums["n"].append(torch.tensor(float(p.numel()), dtype=torch.float64))
    per = {k: _layer_sums(v, groups) + [sum(v)] for k, v in sums.items()}
    return {"m_norm": [float(x.sqrt()) for x in per["mm"]],
            "step_norm": [float(x.sqrt()) for x in per["ss"]],
            "cos_step_grad": [float(sg / (ss * gg).sqrt()) if ss * gg > 0 else float("nan")
                              for sg, ss, gg in zip(per["sg"], per["ss"], per["gg"])],
            "eps_dominated": [float(e / n) for e, n in zip(per["eps"], per["n"])]}


class OptimizerStateMonitor(Instrument):
    """Logs param_dist/* and, for Adam/AdamW, optim/* every `log_every_n_steps` optimizer steps (see the module
    docstring; the interval convention: gradlab.observe.common)."""

    name = "optimizer_state"

    def __init__(self, log_every_n_steps: Optional[int] = None, strip_prefix: str = "net."):
        require("callbacks.optimizer_state.log_every_n_steps", log_every_n_steps)
        self.log_every_n_steps, self.strip_prefix = log_every_n_steps, strip_prefix
        self.init: Optional[list[torch.Tensor]] = None
        self.layers: list[str] = []
        self._every, self._logged = 0, -1
        self.last: dict[str, float] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._every = interval(self.log_every_n_steps, trainer)
        self.layers, params, self._groups = layer_groups(pl_module, self.strip_prefix)
        if self.init is None or [t.shape for t in self.init] != [p.shape for p in params]:
            self.init = [p.detach().clone() for p in params]
        else:  # from a checkpoint: onto the weights' device
            self.init = [t.to(p.device, p.dtype) for t, p in zip(self.init, params)]
        self._base = [_sq(t) for t in self.init]  # Σ θ₀² per tensor, once
        self._scratch = Scratch()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step  # optimizer steps taken; the same over the micro-batches of one step
        if not self._every or step == self._logged or step % self._every or not trainer.is_global_zero:
            return
        self._logged = step
        _, params, groups = layer_groups(pl_module, self.strip_prefix)
        tags = [*self.layers, "total"]
        metrics = {f"param_dist/{t}": v for t, v in zip(tags, param_dist(params, self.init, groups, self._base, self._scratch))}
        opt = trainer.optimizers[0] if trainer.optimizers else None
        state = adam_state(opt, params, groups, self._scratch) if opt is not None else None
        for kind, values in (state or {}).items():
            metrics.update({f"optim/{kind}/{t}": v for t, v in zip(tags, values)})
        self.last = metrics
        log_scalars(trainer, metrics, step - 1)  # the step that just ran, as grad_norm logs it

    def layout_category(self, trainer: pl.Trainer):
        from tensorboard.plugins.custom_scalar import layout_pb2

        if not self._every:
            return None
        charts = [multiline("distance from initialization ‖θ−θ₀‖/‖θ₀‖ per layer",
                            [f"param_dist/{n}" for n in self.layers])]
        opt = trainer.optimizers[0] if trainer.optimizers else None
        if isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)):
            for kind, title in (("m_norm", "Adam's first moment ‖m‖ per layer"),
                                ("step_norm", "step norm ‖Δθ‖ per layer, from the optimizer's state"),
                                ("cos_step_grad", "cos(step, −gradient) per layer (1: plain gradient descent)"),
                                ("eps_dominated", "fraction of coordinates with √v̂ < ε (there Adam is SGD at η/ε)")):
                charts.append(multiline(title, [f"optim/{kind}/{n}" for n in self.layers]))
        return layout_pb2.Category(title="optimizer state", chart=charts)

    def state_dict(self) -> dict[str, Any]:
        return {"init": [t.cpu() for t in self.init] if self.init is not None else None}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.init = state_dict.get("init")

    def final_metrics(self) -> dict[str, Any]:
        """The total distance from initialization at the last logging step, for metrics.json."""
        return {"param_dist/total": self.last["param_dist/total"]} if "param_dist/total" in self.last else {}
