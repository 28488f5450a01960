"""Curvature of the training loss: the sharpness λ_max(H) against its stability threshold, and the Hessian's trace
per layer.

    python train.py 'callbacks=[default,curvature]'                          # every 1000 optimizer steps
    python train.py 'callbacks=[default,curvature]' callbacks.curvature.log_every_n_steps=100
    python train.py experiment=edge_of_stability                             # Cohen et al.'s Figure 1, minutes

Tags (a contract, like train/loss):
    curv/sharpness          λ_max(H), the top Hessian eigenvalue of the loss on the probe batch
    curv/precond_sharpness  λ_max(P⁻¹H) for Adam, AdamW and RMSprop, P = diag(√v̂ + ε) from the optimizer's state
    curv/threshold          where gradient descent on a quadratic with that curvature stops being stable: 2/η for
                            SGD, (2+2β)/η with momentum β, (2+2β)/(η(1+2β)) Nesterov; against the preconditioned
                            sharpness (2+2β₁)/(η(1−β₁)) for Adam (38/η at β₁ = 0.9), 2/η or (2+2μ)/η for RMSprop
    curv/edge               the sharpness that matters for the optimizer over its threshold: above 1, the run is
                            past the edge of stability (Cohen et al. 2021, 2022)
    curv/max_stable_lr      the largest lr at which that sharpness would sit below its threshold
    curv/trace/<layer>      tr(H_ll), the trace of the layer's diagonal Hessian block (Hutchinson), and /total
    curv/trace_se/<layer>   its standard error over the Rademacher probes

How. Hessian-vector products by double backward: g = ∇L(θ) with create_graph=True once per reading, then
Hv = ∇(gᵀv) for each v, reusing g's graph. The top eigenvalue comes from Lanczos with full reorthogonalization,
not power iteration: power iteration converges like (λ₂/λ₁)ᵏ, slowly when the top eigenvalues cluster (a
classifier's Hessian has about one outlier per class), and it finds the eigenvalue of largest |λ|, which early in
training is often a negative one; Lanczos converges like a Chebyshev polynomial in the gap, gives the algebraically
largest eigenvalue directly, and its Krylov basis (20 vectors of the model's size) is cheap next to 20 HVPs.
Each reading starts from the previous top eigenvector (warm start), so it refines rather than restarts.
Hutchinson: E[vᵀHv] = tr(H) for Rademacher v; one HVP gives every layer's v_lᵀ(Hv)_l, whose expectation is that
layer's tr(H_ll) (the cross-layer terms have mean zero).

A guest in the run. The probe batch is drawn once from the training set with the callback's own generator (under
a forked RNG: the run's torch, Python and NumPy streams are left as they were); the loss is the module's
`criterion` on it in eval mode (no dropout mask, no batch-norm running-statistics update); gradients are
returned by torch.autograd.grad, never accumulated into `.grad`; the optimizer is only read. Training is
bit-identical with the instrument on or off (tests/test_curvature.py). Under DDP rank 0 measures alone (every
rank holds the same weights) and the others go on to the next step's all-reduce, where they wait for it.
"""

import math
import random
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
from rich.console import Console
from torch import nn

from gradlab.config.rules import require
from gradlab.observe.common import Instrument, interval
from gradlab.observe.writer import log_scalars

PREFIX = "curv/"
Tensors = Sequence[torch.Tensor]


# ---- Hessian-vector products ---------------------------------------------------------------------------------
class Hessian:
    """v ↦ Hv for the loss L(params), by double backward on one graph: `Hessian(loss, params).hvp(vs)`."""

    def __init__(self, loss: torch.Tensor, params: Sequence[torch.Tensor]):
        self.params = list(params)
        # g = ∇L with its own graph, so that ∇(gᵀv) = Hv; allow_unused: a parameter the loss does not reach
        self.grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
        self.numel = sum(p.numel() for p in self.params)

    def hvp(self, vs: Tensors) -> list[torch.Tensor]:
        live = [(g, v) for g, v in zip(self.grads, vs) if g is not None and g.requires_grad]
        if not live:
            return [torch.zeros_like(p) for p in self.params]
        hv = torch.autograd.grad([g for g, _ in live], self.params, [v for _, v in live], retain_graph=True,
                                 allow_unused=True)
        return [torch.zeros_like(p) if h is None else h.detach() for p, h in zip(self.params, hv)]

    def flat(self, v: torch.Tensor) -> torch.Tensor:
        """Hv on flat vectors (numel,), the form Lanczos works in."""
        return flatten(self.hvp(unflatten(v, self.params)))


def flatten(ts: Tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def unflatten(v: torch.Tensor, like: Tensors) -> list[torch.Tensor]:
    out, i = [], 0
    for p in like:
        out.append(v[i:i + p.numel()].view_as(p))
        i += p.numel()
    return out


# ---- Lanczos -------------------------------------------------------------------------------------------------
@dataclass
class Eigen:
    top: float            # the largest Ritz value: λ_max from below, exact once the Krylov space holds its vector
    bottom: float         # the smallest: λ_min from above
    vector: torch.Tensor  # the top Ritz vector (numel,), unit norm: the next reading's start
    residual: float       # ‖Av − λv‖ for the top Ritz pair, a bound on |λ − nearest eigenvalue|


def lanczos(matvec: Callable[[torch.Tensor], torch.Tensor], start: torch.Tensor, iters: int) -> Eigen:
    """Extreme eigenvalues of a symmetric operator from `iters` matvecs, with full reorthogonalization (without it
    rounding makes converged Ritz values reappear as spurious copies). `start` (n,): any nonzero vector."""
    n = start.numel()
    iters = max(1, min(iters, n))
    q = start / torch.linalg.vector_norm(start)
    basis = torch.empty(iters, n, dtype=start.dtype, device=start.device)  # Q (k, n): the Krylov basis
    alphas, betas = [], []
    for j in range(iters):
        basis[j] = q
        w = matvec(q)
        alpha = torch.dot(w, q)
        w = w - alpha * q - (betas[-1] * basis[j - 1] if j else 0)
        for _ in range(2):  # Gram–Schmidt twice against the whole basis ("twice is enough", Parlett)
            w = w - basis[: j + 1].T @ (basis[: j + 1] @ w)
        alphas.append(float(alpha))
        beta = float(torch.linalg.vector_norm(w))
        if j == iters - 1 or beta <= 1e-10 * max(1.0, abs(alphas[-1])):  # an invariant subspace: T is exact
            break
        betas.append(beta)
        q = w / beta
    k = len(alphas)
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))  # the tridiagonal T = QᵀAQ (k, k)
    if k > 1:
        off = torch.tensor(betas[: k - 1], dtype=torch.float64)
        t += torch.diag(off, 1) + torch.diag(off, -1)
    values, vectors = torch.linalg.eigh(t)
    s = vectors[:, -1]
    top = basis[:k].T @ s.to(basis.dtype)  # (n,)
    return Eigen(float(values[-1]), float(values[0]), top / torch.linalg.vector_norm(top),
                 abs(beta * float(s[-1])))


def sharpness(hessian: Hessian, iters: int = 20, start: Optional[torch.Tensor] = None,
              scale: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None) -> Eigen:
    """λ_max(H), or with `scale` = P^{-1/2} (flat) λ_max(P^{-1/2} H P^{-1/2}) = λ_max(P⁻¹H) (similar matrices)."""
    p = hessian.params[0]
    if start is None or start.numel() != hessian.numel:
        start = torch.randn(hessian.numel, generator=generator, dtype=torch.float64)
    start = start.to(p.device, p.dtype)
    if scale is None:
        return lanczos(hessian.flat, start, iters)
    return lanczos(lambda v: scale * hessian.flat(scale * v), start, iters)


# ---- Hutchinson ----------------------------------------------------------------------------------------------
def rademacher(n: int, count: int, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """(count, n) independent ±1 entries from `generator` (on the CPU: the device's streams stay untouched)."""
    signs = torch.randint(0, 2, (count, n), generator=generator, dtype=torch.int8)
    return (signs * 2 - 1).to(like.device, like.dtype)


def hutchinson(hessian: Hessian, groups: Sequence[Sequence[int]], probes: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(trace per group (G,), its standard error (G,), total trace, its standard error) from the probes (K, n),
    float64. A group is a list of indices into `hessian.params` (a layer's weight and bias)."""
    sizes = [p.numel() for p in hessian.params]
    rows = []
    for v in probes:
        hv = hessian.flat(v)
        per_param = torch.stack([x.double().sum() for x in torch.split(v * hv, sizes)])  # v_pᵀ(Hv)_p per param
        rows.append(torch.stack([per_param[list(g)].sum() for g in groups]))
    samples = torch.stack(rows)                 # (K, G)
    totals = samples.sum(1)                     # (K,): vᵀHv
    k = samples.shape[0]

    def se(x: torch.Tensor) -> torch.Tensor:
        return x.std(0) / math.sqrt(k) if k > 1 else torch.full_like(x[0], math.nan)
    return samples.mean(0), se(samples), totals.mean(), se(totals)


# ---- what the optimizer's stability asks of the curvature -----------------------------------------------------
@dataclass
class Stability:
    threshold: float         # against λ_max(H), or λ_max(P⁻¹H) when `preconditioned`
    preconditioned: bool
    numerator: float         # threshold · lr: the largest stable lr is numerator / sharpness
    rule: str                # the formula, for the report


def stability(optimizer: torch.optim.Optimizer) -> Optional[Stability]:
    """The edge for this optimizer's first parameter group (Cohen et al. 2021, §2; 2022, §3), or None (Adagrad,
    Adadelta, ...: no fixed-point analysis of that kind). Weight decay (≤ 1e-3 here) shifts it by wd, left out."""
    group = optimizer.param_groups[0]
    lr = float(group["lr"])
    if isinstance(optimizer, torch.optim.SGD):
        beta = float(group.get("momentum", 0.0))
        if beta and group.get("nesterov"):
            num, rule = (2 + 2 * beta) / (1 + 2 * beta), "(2+2β)/(η(1+2β)), Nesterov"
        else:
            num, rule = 2 + 2 * beta, "(2+2β)/η" if beta else "2/η"
        return Stability(num / lr, False, num, rule)
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        beta1 = float(group["betas"][0])
        num = (2 + 2 * beta1) / (1 - beta1)
        return Stability(num / lr, True, num, "(2+2β₁)/(η(1−β₁))")
    if isinstance(optimizer, torch.optim.RMSprop):
        mu = float(group.get("momentum", 0.0))
        return Stability((2 + 2 * mu) / lr, True, 2 + 2 * mu, "(2+2μ)/η" if mu else "2/η")
    return None


def preconditioner(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]) -> Optional[list[torch.Tensor]]:
    """P = √v̂ + ε per parameter, the denominator of the optimizer's step, from its state; None before its first
    step (no v yet) or for another optimizer."""
    group = optimizer.param_groups[0]
    out = []
    for p in params:
        state = optimizer.state.get(p, {})
        if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            if "exp_avg_sq" not in state:
                return None
            v = state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]
            bias2 = 1 - group["betas"][1] ** float(state["step"])  # v̂ = v/(1 − β₂ᵗ)
            out.append((v / bias2).sqrt() + group["eps"])
        elif isinstance(optimizer, torch.optim.RMSprop):
            if "square_avg" not in state:
                return None
            v = state["square_avg"]
            if group.get("centered"):
                v = v - state["grad_avg"].square()
            out.append(v.sqrt() + group["eps"])
        else:
            return None
    return out


# ---- the guest's manners: its own probe, the run's RNG and modes untouched ------------------------------------
class fork_all_rng:
    """torch (CPU and CUDA), Python and NumPy random states as they were on entry, on exit."""

    def __enter__(self):
        self._torch = torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_initialized()
                                            else [])
        self._torch.__enter__()
        self._py, self._np = random.getstate(), np.random.get_state()

    def __exit__(self, *exc):
        random.setstate(self._py)
        np.random.set_state(self._np)
        return self._torch.__exit__(*exc)


class eval_mode:
    """Every submodule in eval mode inside, its own mode back on exit."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __enter__(self):
        self.modes = [(m, m.training) for m in self.module.modules()]
        self.module.eval()

    def __exit__(self, *exc):
        for m, training in self.modes:
            m.training = training


def draw_probe(dataset, size: int, seed: int, collate: Callable) -> Any:
    """`size` examples of `dataset`, chosen by a generator of their own, collated as the training loader does."""
    n = len(dataset)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(n, generator=g)[: min(size, n)].tolist()
    with fork_all_rng():  # fetched as torch's DataLoader fetches a batch: __getitems__ where the dataset has it
        items = dataset.__getitems__(idx) if hasattr(dataset, "__getitems__") else [dataset[i] for i in idx]
        return collate(items)


def layer_groups(module: nn.Module, strip_prefix: str = "") -> tuple[list[str], list[nn.Parameter], list[list[int]]]:
    """(layer names, trainable parameters, for each layer the indices of its parameters), input layer first."""
    names, params, groups = [], [], []
    for name, m in module.named_modules():
        own = [p for p in m.parameters(recurse=False) if p.requires_grad]
        if own:
            tag = name[len(strip_prefix):] if strip_prefix and name.startswith(strip_prefix) else name
            names.append(tag or "model")
            groups.append(list(range(len(params), len(params) + len(own))))
            params += own
    return names, params, groups


# ---- the callback --------------------------------------------------------------------------------------------
class CurvatureMonitor(Instrument):
    """Logs curv/* every `log_every_n_steps` optimizer steps, and at initialization (step 0).

    log_every_n_steps: optimizer steps between readings (null: the trainer's; 0: off; gradlab.observe.common).
    lanczos_iters: Hessian-vector products per sharpness reading (20: the top eigenvalue to ~1e-4 relative from a
        warm start on the models here).
    trace_probes: Rademacher probes per trace reading (standard error ∝ 1/√probes); 0: no trace.
    trace_every_n_steps: optimizer steps between trace readings; null: with every sharpness reading.
    probe_size: examples in the fixed probe batch (drawn once); the loss's curvature is that batch's.
    seed: the probe batch's and the probe vectors' own generator.
    """

    name = "curvature"

    def __init__(self, log_every_n_steps: Optional[int] = 1000, lanczos_iters: int = 20, trace_probes: int = 4,
                 trace_every_n_steps: Optional[int] = None, probe_size: int = 64, seed: int = 0,
                 strip_prefix: str = "net."):
        for key, value in (("log_every_n_steps", log_every_n_steps), ("lanczos_iters", lanczos_iters),
                           ("trace_probes", trace_probes), ("trace_every_n_steps", trace_every_n_steps),
                           ("probe_size", probe_size), ("seed", seed)):
            require(f"callbacks.curvature.{key}", value)
        self.log_every_n_steps, self.lanczos_iters, self.trace_probes = log_every_n_steps, lanczos_iters, trace_probes
        self.trace_every_n_steps = trace_every_n_steps
        self.every = self.trace_every = 0  # in optimizer steps, from the trainer at train start (0: off)
        self.probe_size, self.seed, self.strip_prefix = probe_size, seed, strip_prefix
        self.probe: Any = None
        self.layers: list[str] = []
        self.last: dict[str, float] = {}
        self._start: dict[str, torch.Tensor] = {}  # warm starts: "plain", "precond"
        self._done = -1                              # the optimizer step last measured
        self._generator = torch.Generator().manual_seed(seed + 1)
        self._console = Console(stderr=True)
        self._said: set[str] = set()

    # -- when
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.every = interval(self.log_every_n_steps, trainer)
        self.trace_every = self.trace_every_n_steps or self.every
        if not self.every:
            return
        self.layers, _, _ = layer_groups(pl_module, self.strip_prefix)
        self._measure(trainer, pl_module)  # the curvature at initialization (or where a resumed run stands)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every and trainer.global_step % self._gcd() == 0:
            self._measure(trainer, pl_module)

    def _gcd(self) -> int:
        return math.gcd(self.every, self.trace_every)

    # -- what
    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        if step == self._done or not trainer.is_global_zero:
            return  # a micro-batch of a step already measured; other ranks: rank 0 measures alone
        self._done = step
        do_sharp, do_trace = step % self.every == 0, self.trace_probes and step % self.trace_every == 0
        if not (do_sharp or do_trace):
            return
        try:
            metrics = self.measure(pl_module, trainer.optimizers[0] if trainer.optimizers else None,
                                   trainer, do_sharp, bool(do_trace))
        except Exception as error:  # a guest never raises into the host's training step
            self._say("error", f"curvature: not measured ({type(error).__name__}: {error}); training goes on.")
            return
        if metrics:
            self.last.update(metrics)
            log_scalars(trainer, metrics, step)

    def measure(self, pl_module: pl.LightningModule, optimizer: Optional[torch.optim.Optimizer],
                trainer: Optional[pl.Trainer] = None, do_sharp: bool = True, do_trace: bool = True
                ) -> dict[str, float]:
        """One reading on the module's current weights: {tag: value}."""
        criterion = getattr(pl_module, "criterion", None)
        if not callable(criterion):
            self._say("criterion", "curvature: the module has no `criterion(output, target)`; nothing measured.")
            return {}
        if self.probe is None:
            self.probe = self._draw(trainer)
        names, params, groups = layer_groups(pl_module, self.strip_prefix)
        device = params[0].device
        *inputs, target = [t.to(device) if torch.is_tensor(t) else t for t in self.probe]
        cudnn = torch.backends.cudnn.flags(enabled=False) if device.type == "cuda" else _nothing()
        with fork_all_rng(), eval_mode(pl_module), torch.enable_grad(), cudnn:  # cuDNN RNNs: no double backward
            hessian = Hessian(criterion(pl_module(*inputs), target), params)
            out: dict[str, float] = {}
            if do_sharp:
                out.update(self._sharpness(hessian, optimizer))
            if do_trace:
                probes = rademacher(hessian.numel, self.trace_probes, self._generator, params[0])
                trace, se, total, total_se = hutchinson(hessian, groups, probes)
                for name, t, s in zip([*names, "total"], [*trace.tolist(), float(total)],
                                      [*se.tolist(), float(total_se)]):
                    out[f"{PREFIX}trace/{name}"], out[f"{PREFIX}trace_se/{name}"] = t, s
        return out

    def _sharpness(self, hessian: Hessian, optimizer: Optional[torch.optim.Optimizer]) -> dict[str, float]:
        eig = sharpness(hessian, self.lanczos_iters, self._start.get("plain"), generator=self._generator)
        self._start["plain"] = eig.vector
        out = {PREFIX + "sharpness": eig.top}
        edge = stability(optimizer) if optimizer is not None else None
        if edge is None:
            return out
        relevant = eig.top
        if edge.preconditioned:
            p = preconditioner(optimizer, hessian.params)
            if p is None:
                return out  # before the first step: no second moments yet
            scale = flatten(p).rsqrt()  # P^{-1/2} (n,)
            pre = sharpness(hessian, self.lanczos_iters, self._start.get("precond"), scale, self._generator)
            self._start["precond"] = pre.vector
            relevant = out[PREFIX + "precond_sharpness"] = pre.top
        out[PREFIX + "threshold"] = edge.threshold
        out[PREFIX + "edge"] = relevant / edge.threshold
        out[PREFIX + "max_stable_lr"] = edge.numerator / relevant if relevant > 0 else math.inf
        return out

    def _draw(self, trainer: Optional[pl.Trainer]) -> Any:
        loader = trainer.train_dataloader if trainer is not None else None
        if loader is None:
            raise RuntimeError("no training data loader to draw the probe batch from")
        loaders = loader if isinstance(loader, (list, tuple)) else [loader]
        loader = next(iter(loaders.values())) if isinstance(loader, dict) else loaders[0]
        return draw_probe(loader.dataset, self.probe_size, self.seed, loader.collate_fn)

    def _say(self, key: str, message: str) -> None:
        if key not in self._said:
            self._said.add(key)
            self._console.print(message, highlight=False)

    def layout_category(self, trainer: pl.Trainer):
        """The layout's "curvature" charts (gradlab.observe.layout asks every callback for one)."""
        from tensorboard.plugins.custom_scalar import layout_pb2

        if interval(self.log_every_n_steps, trainer) == 0:
            return None
        opt = trainer.optimizers[0] if trainer.optimizers else None
        edge = stability(opt) if opt is not None else None
        pre = edge is not None and edge.preconditioned
        charts = [multiline(f"{'preconditioned sharpness λmax(P⁻¹H)' if pre else 'sharpness λmax(H)'} against the "
                            f"stability threshold {edge.rule if edge else ''}",
                            [PREFIX + ("precond_sharpness" if pre else "sharpness"), PREFIX + "threshold"]),
                  multiline("sharpness / threshold (above 1: past the edge of stability)", [PREFIX + "edge"])]
        if pre:
            charts.append(multiline("sharpness λmax(H), not preconditioned", [PREFIX + "sharpness"]))
        if self.trace_probes:
            charts.append(multiline("Hessian trace per layer (Hutchinson), input layer first",
                                    [f"{PREFIX}trace/{n}" for n in self.layers]))
        return layout_pb2.Category(title="curvature", chart=charts)

    # -- checkpoints and metrics.json
    def state_dict(self) -> dict[str, Any]:
        # The warm starts and the probe vectors' generator ride along: a resumed run reads what an unbroken one would.
        return {"start": {k: v.cpu() for k, v in self._start.items()}, "generator": self._generator.get_state(),
                "last": dict(self.last)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._start = dict(state_dict.get("start", {}))
        if "generator" in state_dict:
            self._generator.set_state(state_dict["generator"])
        self.last = dict(state_dict.get("last", {}))

    def final_metrics(self) -> dict[str, Any]:
        """The last reading's sharpness, threshold and largest stable lr, for metrics.json."""
        keys = ("sharpness", "precond_sharpness", "threshold", "edge", "max_stable_lr", "trace/total")
        return {PREFIX + k: self.last[PREFIX + k] for k in keys if PREFIX + k in self.last}


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def multiline(title: str, tags: list[str]):
    """A layout chart of exactly these tags (a chart's tags are regular expressions)."""
    import re

    from tensorboard.plugins.custom_scalar import layout_pb2

    return layout_pb2.Chart(title=title,
                            multiline=layout_pb2.MultilineChartContent(tag=[f"^{re.escape(t)}$" for t in tags]))
