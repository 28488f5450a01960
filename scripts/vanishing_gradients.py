"""The vanishing-gradient lesson: one deep MLP with sigmoid, tanh, relu and relu + batch norm.

    python scripts/vanishing_gradients.py                       # 15 hidden layers on 3-arm spirals, ~1 min on CPU
    python scripts/vanishing_gradients.py --depth 20 --steps 500 --out grads.png
    python scripts/vanishing_gradients.py --mnist data          # MNIST digits instead (a folder holding MNIST/raw/)

Every variant is gradlab's ManualMLP (hand-written backward; --backend autograd for torch's) with `--depth`
hidden layers of `--width` units and its activation-matched init (Xavier for sigmoid and tanh, Kaiming for
relu), built from the same seed and trained with the same SGD on the same batches. The gradient L2 norm of
each weight matrix is measured on one fixed batch at initialization and after `--steps` steps. Writes a PNG
(layer depth against gradient norm, log scale, one line per variant) and prints a table, then the verdicts of
gradlab's health report (gradlab.observe.health_rules, the rules `scripts/grad_report.py` applies to a run) on each variant's
per-step gradient norms and update ratios: the sigmoid net is flagged vanishing.

Why sigmoid loses: backprop multiplies the upstream gradient by σ'(z) <= 1/4 at every layer, so 15 layers
shrink it by up to 4^15 ≈ 1e9; tanh' reaches 1 near zero and relu' is exactly 1 where a unit is active.
"""

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from gradlab.config.cli import fail  # noqa: E402
from gradlab.data.toy import lesson_data  # noqa: E402
from gradlab.errors import UserError  # noqa: E402
from gradlab.models.mlp import ManualMLP, classification_loss  # noqa: E402
from gradlab.observe.health_rules import diagnose  # noqa: E402

VARIANTS = {  # name: (activation, batch norm)
    "sigmoid": ("sigmoid", False),
    "tanh": ("tanh", False),
    "relu": ("relu", False),
    "relu + batch norm": ("relu", True),
}




def build(variant: str, in_features: int, num_classes: int, depth: int, width: int, backend: str,
          seed: int) -> ManualMLP:
    activation, batch_norm = VARIANTS[variant]
    torch.manual_seed(seed)
    return ManualMLP(in_features, [width] * depth, num_classes, activation, batch_norm, backend)


def weight_grad_norms(model: ManualMLP, loss_fn, x: torch.Tensor, y: torch.Tensor) -> tuple[list[float], float]:
    """‖∂loss/∂W‖ of every weight matrix, input layer first, and the loss, on one batch (training mode)."""
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model(x), y)
    loss.backward()
    norms = [p.grad.norm().item() for name, p in model.named_parameters() if p.ndim == 2]
    return norms, loss.item()


def run_variant(variant: str, x, y, num_classes: int, args) -> dict:
    model = build(variant, x.shape[1], num_classes, args.depth, args.width, args.backend, args.seed)
    loss_fn = classification_loss(num_classes, args.backend)
    probe = slice(0, args.batch_size)  # the fixed batch both measurements use
    init, loss0 = weight_grad_norms(model, loss_fn, x[probe], y[probe])
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)  # the same batches for every variant
    weights = [(name, p) for name, p in model.named_parameters() if p.ndim == 2]
    series = {}  # what GradNormMonitor would log: {tag: [(step, value), ...]}, for the health report
    for step in range(args.steps):
        idx = torch.randint(0, len(x), (args.batch_size,), generator=gen)
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x[idx]), y[idx]).backward()
        before = [p.detach().clone() for _, p in weights]
        optimizer.step()
        for (name, p), w0 in zip(weights, before):
            series.setdefault(f"grad_norm/{name}", []).append((step, p.grad.norm().item()))
            series.setdefault(f"update_ratio/{name}", []).append((step, ((p.detach() - w0).norm() / w0.norm()).item()))
    trained, loss1 = weight_grad_norms(model, loss_fn, x[probe], y[probe])
    return {"init": init, "trained": trained, "loss_init": loss0, "loss_trained": loss1,
            "report": diagnose(series) if args.steps else None}


def plot(results: dict[str, dict], steps: int, out: Path, title: str) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True, layout="constrained")
    for ax, key, label in zip(axes, ("init", "trained"), ("at initialization", f"after {steps} SGD steps")):
        for variant, r in results.items():
            ax.plot(range(1, len(r[key]) + 1), r[key], marker="o", ms=3, label=variant)
        ax.set_yscale("log")
        ax.set_xlabel("layer (1 = next to the input)")
        ax.set_title(label)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("‖∂loss/∂W‖ of the layer's weights")
    axes[1].legend(fontsize=9)
    fig.suptitle(title)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)


def print_table(results: dict[str, dict], steps: int) -> None:
    table = Table(title="‖∂loss/∂W‖ of the first and the last weight matrix", header_style="bold")
    for col in ("variant", "first, init", "last, init", "first/last, init", f"first/last, step {steps}",
                f"loss: init -> {steps}"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for variant, r in results.items():
        first, last = r["init"][0], r["init"][-1]
        table.add_row(variant, f"{first:.1e}", f"{last:.1e}", f"{first / last:.0e}",
                      f"{r['trained'][0] / r['trained'][-1]:.0e}", f"{r['loss_init']:.2f} -> {r['loss_trained']:.2f}")
    Console(width=max(100, Console().width)).print(table)


def print_verdicts(results: dict[str, dict]) -> None:
    table = Table(title="health report (gradlab.observe.health_rules) on each variant's training steps", header_style="bold",
                  show_lines=True)
    for col in ("variant", "verdict", "layer", "steps", "evidence"):
        table.add_column(col, overflow="fold", max_width=70 if col == "evidence" else 24)
    for variant, r in results.items():
        for f in r["report"].findings:
            table.add_row(variant, f.verdict, f.layer, f"{f.steps[0]}–{f.steps[1]}", f.evidence,
                          style="green" if f.verdict == "healthy" else "yellow")
    Console(width=max(140, Console().width)).print(table)


def main(argv: list[str] | None = None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=15, help="hidden layers (default 15)")
    parser.add_argument("--width", type=int, default=64, help="units per hidden layer (default 64)")
    parser.add_argument("--steps", type=int, default=200, help="SGD steps between the two measurements (default 200)")
    parser.add_argument("--lr", type=float, default=0.05, help="SGD learning rate, no momentum (default 0.05)")
    parser.add_argument("--batch-size", type=int, default=128, help="default 128")
    parser.add_argument("--samples", type=int, default=4096, help="generated points (default 4096)")
    parser.add_argument("--seed", type=int, default=0, help="weights, data and batch order (default 0)")
    parser.add_argument("--backend", choices=["manual", "autograd"], default="manual",
                        help="manual: gradlab's hand-written backward (default); autograd: torch's")
    parser.add_argument("--mnist", default=None, help="a folder holding MNIST/raw/*-ubyte: use MNIST digits")
    parser.add_argument("--out", type=Path, default=Path("vanishing_gradients.png"), help="PNG to write")
    args = parser.parse_args(argv)
    if args.depth < 1 or args.width < 1 or args.steps < 0 or args.batch_size < 2:
        raise UserError("--depth, --width and --batch-size (>= 2, for batch norm) must be positive, --steps >= 0.")

    x, y, num_classes = lesson_data(args.mnist, args.samples, args.seed)
    results = {variant: run_variant(variant, x, y, num_classes, args) for variant in VARIANTS}
    data = "MNIST" if args.mnist else "3-arm spirals"
    plot(results, args.steps, args.out,
         f"{args.depth} hidden layers x {args.width} units on {data}, SGD lr {args.lr}, batch {args.batch_size}")
    print_table(results, args.steps)
    if args.steps:
        print_verdicts(results)
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    try:
        main()
    except UserError as err:
        fail(str(err))
    sys.exit(0)
