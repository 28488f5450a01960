"""Activation health per layer, from the training forward pass of logging steps (no second forward pass).

    python train.py callbacks.activations.log_every_n_steps=1        # every optimizer step
    python train.py callbacks.activations=null                       # off

Tags, one per activation layer (named after the linear/conv layer that feeds it: `conv1`, `fc1`, `layers.fc2`;
the recurrent layer itself for an RNN: `rnn`; a normalization layer under its own name):
    act/dead/<layer>        fraction of units (features, or channels of a conv) that give no gradient for the whole
                            batch: the activation's flat part, per kind (table below)
    act/saturation/<layer>  fraction of outputs on the flat part of a bounded or one-sided smooth activation
    act/mean/<layer>, act/std/<layer>   mean and standard deviation of the activation's output
    act/scale/<layer>       RMS of a normalization layer's output (LayerNorm, RMSNorm, BatchNorm, GroupNorm, ...):
                            about 1 after the normalization, times its learned weight
    act/attn_entropy/<layer>.h<i>   attention entropy of head i, normalized to [0, 1] by log(keys attended):
                            0 is one key per query (collapsed), 1 is uniform

What "no gradient" means per kind (f'(x) below about 0.01; x is the activation's input):
    relu                    dead: output 0 (x <= 0) for every example
    gelu                    dead: x < -3          silu, mish: dead: x < -6       hardswish: dead: x <= -3
    sigmoid                 saturated: output within 0.03 of 0 or 1 (|x| > 3.5)  tanh: |output| > 0.97
    hardsigmoid             saturated: |x| >= 3   elu: saturated: x < -4.6       softplus: saturated: x < -4.6
    leaky_relu              never flat: mean and std only
    RNN/GRU/LSTM outputs    as tanh

Attention entropy is measured where the weights can be formed: `F.scaled_dot_product_attention` (recomputed on
logging steps from q and k, with its mask or causal flag) and `nn.MultiheadAttention` (from its own projection
weights). A fused kernel called another way (xformers, flash-attn's own functions) is not seen.

How activations are seen without touching the models: from the training batch's start to its backward, on a
logging step, the forward runs inside a `TorchFunctionMode` that notices the functions above whether they are
called as functions (`F.relu`), through modules (`nn.GELU`) or inside gradlab's hand-written Functions; recurrent
and normalization layers get a forward hook. This does not depend on how the LightningModule calls its network
(`self(x)`, `self.forward(x)` or a submodule). On other steps nothing is installed. Under gradient accumulation
the statistics cover every micro-batch of the step; under DDP they are summed over the ranks (one all-reduce on
logging steps) and logged once, by rank 0.
"""

import math
from typing import Any, Callable, Optional

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from gradlab.config.rules import require
from gradlab.observe.common import Instrument, due, interval, tag
from gradlab.observe.writer import log_scalars

SATURATION = 0.97  # |tanh| above this, or sigmoid within 1 - this of 0 or 1, sits on the flat part of the curve
KINDS = {torch.relu: "relu", F.relu: "relu", torch.Tensor.relu: "relu", torch.relu_: "relu", F.relu6: "relu",
         torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", torch.Tensor.sigmoid: "sigmoid",
         torch.tanh: "tanh", F.tanh: "tanh", torch.Tensor.tanh: "tanh",
         F.leaky_relu: "leaky_relu", F.gelu: "gelu", F.silu: "silu", F.mish: "mish", F.hardswish: "hardswish",
         F.hardsigmoid: "hardsigmoid", F.elu: "elu", F.softplus: "softplus"}
# Where each kind gives (almost) no gradient: a predicate on its input x or its output y.
FLAT: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "relu": lambda x, y: y <= 0,
    "gelu": lambda x, y: x < -3,                   # GELU'(-3) = -0.012
    "silu": lambda x, y: x < -6,                   # SiLU'(-6) = -0.012
    "mish": lambda x, y: x < -6,                   # Mish'(-6) = -0.012
    "hardswish": lambda x, y: x <= -3,             # exactly 0 there
    "hardsigmoid": lambda x, y: x.abs() >= 3,      # exactly 0 there
    "elu": lambda x, y: x < -4.6,                  # ELU'(x) = e^x < 0.01
    "softplus": lambda x, y: x < -4.6,             # softplus'(x) = sigmoid(x) < 0.01
    "sigmoid": lambda x, y: (y - 0.5).abs() > SATURATION - 0.5,
    "tanh": lambda x, y: y.abs() > SATURATION,
}
DEAD = ("relu", "gelu", "silu", "mish", "hardswish")  # flat for a whole unit across the batch: "dead"
STATS = {kind: ("dead", "mean", "std") for kind in DEAD}
STATS.update({kind: ("saturation", "mean", "std") for kind in ("sigmoid", "tanh", "hardsigmoid", "elu", "softplus")})
STATS.update({"leaky_relu": ("mean", "std"), "norm": ("scale",), "attention": ("attn_entropy",)})
FEEDERS = (nn.Linear, nn.modules.conv._ConvNd)  # an activation is named after the last of these to run
NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase, nn.RMSNorm)


class Accumulator:
    """Running sums of one layer's outputs over the micro-batches of a logging step (on the device)."""

    def __init__(self, kind: str):
        self.kind = kind
        self.sums: Optional[torch.Tensor] = None  # (4,): count, sum y, sum y², flat count (float64 across adds)
        self.alive: Optional[torch.Tensor] = None  # (units,) float64: > 0 where a unit gave a gradient somewhere

    @torch.no_grad()
    def add(self, y: torch.Tensor, flat: Optional[torch.Tensor] = None) -> None:
        """y: the output; flat: where it gives no gradient (FLAT), the shape of y."""
        y = y.detach()
        # float32 sums: torch's cascade summation keeps them to ~1e-7 relative at any size, and float64 would
        # cost a converted copy of the activation (~20x the time of the sum on CPU).
        f32 = torch.float32
        counted = flat is not None and self.kind not in DEAD
        saturated = flat.sum(dtype=f32) if counted else torch.zeros((), dtype=f32, device=y.device)
        sums = torch.stack([torch.tensor(float(y.numel()), dtype=f32, device=y.device), y.sum(dtype=f32),
                            torch.linalg.vector_norm(y, dtype=f32).square(), saturated]).double()
        self.sums = sums if self.sums is None else self.sums + sums
        if self.kind in DEAD and flat is not None:
            # A unit is a feature of (B, F), a channel of (B, C, ...): flat for every sample (and position).
            dims = [d for d in range(y.dim()) if d != 1] if y.dim() > 1 else [0]
            alive = (~flat).to(f32).amax(dim=dims).double()  # (units,)
            self.alive = alive if self.alive is None else torch.maximum(self.alive, alive)

    @torch.no_grad()
    def add_entropy(self, entropy: torch.Tensor) -> None:
        """entropy: (H,) summed normalized entropy per head, plus the row count as its last element: (H + 1,)."""
        self.sums = entropy.double() if self.sums is None else self.sums + entropy.double()

    def packed(self) -> torch.Tensor:
        return torch.cat([self.sums] + ([self.alive] if self.alive is not None else []))

    def size(self) -> int:
        return len(self.sums) + (len(self.alive) if self.alive is not None else 0)

    def stats(self, packed: list[float]) -> dict[str, float]:
        if self.kind == "attention":
            rows = packed[-1]
            return {f"attn_entropy.h{h}": v / rows for h, v in enumerate(packed[:-1])} if rows else {}
        n, s, ss, sat = packed[:4]
        if self.kind == "norm":
            return {"scale": math.sqrt(ss / n)}
        mean = s / n
        var = max(ss / n - mean * mean, 0.0) * n / max(n - 1, 1)  # unbiased, as torch.std
        out = {"mean": mean, "std": var ** 0.5}
        if "saturation" in STATS[self.kind]:
            out["saturation"] = sat / n
        if self.kind in DEAD:
            alive = packed[4:]
            out["dead"] = sum(1 for a in alive if a <= 0) / len(alive)
        return out


def attention_entropy(q: torch.Tensor, k: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                      is_causal: bool = False, scale: Optional[float] = None) -> torch.Tensor:
    """Σ over rows of each head's attention entropy / log(keys attended), and the row count: (H + 1,).

    q (B, H, T, D), k (B, H, S, D) as F.scaled_dot_product_attention takes them (k's heads may be fewer: GQA)."""
    q, k = q.detach().float(), k.detach().float()
    if k.shape[-3] != q.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
    logits = q @ k.transpose(-2, -1) * (scale if scale is not None else 1 / math.sqrt(q.shape[-1]))  # (B, H, T, S)
    t, s_len = logits.shape[-2:]
    allowed = torch.ones(t, s_len, dtype=torch.bool, device=q.device)
    if is_causal:
        allowed = torch.ones(t, s_len, dtype=torch.bool, device=q.device).tril()
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            allowed = allowed & attn_mask
        else:
            logits = logits + attn_mask.float()
    logits = logits.masked_fill(~allowed, -math.inf)
    p = logits.softmax(-1)
    entropy = -(p * p.clamp_min(1e-30).log()).sum(-1)                 # (B, H, T)
    keys = torch.isfinite(logits).sum(-1)                             # keys not masked out, (B, H, T)
    rows = keys >= 2                                                  # a row with one key has no choice to judge
    normalized = torch.where(rows, entropy / keys.clamp_min(2).float().log(), torch.zeros_like(entropy))
    heads = normalized.movedim(-2, 0).flatten(1).sum(1)               # (H,)
    count = rows.select(-2, 0).sum().float()                          # rows per head (the mask is the heads')
    return torch.cat([heads, count.reshape(1)])


class _Watch(TorchFunctionMode):
    """Passes every torch call through; the activations' inputs and outputs go to the monitor."""

    def __init__(self, monitor: "ActivationMonitor"):
        super().__init__()
        self.monitor = monitor

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = KINDS.get(func)
        if self.monitor._depth <= 0 or (kind is None and func is not F.scaled_dot_product_attention
                                        and func is not F.multi_head_attention_forward):
            return func(*args, **kwargs)  # outside the model's modules (the loss, metrics): not an activation
        self.monitor._inside = True  # a failure in here may not exit this mode (see switch_off)
        try:
            return self._watched(func, kind, args, kwargs)
        finally:
            self.monitor._inside = False

    def _watched(self, func, kind, args, kwargs):
        if kind is None:
            out = func(*args, **kwargs)
            if func is F.scaled_dot_product_attention or func is F.multi_head_attention_forward:
                self.monitor.guarded(self.monitor._attention, where="attention")(func, args, kwargs)
            return out
        x = args[0] if args else kwargs.get("input")
        # The flat part from the input, before an in-place activation (nn.ReLU(inplace=True)) overwrites it.
        flat = self.monitor.guarded(_flat_input, where=kind)(kind, x)
        out = func(*args, **kwargs)
        if isinstance(out, torch.Tensor):
            self.monitor.guarded(self.monitor._record, where=kind)(kind, out, None, flat)
        return out


def _flat_input(kind: str, x: Any) -> Optional[torch.Tensor]:
    if kind in ("relu", "sigmoid", "tanh", "leaky_relu") or not isinstance(x, torch.Tensor):
        return None  # judged on the output
    return FLAT[kind](x.detach(), None)


class ActivationMonitor(Instrument):
    """Logs dead units, saturation, mean and std of every activation layer, normalization output scale and
    attention entropy on logging steps.

    log_every_n_steps: optimizer steps between logs (gradlab.observe.common.EVERY_N: null follows the trainer,
        0 off).
    strip_prefix: removed from module names in tags (`net.conv1` -> `conv1`).
    """

    name = "activations"

    def __init__(self, log_every_n_steps: Optional[int] = None, strip_prefix: str = "net."):
        require(f"callbacks.{self.name}.log_every_n_steps", log_every_n_steps)
        self.log_every_n_steps = log_every_n_steps
        self.strip_prefix = strip_prefix
        self.layers: list[tuple[str, str]] = []  # (layer, kind) in the order the forward pass met them
        self._every = 0
        self._acc: dict[str, Accumulator] = {}
        self._mode: Optional[_Watch] = None
        self._handles: list = []
        self._names: dict[nn.Module, str] = {}
        self._feeder: Optional[str] = None  # the last linear/conv layer that ran
        self._seen: dict[str, int] = {}  # layer -> activations met in this forward pass (a name used twice)
        self._pending: Optional[torch.Tensor] = None
        self._step = -1  # the optimizer step whose micro-batches the accumulators hold
        self._inside = False  # within _Watch.__torch_function__
        self._depth = 0  # forwards of the LightningModule or a module directly under it now running

    def every(self) -> int:
        """The interval in optimizer steps this run uses (0: off), known from the start of training."""
        return self._every

    # -- when to watch --------------------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._every = interval(self.log_every_n_steps, trainer)
        self._names = {m: tag(n, self.strip_prefix) for n, m in pl_module.named_modules()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if due(self._every, trainer.global_step):
            if self._step != trainer.global_step:
                self._acc, self._step = {}, trainer.global_step  # a step that never reached the optimizer
            self._arm(pl_module)

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self._disarm()  # the forward pass is over: backward and optimizer run unwatched

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._disarm()
        if not self._acc:
            return
        packed = torch.cat([acc.packed() for acc in self._acc.values()])
        if trainer.world_size > 1:
            # Every rank watched its own shard: sums (and "alive" counts) add up; every rank takes part.
            packed = trainer.strategy.reduce(packed, reduce_op="sum")
        self._pending = packed

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._disarm()  # also when the step was skipped before backward
        pending, self._pending = self._pending, None
        if pending is None:
            return
        acc, self._acc = self._acc, {}
        if not trainer.is_global_zero:
            return
        values, i, metrics = pending.tolist(), 0, {}  # the one device-to-host copy
        for layer, a in acc.items():
            size = a.size()
            for stat, v in a.stats(values[i:i + size]).items():
                if stat.startswith("attn_entropy."):  # per head: act/attn_entropy/<layer>.h<i>
                    metrics[f"act/attn_entropy/{layer}.{stat.split('.', 1)[1]}"] = v
                else:
                    metrics[f"act/{stat}/{layer}"] = v
            i += size
        log_scalars(trainer, dict(sorted(metrics.items(), key=lambda kv: _order(kv[0], self.layers))),
                    trainer.global_step - 1)  # the step that just ran

    def on_train_end(self, trainer, pl_module) -> None:
        self._disarm()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._disarm()

    def switch_off(self) -> None:
        if self._inside:  # inside the mode's own __torch_function__: the next hook (before backward) exits it
            for handle in self._handles:
                handle.remove()
            self._handles = []
            return
        self._disarm()

    # -- watching -------------------------------------------------------------------------------------------
    def _arm(self, module: nn.Module) -> None:
        if self._mode is not None:
            return
        self._feeder, self._seen, self._depth = None, {}, 0
        for top in (module, *module.children()):  # inside one of these: the model's forward, not the loss
            self._handles.append(top.register_forward_pre_hook(self.guarded(self._enter)))
            self._handles.append(top.register_forward_hook(self.guarded(self._leave)))
        for sub in module.modules():
            name = self._names.get(sub, "")
            if isinstance(sub, FEEDERS):
                self._handles.append(sub.register_forward_hook(self.guarded(self._fed, name)))
            elif isinstance(sub, nn.RNNBase):
                self._handles.append(sub.register_forward_hook(self.guarded(self._recurrent, name)))
            elif isinstance(sub, NORMS):
                self._handles.append(sub.register_forward_hook(self.guarded(self._norm, name)))
        self._mode = _Watch(self)
        self._mode.__enter__()

    def _disarm(self) -> None:
        if self._mode is not None:
            mode, self._mode = self._mode, None
            mode.__exit__(None, None, None)
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _enter(self, module, args) -> None:
        self._depth += 1

    def _leave(self, module, args, output) -> None:
        self._depth -= 1

    def _fed(self, module, args, output) -> None:
        self._feeder = self._names.get(module)

    def _recurrent(self, module, args, output) -> None:
        out = output[0]
        out = out.data if isinstance(out, nn.utils.rnn.PackedSequence) else out  # real tokens only
        self._record("tanh", out, self._names.get(module, "rnn"), FLAT["tanh"](None, out.detach()))
        self._feeder = None

    def _norm(self, module, args, output) -> None:
        if isinstance(output, torch.Tensor):
            self._record("norm", output, self._names.get(module, "norm"))

    def _attention(self, func, args, kwargs) -> None:
        if func is F.scaled_dot_product_attention:
            names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
            a = {**dict(zip(names, args)), **kwargs}
            entropy = attention_entropy(a["query"], a["key"], a.get("attn_mask"), bool(a.get("is_causal")),
                                        a.get("scale"))
        else:
            entropy = _mha_entropy(args, kwargs)
        layer = f"{self._feeder or 'attention'}.attn"
        self._feeder = None
        self._add(layer, "attention").add_entropy(entropy)

    def _record(self, kind: str, y: torch.Tensor, layer: Optional[str] = None,
                flat: Optional[torch.Tensor] = None) -> None:
        if flat is None and kind in FLAT:
            flat = FLAT[kind](None, y.detach())
        self._add(layer or self._feeder or f"act{len(self._seen) + 1}", kind).add(y, flat)
        if kind != "norm":
            self._feeder = None  # the next activation belongs to the next layer

    def _add(self, layer: str, kind: str) -> Accumulator:
        self._seen[layer] = self._seen.get(layer, 0) + 1
        if self._seen[layer] > 1:
            layer = f"{layer}#{self._seen[layer]}"  # a second activation after the same layer
        if layer not in self._acc:
            self._acc[layer] = Accumulator(kind)
            if (layer, kind) not in self.layers:
                self.layers.append((layer, kind))
        return self._acc[layer]


def _mha_entropy(args: tuple, kwargs: dict) -> torch.Tensor:
    """Per-head entropy for F.multi_head_attention_forward, from its own in-projection (need_weights or not)."""
    names = ("query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight", "in_proj_bias")
    a = {**dict(zip(names, args)), **kwargs}
    if a.get("use_separate_proj_weight") or a.get("bias_k") is not None or a.get("static_k") is not None:
        raise NotImplementedError("nn.MultiheadAttention with separate q/k/v weights or bias_k: no entropy")
    query, key, heads = a["query"], a["key"], a["num_heads"]      # (T, B, E), (S, B, E): batch_first undone
    w, b = a["in_proj_weight"], a["in_proj_bias"]
    e = query.shape[-1]
    q = F.linear(query.detach(), w[:e], None if b is None else b[:e])
    k = F.linear(key.detach(), w[e:2 * e], None if b is None else b[e:2 * e])
    q = q.reshape(q.shape[0], q.shape[1], heads, e // heads).permute(1, 2, 0, 3)  # (B, H, T, D)
    k = k.reshape(k.shape[0], k.shape[1], heads, e // heads).permute(1, 2, 0, 3)
    mask = a.get("attn_mask")
    padding = a.get("key_padding_mask")
    allowed = None
    if mask is not None:
        allowed = ~mask if mask.dtype == torch.bool else mask  # MHA's bool mask: True = not allowed
    if padding is not None:
        keep = (~padding if padding.dtype == torch.bool else padding == 0)[:, None, None, :]  # (B, 1, 1, S)
        allowed = keep if allowed is None else (allowed & keep if allowed.dtype == torch.bool else
                                                allowed + torch.where(keep, 0.0, -math.inf))
    return attention_entropy(q, k, allowed, bool(a.get("is_causal")) and mask is None)


def _order(tag: str, layers: list[tuple[str, str]]) -> tuple[int, str]:
    layer = tag.split("/", 2)[2]
    index = next((i for i, (name, _) in enumerate(layers) if name == layer or layer.startswith(name + ".h")),
                 len(layers))
    return index, tag
