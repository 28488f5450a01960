"""Cohen et al. (ICLR 2021), Figure 1, on this machine: full-batch GD at three learning rates; λ_max against 2/η.

    python scripts/plot_edge_of_stability.py                           # -> docs/img/edge_of_stability.png
    python scripts/plot_edge_of_stability.py --lrs 0.015 0.01 --steps 300 --out /tmp/eos.png

Each learning rate is one `python train.py experiment=edge_of_stability optimizer.lr=<η>` run (conf/experiment/
edge_of_stability.yaml: a tanh MLP with square loss on the shipped MNIST sample's training split, one batch a step);
the script reads curv/sharpness and train/loss back from the runs' event files and draws them, the sharpness
beside its threshold 2/η. It prints a table: per lr, λ_max at initialization, the step where it first reached 2/η,
its median afterwards relative to 2/η, the final loss and the wall time (the runs go in parallel).
"""

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from gradlab.observe.events import read_scalars  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def command(lr: float, steps: int, every: int, iters: int, logs: Path) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), "experiment=edge_of_stability", f"optimizer.lr={lr}",
           f"trainer.max_epochs={steps}", f"callbacks.curvature.log_every_n_steps={every}",
           f"callbacks.curvature.lanczos_iters={iters}", f"paths.log_dir={logs / str(lr)}", "test=false",
           "callbacks.health=null", "callbacks.progress_bar=null"]


def run_all(lrs: list[float], steps: int, every: int, iters: int, logs: Path) -> list[tuple[Path, float]]:
    """One train.py per lr, all at once (one thread each): {lr: (run folder, wall seconds)}."""
    start = time.time()
    procs = [subprocess.Popen(command(lr, steps, every, iters, logs), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, cwd=logs) for lr in lrs]
    out = []
    for lr, proc in zip(lrs, procs):
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"train.py failed for lr={lr}:\n{err[-2000:]}")
        (folder,) = (logs / str(lr) / "train" / "runs").iterdir()
        out.append((folder, time.time() - start))
    return out


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.1, 0.0667, 0.05])
    parser.add_argument("--steps", type=int, default=250, help="GD steps per run")
    parser.add_argument("--every", type=int, default=10, help="steps between sharpness readings")
    parser.add_argument("--iters", type=int, default=8, help="Lanczos iterations per reading (warm-started)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "edge_of_stability.png")
    args = parser.parse_args(argv)

    fig, (ax_loss, ax_sharp) = plt.subplots(1, 2, figsize=(11, 4))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        runs = run_all(args.lrs, args.steps, args.every, args.iters, Path(tmp))
        for lr, (folder, wall), color in zip(args.lrs, runs, ("tab:blue", "tab:orange", "tab:green", "tab:red")):
            s = read_scalars(folder)
            sharp, loss = s["curv/sharpness"], s["train/loss"]
            edge = 2 / lr
            ax_loss.plot(*zip(*loss), color=color, label=f"η = {lr:g}")
            ax_sharp.plot(*zip(*sharp), color=color, label=f"η = {lr:g}")
            ax_sharp.axhline(edge, color=color, linestyle="--", linewidth=1)
            reached = next((step for step, v in sharp if v >= 0.95 * edge), None)
            after = [v / edge for step, v in sharp if reached is not None and step > reached]
            rows.append((lr, edge, sharp[0][1], reached, statistics.median(after) if after else float("nan"),
                         loss[-1][1], wall))
    ax_loss.set(xlabel="GD step", ylabel="train/loss (square loss)", title="training loss", yscale="log")
    ax_sharp.set(xlabel="GD step", ylabel="λ_max(H)", title="sharpness; dashed: 2/η")
    for ax in (ax_loss, ax_sharp):
        ax.legend()
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"{'lr':>8} {'2/η':>7} {'λ at init':>10} {'reached 2/η at':>15} {'median λ·η/2 after':>19} "
          f"{'final loss':>11} {'wall s':>7}")
    for lr, edge, first, reached, after, final, wall in rows:
        print(f"{lr:8g} {edge:7.1f} {first:10.1f} {str(reached):>15} {after:19.3f} {final:11.4f} {wall:7.0f}")
    print(f"figure: {args.out}")
    return args.out


if __name__ == "__main__":
    main()
