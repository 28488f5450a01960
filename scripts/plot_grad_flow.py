"""Gradient flow of one training run as a picture: per-layer gradient norms over steps, and the total norm.

    python scripts/plot_grad_flow.py logs/train/runs/2026-01-01_12-00-00              # -> <run>/grad_flow.png
    python scripts/plot_grad_flow.py logs/train/runs/<run> --out flow.png --weights-only

Reads the `grad_norm/*` (and, when present, `update_ratio/*`) scalars that GradNormMonitor wrote to the run's
TensorBoard events. Top: heat map layers x steps on a log colour scale, input layers at the top; grey cells
are zero or non-finite norms. Below: the total norm (before and after clipping) and the update ratio
‖Δw‖/‖w‖ per layer against the healthy ~1e-3.
"""

import argparse
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402

from gradlab.cli import fail  # noqa: E402
from gradlab.errors import UserError  # noqa: E402
from gradlab.events import Series, read_scalars  # noqa: E402

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


def plot(scalars: dict[str, Series], out: Path, title: str, weights_only: bool = False) -> None:
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

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(out)  # an existing picture is replaced only by a complete one


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path, help="a run folder (or its tensorboard/ folder)")
    parser.add_argument("--out", type=Path, default=None, help="PNG to write (default: RUN_DIR/grad_flow.png)")
    parser.add_argument("--weights-only", action="store_true", help="leave biases and norm parameters out")
    args = parser.parse_args(argv)
    scalars = read_scalars(args.run_dir)
    out = args.out or args.run_dir / "grad_flow.png"
    plot(scalars, out, title=args.run_dir.resolve().name, weights_only=args.weights_only)
    total = scalars.get("grad_norm/total", [])
    last = ""
    if total and math.isfinite(total[-1][1]):
        last = f", last total norm {total[-1][1]:.3g} at step {total[-1][0]}"
    print(f"wrote {out}{last}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as err:
        fail(str(err))
