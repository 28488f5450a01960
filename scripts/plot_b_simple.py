"""B_simple and the training loss of a run against the optimizer step, from its TensorBoard event files.

    python scripts/plot_b_simple.py logs/train/runs/<time>                 # -> <run>/b_simple.png
    python scripts/plot_b_simple.py logs/train/runs/<time> --out docs/img/b_simple.png
"""

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from gradlab.callbacks.grad_noise import summarize  # noqa: E402
from gradlab.events import read_scalars  # noqa: E402


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    scalars = read_scalars(args.run)
    b = scalars.get("grad_noise/b_simple/total")
    if not b:
        raise SystemExit(f"no grad_noise/b_simple/total in {args.run}: was callbacks.grad_noise on?")
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.plot(*zip(*b), color="tab:blue", label="B_simple (total)")
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
        twin.legend(loc="upper center", frameon=False)
    ax.legend(loc="upper left", frameon=False)
    ax.set_title("Gradient noise scale during training")
    fig.tight_layout()
    out = args.out or args.run / "b_simple.png"
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
