"""Cost of logging to MLflow's SQLite store per logging step: Lightning's MLFlowLogger vs gradlab's buffered one.

    python scripts/bench_mlflow_logger.py               # ~1 minute
    python scripts/bench_mlflow_logger.py --steps 40 --rounds 3

A logging step reaches a logger in three `log_metrics` calls in a gradlab run (the module's 4 metrics, the CNN's
25 gradient-instrument values, ThroughputMonitor's 5). Lightning's MLFlowLogger writes each call as one
`log_batch`, one transaction of the store; gradlab.run.trackers.MLFlowLogger merges a step's calls into one write
(flush_every_s=0), or several steps' into one when its writes are at least flush_every_s apart (the default 5;
here the steps follow each other at once, so that row is a lower bound: in training, 50 steps take seconds).
Wall time per logging step, best round, rounds interleaved; a fresh SQLite file in a temporary folder.
"""

import argparse
import logging
import os
import subprocess
import tempfile
import time

from lightning.pytorch.loggers import MLFlowLogger as LightningMLFlowLogger

from gradlab.run.trackers import MLFlowLogger

CASES = (("Lightning MLFlowLogger (a write per call)", LightningMLFlowLogger, {}),
         ("gradlab, flush_every_s=0 (a write per step)", MLFlowLogger, {"flush_every_s": 0.0}),
         ("gradlab, flush_every_s=5 (default)", MLFlowLogger, {"flush_every_s": 5.0}))


def one_round(cls, kwargs: dict, uri: str, name: str, steps: int) -> float:
    logger = cls(experiment_name="bench", tracking_uri=uri, run_name=name, **kwargs)
    _ = logger.experiment  # creating the run is not part of a step
    t = time.perf_counter()
    for step in range(0, steps * 50, 50):
        logger.log_metrics({"train/loss": 1.0, "train/acc": 0.5, "lr-Adam": 1e-3, "epoch": 0}, step)
        logger.log_metrics({f"grad_norm/p{i}": float(i) for i in range(25)}, step)
        logger.log_metrics({f"train/x{i}": float(i) for i in range(5)}, step)
    logger.finalize("success")
    return (time.perf_counter() - t) / steps


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="logging steps per round (default 20)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    args = parser.parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("mlflow").setLevel(logging.ERROR)
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name")), "?")
    best = {name: float("inf") for name, _, _ in CASES}
    with tempfile.TemporaryDirectory() as tmp:
        uri = "sqlite:///" + os.path.join(tmp, "mlflow.db")
        for _ in range(args.rounds):
            for name, cls, kwargs in CASES:
                best[name] = min(best[name], one_round(cls, kwargs, uri, name, args.steps))
    print(f"CPU: {model}; SQLite store; {args.steps} logging steps of 34 metrics in 3 calls; best of {args.rounds}")
    print("| logger | per logging step (ms) | vs Lightning's |")
    print("|---|---:|---:|")
    base = best[CASES[0][0]]
    for name, seconds in best.items():
        print(f"| {name} | {seconds * 1e3:.1f} | {seconds / base:.2f}x |")
    return best


if __name__ == "__main__":
    main()
