"""relu, leaky relu, sigmoid and tanh with their derivatives, in one picture.

    python scripts/activations.py                          # -> docs/img/activations.png
    python scripts/activations.py --out act.png --range 6

Each panel draws an activation f(x) and its derivative f'(x). The derivative is what gradlab's hand-written
backward (src/gradlab/autograd/activations.py) returns for an upstream gradient of ones; autograd's derivative of
torch's own function is drawn over it as dots, and the script exits with status 1 if the two differ anywhere.
Shaded: where the unit saturates or is dead, so that f'(x) is (nearly) zero and backprop passes almost nothing
(sigmoid within 0.03 of 0 or 1, |tanh| > 0.97, relu's negative side). Leaky relu keeps a slope of 0.01 there.
"""

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from gradlab.autograd import leaky_relu, relu, sigmoid, tanh  # noqa: E402

SLOPE = 0.01
# name: (gradlab's Function, torch's function, where the unit saturates or is dead, as a mask of the output y)
ACTIVATIONS = {
    "relu": (relu, torch.relu, lambda y: y <= 0),
    "leaky relu": (lambda x: leaky_relu(x, SLOPE), lambda x: F.leaky_relu(x, SLOPE), lambda y: y != y),  # never dead
    "sigmoid": (sigmoid, torch.sigmoid, lambda y: (y < 0.03) | (y > 0.97)),
    "tanh": (tanh, torch.tanh, lambda y: y.abs() > 0.97),
}


def derivative(fn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(f(x), f'(x)): backward of sum(f(x)) gives each element's own slope, as the upstream gradient is 1."""
    leaf = x.clone().requires_grad_()
    y = fn(leaf)
    y.sum().backward()
    return y.detach(), leaf.grad


def curves(limit: float, points: int = 1201) -> dict[str, dict[str, torch.Tensor]]:
    """For each activation: x, f(x), gradlab's f'(x), autograd's f'(x), and the saturated mask (float64)."""
    # An even count of points puts no sample exactly on the kink at 0, where relu's subgradient is a choice.
    x = torch.linspace(-limit, limit, points + (points % 2 == 1), dtype=torch.float64)
    out = {}
    for name, (ours, theirs, saturated) in ACTIVATIONS.items():
        y, d_ours = derivative(ours, x)
        _, d_theirs = derivative(theirs, x)
        out[name] = {"x": x, "y": y, "dy": d_ours, "dy_autograd": d_theirs, "saturated": saturated(y)}
    return out


def plot(data: dict[str, dict[str, torch.Tensor]], path: Path) -> None:
    fig, axes = plt.subplots(1, len(data), figsize=(4 * len(data), 3.6), sharex=True)
    for ax, (name, c) in zip(axes, data.items()):
        x = c["x"].numpy()
        ax.fill_between(x, 0, 1, where=c["saturated"].numpy(), transform=ax.get_xaxis_transform(), color="0.9",
                        label="saturated / dead")
        ax.plot(x, c["y"].numpy(), color="tab:blue", lw=2, label="f(x)")
        ax.plot(x, c["dy"].numpy(), color="tab:red", lw=2, label="f'(x), gradlab's backward")
        ax.plot(x[::40], c["dy_autograd"].numpy()[::40], "o", ms=3, color="black", label="f'(x), autograd")
        ax.axhline(0, color="0.5", lw=0.5)
        ax.set_title(name)
        ax.set_xlabel("x")
        ax.set_ylim(-1.15 if name == "tanh" else -0.15, 1.15 if name != "relu" and name != "leaky relu" else 2.2)
    axes[0].legend(loc="upper left", fontsize=7, frameon=False)
    fig.suptitle("Activations and their derivatives: where f' is ~0, backprop passes ~nothing", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("docs/img/activations.png"), help="the PNG to write")
    parser.add_argument("--range", type=float, default=5.0, help="x from -RANGE to RANGE (default 5)")
    args = parser.parse_args(argv)
    data = curves(args.range)
    plot(data, args.out)
    bad = [name for name, c in data.items() if not torch.allclose(c["dy"], c["dy_autograd"], rtol=0, atol=1e-12)]
    for name, c in data.items():
        print(f"{name:10s} f'(0-) = {c['dy'][len(c['x']) // 2 - 1]:.4f}  max f' = {c['dy'].max():.4f}  "
              f"saturated at |x| = {args.range:g}: {bool(c['saturated'][0])}")
    print(f"wrote {args.out}")
    if bad:
        print(f"error: gradlab's derivative differs from autograd's for {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
