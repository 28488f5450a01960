"""Gradient noise per layer: tr(Σ), ‖G‖², the gradient noise scale B_simple and Cockpit's norm test.

    python train.py                                              # on by default, every 64 optimizer steps
    python train.py callbacks.grad_noise.log_every_n_steps=8     # denser readings
    python train.py callbacks.grad_noise.log_every_n_steps=0     # off (or callbacks.grad_noise=null)

Tags (a contract, like train/loss), per parameterized layer (weight and bias together) and `total`:
    grad_noise/trace_cov/<layer>  tr(Σ): the per-example gradient variance summed over the layer's weights
    grad_noise/signal/<layer>     ‖G‖²: the squared norm of the true (full-data) gradient, unbiased estimate
    grad_noise/b_simple/<layer>   B_simple = tr(Σ)/‖G‖² (McCandlish et al. 2018), from running averages of both
    grad_noise/snr/<layer>        Cockpit's norm test √(tr(Σ)/(B‖g‖²)): noise over signal of the batch gradient
    grad_noise/batch_size         B, the examples behind one optimizer step (all ranks, all micro-batches)

Estimators. With per-group gradient sums s_j over n_j examples (m groups, N examples in the step, g the
step's gradient, a mean over the N examples), E[Σ_j ‖s_j‖²/n_j] = N‖G‖² + m·tr(Σ) and E[N‖g‖²] = N‖G‖² + tr(Σ):

    tr(Σ) ≈ (Σ_j ‖s_j‖²/n_j − N‖g‖²) / (m − 1)        ‖G‖² ≈ ‖g‖² − tr(Σ)/N

both unbiased. A group is one example where per-example gradients are cheap and exact (then this is the
sample variance), else a micro-batch or half of one (the two-batch-size estimator of McCandlish et al.,
Appendix A, with B_small = n_j and B_big = N).

Where per-example gradient norms come from (`PerExampleTap`, module forward hooks for the input aᵢ plus a
tensor hook on the output for δᵢ = ∂L/∂outᵢ; nothing reads a Function's ctx). The model's output (B, ...) is
that of the LightningModule's `__call__`, or, where the module calls `self.forward(x)` or a submodule directly,
the last output of a module directly under it; a tuple output `(logits, loss)` gives its first (B, ...) tensor.
    nn.Linear and gradlab.autograd.modules.Linear on (B, in): ‖gᵢ(W)‖² = ‖aᵢ‖²·‖δᵢ‖² (Goodfellow 2015) and
        ‖gᵢ(b)‖² = ‖δᵢ‖², O(B·(in+out)); on (B, T, in) the per-example gradient sums T outer products: as conv.
    nn.Conv2d: the per-example gradient (out, in·k²) materialized by one batched matmul per kernel tap, or the
        Gram form Σ_pq (UUᵀ)_pq(δδᵀ)_pq when P·(in·k²+out) < in·k²·out (P output positions): for the MNIST CNN
        materializing is 96x (conv1) and 11x (conv2) fewer multiply-adds than the Gram form.
    everything else (RNN/GRU/LSTM, embeddings, a layer called twice in one forward, weights tied between two
        layers, which are counted once, under the first layer's name) and
        every layer of a model with batch norm in training mode: groups. Where a step has several micro-batches
        (trainer.accumulate_grad_batches) or ranks (DDP), each micro-batch on each rank is a group, read from the
        parameter's gradient before accumulation and all-reduce: free. Otherwise the batch is split in two
        halves: one extra backward of the first half's rows, on the same graph (no new forward, no RNG drawn).
    Batch norm in training mode normalizes each example with its batch's statistics, so an example's loss
    depends on the others and per-example gradients are not defined; groups that are whole batches (micro-batches,
    ranks) stay valid. Halves of one batch share its statistics, a coupling of order 1/B that is ignored.

Scale. Lightning's loss is the batch mean divided by the accumulation count k, so the hooks see
δᵢ = (1/(k·n))·(example i's output gradient) on a micro-batch of n (times the fp16 loss scale): the tap
multiplies by k·n/scale. The training step is untouched: hooks only read, the extra backward returns its
gradients instead of accumulating them, and on other steps no hook is attached.
"""

import math
from typing import Any, Callable, Optional

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from rich.console import Console
from torch import nn

from gradlab.config.rules import require
from gradlab.observe.common import Instrument, dense, due, interval, tag
from gradlab.observe.writer import log_scalars

PREFIX = "grad_noise/"


# ---- the estimators (plain functions: the callback, the tests and reports call them) -----------------------
def noise_estimates(q: torch.Tensor, m: torch.Tensor, n: float, sq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(tr(Σ), ‖G‖²) from q = Σ_j ‖s_j‖²/n_j over m groups, n examples and sq = ‖g‖² of the step's mean gradient."""
    trace = (q - n * sq) / (m - 1)  # m < 2 gives inf/nan: no estimate from one group
    return trace, sq - trace / n


def norm_test(trace: torch.Tensor, sq: torch.Tensor, n: float) -> torch.Tensor:
    """Cockpit's norm test √(tr(Σ)/(n‖g‖²)): the batch gradient's noise relative to its size; < 1 means a reliable
    direction (Byrd et al. 2012 with θ = 1). Equal to √(B_simple/n) up to using ‖g‖² for ‖G‖²."""
    return torch.sqrt(trace.clamp(min=0) / (n * sq))


def reading(b_simple: Optional[float], batch_size: int) -> str:
    """One sentence on what B_simple says about the batch size in use (steps ∝ 1 + B_simple/B, McCandlish eq. 2.7)."""
    if b_simple is None or not math.isfinite(b_simple) or b_simple <= 0:
        return (f"B_simple is not measurable yet with batch {batch_size}: the gradient's signal is still within its "
                "noise (log more often or for longer).")
    b = b_simple
    cut = 1 - (1 + b / (2 * batch_size)) / (1 + b / batch_size)  # fewer steps when the batch doubles
    head = f"B_simple ≈ {b:,.0f} with batch {batch_size}: "
    if batch_size < b / 2:
        return head + (f"a larger batch (or more GPUs) would cut steps nearly proportionally, up to ~B_simple "
                       f"(doubling the batch: {cut:.0%} fewer steps).")
    if batch_size <= 2 * b:
        return head + (f"the batch is near the critical batch size: doubling it would save {cut:.0%} of the steps "
                       "for twice the examples.")
    return head + (f"the batch is past the critical batch size: doubling it would save only {cut:.0%} of the steps; "
                   "a smaller batch would need nearly as few steps for fewer examples.")


def summarize(scalars: dict[str, list[tuple[int, float]]]) -> dict[str, Any]:
    """The last B_simple reading of a run from its scalars (`gradlab.observe.events.read_scalars(run, "grad_noise/")`)."""
    b = scalars.get(PREFIX + "b_simple/total")
    n = scalars.get(PREFIX + "batch_size")
    if not b or not n:
        return {}
    step, value = b[-1]
    batch = int(n[-1][1])
    return {"step": step, "b_simple": value, "batch_size": batch, "reading": reading(value, batch)}


# ---- per-example squared norms -------------------------------------------------------------------------------
def _wide(x: torch.Tensor) -> torch.Tensor:
    return x if x.element_size() >= 4 else x.float()  # squares of 16-bit values lose too much


def sq_norm(x: torch.Tensor, dim=None) -> torch.Tensor:
    """Σ x² over `dim` (all of x: as float64), without a squared copy of x.

    A large copy is not free: a fresh multi-megabyte tensor costs a page fault per 4 KiB, and `g.double().square()
    .sum()` on a 784x256 gradient took 15x longer than this on the development CPU."""
    if dim is None:
        if x.dtype in (torch.float32, torch.float64) and x.is_contiguous():
            # A dot product: float32 accumulates to ~1e-6 relative on 10^6 elements, far below any sampling noise,
            # and dispatches 3x faster than a norm (the MLP's logging step pays it once per parameter).
            flat = x.view(-1)
            return torch.dot(flat, flat).double()
        return torch.linalg.vector_norm(x, dtype=torch.float64).square()
    if x.numel() < 65536:  # small: the plain square and sum, whose two kernels dispatch faster than a norm's
        return _wide(x).square().sum(dim)
    return torch.linalg.vector_norm(x, dim=dim, dtype=None if x.element_size() >= 4 else torch.float32).square()


def _outer_sq(u: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """‖Σ_p d_p u_pᵀ‖² per example, u (B, P, I), d (B, P, O): by materializing or by the Gram form, the cheaper."""
    _, p, i = u.shape
    o = d.shape[-1]
    if p * (i + o) < i * o:
        return (u @ u.transpose(1, 2) * (d @ d.transpose(1, 2))).sum((1, 2))  # (B, P, P) twice: B·P²·(I+O)
    return sq_norm(d.transpose(1, 2) @ u, (1, 2))  # (B, O, I): B·P·I·O


def linear_sq(a: torch.Tensor, d: torch.Tensor, bias: bool) -> torch.Tensor:
    """Σ over the layer's parameters of ‖gᵢ‖² per example, for y = a·Wᵀ + b with a (B, [T,] in), δ (B, [T,] out)."""
    a, d = _wide(a), _wide(d)
    if a.dim() == 2:
        aa = sq_norm(a, 1)                           # ‖aᵢ‖²: (B,)
        # ‖δᵢaᵢᵀ‖² = ‖aᵢ‖²·‖δᵢ‖², and the bias's ‖δᵢ‖² beside it: (‖aᵢ‖² + 1)·‖δᵢ‖²
        return (aa + 1 if bias else aa) * sq_norm(d, 1)
    a, d = a.flatten(1, -2), d.flatten(1, -2)        # (B, T, in), (B, T, out)
    sq = _outer_sq(a, d)
    return sq + sq_norm(d.sum(1), 1) if bias else sq


def conv2d_sq(conv: nn.Conv2d, a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """The same for a Conv2d (groups 1, zero padding) with input a (B, C, H, W) and output gradient δ (B, O, H', W')."""
    a, d = _wide(a), _wide(d)
    (kh, kw), (sh, sw), (dh, dw), (ph, pw) = conv.kernel_size, conv.stride, conv.dilation, conv.padding
    b, o, ho, wo = d.shape
    c = a.shape[1]
    p = ho * wo
    bias = sq_norm(d.sum((2, 3)), 1) if conv.bias is not None else 0  # ‖Σ_p δ_p‖²
    if p * (c * kh * kw + o) < c * kh * kw * o:  # few output positions: the Gram form
        u = F.unfold(a, conv.kernel_size, conv.dilation, conv.padding, conv.stride).transpose(1, 2)  # (B, P, C·kh·kw)
        return _outer_sq(u, d.flatten(2).transpose(1, 2)) + bias
    # The per-example gradient (B, O, kh·kw·C) from the channels-last input's windows, one per kernel tap: a
    # strided copy each, ~2x cheaper on CPU than F.unfold's im2col. Many channels: one (B, O, C) block per tap
    # (the blocks are disjoint weights, so their squared norms add); few: the windows gathered into one matmul.
    x = F.pad(a, (pw, pw, ph, ph)).permute(0, 2, 3, 1) if ph or pw else a.permute(0, 2, 3, 1)  # (B, H, W, C)
    dt = d.reshape(b, o, p)                                                                   # (B, O, P)
    windows = [x[:, i * dh: i * dh + sh * (ho - 1) + 1: sh, j * dw: j * dw + sw * (wo - 1) + 1: sw]
               for i in range(kh) for j in range(kw)]                                         # (B, H', W', C) each
    if c >= 16:
        block = dt.new_empty(b, o, c)  # reused: one allocation, not one per tap
        sq = sum(sq_norm(torch.bmm(dt, w.reshape(b, p, c), out=block), (1, 2)) for w in windows)
    else:
        u = torch.stack(windows, dim=3).reshape(b, p, kh * kw * c)                            # (B, P, taps·C)
        sq = sq_norm(torch.bmm(dt, u), (1, 2))
    return sq + bias


def exact_kind(module: nn.Module) -> Optional[str]:
    """'linear' or 'conv' where per-example norms have an exact cheap form, else None (groups)."""
    if isinstance(module, nn.Linear):  # gradlab.autograd.modules.Linear subclasses it
        return "linear"
    if (isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros"
            and not isinstance(module.padding, str)):
        return "conv"
    return None


# ---- the hook ------------------------------------------------------------------------------------------------
def _without_graph(fn):
    """A tensor hook that records no graph. The backward runs hooks so already, unless create_graph=True; checking
    costs less than entering torch.no_grad() on every call (the hooks run once per layer and micro-batch)."""
    def hook(x: torch.Tensor):
        if torch.is_grad_enabled():
            with torch.no_grad():
                return fn(x)
        return fn(x)
    return hook


class PerExampleTap:
    """Per-layer sums of squared group gradients over one optimizer step, from hooks attached for that step.

        tap = PerExampleTap(model)
        tap.attach(scale=1.0, grouped=False)      # before the step's forward passes
        loss.backward()                           # any number of micro-batches
        names, q, m, n = tap.collect()            # then sq = ‖.grad‖² per layer -> noise_estimates(q, m, n, sq)
        tap.detach()

    `model(...)`'s output must be (B, ...) rows of independent examples and the loss a mean over them (times
    1/scale). A layer is a module with parameters of its own. `grouped=True` makes each micro-batch one group
    (the caller knows there are at least two); otherwise non-exact layers get two groups per micro-batch.

    `conv_sample` < 1: conv layers' per-example norms from the first ⌈conv_sample·B⌉ rows of each micro-batch
    only, their sum scaled by B/rows. The rows of a shuffled batch are a random sample of it, so q keeps its
    expectation and the estimators stay unbiased, with more variance; the cost of the norms falls in proportion.
    """

    def __init__(self, model: nn.Module, strip_prefix: str = "", conv_sample: float = 1.0,
                 wrap: Optional[Callable] = None):
        if not 0 < conv_sample <= 1:
            raise ValueError(f"conv_sample must be in (0, 1], not {conv_sample!r}")
        self.model = model
        self.conv_sample = conv_sample
        # wrap(hook, layer): the owning instrument's guard around every hook the tap attaches
        self.wrap = wrap or (lambda fn, layer=None: fn)
        self.layers: list[tuple[str, nn.Module, list[nn.Parameter]]] = []
        self._kinds: list[Optional[str]] = []
        owner: dict[int, int] = {}  # id(parameter) -> the layer that holds it (tied weights: the first)
        for name, module in model.named_modules():
            own = [p for p in module.parameters(recurse=False) if p.requires_grad]
            params = [p for p in own if id(p) not in owner]
            kind = exact_kind(module)
            for p in own:
                if id(p) in owner:  # tied: the gradient sums both uses, so neither layer's own input gives it
                    self._kinds[owner[id(p)]] = kind = None
            if params:
                owner.update((id(p), len(self.layers)) for p in params)
                self.layers.append((tag(name, strip_prefix) or "model", module, params))
                self._kinds.append(kind)
        self._norms = [(name, m) for name, m in model.named_modules()
                       if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self.batch_norm: list[str] = []  # batch-norm layers in training mode, seen in the last backward
        self._handles: list[Any] = []
        self.estimated: set[int] = set()  # layers measured by groups in the last micro-batch
        # One step's state (attach), then one micro-batch's (start):
        self.scale, self.grouped, self.estimate = 1.0, False, True
        self.q: list[Optional[torch.Tensor]] = []    # Σ_j ‖s_j‖²/n_j per layer, a tensor on the device
        self.m: list[int] = []                       # groups per layer
        self.n = 0                                   # examples in the step
        self._param_hooked: set[int] = set()         # layers whose parameters have a hook (estimated ones only)
        self._inputs: dict[int, list[Any]] = {}      # layer -> inputs of its calls in this micro-batch
        self._outputs: list[tuple[bool, torch.Tensor]] = []  # (the model's own?, output): candidates for (B, ...)
        self._split: dict[nn.Parameter, torch.Tensor] = {}   # the first half's gradient per parameter
        self._rows = 0                               # B of this micro-batch
        self._in_split = False                       # inside the extra half-batch backward
        self._prepared: set[int] = set()             # outputs that have their gradient hook

    # -- attach / detach
    def attach(self, scale: float = 1.0, grouped: bool = False, estimate: bool = True) -> None:
        """`estimate=False`: this step measures the exact layers only (no extra backward); unless `grouped`,
        where the groups cost nothing, the other layers then collect nothing."""
        if self._handles:
            return
        self.scale, self.grouped, self.estimate = scale, grouped, estimate or grouped
        self.q = [None] * len(self.layers)
        self.m = [0] * len(self.layers)
        self.n = 0
        self._param_hooked = set()
        for i, (name, module, _) in enumerate(self.layers):
            self._handles.append(module.register_forward_hook(self.wrap(self._on_layer_forward(i), name)))
        # The model's output: the LightningModule's own, else the last of a module directly under it.
        self._handles.append(self.model.register_forward_hook(self.wrap(self._on_output(True))))
        for child in self.model.children():
            self._handles.append(child.register_forward_hook(self.wrap(self._on_output(False))))
        self.start()

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._inputs, self._split, self._outputs = [], {}, {}, []

    def collect(self) -> tuple[list[str], torch.Tensor, torch.Tensor, int]:
        """(layer names, q (L,), m (L,), n) of the layers that received gradients."""
        kept = [i for i, q in enumerate(self.q) if q is not None]
        q = torch.stack([self.q[i] for i in kept]) if kept else torch.zeros(0)
        m = torch.tensor([float(self.m[i]) for i in kept], dtype=q.dtype, device=q.device)
        return [self.layers[i][0] for i in kept], q, m, self.n

    # -- hooks of one micro-batch
    def start(self) -> None:
        """A new micro-batch (the callback calls it at each training batch start, while attached)."""
        self._inputs, self._split, self._outputs, self._rows, self._prepared = {}, {}, [], 0, set()

    def _on_layer_forward(self, i: int):
        def hook(module, args, out):
            self._inputs.setdefault(i, []).append(args[0] if args else None)
            if self._kinds[i] and torch.is_tensor(out) and out.requires_grad:
                out.register_hook(self.wrap(self._on_layer_grad(i, module, len(self._inputs[i])), self.layers[i][0]))
        return hook

    def _on_output(self, own: bool):
        def hook(module, args, out) -> None:
            # (logits, loss) or {"logits": ...}: the first (B, ...) tensor. Under DDP, Lightning also routes
            # training_step through the module's __call__: that output is the loss, (), and is left out.
            items = out.values() if isinstance(out, dict) else out if isinstance(out, (tuple, list)) else (out,)
            found = next((t for t in items if torch.is_tensor(t) and t.requires_grad and t.dim() > 0), None)
            if found is not None:
                self._outputs.append((own, found))
                if own:
                    self.prepare()  # called through __call__: decide now (a tap used without the callback)
        return hook

    def prepare(self) -> None:
        """Before the backward (on_before_backward): decide per layer between exact and estimated.

        Decide now: in the backward, a layer's hook on the model's own output tensor runs before ours."""
        own = [t for is_own, t in self._outputs if is_own]
        out = (own or [t for _, t in self._outputs] or [None])[-1]
        if out is None:
            raise RuntimeError("no (B, ...) output with a gradient from the LightningModule or a module directly "
                               "under it, so the batch's examples cannot be told apart")
        if id(out) in self._prepared:
            return  # a second backward through the same output (manual optimization)
        self._prepared.add(id(out))
        rows = self._rows = out.shape[0]
        self.batch_norm = [name for name, m in self._norms if m.training]  # they mix the batch's examples
        self.estimated = set()
        for i in range(len(self.layers)):
            calls = self._inputs.get(i, [])
            exact = (not self.batch_norm and len(calls) == 1 and self._kinds[i] is not None
                     and torch.is_tensor(calls[0]) and calls[0].shape[0] == rows)
            if not exact:
                self.estimated.add(i)
                if self.estimate and i not in self._param_hooked:  # before the backward, once per step
                    self._param_hooked.add(i)
                    self._handles += [p.register_hook(self.wrap(self._on_param_grad(i, p), self.layers[i][0]))
                                      for p in self.layers[i][2]]
        out.register_hook(self.wrap(self._on_output_grad(out)))

    def _on_output_grad(self, out: torch.Tensor):
        # Runs before any parameter's gradient exists: the extra half-batch backward, if one is needed.
        def hook(grad: torch.Tensor) -> None:
            if self._in_split or not self._handles:  # the extra backward below starts at this same tensor
                return
            rows = self._rows
            self.n += rows
            if self.grouped or not self.estimate or not self.estimated or rows < 2:
                return
            params = [p for i in sorted(self.estimated) for p in self.layers[i][2]]
            mask = torch.zeros(rows, *([1] * (grad.dim() - 1)), dtype=grad.dtype, device=grad.device)
            mask[: rows // 2] = 1
            self._in_split = True
            try:  # same graph, first half's rows: their gradient, returned, not accumulated into .grad
                half = torch.autograd.grad(out, params, grad * mask, retain_graph=True, allow_unused=True)
            finally:
                self._in_split = False
            self._split = {p: g for p, g in zip(params, half)}
        return hook

    def _add(self, i: int, value: torch.Tensor, groups: int) -> None:
        self.q[i] = value if self.q[i] is None else self.q[i] + value
        self.m[i] += groups

    def _on_layer_grad(self, i: int, module: nn.Module, call: int):
        @_without_graph
        def hook(d: torch.Tensor) -> None:
            # Detached (a later backward through this graph, manual optimization) or measured otherwise: nothing.
            if self._in_split or i in self.estimated or not self._handles or i not in self._inputs:
                return
            a = self._inputs[i][call - 1]
            rows, f = self._rows, self.scale * self._rows  # δ carries 1/(k·n) of the mean loss: back to gᵢ itself
            if self._kinds[i] == "linear":
                total = linear_sq(a, d, module.bias is not None).sum()
            else:
                k = math.ceil(self.conv_sample * rows)
                total = conv2d_sq(module, a[:k], d[:k]).sum() * (rows / k)  # k = rows: all of them, exact
            self._add(i, total * f * f, rows)
        return hook

    def _on_param_grad(self, i: int, p: nn.Parameter):
        @_without_graph
        def hook(g: torch.Tensor) -> None:
            # This micro-batch's own gradient of p on this rank, before accumulation into .grad and before DDP.
            if self._in_split or i not in self.estimated:
                return
            if g.is_sparse:
                g = g.coalesce().to_dense()
            rows, f = self._rows, self.scale * self._rows
            # f·g is the sum of the micro-batch's per-example gradients; ‖f·g‖² = f²‖g‖², with no scaled copy
            if self.grouped or rows < 2:
                self._add_param(i, p, sq_norm(g) * (f * f / rows), 1)
                return
            half = self._split.get(p)
            n_a = rows // 2
            if half is None:  # no gradient from the first half's rows: all of it came from the second
                self._add_param(i, p, sq_norm(g) * (f * f / (rows - n_a)), 2)
                return
            if half.is_sparse:
                half = half.coalesce().to_dense()
            self._add_param(i, p, sq_norm(half) * (f * f / n_a) + sq_norm(g - half) * (f * f / (rows - n_a)), 2)
        return hook

    def _add_param(self, i: int, p: nn.Parameter, value: torch.Tensor, groups: int) -> None:
        # A layer's groups are counted once, on its first parameter; its other parameters add to the same q.
        first = self.layers[i][2][0] is p
        self.q[i] = value if self.q[i] is None else self.q[i] + value
        if first:
            self.m[i] += groups


# ---- the callback --------------------------------------------------------------------------------------------
class GradNoiseMonitor(Instrument):
    """Logs grad_noise/{trace_cov,signal,b_simple,snr}/<layer> and /total every `log_every_n_steps` optimizer steps.

    log_every_n_steps: optimizer steps between readings (gradlab.observe.common.EVERY_N: null follows the
        trainer, 0 switches the instrument off: no hook is ever attached).
    conv_sample: the fraction of each batch whose per-example norms conv layers compute (the first rows, see
        PerExampleTap); `auto`: all rows when logging every 16 steps or more sparsely, where a reading must stand
        on its own, else a quarter: the norms of the CNN's conv2 cost about two of its weight gradients, and
        dense readings are averaged anyway (`smoothing`), so per-reading precision buys little.
    estimate_every: layers without exact per-example norms (the two-batch estimate, one extra backward of half
        the batch) are measured at every this-many-th reading; in between, their last values stand in for them
        in the totals and the moving averages, and their own tags are not logged. `auto`: every reading when
        logging every 16 steps or more sparsely, else every 4th (for the GRU, the extra backward is ~60% of a
        step). Micro-batches or several ranks make the estimate free: then it is taken at every reading.
    smoothing: B_simple is the ratio of exponential moving averages of tr(Σ) and ‖G‖² over logging steps, as
        McCandlish et al. recommend (a ratio of single-step estimates is very noisy); 0 uses each step alone.
    strip_prefix: removed from module names in tags (`net.conv1` -> `conv1`).
    """

    name = "grad_noise"

    def __init__(self, log_every_n_steps: Optional[int] = 64, smoothing: float = 0.9, strip_prefix: str = "net.",
                 conv_sample: Any = "auto", estimate_every: Any = "auto"):
        for key, value in (("log_every_n_steps", log_every_n_steps), ("smoothing", smoothing),
                           ("conv_sample", conv_sample), ("estimate_every", estimate_every)):
            require(f"callbacks.{self.name}.{key}", value)  # the rules of conf/ (gradlab.config.rules.RULES)
        self._conv_sample, self._estimate_every = conv_sample, estimate_every  # "auto": set by the interval
        self.conv_sample, self.estimate_every = 1.0, 1
        self._resolve(log_every_n_steps or 0)
        self._every = 0
        self._readings = 0                            # readings taken (the estimate's cadence)
        self._held: dict[str, list[float]] = {}      # layer -> its last [tr Σ, ‖G‖², ‖g‖²], between estimates
        self.log_every_n_steps = log_every_n_steps
        self.smoothing = smoothing
        self.strip_prefix = strip_prefix
        self.tap: Optional[PerExampleTap] = None
        self.last: dict[str, float] = {}              # the last logged values, by tag
        self._ema: dict[str, torch.Tensor] = {}
        self._told = False
        self._console = Console(stderr=True)

    def _resolve(self, every: int) -> None:
        # Dense logging (< 16 steps): a quarter of each batch's conv rows, the two-batch estimate every 4th reading.
        dense_logging = 0 < every < 16
        self.conv_sample = float(0.25 if dense_logging else 1.0) if self._conv_sample == "auto" \
            else float(self._conv_sample)
        self.estimate_every = (4 if dense_logging else 1) if self._estimate_every == "auto" else self._estimate_every

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._every = interval(self.log_every_n_steps, trainer)
        if self._every == 0:
            return
        self._resolve(self._every)
        self.tap = PerExampleTap(pl_module, self.strip_prefix, self.conv_sample, wrap=self.guarded)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx) -> None:
        if self.tap is not None and self.tap.attached:
            self.tap.start()  # the next micro-batch of the same step
        if self.tap is None or not due(self._every, trainer.global_step):
            return
        k = trainer.accumulate_grad_batches
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        scale = k / (scaler.get_scale() if scaler is not None else 1.0)
        # Several micro-batches or ranks per step: each one a group, for free; otherwise halves of the batch.
        self.tap.attach(scale=scale, grouped=k * trainer.world_size >= 2,
                        estimate=self._readings % self.estimate_every == 0)
        self._readings += 1

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss) -> None:
        if self.tap is not None and self.tap.attached:
            self.tap.prepare()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.switch_off()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.switch_off()

    def switch_off(self) -> None:
        if self.tap is not None:
            self.tap.detach()

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        tap = self.tap
        if tap is None or not tap.attached:
            return
        tap.detach()
        names, q, m, n = tap.collect()
        if not names:
            return
        index = {name: i for i, (name, _, _) in enumerate(tap.layers)}
        grads = [[p.grad for p in tap.layers[index[name]][2] if p.grad is not None] for name in names]
        sq = torch.stack([sum(sq_norm(dense(g)) for g in gs) for gs in grads])  # ‖g‖² per layer, float64
        if trainer.world_size > 1:  # sums over ranks; ‖g‖² is of the all-reduced gradient, the same on every rank
            packed = trainer.strategy.reduce(torch.cat([q, m, q.new_tensor([float(n)])]).double(), reduce_op="sum")
            q, m, n = packed[: len(q)], packed[len(q): 2 * len(q)], int(packed[-1].item())
        estimated = [j for j, t in enumerate(names) if index[t] in tap.estimated] if tap.estimate else []
        self._log(trainer, tap, names, q, m, n, sq, estimated)

    def _log(self, trainer, tap, names, q, m, n, sq, estimated) -> None:
        trace, signal = noise_estimates(q.double(), m.double(), n, sq.double())
        measured, sq = list(names), sq.double()
        if estimated:  # keep the two-batch layers' (tr Σ, ‖G‖², ‖g‖²) for the readings without the estimate
            self._held = {names[j]: v for j, v in zip(estimated, torch.stack([trace, signal, sq], 1)[estimated]
                                                          .tolist())}
        elif self._held and not tap.estimate:  # their last values stand in, in the totals and the averages
            held = [t for t in self._held if t not in names]
            if held:  # in the layers' own order, which the moving averages are kept in
                extra = torch.tensor([self._held[t] for t in held], dtype=torch.float64, device=trace.device)
                trace, signal, sq = (torch.cat([v, extra[:, j]]) for j, v in enumerate((trace, signal, sq)))
                position = {name: i for i, (name, _, _) in enumerate(tap.layers)}
                order = sorted(range(len(names) + len(held)), key=lambda j: position[(names + held)[j]])
                names = [(names + held)[j] for j in order]
                trace, signal, sq = trace[order], signal[order], sq[order]
        trace_t, signal_t, sq_t = trace.sum(), signal.sum(), sq.sum()
        snr = norm_test(trace, sq, n)
        snr_t = norm_test(trace_t, sq_t, n)
        tr_all, sig_all = torch.cat([trace, trace_t[None]]), torch.cat([signal, signal_t[None]])
        b = self._smoothed(tr_all, sig_all)
        values = torch.cat([tr_all, sig_all, b, snr, snr_t[None]]).tolist()  # one device-to-host copy
        tags = [*names, "total"]
        L = len(tags)
        metrics = {}
        for j, kind in enumerate(("trace_cov", "signal", "b_simple")):
            metrics.update({f"{PREFIX}{kind}/{t}": v for t, v in zip(tags, values[j * L:(j + 1) * L])})
        metrics.update({f"{PREFIX}snr/{t}": v for t, v in zip(tags, values[3 * L:])})
        for t in names:  # a held-over layer: in the totals, not logged as if measured now
            if t not in measured:
                for kind in ("trace_cov", "signal", "b_simple", "snr"):
                    metrics.pop(f"{PREFIX}{kind}/{t}")
        metrics[PREFIX + "batch_size"] = float(n)
        self.last = metrics
        if trainer.is_global_zero:
            log_scalars(trainer, metrics, trainer.global_step)
            if not self._told:
                self._tell(tap, names)
        self._told = True

    def _smoothed(self, trace: torch.Tensor, signal: torch.Tensor) -> torch.Tensor:
        # Ratio of EMAs; their bias corrections (1 - β^t) are equal and cancel in the ratio.
        beta = self.smoothing
        for key, value in (("trace", trace), ("signal", signal)):
            old = self._ema.get(key)
            old = old.to(value.device) if old is not None else None
            self._ema[key] = value if old is None or old.shape != value.shape else beta * old + (1 - beta) * value
        b = self._ema["trace"] / self._ema["signal"]
        return torch.where(self._ema["signal"] > 0, b, torch.full_like(b, math.nan))

    def _tell(self, tap: PerExampleTap, names: list[str]) -> None:
        est = [tap.layers[i][0] for i in sorted(tap.estimated) if tap.layers[i][0] in names]
        exact = [t for t in names if t not in est]
        lines = []
        if exact:
            index = {name: layer for name, layer, _ in tap.layers}
            sampled = [t for t in exact if exact_kind(index[t]) == "conv"] if tap.conv_sample < 1 else []
            lines.append(f"exact per-example gradient norms for {', '.join(exact)}"
                         + (f" ({', '.join(sampled)}: from the first {tap.conv_sample:.0%} of each batch's rows, "
                            "conv_sample)" if sampled else ""))
        if est:
            every = "reading" if self.estimate_every == 1 else f"{self.estimate_every}th reading (estimate_every)"
            how = ("each micro-batch of each rank a group" if tap.grouped
                   else f"two halves of each batch, one extra backward every {every}; free with "
                        "trainer.accumulate_grad_batches >= 2 or several ranks")
            lines.append(f"two-batch estimate for {', '.join(est)} ({how})")
        note = ""
        if tap.batch_norm:
            note = (f" Batch norm in training mode ({', '.join(tap.batch_norm)}) mixes the samples of a batch, so "
                    "per-example gradients are not defined in this model: every layer is estimated from groups"
                    + ("." if tap.grouped else "; halves of one batch share its statistics (a 1/B coupling); "
                       "trainer.accumulate_grad_batches=2 makes each group its own batch."))
        self._console.print(f"[bold]grad_noise[/]: {'; '.join(lines)}.{note}", highlight=False)

    def state_dict(self) -> dict[str, Any]:
        # The moving averages ride in checkpoints, so a resumed run logs the B_simple an uninterrupted one would.
        return {"ema": {k: v.tolist() for k, v in self._ema.items()}, "last": dict(self.last),
                "readings": self._readings, "held": dict(self._held)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._ema = {k: torch.tensor(v, dtype=torch.float64) for k, v in state_dict.get("ema", {}).items()}
        self.last = dict(state_dict.get("last", {}))
        self._readings = int(state_dict.get("readings", 0))
        self._held = {k: list(v) for k, v in state_dict.get("held", {}).items()}

    def final_metrics(self) -> dict[str, Any]:
        """For metrics.json and the results table: the last B_simple, the batch it was measured at, a reading."""
        if not self.last:
            return {}
        b, n = self.last[PREFIX + "b_simple/total"], int(self.last[PREFIX + "batch_size"])
        return {PREFIX + "b_simple/total": b, PREFIX + "batch_size": n, PREFIX + "reading": reading(b, n)}

