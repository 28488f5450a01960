"""Where bf16-mixed pays: the MNIST CNN's training step in float32 and in bf16 autocast, per instruction set.

    python scripts/bench_precision.py                  # native, AVX-512 without BF16, AVX2 only
    python scripts/bench_precision.py --steps 40 --rounds 5

One CPU can stand in for older ones: oneDNN (the convolutions and matmuls) and ATen (everything else) both take a
cap on the instruction set they use, ONEDNN_MAX_CPU_ISA and ATEN_CPU_CAPABILITY. Each row is a fresh process under
one cap, timing float32 and bf16 steps in alternating rounds (so a change of the machine's load hits both); the
ratio is of the medians. This is an emulation: a real Skylake or Zen 3 also differs in clock, caches and memory;
the row says what the missing instructions alone cost. GPUs are not measured here.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

# (row, ONEDNN_MAX_CPU_ISA, ATEN_CPU_CAPABILITY); None leaves the variable unset (the CPU's best).
CAPS = [
    ("native (this CPU)", None, None),
    ("AVX-512 without BF16 (as Skylake-SP to Ice Lake)", "AVX512_CORE_VNNI", "avx512"),
    ("AVX2 only (as Haswell to Alder Lake, Zen 1-3)", "AVX2", "avx2"),
]


def worker(steps: int, rounds: int, batch: int) -> dict:
    import torch
    import torch.nn.functional as F

    from gradlab.models.cnn import MnistCNN

    torch.manual_seed(0)
    net = MnistCNN().to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))

    def step(bf16: bool) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.nll_loss(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    rates = {False: [], True: []}
    for bf16 in (False, True):  # warm-up: oneDNN picks and JIT-compiles its kernels on first use
        for _ in range(3):
            step(bf16)
    for _ in range(rounds):
        for bf16 in (False, True):
            start = time.perf_counter()
            for _ in range(steps):
                step(bf16)
            rates[bf16].append(steps * batch / (time.perf_counter() - start))
    return {"fp32": statistics.median(rates[False]), "bf16": statistics.median(rates[True]),
            "isa": torch.backends.cpu.get_cpu_capability()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="training steps per round (default 20)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per precision (default 3)")
    parser.add_argument("--batch", type=int, default=128, help="batch size (default 128, experiment=mnist_fast's)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.steps, args.rounds, args.batch)))
        return

    from bench_time_to_accuracy import cpu_model

    print(f"MNIST CNN training step, batch {args.batch}, {args.steps} steps x {args.rounds} rounds, "
          f"{cpu_model()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, {time.strftime('%Y-%m-%d')}")
    print("| instruction set | float32 samples/s | bf16-mixed samples/s | bf16 / float32 |")
    print("|---|---:|---:|---:|")
    for row, onednn, aten in CAPS:
        env = dict(os.environ)
        env.update({k: v for k, v in (("ONEDNN_MAX_CPU_ISA", onednn), ("ATEN_CPU_CAPABILITY", aten)) if v})
        cmd = [sys.executable, __file__, "--worker", "--steps", str(args.steps), "--rounds", str(args.rounds),
               "--batch", str(args.batch)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{row}: failed\n{proc.stderr[-2000:]}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"| {row} | {r['fp32']:.0f} | {r['bf16']:.0f} | **{r['bf16'] / r['fp32']:.2f}x** |", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
