"""B_simple and the training loss of a run against the optimizer step, from its TensorBoard event files.

    python scripts/plot_b_simple.py logs/train/runs/<time>                 # -> <run>/b_simple.png
    python scripts/plot_b_simple.py logs/train/runs/<time> --smoothing 0.95 --out docs/img/b_simple.png

--smoothing recomputes B_simple from the logged per-reading tr(Σ) and ‖G‖² (grad_noise/trace_cov/total and
grad_noise/signal/total) as a ratio of their moving averages with that decay, instead of the run's own.
"""

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from gradlab.observe.events import read_scalars  # noqa: E402
from gradlab.observe.grad_noise import summarize  # noqa: E402


def resmooth(scalars, beta: float) -> list[tuple[int, float]]:
    """B_simple = EMA(tr Σ)/EMA(‖G‖²) over the logged readings; NaN while the averaged signal is not positive."""
    out, t, s = [], 0.0, 0.0
    for (step, trace), (_, signal) in zip(scalars["grad_noise/trace_cov/total"], scalars["grad_noise/signal/total"]):
        t, s = (trace, signal) if not out else (beta * t + (1 - beta) * trace, beta * s + (1 - beta) * signal)
        out.append((step, t / s if s > 0 else float("nan")))
    return out


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--smoothing", type=float, default=None, help="EMA decay over readings (default: the run's)")
    args = parser.parse_args(argv)
    scalars = read_scalars(args.run)
    b = scalars.get("grad_noise/b_simple/total")
    if not b:
        raise SystemExit(f"no grad_noise/b_simple/total in {args.run}: was callbacks.grad_noise on?")
    label = "B_simple (total)"
    if args.smoothing is not None:
        b, label = resmooth(scalars, args.smoothing), f"B_simple (total, smoothing {args.smoothing:g})"
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.plot(*zip(*b), color="tab:blue", label=label)
    batch = summarize(scalars)["batch_size"]
    ax.axhline(batch, color="tab:blue", ls=":", lw=1, label=f"batch size in use ({batch})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("B_simple = tr(Σ) / ‖G‖²")
    ax.set_yscale("log")
    loss = scalars.get("train/loss")
    if loss:
        twin = ax.twinx()
        twin.plot(*zip(*loss), color="tab:gray", alpha=0.5, lw=0.8, label="train/loss")
        twin.set_ylabel("train/loss")
        twin.legend(loc="lower right", frameon=False)
    ax.legend(loc="upper left", frameon=False)
    ax.set_title("Gradient noise scale during training")
    fig.tight_layout()
    out = args.out or args.run / "b_simple.png"
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
