"""Gradient flow of one training run as a picture: per-layer gradient norms over steps, and the total norm.

    python scripts/plot_grad_flow.py logs/train/runs/2026-01-01_12-00-00              # -> <run>/grad_flow.png
    python scripts/plot_grad_flow.py logs/train/runs/<run> --out flow.png --weights-only

Reads the `grad_norm/*` (and, when present, `update_ratio/*`) scalars that GradNormMonitor wrote to the run's
TensorBoard events and draws them with gradlab.observe.grad_flow_picture, the same code that puts this picture into
TensorBoard's IMAGES tab during training (callbacks.grad_flow).
"""

import argparse
import math
import sys
from pathlib import Path

from gradlab.config.cli import fail
from gradlab.errors import UserError
from gradlab.observe.events import read_scalars
from gradlab.observe.grad_flow_picture import plot


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
