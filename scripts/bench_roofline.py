"""How close a training step comes to this machine's own limit: achieved FLOP/s as a fraction of its GEMM rate.

    python scripts/bench_roofline.py --data DIR          # DIR holds FashionMNIST/raw/ (the train files suffice)
    python scripts/bench_roofline.py --data DIR --rounds 7 --fraction 0.25   # longer rounds, a quarter epoch

The yardstick is a dense matrix multiply (`torch.mm`, 2048 x 2048, torch's default threads): the practical
ceiling of float32 arithmetic here (and of bfloat16 where the CPU computes it natively, as a second column).
Each model's FLOPs per training step (forward + loss + backward) come from `torch.utils.flop_counter`, which
counts the matmuls and convolutions; elementwise work is left out, so every fraction below is of useful
arithmetic. Measured in one run:

* plain steps (no Lightning): the CNN as `experiment=mnist_fast` trains it, main.py's step (its `Net`, batch 64,
  Adadelta), the MLP (`model=mlp`, hand-written backward) and the GRU (`experiment=imdb_gru`, 400 tokens), on
  random inputs already in memory; rounds alternate GEMM and steps, and each round's rate is divided by that
  round's GEMM rate (a busy machine slows both), the fraction being the median over rounds;
* gradlab's step inside `train.py experiment=mnist_fast` (one epoch, or `--fraction` of one), timed from the loop by
  a callback (`LoopClock`) that also times the same GEMM inside that process every `--probe-every` steps (left out
  of every other figure): the step (forward, backward, optimizer, instruments), the loop's iteration (plus fetching
  the batch), the training epoch, the validation pass, and the whole epoch with validation.

The CPU model, its instruction sets (from lscpu's flags) and torch's kernel choice are printed with the table.
`--json PATH` writes every figure for scripts and tests.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# lscpu flags that decide which float32/bf16 kernels oneDNN and ATen can use, in order of arrival.
ISA_FLAGS = ("sse4_2", "avx", "fma", "avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")


# ---- the machine ----------------------------------------------------------------------------------------------
def cpu_info() -> dict:
    """CPU model, its instruction sets of ISA_FLAGS, torch's chosen kernel level, threads."""
    model, flags = "unknown CPU", set()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Model name":
                model = value.strip()
            elif key.strip() == "Flags":
                flags = set(value.split())
    except OSError:
        pass
    from gradlab.run.precision import BF16_CPU_FLAGS

    return {"model": model, "isa": [f for f in ISA_FLAGS if f in flags],
            "bf16_native": any(f in flags for f in BF16_CPU_FLAGS),
            "torch_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()}


def gemm_rate(n: int = 2048, dtype=torch.float32, reps: int = 3) -> float:
    """FLOP/s of `torch.mm` on two n x n matrices: 2 n^3 per product, the best of `reps` after a warm-up."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


# ---- the models' training steps -------------------------------------------------------------------------------
def cnn_case(batch: int) -> dict:
    """The CNN as experiment=mnist_fast trains it: channels-last, dropout 0/0.25, label smoothing, SGD Nesterov."""
    from gradlab.models.cnn import MnistCNN

    net = MnistCNN(dropout_conv=0.0, dropout_fc=0.25).to(memory_format=torch.channels_last)
    x = torch.randn(batch, 1, 28, 28).contiguous(memory_format=torch.channels_last)  # (B, 1, 28, 28) NHWC
    return {"net": net, "inputs": (x,), "target": torch.randint(0, 10, (batch,)),
            "loss": torch.nn.CrossEntropyLoss(label_smoothing=0.1), "batch": batch,
            "opt": torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)}


def reference_case(batch: int = 64) -> dict:
    """main.py's step: its Net verbatim (NCHW, dropout 0.25/0.5), NLL, Adadelta, batch 64."""
    from gradlab.models.reference_net import Net

    net = Net()
    return {"net": net, "inputs": (torch.randn(batch, 1, 28, 28),), "target": torch.randint(0, 10, (batch,)),
            "loss": torch.nn.NLLLoss(), "batch": batch, "opt": torch.optim.Adadelta(net.parameters(), lr=1.0)}


def mlp_case(batch: int) -> dict:
    """model=mlp: 784-256-128-10 relu, the hand-written backward, SGD."""
    from gradlab.models.mlp import ManualMLP, classification_loss

    net = ManualMLP(784, [256, 128], 10)
    return {"net": net, "inputs": (torch.randn(batch, 1, 28, 28),), "target": torch.randint(0, 10, (batch,)),
            "loss": classification_loss(10), "batch": batch, "opt": torch.optim.SGD(net.parameters(), lr=0.01)}


def gru_case(batch: int, tokens: int = 400) -> dict:
    """experiment=imdb_gru: bidirectional GRU (embed 128, hidden 64), max-pooled, `tokens` per review, Adam."""
    from gradlab.models.rnn import SentimentRNN

    net = SentimentRNN(25000, embed_dim=128, hidden_size=64, cell="gru")
    x = torch.randint(1, 25000, (batch, tokens))  # (B, T), no padding: bucketed batches of cut reviews
    return {"net": net, "inputs": (x, torch.full((batch,), tokens)), "target": torch.randint(0, 2, (batch,)).float(),
            "loss": torch.nn.BCEWithLogitsLoss(), "batch": batch, "opt": torch.optim.Adam(net.parameters(), 2e-3)}


def train_step(case: dict) -> None:
    case["opt"].zero_grad(set_to_none=True)
    case["loss"](case["net"](*case["inputs"]), case["target"]).backward()
    case["opt"].step()


def step_flops(case: dict) -> int:
    """FLOPs of one training step (matmuls and convolutions of forward, loss and backward), counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        case["loss"](case["net"](*case["inputs"]), case["target"]).backward()
    case["opt"].zero_grad(set_to_none=True)
    return counter.get_total_flops()


def plain_rates(cases: dict, steps: int, rounds: int, gemm_n: int) -> dict:
    """Per case: FLOP/s and fraction of GEMM, rounds alternating GEMM and steps; medians over rounds."""
    flops = {name: step_flops(case) for name, case in cases.items()}
    for case in cases.values():  # warm-up: oneDNN picks and JIT-compiles its kernels on first use
        for _ in range(2):
            train_step(case)
    rates = {name: [] for name in cases}
    fractions = {name: [] for name in cases}
    gemms = []
    # Every case does about the arithmetic of `steps` CNN steps a round (the GRU's step is ~20x the CNN's).
    n_steps = {name: max(1, round(steps * flops["cnn"] / flops[name])) for name in cases}
    for _ in range(rounds):
        gemm = gemm_rate(gemm_n)
        gemms.append(gemm)
        for name, case in cases.items():
            start = time.perf_counter()
            for _ in range(n_steps[name]):
                train_step(case)
            rate = flops[name] * n_steps[name] / (time.perf_counter() - start)
            rates[name].append(rate)
            fractions[name].append(rate / gemm)
    return {"gemm": statistics.median(gemms), "rows": {
        name: {"flops_per_step": flops[name], "batch": cases[name]["batch"],
               "flops_per_sample": flops[name] / cases[name]["batch"], "rate": statistics.median(rates[name]),
               "fraction": statistics.median(fractions[name])} for name in cases}}


# ---- gradlab's step inside train.py ---------------------------------------------------------------------------
try:
    import lightning.pytorch as pl

    _Callback = pl.Callback
except ImportError:  # the parent needs no Lightning
    _Callback = object


class LoopClock(_Callback):
    """Times train.py's loop from the inside (a guest: hooks only) and probes GEMM in the same process.

    Writes {steps, samples, step_s, iteration_s, train_epoch_s, val_s, epoch_s, gemm} to `out` when the first
    epoch ends: medians of the step (on_train_batch_start to _end) and of the loop's iteration (start to next
    start, so the batch fetch is in), both over steps after `warmup`; the epoch's seconds with and without its
    validation; GEMM's FLOP/s, measured every `probe_every` steps and left out of all the seconds above.
    """

    def __init__(self, out: str, warmup: int = 5, probe_every: int = 50, gemm_n: int = 2048):
        self.out, self.warmup, self.probe_every, self.gemm_n = out, warmup, probe_every, gemm_n
        self.steps, self.iterations, self.gemms = [], [], []
        self.samples, self.probe_s, self.val_s, self.done, self.batch = 0, 0.0, 0.0, False, 0
        self.last_start = self.t_start = self.epoch_start = None

    def _probe(self) -> None:
        start = time.perf_counter()
        self.gemms.append(gemm_rate(self.gemm_n, reps=2))
        self.probe_s += time.perf_counter() - start

    def on_train_epoch_start(self, trainer, pl_module):
        if self.epoch_start is None:
            self._probe()
            self.probe_before, self.epoch_start = self.probe_s, time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx and batch_idx % self.probe_every == 0:
            self._probe()  # between steps: the loop's iteration then leaves it out too
            self.last_start = None
        now = time.perf_counter()
        if self.last_start is not None and batch_idx > self.warmup:
            self.iterations.append(now - self.last_start)
        self.last_start = self.t_start = now

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx >= self.warmup:
            self.steps.append(time.perf_counter() - self.t_start)
        self.samples += batch[-1].shape[0]
        self.batch = self.batch or batch[-1].shape[0]

    def on_validation_start(self, trainer, pl_module):
        self.val_start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking and not self.done:
            self.val_s += time.perf_counter() - self.val_start

    def on_train_epoch_end(self, trainer, pl_module):
        if self.done:
            return
        self.done = True
        epoch_s = time.perf_counter() - self.epoch_start - (self.probe_s - self.probe_before)
        self._probe()
        with open(self.out, "w") as f:
            json.dump({"steps": trainer.global_step, "samples": self.samples,
                       "step_s": statistics.median(self.steps), "iteration_s": statistics.median(self.iterations),
                       "train_epoch_s": epoch_s - self.val_s, "val_s": self.val_s, "epoch_s": epoch_s,
                       "gemm": statistics.median(self.gemms), "batch": self.batch}, f)


def train_py(data: str, dataset: str, fraction: float, out: str, work: str, overrides: list[str],
             probe_every: int, gemm_n: int, warmup: int) -> dict:
    """One epoch (or `fraction` of one) of `train.py experiment=mnist_fast`, timed by LoopClock."""
    cmd = [sys.executable, str(ROOT / "train.py"), "experiment=mnist_fast", f"data={dataset}", f"data.root={data}",
           "data.download=false", "test=false", f"paths.root_dir={work}", "trainer.max_epochs=1",
           f"trainer.limit_train_batches={fraction}", "callbacks.progress_bar=null", "callbacks.model_summary=null",
           f"+callbacks.roofline={{_target_:bench_roofline.LoopClock,out:{out},probe_every:{probe_every},"
           f"gemm_n:{gemm_n},warmup:{warmup}}}", *overrides]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "scripts"), str(ROOT / "src")])}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"train.py failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
    return json.loads(Path(out).read_text())


def loop_rows(clock: dict, flops_per_sample: float) -> dict:
    """train.py's figures as FLOP/s of training arithmetic (the CNN's per-sample FLOPs) and fractions of GEMM."""
    per_step = flops_per_sample * clock["batch"]
    rows = {"step in the loop": per_step / clock["step_s"], "loop iteration (with the batch fetch)":
            per_step / clock["iteration_s"], "training epoch": flops_per_sample * clock["samples"] /
            clock["train_epoch_s"], "whole epoch (with validation)": flops_per_sample * clock["samples"] /
            clock["epoch_s"]}
    return {name: {"rate": rate, "fraction": rate / clock["gemm"]} for name, rate in rows.items()}


# ---- levers on the CNN's step --------------------------------------------------------------------------------
def lever_cases(batch: int, compile: bool = True) -> dict:
    """The plain mnist_fast step beside one change each (same FLOPs per sample, except where noted)."""
    nchw = cnn_case(batch)
    nchw["net"] = nchw["net"].to(memory_format=torch.contiguous_format)
    nchw["inputs"] = (nchw["inputs"][0].contiguous(),)
    cases = {f"channels-last, batch {batch} (mnist_fast)": cnn_case(batch), f"NCHW, batch {batch}": nchw,
             f"channels-last, batch {2 * batch}": cnn_case(2 * batch),
             f"channels-last, batch {4 * batch}": cnn_case(4 * batch)}
    if compile:  # compiles at its first step: that time is in the table's last column
        compiled = cnn_case(batch)
        compiled["net"] = torch.compile(compiled["net"])
        cases[f"torch.compile (inductor), batch {batch}"] = compiled
    return cases


def levers(batch: int, steps: int, rounds: int, compile: bool = True) -> dict:
    """Samples/s of each lever case against the first, in alternating rounds; compile seconds counted apart."""
    cases = lever_cases(batch, compile)
    first_s = {}
    for name, case in cases.items():  # warm-up; for torch.compile this is where it compiles
        start = time.perf_counter()
        for _ in range(2):
            train_step(case)
        first_s[name] = time.perf_counter() - start
    rates = {name: [] for name in cases}
    for _ in range(rounds):
        for name, case in cases.items():
            start = time.perf_counter()
            for _ in range(steps):
                train_step(case)
            rates[name].append(case["batch"] * steps / (time.perf_counter() - start))
    base = next(iter(cases))
    ratios = {name: statistics.median(r / b for r, b in zip(rates[name], rates[base])) for name in cases}
    return {name: {"samples_per_s": statistics.median(rates[name]), "ratio": ratios[name],
                   "first_two_steps_s": first_s[name]} for name in cases}


# ---- the table ------------------------------------------------------------------------------------------------
PLAIN = {"cnn": ("the CNN, plain step as mnist_fast (batch {b})", cnn_case),
         "reference": ("main.py's step (Net, batch {b}, Adadelta, NCHW)", reference_case),
         "mlp": ("MLP 784-256-128-10, hand-written backward (batch {b})", mlp_case),
         "gru": ("GRU (imdb_gru, batch {b} x 400 tokens)", gru_case)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT / "data"), help="a folder holding FashionMNIST/raw/ (default ./data)")
    parser.add_argument("--dataset", default="fashion_mnist", help="data config of the train.py run (default "
                        "fashion_mnist; mnist reads <data>/MNIST/raw/)")
    parser.add_argument("--batch", type=int, default=128, help="the plain CNN step's batch (mnist_fast's, 128)")
    parser.add_argument("--steps", type=int, default=10,
                        help="plain CNN steps per round (default 10); the other models do as many FLOPs")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of GEMM + plain steps (default 5)")
    parser.add_argument("--fraction", type=float, default=1.0, help="of the train.py epoch (default 1: all of it)")
    parser.add_argument("--gemm-n", type=int, default=2048, help="GEMM size (default 2048)")
    parser.add_argument("--probe-every", type=int, default=50, help="GEMM probe in train.py every this many steps")
    parser.add_argument("--no-train-py", action="store_true", help="plain steps only")
    parser.add_argument("--no-plain", action="store_true", help="train.py only")
    parser.add_argument("--levers", action="store_true", help="only the CNN step's levers, side by side")
    parser.add_argument("--no-compile", action="store_true", help="levers without torch.compile (minutes on 2 cores)")
    parser.add_argument("--tiny", action="store_true", help="tests: batch 8 and 16 tokens for every plain step")
    parser.add_argument("--json", help="also write every figure to this file")
    parser.add_argument("overrides", nargs="*", help="extra train.py overrides (e.g. data.batch_size=256)")
    args = parser.parse_args(argv)
    info = cpu_info()
    if args.levers:
        rows = levers(8 if args.tiny else args.batch, args.steps, args.rounds, not args.no_compile)
        print(f"\n{info['model']}, {info['threads']} threads, {' '.join(info['isa'])}; the CNN's plain step, "
              f"{args.rounds} alternating rounds of {args.steps} steps")
        print("| variant | samples/s (median) | ratio to mnist_fast's step (median of rounds) | first 2 steps (s) |")
        print("|---|---:|---:|---:|")
        for name, row in rows.items():
            print(f"| {name} | {row['samples_per_s']:.0f} | {row['ratio']:.2f}x | {row['first_two_steps_s']:.1f} |")
        return {"cpu": info, "levers": rows}
    bf16 = gemm_rate(args.gemm_n, torch.bfloat16) if info["bf16_native"] else None
    batches = {"cnn": args.batch, "reference": 64, "mlp": 64, "gru": 64}
    cases = {name: make(8) if args.tiny else make(batches[name]) for name, (_, make) in PLAIN.items()}
    if args.tiny:
        cases["gru"] = gru_case(8, tokens=16)
    if args.no_plain:  # FLOPs only: train.py's rows need the CNN's per sample
        plain = {"gemm": gemm_rate(args.gemm_n), "rows": {"cnn": {"flops_per_sample": step_flops(cases["cnn"]) /
                                                                   args.batch, "batch": args.batch}}}
    else:
        plain = plain_rates(cases, args.steps, args.rounds, args.gemm_n)
    result = {"cpu": info, "gemm_fp32": plain["gemm"], "gemm_bf16": bf16, "plain": plain["rows"]}
    if not args.no_train_py:
        with tempfile.TemporaryDirectory() as tmp:
            clock = train_py(args.data, args.dataset, args.fraction, os.path.join(tmp, "clock.json"), tmp,
                             args.overrides, args.probe_every, args.gemm_n, 1 if args.tiny else 5)
        result["train_py"] = clock
        result["loop"] = loop_rows(clock, plain["rows"]["cnn"]["flops_per_sample"])
    report(result, args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


def report(r: dict, args) -> None:
    cpu = r["cpu"]
    print(f"\n{cpu['model']}, {os.cpu_count()} cores, {cpu['threads']} torch threads; instruction sets: "
          f"{' '.join(cpu['isa'])}; torch kernels: {cpu['torch_capability']}; "
          f"bf16 {'native' if cpu['bf16_native'] else 'not native'}; {time.strftime('%Y-%m-%d %H:%M')}")
    print("| what | MFLOP per sample | GFLOP/s | fraction of GEMM |")
    print("|---|---:|---:|---:|")
    print(f"| `torch.mm` {args.gemm_n}² float32 (median of {args.rounds} rounds) | | {r['gemm_fp32'] / 1e9:.1f} | "
          f"1.00 |")
    if r["gemm_bf16"]:
        print(f"| `torch.mm` {args.gemm_n}² bfloat16 | | {r['gemm_bf16'] / 1e9:.1f} | "
              f"{r['gemm_bf16'] / r['gemm_fp32']:.2f} |")
    for name, row in r["plain"].items():
        if "rate" not in row:
            continue
        label = PLAIN[name][0].format(b=row["batch"])
        print(f"| {label} | {row['flops_per_sample'] / 1e6:.2f} | {row['rate'] / 1e9:.1f} | {row['fraction']:.2f} |")
    if "train_py" in r:
        c = r["train_py"]
        print(f"| *train.py experiment=mnist_fast {' '.join(args.overrides)}: {c['steps']} steps of {c['batch']}, "
              f"GEMM in that process {c['gemm'] / 1e9:.1f} GFLOP/s* | | | |")
        for name, row in r["loop"].items():
            print(f"| {name} | | {row['rate'] / 1e9:.1f} | **{row['fraction']:.2f}** |")
        print(f"\nstep {1e3 * c['step_s']:.1f} ms, loop iteration {1e3 * c['iteration_s']:.1f} ms (median); training "
              f"epoch {c['train_epoch_s']:.1f} s, validation {c['val_s']:.1f} s "
              f"({100 * c['val_s'] / c['epoch_s']:.0f}% of the epoch)")


if __name__ == "__main__":
    main()
