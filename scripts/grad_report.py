"""The gradient health report of a finished run: verdicts with layer, steps, evidence and fix.

    python scripts/grad_report.py logs/train/runs/2026-01-01_12-00-00     # prints, writes <run>/health.json
    python scripts/grad_report.py logs/train/multiruns/<time>/3 --dead 0.5

Reads the run's TensorBoard events (gradlab.observe.events) and applies gradlab.observe.health_rules's rules, the same report the
`health` callback writes at the end of fit. Exit code 0 whether or not there are findings.
"""

import argparse
import sys
from dataclasses import fields
from pathlib import Path

from gradlab.config.cli import fail
from gradlab.errors import UserError
from gradlab.observe.events import read_scalars
from gradlab.observe.health_rules import Thresholds, diagnose


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a run folder (or its tensorboard/ folder)")
    parser.add_argument("--out", type=Path, default=None, help="JSON to write (default: RUN_DIR/health.json)")
    for f in fields(Thresholds):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=float, default=f.default,
                            help=f"threshold (default {f.default:g}; see gradlab.observe.health_rules)")
    args = parser.parse_args(argv)
    scalars = read_scalars(args.run_dir)
    if not any(t.startswith("grad_norm/") for t in scalars):
        raise UserError(f"{args.run_dir} has no grad_norm/* scalars: the report needs a run trained with the "
                        "gradient callback on (callbacks.grad_norm, on by default).")
    report = diagnose(scalars, Thresholds(**{f.name: getattr(args, f.name) for f in fields(Thresholds)}))
    out = args.out or args.run_dir / "health.json"
    report.write_json(out)
    report.print(f"gradient health of {args.run_dir}")
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    try:
        main()
    except UserError as err:
        fail(str(err))
    sys.exit(0)
