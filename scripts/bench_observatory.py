"""The default instrument set (gradlab.observe.Observatory) against no instruments, on torchvision's resnet18 and a
small decoder-only transformer LM, side by side in one process. Target: <= 3 % at the default interval.

    python scripts/bench_observatory.py                      # 200 steps per run, 3 rounds
    python scripts/bench_observatory.py --steps 100 --rounds 2

Each round fits every (model, setting) pair once, in alternating order; the table shows the median time per
round and the ratio. The trainer logs every 50 steps (Lightning's default); grad_noise reads every 64.
"""

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from gradlab.observe import Observatory  # noqa: E402
from zoo import Classifier, LanguageModel, TinyGPT, class_data, loader, token_data  # noqa: E402


def models():
    import torchvision

    return {"resnet18 (B=16, 32x32)": (lambda: Classifier(torchvision.models.resnet18(num_classes=3)),
                                       class_data((3, 32, 32), n=64), 16),
            "GPT LM (2 layers, d=64)": (lambda: LanguageModel(TinyGPT(d=64, heads=4)), token_data(n=64), 16)}


def fit_seconds(make, dataset, batch, steps: int, observed: bool) -> float:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = pl.Trainer(max_steps=steps, accelerator="cpu", log_every_n_steps=50, enable_progress_bar=False,
                             enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp,
                             logger=TensorBoardLogger(tmp), callbacks=Observatory(out_dir=tmp) if observed else [])
        data = loader(dataset, batch)
        start = time.perf_counter()
        trainer.fit(make(), data)
        return time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cpu = next((line.split(":", 1)[1].strip() for line in subprocess.run(["lscpu"], capture_output=True, text=True)
                .stdout.splitlines() if line.startswith("Model name")), "unknown CPU")
    times = {}
    for r in range(args.rounds):
        for name, (make, dataset, batch) in models().items():
            for observed in ((False, True) if r % 2 == 0 else (True, False)):
                times.setdefault((name, observed), []).append(fit_seconds(make, dataset, batch, args.steps, observed))
    print(f"{cpu}, 1 thread, {args.steps} steps, median of {args.rounds} rounds")
    print("| model | off (s) | Observatory() (s) | ratio |\n| --- | --- | --- | --- |")
    for name in models():
        off, on = statistics.median(times[(name, False)]), statistics.median(times[(name, True)])
        print(f"| {name} | {off:.2f} | {on:.2f} | {on / off:.3f} |")


if __name__ == "__main__":
    main()
