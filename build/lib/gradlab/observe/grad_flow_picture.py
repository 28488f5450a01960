"""The gradient-flow picture of a run: per-layer gradient norms over steps (heat map), the total norm, and the
update ratio per layer. One implementation for `scripts/plot_grad_flow.py`'s PNG and the TensorBoard image that
observe/grad_flow.py logs.

Top: heat map layers x steps on a log colour scale, input layers at the top; grey cells are zero or non-finite
norms. Below: the total norm (before and after clipping) and the update ratio ‖Δw‖/‖w‖ per layer against the
healthy ~1e-3 (blue: too small to learn, white: ~1e-3, red: too big).
"""

import io
import struct
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402

from gradlab.errors import UserError  # noqa: E402
from gradlab.observe.events import Series  # noqa: E402

TOTALS = ("grad_norm/total", "grad_norm/total_after_clip")
HEALTHY_RATIO = 1e-3  # the usual rule of thumb for ‖Δw‖/‖w‖ per step


def layer_matrix(series: dict[str, Series]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(layer names, steps (S,), norms (L, S)); a step a layer was not logged at is NaN."""
    names = list(series)
    steps = np.array(sorted({s for points in series.values() for s, _ in points}))
    column = {s: j for j, s in enumerate(steps)}
    grid = np.full((len(names), len(steps)), np.nan)
    for i, name in enumerate(names):
        for s, v in series[name]:
            grid[i, column[s]] = v
    return names, steps, grid


def step_edges(steps: np.ndarray) -> np.ndarray:
    """Cell edges halfway between logged steps, so uneven logging intervals draw correctly."""
    if len(steps) == 1:
        return np.array([steps[0] - 0.5, steps[0] + 0.5])
    mid = (steps[1:] + steps[:-1]) / 2
    return np.concatenate([[steps[0] - (mid[0] - steps[0])], mid, [steps[-1] + (steps[-1] - mid[-1])]])


def heat_map(fig, ax, cax, series: dict[str, Series], norm, cmap_name: str, label: str) -> None:
    names, steps, grid = layer_matrix(series)
    masked = np.ma.masked_where(~np.isfinite(grid) | (grid <= 0), grid)  # LogNorm cannot show them
    cmap = plt.get_cmap(cmap_name).with_extremes(bad="lightgrey")
    mesh = ax.pcolormesh(step_edges(steps), np.arange(len(names) + 1), masked, cmap=cmap, norm=norm)
    ax.set_yticks(np.arange(len(names)) + 0.5, names, fontsize=8 if len(names) < 30 else 5)
    ax.invert_yaxis()  # the input layer on top, as the network is usually drawn
    fig.colorbar(mesh, cax=cax, label=label)


def figure(scalars: dict[str, Series], title: str, weights_only: bool = False):
    layers = {t.removeprefix("grad_norm/"): v for t, v in scalars.items()
              if t.startswith("grad_norm/") and t not in TOTALS and (not weights_only or t.endswith("weight"))}
    if not layers:
        raise UserError("The run has no per-layer grad_norm/* scalars: was it trained with the gradient "
                        "callback on (callbacks.grad_norm, on by default)?")
    ratios = {name: scalars[f"update_ratio/{name}"] for name in layers if f"update_ratio/{name}" in scalars}

    heat_h = max(1.6, 0.2 * len(layers))
    heights = [heat_h, 1.8] + ([heat_h] if ratios else [])
    fig = plt.figure(figsize=(10, sum(heights) + 1.2), layout="constrained")
    spec = fig.add_gridspec(len(heights), 2, height_ratios=heights, width_ratios=[50, 1])
    heat = fig.add_subplot(spec[0, 0])
    values = np.array([v for points in layers.values() for _, v in points])
    shown = values[np.isfinite(values) & (values > 0)]
    norm = LogNorm(vmin=shown.min(), vmax=shown.max()) if shown.size else None
    heat_map(fig, heat, fig.add_subplot(spec[0, 1]), layers, norm, "viridis", "‖∇‖ (log scale)")
    heat.set_title(f"{title}: gradient L2 norm per layer (grey: zero or non-finite)")

    total_ax = fig.add_subplot(spec[1, 0], sharex=heat)
    for tag, label in zip(TOTALS, ("total", "total after clipping")):
        if tag in scalars:
            s, v = zip(*scalars[tag])
            total_ax.plot(s, v, label=label, lw=1.2)
    total_ax.set_yscale("log")
    total_ax.set_ylabel("total ‖∇‖")
    total_ax.legend(loc="upper right", fontsize=8)
    total_ax.grid(alpha=0.3, which="both")
    bottom = total_ax

    if ratios:
        ratio_ax = fig.add_subplot(spec[2, 0], sharex=heat)
        # Blue: steps too small to learn, white: the healthy ~1e-3, red: steps that rewrite the layer.
        span = 1e3
        heat_map(fig, ratio_ax, fig.add_subplot(spec[2, 1]), ratios,
                 LogNorm(vmin=HEALTHY_RATIO / span, vmax=HEALTHY_RATIO * span, clip=True), "coolwarm",
                 "‖Δw‖ / ‖w‖ per step")
        ratio_ax.set_title("update ratio per layer (white = 1e-3, the usual healthy value)", fontsize=10)
        bottom = ratio_ax
    bottom.set_xlabel("optimizer step")
    return fig


def render_png(scalars: dict[str, Series], title: str, weights_only: bool = False, dpi: int = 90) -> bytes:
    """The picture as PNG bytes (what the TensorBoard image and the script's file hold)."""
    fig = figure(scalars, title, weights_only)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()


def png_size(png: bytes) -> tuple[int, int]:
    """(height, width) from the PNG's IHDR chunk, which follows the 8-byte signature and 8 bytes of chunk header."""
    width, height = struct.unpack(">II", png[16:24])
    return height, width


def plot(scalars: dict[str, Series], out: Path, title: str, weights_only: bool = False) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.png")
    tmp.write_bytes(render_png(scalars, title, weights_only))
    tmp.replace(out)  # an existing picture is replaced only by a complete one
