"""Activation health per layer, from the training forward pass of logging steps (no second forward pass).

    python train.py callbacks.activations.log_every_n_steps=1        # every optimizer step
    python train.py callbacks.activations=null                       # off

Tags, one per activation layer (named after the linear/conv layer that feeds it: `conv1`, `fc1`, `layers.fc2`;
the recurrent layer itself for an RNN: `rnn`):
    act/saturation/<layer>  fraction of outputs in the flat part: |tanh| > 0.97, sigmoid within 0.03 of 0 or 1
                            (the recurrent outputs of an RNN/GRU/LSTM count as tanh)
    act/dead/<layer>        fraction of ReLU units (features, or channels of a conv) that are 0 for the whole batch
    act/mean/<layer>        mean of the activation's output
    act/std/<layer>         its standard deviation

How activations are seen without touching the models: on a logging step the net's forward runs inside a
`TorchFunctionMode` that notices `relu`, `sigmoid`, `tanh` and `leaky_relu` whether they are called as functions
(the CNN's `F.relu`), through `nn.ReLU`/`nn.Tanh`/... (the autograd MLP) or inside gradlab's hand-written
Functions (`gradlab.autograd.modules.ReLU`, ...); recurrent layers get a forward hook. On other steps nothing is
installed. Under gradient accumulation the statistics cover every micro-batch of the step; under DDP they are
summed over the ranks (one all-reduce on logging steps) and logged once, by rank 0.
"""

from typing import Optional

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.overrides import TorchFunctionMode

from gradlab.errors import UserError
from gradlab.observe.writer import log_scalars

SATURATION = 0.97  # |tanh| above this, or sigmoid within 1 - this of 0 or 1, sits on the flat part of the curve
KINDS = {torch.relu: "relu", F.relu: "relu", torch.Tensor.relu: "relu",
         torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", torch.Tensor.sigmoid: "sigmoid",
         torch.tanh: "tanh", F.tanh: "tanh", torch.Tensor.tanh: "tanh",
         F.leaky_relu: "leaky_relu"}
STATS = {"relu": ("dead", "mean", "std"), "leaky_relu": ("mean", "std"),
         "sigmoid": ("saturation", "mean", "std"), "tanh": ("saturation", "mean", "std")}
FEEDERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)  # an activation is named after the last of these to run


class Accumulator:
    """Running sums of one layer's outputs over the micro-batches of a logging step (on the device)."""

    def __init__(self, kind: str):
        self.kind = kind
        self.sums: Optional[torch.Tensor] = None  # (4,): count, sum y, sum y², saturated count (float64 across adds)
        self.alive: Optional[torch.Tensor] = None  # (units,) float64: > 0 where a unit was positive somewhere

    @torch.no_grad()
    def add(self, y: torch.Tensor) -> None:
        y = y.detach()
        # float32 sums: torch's cascade summation keeps them to ~1e-7 relative at any size, and float64 would
        # cost a converted copy of the activation (~20x the time of the sum on CPU).
        f32 = torch.float32
        if self.kind in ("sigmoid", "tanh"):
            flat = (y - 0.5).abs() > SATURATION - 0.5 if self.kind == "sigmoid" else y.abs() > SATURATION
            saturated = flat.sum(dtype=f32)
        else:
            saturated = torch.zeros((), dtype=f32, device=y.device)
        sums = torch.stack([torch.tensor(float(y.numel()), dtype=f32, device=y.device), y.sum(dtype=f32),
                            torch.linalg.vector_norm(y, dtype=f32).square(), saturated]).double()
        self.sums = sums if self.sums is None else self.sums + sums
        if self.kind == "relu":
            # A unit is a feature of (B, F), a channel of (B, C, ...): zero for every sample (and position).
            dims = [d for d in range(y.dim()) if d != 1] if y.dim() > 1 else [0]
            alive = (y.amax(dim=dims) > 0).double()  # (units,)
            self.alive = alive if self.alive is None else torch.maximum(self.alive, alive)

    def packed(self) -> torch.Tensor:
        parts = [self.sums] + ([self.alive] if self.alive is not None else [])
        return torch.cat(parts)

    def stats(self, packed: list[float]) -> dict[str, float]:
        n, s, ss, sat = packed[:4]
        mean = s / n
        var = max(ss / n - mean * mean, 0.0) * n / max(n - 1, 1)  # unbiased, as torch.std
        out = {"mean": mean, "std": var ** 0.5}
        if "saturation" in STATS[self.kind]:
            out["saturation"] = sat / n
        if self.kind == "relu":
            alive = packed[4:]
            out["dead"] = sum(1 for a in alive if a <= 0) / len(alive)
        return out


class _Watch(TorchFunctionMode):
    """Passes every torch call through; the outputs of activation functions go to the monitor."""

    def __init__(self, monitor: "ActivationMonitor"):
        super().__init__()
        self.monitor = monitor

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        kind = KINDS.get(func)
        if kind is not None and isinstance(out, torch.Tensor):
            self.monitor._record(kind, out)
        return out


class ActivationMonitor(Callback):
    """Logs saturation, dead units, mean and std of every activation layer on logging steps.

    log_every_n_steps: optimizer steps between logs; None follows `trainer.log_every_n_steps`; 0 switches it off.
    strip_prefix: removed from module names in tags (`net.conv1` -> `conv1`).
    """

    def __init__(self, log_every_n_steps: Optional[int] = None, strip_prefix: str = "net."):
        if log_every_n_steps is not None and log_every_n_steps < 0:
            raise UserError(f"callbacks.activations.log_every_n_steps must be >= 0 (or null), not {log_every_n_steps}.")
        self.log_every_n_steps = log_every_n_steps
        self.strip_prefix = strip_prefix
        self.layers: list[tuple[str, str]] = []  # (layer, kind) in the order the forward pass met them
        self._every = 0
        self._acc: dict[str, Accumulator] = {}
        self._armed = False
        self._mode: Optional[_Watch] = None
        self._handles: list = []
        self._names: dict[nn.Module, str] = {}
        self._feeder: Optional[str] = None  # the last linear/conv layer that ran
        self._seen: dict[str, int] = {}  # layer -> activations met in this forward pass (a name used twice)
        self._pending: Optional[torch.Tensor] = None
        self._step = -1  # the optimizer step whose micro-batches the accumulators hold

    # -- when to watch --------------------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._every = trainer.log_every_n_steps if self.log_every_n_steps is None else self.log_every_n_steps
        self._names = {m: self._tag(n) for n, m in pl_module.named_modules()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._every and trainer.global_step % self._every == 0 and not self._handles:
            if self._step != trainer.global_step:
                self._acc, self._step = {}, trainer.global_step  # a step that never reached the optimizer
            self._arm(getattr(pl_module, "net", pl_module))

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self._disarm()  # the forward pass is over: backward and optimizer run unwatched

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
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
            size = 4 + (len(a.alive) if a.alive is not None else 0)
            for stat, v in a.stats(values[i:i + size]).items():
                metrics[f"act/{stat}/{layer}"] = v
            i += size
        log_scalars(trainer, dict(sorted(metrics.items(), key=lambda kv: _order(kv[0], self.layers))),
                    trainer.global_step - 1)  # the step that just ran

    def on_train_end(self, trainer, pl_module) -> None:
        self._disarm()
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # -- watching -------------------------------------------------------------------------------------------
    def _arm(self, net: nn.Module) -> None:
        self._handles.append(net.register_forward_pre_hook(self._enter))
        self._handles.append(net.register_forward_hook(self._exit))
        for module in net.modules():
            if isinstance(module, FEEDERS):
                self._handles.append(module.register_forward_hook(self._fed))
            elif isinstance(module, nn.RNNBase):
                self._handles.append(module.register_forward_hook(self._recurrent))
        self._armed = True

    def _disarm(self) -> None:
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self._mode = None
        if not self._armed:
            return
        for handle in self._handles:
            handle.remove()
        self._handles, self._armed = [], False

    def _enter(self, module, args) -> None:
        if module.training and self._mode is None:
            self._feeder, self._seen = None, {}
            self._mode = _Watch(self)
            self._mode.__enter__()

    def _exit(self, module, args, output) -> None:
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self._mode = None

    def _fed(self, module, args, output) -> None:
        self._feeder = self._names.get(module)

    def _recurrent(self, module, args, output) -> None:
        if self._mode is None:
            return
        out = output[0]
        out = out.data if isinstance(out, nn.utils.rnn.PackedSequence) else out  # real tokens only
        self._record("tanh", out, self._names.get(module, "rnn"))
        self._feeder = None

    def _record(self, kind: str, y: torch.Tensor, layer: Optional[str] = None) -> None:
        layer = layer or self._feeder or f"act{len(self._seen) + 1}"
        self._seen[layer] = self._seen.get(layer, 0) + 1
        if self._seen[layer] > 1:
            layer = f"{layer}#{self._seen[layer]}"  # a second activation after the same layer
        if layer not in self._acc:
            self._acc[layer] = Accumulator(kind)
            if (layer, kind) not in self.layers:
                self.layers.append((layer, kind))
        self._acc[layer].add(y)
        self._feeder = None  # the next activation belongs to the next layer

    def _tag(self, name: str) -> str:
        return name[len(self.strip_prefix):] if self.strip_prefix and name.startswith(self.strip_prefix) else name


def _order(tag: str, layers: list[tuple[str, str]]) -> tuple[int, str]:
    layer = tag.split("/", 2)[2]
    index = next((i for i, (name, _) in enumerate(layers) if name == layer), len(layers))
    return index, tag
