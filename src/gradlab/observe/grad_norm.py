"""Per-layer gradient norms, update ratios and gradient health checks, written to every logger.

    python train.py callbacks.grad_norm.log_every_n_steps=1            # every optimizer step
    python train.py callbacks.grad_norm.histogram_every_n_steps=100    # plus gradient histograms
    python train.py callbacks.grad_norm.on_nonfinite=warn              # keep training after a NaN
    python scripts/plot_grad_flow.py logs/train/runs/<run>             # the picture

Tags (a contract, like train/loss):
    grad_norm/<param>          L2 norm of the parameter's gradient (before clipping)
    grad_norm/total            L2 norm of all gradients as one vector (before clipping)
    grad_norm/total_after_clip the same after clipping (only when clipping is on)
    param_norm/<param>         ‖w‖ before the optimizer step
    update_ratio/<param>       ‖Δw‖/‖w‖ of the optimizer step: around 1e-3 is healthy, 1e-1 is too big a step.
                               An embedding's (nn.Embedding) is taken over the rows the step used (a nonzero
                               gradient row): a batch touches a few rows of a large vocabulary, and the rest
                               would make a healthy step look 1,000x too small
    grad_norm_log10/*, update_ratio_log10/*   log10 of the above, for the layout's charts (log10=true)
    update_ratio_log10/band_{low,1e-3,high}   -4, -3, -2: the healthy band's reference lines in the layout
    grad_hist/<param>          gradient histograms (TensorBoard only; off unless histogram_every_n_steps > 0)

Where gradients are read: Lightning calls `on_before_optimizer_step` after the closure (backward, and with it
the DDP all-reduce), after gradient accumulation and after the AMP scaler has unscaled them, but before
clipping; so per-layer norms are the raw, final gradients. Clipping then works in place on `.grad` and
optimizers leave `.grad` alone, so `on_train_batch_end` reads the clipped gradients and the new weights.

Cost: all norms of a step come from `torch._foreach_norm` (one fused kernel per device and dtype), are stacked
on the device, copied to the host once per logging step and written to TensorBoard as one event; Lightning's
`grad_norm` utility syncs the device once per parameter instead. on_nonfinite=stop adds one fused norm and one
host sync on the other steps. scripts/bench_grad_norms.py measures it all.
"""

import math
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from rich.console import Console

from gradlab.config.rules import require
from gradlab.observe.common import Instrument, dense, due, interval, tag
from gradlab.observe.health_rules import exploding, vanishing
from gradlab.observe.lightning_private import keep_checkpoints, stop_now
from gradlab.observe.writer import log_histogram, log_scalars

NONFINITE, VANISHING, EXPLODING = "non-finite", "vanishing", "exploding"
# The healthy band of ‖Δw‖/‖w‖ drawn in the layout: a decade either side of the usual 1e-3, as log10 values.
RATIO_BAND = {"update_ratio_log10/band_low": -4.0, "update_ratio_log10/band_1e-3": -3.0,
              "update_ratio_log10/band_high": -2.0}


class GradNormMonitor(Instrument):
    """Logs gradient norms per parameter and warns when they vanish, explode or stop being finite.

    log_every_n_steps: optimizer steps between logs (gradlab.observe.common.EVERY_N: null follows the trainer, 0 off).
    update_ratio: also log `param_norm/*` and `update_ratio/*` (costs a copy of the weights on logging steps).
    histogram_every_n_steps: gradient histograms every M optimizer steps; 0 switches them off.
    vanishing_threshold, exploding_threshold, patience: warn when a weight's gradient norm stays below
        `vanishing_threshold` times the largest of a layer after it, or a parameter's above `exploding_threshold`,
        for `patience` logging steps in a row (gradlab.observe.health_rules.vanishing/exploding: the report's
        definitions).
    on_nonfinite: "warn" prints a warning on logging steps; "stop" checks every step, skips the optimizer
        step whose gradients are NaN/inf (so the weights stay finite) and ends training cleanly.
    strip_prefix: removed from parameter names in tags (`net.conv1.weight` -> `conv1.weight`).
    log10: also log `grad_norm_log10/*` and `update_ratio_log10/*` (and the healthy band's three reference
        lines), which the TensorBoard layout charts: these families span orders of magnitude.
    """

    name = "grad_norm"

    def __init__(
        self,
        log_every_n_steps: Optional[int] = None,
        update_ratio: bool = True,
        histogram_every_n_steps: int = 0,
        vanishing_threshold: float = 1e-3,
        exploding_threshold: float = 1e3,
        patience: int = 3,
        on_nonfinite: str = "stop",
        strip_prefix: str = "net.",
        log10: bool = True,
    ):
        for key, value in (("log_every_n_steps", log_every_n_steps), ("histogram_every_n_steps",
                           histogram_every_n_steps), ("patience", patience), ("on_nonfinite", on_nonfinite)):
            require(f"callbacks.{self.name}.{key}", value)  # the rules of conf/ (gradlab.config.rules.RULES)
        self.log_every_n_steps = log_every_n_steps
        self.update_ratio = update_ratio
        self.histogram_every_n_steps = histogram_every_n_steps
        self.vanishing_threshold = vanishing_threshold
        self.exploding_threshold = exploding_threshold
        self.patience = patience
        self.on_nonfinite = on_nonfinite
        self.strip_prefix = strip_prefix
        self.log10 = log10
        self.stopped_at: Optional[int] = None  # the step whose non-finite gradients stopped training
        self._every = 1
        self._clipping = False
        self._amp_scaler = False
        self._console = Console(stderr=True)
        self._health: dict[str, tuple[str, int]] = {}  # tag -> (state, logging steps in that state)
        self._pending: Optional[dict[str, Any]] = None  # what on_before_optimizer_step leaves for after the step
        self._snapshot: list[torch.Tensor] = []  # weights before the step, reused between logging steps
        self._named: Optional[list[tuple[str, torch.nn.Parameter]]] = None
        self._tables: set[int] = set()  # ids of nn.Embedding weights: their update ratio is over the used rows

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._named = None  # (tag, parameter) pairs, listed once: named_parameters() walks every module
        self._every = interval(self.log_every_n_steps, trainer)
        # ClassifierModule has its own default clip value that applies when the trainer's is null.
        hparams = getattr(pl_module, "hparams", {})
        self._clipping = bool(trainer.gradient_clip_val or hparams.get("gradient_clip_val"))
        # fp16 AMP: a GradScaler skips steps with inf gradients and lowers its scale; that is routine, not a fault.
        self._amp_scaler = getattr(trainer.precision_plugin, "scaler", None) is not None

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        step = trainer.global_step
        log_now = trainer.is_global_zero and due(self._every, step)
        hist_now = trainer.is_global_zero and due(self.histogram_every_n_steps, step)
        guard = self.on_nonfinite == "stop" and not self._amp_scaler
        if not (log_now or hist_now or guard):
            return
        if self._named is None:
            self._named = [(tag(n, self.strip_prefix), p) for n, p in pl_module.named_parameters()]
            self._tables = {id(m.weight) for m in pl_module.modules() if isinstance(m, torch.nn.Embedding)}
        named = [(n, p) for n, p in self._named if p.grad is not None]
        if not named:
            return
        if log_now or guard:
            grads = [dense(p.grad.detach()) for _, p in named]
            norms = torch.stack(torch._foreach_norm(grads))  # (L,)
            total = torch.linalg.vector_norm(norms)
            if guard and not torch.isfinite(total):  # the one per-step host sync, only in "stop" mode
                self._stop(trainer, pl_module, named, norms)
                return
        if hist_now:
            self._histograms(trainer, named, step)
        if not log_now:
            return
        pending = {"step": step, "names": [n for n, _ in named], "norms": norms, "total": total,
                   "params": [p for _, p in named]}
        if self.update_ratio:
            weights = [p.detach() for _, p in named]
            param_norms = list(torch._foreach_norm(weights))
            rows = {i: dense(p.grad).ne(0).flatten(1).any(1) for i, (_, p) in enumerate(named) if id(p) in self._tables}
            for i, used in rows.items():  # an embedding: the rows this step used
                param_norms[i] = torch.linalg.vector_norm(weights[i][used])
            pending["param_norms"], pending["rows"] = torch.stack(param_norms), rows
            self._take_snapshot(weights)
        self._pending = pending

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        # Runs after every micro-batch; only the one that stepped the optimizer left something pending.
        pending, self._pending = self._pending, None
        if pending is None:
            return
        names, params = pending["names"], pending["params"]
        parts = [pending["norms"], pending["total"].reshape(1)]
        if self._clipping:
            clipped = [dense(p.grad) if p.grad is not None else torch.zeros_like(p) for p in params]
            parts.append(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(clipped))).reshape(1))
        if self.update_ratio:
            torch._foreach_sub_(self._snapshot, [p.detach() for p in params])  # w_before - w_after = -Δw
            deltas = list(torch._foreach_norm(self._snapshot))
            for i, used in pending["rows"].items():
                deltas[i] = torch.linalg.vector_norm(self._snapshot[i][used])
            deltas = torch.stack(deltas)
            w = pending["param_norms"]
            parts += [w, torch.where(w > 0, deltas / w, torch.nan)]  # a zero-initialized weight has no ratio yet
        values = torch.cat([t.to(parts[0].dtype) for t in parts]).tolist()  # the one device-to-host copy

        n = len(names)
        metrics = {f"grad_norm/{name}": v for name, v in zip(names, values[:n])}
        metrics["grad_norm/total"] = values[n]
        i = n + 1
        if self._clipping:
            metrics["grad_norm/total_after_clip"] = values[i]
            i += 1
        if self.update_ratio:
            metrics.update({f"param_norm/{name}": v for name, v in zip(names, values[i:i + n])})
            metrics.update({f"update_ratio/{name}": v for name, v in zip(names, values[i + n:i + 2 * n])})
        if self.log10:
            metrics.update(log10_copies(metrics))
            if self.update_ratio:
                metrics.update(RATIO_BAND)
        log_scalars(trainer, metrics, pending["step"])
        self._check_health(pending["step"], dict(zip(names, values[:n])))

    def _take_snapshot(self, params: list[torch.Tensor]) -> None:
        same = len(self._snapshot) == len(params) and all(
            s.shape == p.shape and s.dtype == p.dtype and s.device == p.device for s, p in zip(self._snapshot, params))
        if same:
            torch._foreach_copy_(self._snapshot, params)  # no new allocation on every logging step
        else:
            self._snapshot = [p.clone() for p in params]

    def _histograms(self, trainer: pl.Trainer, named, step: int) -> None:
        for name, p in named:
            log_histogram(trainer, f"grad_hist/{name}", p.grad.detach().float().cpu(), step)

    def _check_health(self, step: int, norms: dict[str, float]) -> None:
        """Warn once when a parameter enters a bad state and has stayed in it long enough."""
        events: dict[str, list[tuple[str, float]]] = {}
        weak = set(vanishing(norms, self.vanishing_threshold))
        for name, value in norms.items():
            state = (NONFINITE if not math.isfinite(value) else VANISHING if name in weak
                     else EXPLODING if exploding(value, self.exploding_threshold) else None)
            prev, count = self._health.get(name, (None, 0))
            count = count + 1 if state == prev else 1
            self._health[name] = (state, count)
            # Under a GradScaler a single inf step is routine; only a run of them is a fault.
            needed = 1 if state == NONFINITE and not self._amp_scaler else self.patience
            if state is not None and count == needed:
                events.setdefault(state, []).append((name, value))
        for state, layers in events.items():
            self._warn(state, step, layers)

    def _warn(self, state: str, step: int, layers: list[tuple[str, float]]) -> None:
        shown = ", ".join(f"{name} = {value:.3g}" for name, value in layers[:6])
        more = f" and {len(layers) - 6} more" if len(layers) > 6 else ""
        if state == NONFINITE:
            advice = ("Training goes on (callbacks.grad_norm.on_nonfinite=warn) and the weights are now NaN; "
                      "use on_nonfinite=stop to keep the last good weights, and lower the learning rate or clip "
                      "(trainer.gradient_clip_val=1.0).")
        elif state == VANISHING:
            advice = (f"below {self.vanishing_threshold:g} times the gradient of a later layer for {self.patience} "
                      "logging steps: these layers barely "
                      "learn. Saturating activations (sigmoid, tanh), depth without normalization or a poor init "
                      "are the usual causes.")
        else:
            advice = (f"above {self.exploding_threshold:g} for {self.patience} logging steps: lower the learning "
                      "rate or clip gradients (trainer.gradient_clip_val=1.0).")
        self._console.print(f"[bold yellow]gradient warning[/]: {state} gradient at step {step}: {shown}{more}. "
                            f"{advice}", highlight=False)

    def _stop(self, trainer: pl.Trainer, pl_module: pl.LightningModule, named, norms: torch.Tensor) -> None:
        # Optimizers skip parameters without a gradient: this step changes no weight and no optimizer state.
        for _, p in named:
            p.grad = None
        if self.stopped_at is not None:
            return  # already stopping (Lightning may still finish this step's bookkeeping)
        step = self.stopped_at = trainer.global_step
        stop_now(trainer)  # a diverged run ends now, not after `min_epochs`/`min_steps` of skipped steps
        # Weights that just produced NaN gradients are finite but already diverged (the NaN usually comes from
        # a forward pass through huge weights), so nothing may overwrite the checkpoints on disk from here on.
        kept = keep_checkpoints(trainer)
        if not trainer.is_global_zero:
            return
        bad = [(n, v) for (n, _), v in zip(named, norms.tolist()) if not math.isfinite(v)] or [("total", math.inf)]
        shown = ", ".join(f"{name} = {value:.3g}" for name, value in bad[:6])
        more = f" and {len(bad) - 6} more" if len(bad) > 6 else ""
        saved = (f"the last good checkpoints are kept: {', '.join(kept)}." if kept
                 else "no checkpoint had been written yet.")
        self._console.print(
            f"[bold red]gradient error[/]: non-finite gradient at step {step}: {shown}{more}. Training stops "
            f"(callbacks.grad_norm.on_nonfinite=stop): the update was skipped, no checkpoint is written from here "
            f"on, and {saved} Lower the learning rate or clip gradients (trainer.gradient_clip_val=1.0).",
            highlight=False)


def log10_copies(metrics: dict[str, float]) -> dict[str, float]:
    """`grad_norm_log10/<param>` beside `grad_norm/<param>` (and update_ratio); zero and NaN give NaN, inf stays."""
    out = {}
    for key, v in metrics.items():
        family, _, name = key.partition("/")
        if family in ("grad_norm", "update_ratio"):
            out[f"{family}_log10/{name}"] = math.log10(v) if v > 0 else math.nan  # NaN > 0 is False
    return out

