"""The learning-rate, optimizer and gradient-clipping lessons: one model, several training runs, one picture.

    python scripts/lr_demo.py                                    # SGD on 3-arm spirals, 5 rates, ~30 s on CPU
    python scripts/lr_demo.py --lrs 0.003 0.03 0.3 3 --steps 600
    python scripts/lr_demo.py --optimizers sgd momentum adagrad rmsprop adam --out optimizers.png
    python scripts/lr_demo.py --lrs 0.3 3 --clip 1 --out clipping.png   # each rate with and without clipping
    python scripts/lr_demo.py --mnist data          # MNIST digits instead (a folder holding MNIST/raw/)
    python scripts/lr_demo.py --runs logs/train/multiruns/<time> # the train/loss curves of a Hydra sweep, made by
        python train.py -m optimizer=sgd optimizer.lr=0.001,0.01,0.1,1 trainer.log_every_n_steps=1

The built-in runs train gradlab's ManualMLP (2 hidden relu layers of 64, hand-written backward) from the same
initial weights and on the same batches. Learning rates (plain SGD): too small a rate crawls, a good one drops
fast, too large a one oscillates and then diverges: a curve ends in x where the loss went non-finite or above
10x its starting value. Optimizers: SGD, SGD with momentum 0.9, AdaGrad, RMSprop and Adam, each at the usual
rate for it (or each at every --lrs rate given with --optimizers): the adaptive ones scale each weight's step
by its own gradient history. Clipping: every rate once plainly and once with the gradient's total norm clipped
to --clip (torch.nn.utils.clip_grad_norm_): a rate that diverges unclipped can train clipped, because no single
step can be longer than lr x clip. The light lines are the raw per-step losses, the solid ones their moving
average; the table also gives the largest gradient norm each run met.
"""

import argparse
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from gradlab.config.cli import fail  # noqa: E402
from gradlab.data.toy import lesson_data  # noqa: E402
from gradlab.errors import UserError  # noqa: E402
from gradlab.models.mlp import ManualMLP, classification_loss  # noqa: E402
from gradlab.observe.events import read_scalars  # noqa: E402

DIVERGED = 10.0  # a loss this many times the first one counts as diverged
SMOOTH = 0.9  # weight of the past in the moving average drawn over each curve

Curve = dict  # {"steps": [...], "loss": [...], "diverged_at": step or None}




# name: (optimizer for the parameters at a rate, the rate that trains this lesson's MLP well)
OPTIMIZERS = {
    "sgd": (lambda params, lr: torch.optim.SGD(params, lr=lr), 0.3),
    "momentum": (lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9), 0.03),
    "adagrad": (lambda params, lr: torch.optim.Adagrad(params, lr=lr), 0.03),
    "rmsprop": (lambda params, lr: torch.optim.RMSprop(params, lr=lr), 0.003),
    "adam": (lambda params, lr: torch.optim.Adam(params, lr=lr), 0.003),
}


def train_curve(lr: float, x: torch.Tensor, y: torch.Tensor, num_classes: int, args,
                optimizer: str = "sgd", clip: float | None = None) -> Curve:
    torch.manual_seed(args.seed)  # the same initial weights for every run
    model = ManualMLP(x.shape[1], [64, 64], num_classes, "relu")
    loss_fn = classification_loss(num_classes)
    opt = OPTIMIZERS[optimizer][0](model.parameters(), lr)
    gen = torch.Generator().manual_seed(args.seed)  # the same batches for every run
    steps, losses, norms = [], [], []
    for step in range(args.steps):
        idx = torch.randint(0, len(x), (args.batch_size,), generator=gen)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x[idx]), y[idx])
        value = loss.item()
        if not math.isfinite(value) or (losses and value > DIVERGED * losses[0]):
            return {"steps": steps, "loss": losses, "diverged_at": step, "grad_norm": norms}
        steps.append(step)
        losses.append(value)
        loss.backward()
        # the total gradient norm before clipping; with max_norm=inf nothing is scaled
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip or math.inf)))
        opt.step()
    return {"steps": steps, "loss": losses, "diverged_at": None, "grad_norm": norms}


def curves_from_runs(sweep: Path) -> dict[str, Curve]:
    """train/loss of every job of a Hydra multirun, labelled by the overrides in which the jobs differ."""
    jobs = sorted((p.parent.parent for p in sweep.rglob(".hydra/overrides.yaml")), key=lambda p: p.name)
    if not jobs:
        raise UserError(f"No Hydra jobs (<job>/.hydra/overrides.yaml) under {sweep}. Pass the folder of a sweep, "
                        "e.g. logs/train/multiruns/<time>, made by python train.py -m optimizer.lr=0.01,0.1,1")
    overrides = {job: list(OmegaConf.load(job / ".hydra" / "overrides.yaml")) for job in jobs}
    shared = set.intersection(*(set(o) for o in overrides.values()))
    curves = {}
    for job in jobs:
        label = " ".join(o for o in overrides[job] if o not in shared) or job.name
        points = read_scalars(job, prefix="train/loss").get("train/loss", [])
        if not points:
            continue
        steps, losses = [s for s, _ in points], [v for _, v in points]
        bad = next((i for i, v in enumerate(losses) if not math.isfinite(v) or v > DIVERGED * losses[0]), None)
        curves[label] = {"steps": steps[:bad], "loss": losses[:bad],
                         "diverged_at": None if bad is None else steps[bad]}
    if not curves:
        raise UserError(f"The jobs under {sweep} logged no train/loss to TensorBoard (logger=tensorboard).")
    return curves


def smooth(values: list[float]) -> np.ndarray:
    out, avg = [], None
    for v in values:
        avg = v if avg is None else SMOOTH * avg + (1 - SMOOTH) * v
        out.append(avg)
    return np.array(out)


def plot(curves: dict[str, Curve], out: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(9, 4.8), layout="constrained")
    for i, (label, c) in enumerate(curves.items()):
        color = f"C{i}"
        style = "--" if ", clip" in label else "-"  # a clipped run dashed, over its unclipped twin
        if c["loss"]:
            ax.plot(c["steps"], c["loss"], color=color, alpha=0.25, lw=0.8, ls=style)
            ax.plot(c["steps"], smooth(c["loss"]), color=color, lw=1.8, label=label, ls=style)
        if c["diverged_at"] is not None:
            y = c["loss"][-1] if c["loss"] else 1.0
            ax.plot([c["diverged_at"]], [y], marker="x", color=color, ms=10, mew=2.5,
                    label=None if c["loss"] else label)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=9)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)


def print_table(curves: dict[str, Curve]) -> None:
    table = Table(title="Training loss by run", header_style="bold")
    for col in ("run", "first", "last (mean of last 10%)", "lowest", "largest grad norm", "diverged at step"):
        table.add_column(col, justify="left" if col == "run" else "right")
    for label, c in curves.items():
        loss = c["loss"]
        tail = loss[-max(1, len(loss) // 10):]
        cells = [f"{loss[0]:.3f}", f"{sum(tail) / len(tail):.3f}", f"{min(loss):.3f}"] if loss else ["-"] * 3
        norm = f"{max(c['grad_norm']):.3g}" if c.get("grad_norm") else "-"
        table.add_row(label, *cells, norm, "-" if c["diverged_at"] is None else str(c["diverged_at"]))
    Console(width=max(100, Console().width)).print(table)


def main(argv: list[str] | None = None) -> dict[str, Curve]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lrs", type=float, nargs="+", default=None,
                        help="learning rates (default 0.003 0.03 0.3 3 30; with --optimizers: each one's usual rate)")
    parser.add_argument("--optimizers", nargs="+", choices=list(OPTIMIZERS), default=None,
                        help="compare optimizers: " + ", ".join(f"{k} (lr {v[1]:g})" for k, v in OPTIMIZERS.items()))
    parser.add_argument("--clip", type=float, default=None,
                        help="also run every rate with the gradient norm clipped to this")
    parser.add_argument("--steps", type=int, default=400, help="SGD steps per rate (default 400)")
    parser.add_argument("--batch-size", type=int, default=64, help="default 64")
    parser.add_argument("--samples", type=int, default=4096, help="generated points (default 4096)")
    parser.add_argument("--seed", type=int, default=0, help="weights, data and batch order (default 0)")
    parser.add_argument("--mnist", default=None, help="a folder holding MNIST/raw/*-ubyte: use MNIST digits")
    parser.add_argument("--runs", type=Path, default=None, help="plot a Hydra sweep's train/loss instead of training")
    parser.add_argument("--out", type=Path, default=Path("lr_demo.png"), help="PNG to write (default lr_demo.png)")
    args = parser.parse_args(argv)

    if args.runs is not None:
        curves = curves_from_runs(args.runs)
        title = f"train/loss of the sweep {args.runs.name}"
    else:
        if args.steps < 1 or args.batch_size < 1 or any(lr <= 0 for lr in args.lrs or []) or (
                args.clip is not None and args.clip <= 0):
            raise UserError("--steps, --batch-size, --clip and every --lrs value must be positive.")
        x, y, num_classes = lesson_data(args.mnist, args.samples, args.seed)
        data = "MNIST" if args.mnist else "3-arm spirals"
        runs = []  # (label, lr, optimizer, clip)
        if args.optimizers:
            for name in args.optimizers:
                for lr in args.lrs or [OPTIMIZERS[name][1]]:
                    runs.append((f"{name} lr {lr:g}", lr, name, None))
            what = "optimizers"
        else:
            for lr in args.lrs or [0.003, 0.03, 0.3, 3.0, 30.0]:
                runs.append((f"lr {lr:g}", lr, "sgd", None))
                if args.clip:
                    runs.append((f"lr {lr:g}, clip {args.clip:g}", lr, "sgd", args.clip))
            what = "SGD" + (f" with and without clipping at {args.clip:g}" if args.clip else "")
        if args.optimizers and args.clip:
            runs = [r for run in runs for r in (run, (f"{run[0]}, clip {args.clip:g}", *run[1:3], args.clip))]
        curves = {label: train_curve(lr, x, y, num_classes, args, opt, clip) for label, lr, opt, clip in runs}
        title = f"MLP 2x64 relu, {data}, {what}, batch {args.batch_size}; same weights and batches for all"
    plot(curves, args.out, title)
    print_table(curves)
    print(f"wrote {args.out}")
    return curves


if __name__ == "__main__":
    try:
        main()
    except UserError as err:
        fail(str(err))
    sys.exit(0)
