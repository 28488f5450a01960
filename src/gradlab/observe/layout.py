"""The run's TensorBoard Custom Scalars layout: one chart per family with every layer on it, input -> output.

    tensorboard --logdir logs/train/runs      # then the CUSTOM SCALARS tab
    python train.py callbacks.layout=null     # no layout

Charts (category "gradient flow"): gradient norm per layer and update ratio per layer as log10 values (these span
orders of magnitude, and Custom Scalars charts have no log axis that stays on), the update ratio with the healthy
band 1e-4 .. 1e-2 around 1e-3 drawn as a shaded margin, the parameter norm per layer, and the total gradient
norm before and after clipping (log10). Category "activation health": saturation, dead units, mean and std of
every activation layer. The charts name the existing tags (`grad_norm_log10/conv1.weight`, `act/dead/fc1`, ...),
so the layout costs nothing per step. It is written once, after the first logging step (when the activation
layers are known), into the run's own event file: in a sweep every job's layout and lines sit under its run.
"""

import re
from typing import Optional

import lightning.pytorch as pl
from tensorboard.plugins.custom_scalar import layout_pb2

from gradlab.observe.activations import STATS, ActivationMonitor
from gradlab.observe.common import Instrument, find, tag
from gradlab.observe.grad_norm import RATIO_BAND, GradNormMonitor
from gradlab.observe.writer import log_layout

STAT_TITLES = {"saturation": "saturated fraction (|tanh| > 0.97, sigmoid within 0.03 of 0/1, ...)",
               "dead": "dead units (fraction with no gradient for the whole batch: ReLU 0, GELU x < -3, ...)",
               "mean": "activation mean", "std": "activation std",
               "scale": "normalization output RMS", "attn_entropy": "attention entropy per head (1: uniform)"}


def build_layout(params: list[str], activations: list[tuple[str, str]], log10: bool = True,
                 update_ratio: bool = True) -> layout_pb2.Layout:
    """The Layout proto for these parameter tags and (layer, kind) activation layers, in the order given."""
    suffix = "_log10" if log10 else ""
    scale = " (log10)" if log10 else ""

    def multiline(title: str, tags: list[str]) -> layout_pb2.Chart:
        regexes = [f"^{re.escape(t)}$" for t in tags]  # a chart's tags are regular expressions: exact names
        return layout_pb2.Chart(title=title, multiline=layout_pb2.MultilineChartContent(tag=regexes))

    grads = [multiline(f"gradient L2 norm per layer{scale}, input layer first",
                       [f"grad_norm{suffix}/{p}" for p in params]),
             multiline(f"total gradient norm, before and after clipping{scale}",
                       [f"grad_norm{suffix}/total", f"grad_norm{suffix}/total_after_clip"])]
    if update_ratio:
        if log10:
            low, mid, high = RATIO_BAND
            # The shaded series is the healthy band; every layer is a series of its own with no margin.
            series = [layout_pb2.MarginChartContent.Series(value=mid, lower=low, upper=high)]
            series += [layout_pb2.MarginChartContent.Series(value=t, lower=t, upper=t)
                       for t in (f"update_ratio_log10/{p}" for p in params)]
            grads.append(layout_pb2.Chart(
                title="update ratio ‖Δw‖/‖w‖ per layer (log10); shaded: the healthy 1e-4 .. 1e-2 around 1e-3",
                margin=layout_pb2.MarginChartContent(series=series)))
        else:
            grads.append(multiline("update ratio ‖Δw‖/‖w‖ per layer (~1e-3 is healthy)",
                                   [f"update_ratio/{p}" for p in params]))
        grads.append(multiline("parameter L2 norm ‖w‖ per layer", [f"param_norm/{p}" for p in params]))
    categories = [layout_pb2.Category(title="gradient flow", chart=grads)] if params else []
    acts = []
    for stat, title in STAT_TITLES.items():
        layers = [name for name, kind in activations if stat in STATS[kind]]
        if layers and stat == "attn_entropy":  # one series per head: a pattern per layer
            acts.append(layout_pb2.Chart(title=title, multiline=layout_pb2.MultilineChartContent(
                tag=[f"^act/attn_entropy/{re.escape(name)}\\.h[0-9]+$" for name in layers])))
        elif layers:
            acts.append(multiline(title, [f"act/{stat}/{name}" for name in layers]))
    if acts:
        categories.append(layout_pb2.Category(title="activation health", chart=acts))
    return layout_pb2.Layout(category=categories)


class TensorBoardLayout(Instrument):
    """Writes the Custom Scalars layout of the run's gradient and activation tags (see the module docstring)."""

    name = "layout"

    def __init__(self, strip_prefix: Optional[str] = None):
        self.strip_prefix = strip_prefix  # None: the gradient callback's (`net.`)
        self.layout: Optional[layout_pb2.Layout] = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.layout = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.layout is None:
            acts = find(trainer, ActivationMonitor)
            if acts is None or acts.layers or not acts.every() or trainer.global_step > 1:
                self._write(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.layout is None:
            self._write(trainer, pl_module)

    def _write(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        grads, acts = find(trainer, GradNormMonitor), find(trainer, ActivationMonitor)
        prefix = self.strip_prefix if self.strip_prefix is not None else (grads.strip_prefix if grads else "net.")
        params = [tag(n, prefix) for n, p in pl_module.named_parameters() if p.requires_grad] if grads else []
        self.layout = build_layout(params, acts.layers if acts else [], log10=grads.log10 if grads else True,
                                   update_ratio=grads.update_ratio if grads else False)
        # Instruments that bring charts of their own (curvature, optimizer state) add a category each.
        self.layout.category.extend(c for cb in trainer.callbacks if hasattr(cb, "layout_category")
                                    for c in [cb.layout_category(trainer)] if c is not None)
        if trainer.is_global_zero:
            log_layout(trainer, self.layout, trainer.global_step)

