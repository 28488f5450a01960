"""Cost of the throughput callback: training step time with gradlab's ThroughputMonitor vs without, in the same run.

    python scripts/bench_throughput_monitor.py                 # CNN, MLP and GRU, a few minutes on 2 shared cores
    python scripts/bench_throughput_monitor.py --models cnn --cycles 200

One training run per model (the `model=cnn` MnistCNN on MNIST-shaped tensors, batch 64; an MLP of the `model=mlp`
shape, whose small step shows a fixed cost most; the `model=rnn` GRU on (tokens, lengths, target) batches of 64
reviews of 50-400 tokens, so the token count is exercised), TensorBoard logger. Consecutive steps rotate through the modes below, so every mode sees the same machine; a step is timed
from on_train_batch_start to on_train_batch_end (forward, backward, optimizer step, every hook).
    off       no throughput callback
    update    ThroughputMonitor on a step that does not log: clock, sample (and token) count, window update
    logging   ThroughputMonitor on a logging step: the same, plus computing and writing its metrics to the logger
    control   no callback again: its "overhead" is the noise floor of the end-to-end comparison
Times are CPU time of the process. "direct" = time inside the callback's hooks / median "off" step (precise);
"end to end" = median over rotation cycles of (step of that mode / "off" step of the same cycle) - 1 (noisy).
The default interval (trainer.log_every_n_steps=50) is 49/50 update + 1/50 logging. Target: <= 1 %.
"""

import argparse
import logging
import statistics
import subprocess
import tempfile
import time
import warnings
from functools import partial

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from gradlab.data.tensor_loader import TensorBatches, identity_collate
from gradlab.models.classifier import ClassifierModule
from gradlab.models.cnn import MnistCNN
from gradlab.models.rnn import SentimentRNN
from gradlab.observe.throughput import ThroughputMonitor

MODES = ("off", "update", "logging", "control")
DEFAULT_INTERVAL = 50  # conf/trainer/default.yaml log_every_n_steps
NEVER = 10**12


def now() -> float:
    return time.process_time()


class Rotation(pl.Callback):
    """Runs step k in mode MODES[k % len(MODES)]; records its time and the time spent in the monitor's hooks."""

    def __init__(self, warmup: int):
        self.warmup = warmup
        self.monitor = ThroughputMonitor(window_size=DEFAULT_INTERVAL)
        self.step = {m: [] for m in MODES}
        self.hooks = {m: [] for m in MODES}
        self._mode, self._t0, self._hook = "off", 0.0, 0.0

    def setup(self, trainer, pl_module, stage):
        self.monitor.setup(trainer, pl_module, stage)

    def on_train_start(self, trainer, pl_module):
        self.monitor.on_train_start(trainer, pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._mode = MODES[trainer.global_step % len(MODES)]
        # Lightning logs, the monitor included, on steps where global_step + 1 is a multiple of this.
        trainer.log_every_n_steps = 1 if self._mode == "logging" else NEVER
        self._t0 = now()
        self._hook = 0.0
        if self._mode in ("update", "logging"):
            self._timed(self.monitor.on_train_batch_start, trainer, pl_module, batch, batch_idx)

    def _timed(self, fn, *args) -> None:
        t = now()
        fn(*args)
        self._hook += now() - t

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._mode in ("update", "logging"):
            self._timed(self.monitor.on_train_batch_end, trainer, pl_module, outputs, batch, batch_idx)
        end = now()
        if trainer.global_step > self.warmup * len(MODES):
            self.step[self._mode].append(end - self._t0)
            self.hooks[self._mode].append(self._hook)


def cnn_case(n: int, batch: int):
    g = torch.Generator().manual_seed(0)
    data = TensorBatches(torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g))
    module = ClassifierModule(MnistCNN(), nn.NLLLoss(), num_classes=10, channels_last=True,
                              optimizer=partial(torch.optim.Adam, lr=1e-3))
    return module, torch.utils.data.DataLoader(data, batch_size=batch, collate_fn=identity_collate)


def mlp_case(n: int, batch: int):
    # The model=mlp shape (784-256-128-10) on autograd: the smallest step, where a fixed cost weighs most.
    g = torch.Generator().manual_seed(0)
    data = TensorBatches(torch.randn(n, 784, generator=g), torch.randint(0, 10, (n,), generator=g))
    net = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))
    module = ClassifierModule(net, nn.CrossEntropyLoss(), num_classes=10, optimizer=partial(torch.optim.Adam, lr=1e-3))
    return module, torch.utils.data.DataLoader(data, batch_size=batch, collate_fn=identity_collate)


def rnn_case(n: int, batch: int):
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(50, 401, (n,), generator=g)
    tokens = torch.randint(2, 25000, (n, 400), generator=g)
    tokens[torch.arange(400)[None, :] >= lengths[:, None]] = 0  # right padding
    data = TensorBatches(tokens, lengths, torch.randint(0, 2, (n,), generator=g).float())
    net = SentimentRNN(vocab_size=25000, embed_dim=128, hidden_size=64, cell="gru", bidirectional=True,
                       pooling="max", dropout=0.5)
    module = ClassifierModule(net, nn.BCEWithLogitsLoss(), num_classes=1, gradient_clip_val=1.0,
                              optimizer=partial(torch.optim.Adam, lr=2e-3))
    return module, torch.utils.data.DataLoader(data, batch_size=batch, collate_fn=identity_collate)


CASES = {"cnn": ("MnistCNN, batch 64", cnn_case), "mlp": ("MLP 784-256-128-10, batch 64", mlp_case), "rnn": ("GRU (bidirectional, 128/64), batch 64", rnn_case)}


def measure(model: str, cycles: int, warmup: int, batch: int) -> dict[str, tuple[float, float, float]]:
    steps = (cycles + warmup) * len(MODES)
    torch.manual_seed(0)
    module, loader = CASES[model][1](steps * batch, batch)
    rotation = Rotation(warmup)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, log_every_n_steps=NEVER,
                             logger=TensorBoardLogger(tmp, name="", version=""), callbacks=[rotation],
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(module, loader)
    rows = {}
    for mode in MODES:
        paired = statistics.median(s / o - 1 for s, o in zip(rotation.step[mode], rotation.step["off"]))
        rows[mode] = (statistics.median(rotation.step[mode]), statistics.median(rotation.hooks[mode]), paired)
    k = DEFAULT_INTERVAL
    rows["default"] = tuple(((k - 1) * u + g) / k for u, g in zip(rows["update"], rows["logging"]))
    return rows


def cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["cnn", "mlp", "rnn"], choices=sorted(CASES))
    parser.add_argument("--cycles", type=int, default=60, help="measured rotations of the modes (default 60)")
    parser.add_argument("--warmup", type=int, default=3, help="rotations left out first (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as the other benchmarks)")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    print(f"CPU: {cpu_model()}; {args.threads} torch thread(s); modes rotating step by step in one run per model, "
          f"{args.cycles} cycles after {args.warmup} warm-up; medians of CPU time")
    print("| model | mode | step (ms) | in the callback (ms) | **overhead, direct** | overhead, end to end |")
    print("|---|---|---:|---:|---:|---:|")
    labels = {"update": "non-logging step", "logging": "logging step",
              "default": f"default: {DEFAULT_INTERVAL - 1} + 1 logging step, per step", "control": "control (off again)"}
    ratios = {}
    for model in args.models:
        rows = measure(model, args.cycles, args.warmup, args.batch_size)
        off = rows["off"][0]
        print(f"| {CASES[model][0]} | off | {off * 1e3:.1f} | – | – | – |")
        for mode in ("update", "logging", "default", "control"):
            step, hooks, paired = rows[mode]
            print(f"| | {labels[mode]} | {step * 1e3:.1f} | {hooks * 1e3:.3f} | **{hooks / off * 100:+.3f} %** | "
                  f"{paired * 100:+.1f} % |")
        ratios[model] = {mode: rows[mode][1] / off for mode in rows}
    return ratios


if __name__ == "__main__":
    main()
