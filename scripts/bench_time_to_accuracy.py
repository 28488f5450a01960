"""Time to accuracy: `experiment=mnist_fast` against pytorch/examples mnist/main.py's 14 epochs, on Fashion-MNIST.

    python scripts/bench_time_to_accuracy.py --data DIR             # DIR holds FashionMNIST/raw/ (train files)
    python scripts/bench_time_to_accuracy.py --target 0.92 --peer-epochs 3 --fraction 0.1   # a quick look

The peer and ours run side by side, one process each and one thread each by default, so that whatever else loads
the machine loads all of them. The peer is pytorch/examples `main.py` with its default flags plus `--no-accel` (its
`Net` verbatim, ToTensor + Normalize per sample, DataLoader batch 64 without shuffling, as main.py does off
accelerators, Adadelta lr 1.0, StepLR x0.7 per epoch, seed 1, 14 epochs); only the dataset class (FashionMNIST) and
the split differ: both train on the same 55,000 images and evaluate on the same 5,000 held out (data.split_seed's
permutation). Ours is `train.py experiment=mnist_fast`, once per `--precisions` entry (auto, and 32-true for the
accuracy parity). All evaluate every `--every` of an epoch; a curve point's seconds are wall (and CPU) seconds
since the process was started (imports and data loading included) minus those spent in the evaluations. The target
accuracy defaults to the peer's final (14-epoch) validation accuracy. Prints the seconds each needs to reach it
and two ratios, with the CPU model: the peer's whole run (what main.py takes to reach its final accuracy) over
ours, and, stricter, the peer's first evaluation at or above the target over ours; draws docs/img/time_to_accuracy.png (wall and CPU seconds). `--replot` reports
from the curves kept in `--workdir`, also while the processes still run (the peer's last accuracy so far is then
the default target).
"""

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gradlab.run.precision import cpu_model

ROOT = Path(__file__).resolve().parents[1]
RAW = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
PEER, OURS = "pytorch/examples main.py", "gradlab mnist_fast"
VAL_SIZE, SPLIT_SEED = 5000, 12345  # conf/data/mnist.yaml's defaults: the split both recipes see (--val-size)


# ---- the peer: pytorch/examples mnist/main.py ---------------------------------------------------------------
def peer(data: str, epochs: int, every: float, fraction: float, out: str, val_size: int = VAL_SIZE) -> None:
    import torch
    import torch.nn.functional as F
    import torch.optim as optim
    from torch.optim.lr_scheduler import StepLR
    from torchvision import datasets, transforms

    from gradlab.models.reference_net import Net  # pytorch/examples' Net, verbatim

    t0, paused, cpu_paused = float(os.environ["BENCH_T0"]), 0.0, 0.0
    torch.manual_seed(1)
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    dataset1 = datasets.FashionMNIST(data, train=True, download=False, transform=transform)
    # The held-out split of gradlab's data module (same generator, same seed), instead of the test set.
    perm = torch.randperm(len(dataset1), generator=torch.Generator().manual_seed(SPLIT_SEED))
    train_idx = perm[val_size:][: int(fraction * (len(dataset1) - val_size))].tolist()
    train_set = torch.utils.data.Subset(dataset1, train_idx)
    val_set = torch.utils.data.Subset(dataset1, perm[:val_size].tolist())
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=64)  # no shuffle: main.py off accelerators
    test_loader = torch.utils.data.DataLoader(val_set, batch_size=1000)
    model = Net()
    optimizer = optim.Adadelta(model.parameters(), lr=1.0)
    scheduler = StepLR(optimizer, step_size=1, gamma=0.7)
    checks = max(1, round(1 / every))
    check_at = {round(len(train_loader) * k / checks) for k in range(1, checks + 1)}
    samples = 0

    def test() -> float:  # main.py's test(), returning the accuracy
        model.eval()
        correct = 0
        with torch.no_grad():
            for data, target in test_loader:
                output = model(data)
                pred = output.argmax(dim=1, keepdim=True)
                correct += pred.eq(target.view_as(pred)).sum().item()
        model.train()
        return correct / len(test_loader.dataset)

    for epoch in range(1, epochs + 1):
        model.train()
        for batch_idx, (data, target) in enumerate(train_loader):  # main.py's train()
            optimizer.zero_grad()
            output = model(data)
            loss = F.nll_loss(output, target)
            loss.backward()
            optimizer.step()
            samples += len(data)
            if batch_idx % 10 == 0:  # main.py's --log-interval 10
                print(f"Train Epoch: {epoch} [{batch_idx * len(data)}/{len(train_loader.dataset)}]\tLoss: "
                      f"{loss.item():.6f}", flush=True)
            if batch_idx + 1 in check_at:
                start, cpu_start = time.time(), time.process_time()
                acc = test()
                with open(out, "a") as f:
                    f.write(json.dumps({"s": start - t0 - paused, "cpu_s": cpu_start - cpu_paused,
                                        "samples": samples, "acc": acc, "epoch": epoch}) + "\n")
                paused += time.time() - start
                cpu_paused += time.process_time() - cpu_start
        scheduler.step()


# ---- the parent ---------------------------------------------------------------------------------------------
def prepared_root(data: str, tmp: str) -> str:
    """A root whose FashionMNIST/raw/ torchvision can read: the .gz files unpacked, the test pair linked to train.

    torchvision checks that all four IDX files exist; the train-only folder has no test split, and neither recipe
    reads it (both evaluate on the held-out part of train), so the train files stand in for it.
    """
    src, dst = Path(data) / "FashionMNIST" / "raw", Path(tmp) / "data" / "FashionMNIST" / "raw"
    dst.mkdir(parents=True)
    for name in RAW:
        if (src / name).exists():
            shutil.copyfile(src / name, dst / name)
        elif (src / f"{name}.gz").exists():
            with gzip.open(src / f"{name}.gz") as f_in, open(dst / name, "wb") as f_out:
                shutil.copyfileobj(f_in, f_out)
        else:
            sys.exit(f"{src} has neither {name} nor {name}.gz: pass --data a folder holding FashionMNIST/raw/.")
        (dst / name.replace("train", "t10k")).symlink_to(dst / name)
    return str(dst.parents[1])


def peer_cmd(root: str, args, out: str) -> list[str]:
    return [sys.executable, __file__, "--worker", "peer", "--data", root, "--peer-epochs", str(args.peer_epochs),
            "--every", str(args.every), "--fraction", str(args.fraction), "--val-size", str(args.val_size), "--out", out]


def ours_cmd(root: str, args, precision: str, out: str, work: str) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), "experiment=mnist_fast", "data=fashion_mnist",
            f"data.root={root}", "data.download=false", "test=false", f"paths.root_dir={work}",
            f"data.val_size={args.val_size}",
            f"trainer.precision={precision}", f"trainer.val_check_interval={args.every}",
            f"trainer.limit_train_batches={args.fraction}", "callbacks.progress_bar=null",
            "callbacks.model_summary=null",
            f"+callbacks.clock={{_target_:bench_timer.AccuracyClock,out:{out}}}", *args.overrides]


def start(cmd: list[str], log_path: str, threads) -> subprocess.Popen:
    """`cmd` in a fresh process whose clock starts now (BENCH_T0), output to `log_path`."""
    env = {**os.environ, "BENCH_T0": repr(time.time()),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "scripts"), os.environ.get("PYTHONPATH", "")])}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    log = open(log_path, "w")
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    RUNNING.append(proc)
    return proc


RUNNING: list[subprocess.Popen] = []


def finish(proc: subprocess.Popen, out: str, log_path: str) -> list[dict]:
    if proc.wait() != 0:
        for other in RUNNING:  # the others' curves would be of no use without this one
            other.kill()
        sys.exit(f"failed ({proc.returncode}): {' '.join(proc.args)}; its output: {log_path}")
    return [json.loads(line) for line in Path(out).read_text().splitlines()]


def seconds_to(curve: list[dict], target: float, clock: str = "s"):
    """Seconds (`s` wall, `cpu_s` CPU) of the first evaluation at or above `target` (None if never)."""
    return next((p[clock] for p in curve if p["acc"] >= target - 1e-9), None)


def _s(t) -> str:
    return "never" if t is None else f"{t:.1f}"


def _ratio(peer_t, t) -> str:
    return "n/a" if peer_t is None or t is None else f"**{peer_t / t:.2f}x**"



def plot(curves: dict[str, list[dict]], target: float, path: Path, title: str) -> None:
    """Validation accuracy against wall seconds (left) and CPU seconds (right), evaluations excluded from both."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    low = max(75, 100 * min(p["acc"] for c in curves.values() for p in c) - 1)
    for ax, clock, label in zip(axes, ("s", "cpu_s"), ("wall seconds", "CPU seconds (all threads)")):
        for (name, curve), style in zip(curves.items(), ("-o", "-s", "--^", ":v")):
            ax.plot([p[clock] for p in curve], [100 * p["acc"] for p in curve], style, ms=3, label=name)
        ax.axhline(100 * target, color="grey", lw=0.8, ls=":", label=f"target {100 * target:.2f}%")
        ax.set_xlabel(f"{label}, evaluations excluded")
        ax.set_ylim(low, None)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation accuracy (%)")
    axes[1].legend(loc="lower right", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT / "data"),
                        help="a folder holding FashionMNIST/raw/ (IDX or .gz files; default ./data, where "
                             "python train.py data=fashion_mnist downloads it)")
    parser.add_argument("--target", type=float, default=None,
                        help="validation accuracy to reach, in [0, 1] (default: the peer's final accuracy)")
    parser.add_argument("--peer-epochs", type=int, default=14, help="the peer's epochs (default 14, main.py's)")
    parser.add_argument("--val-size", type=int, default=VAL_SIZE,
                        help="images held out of the training file, the same ones for both (default 5,000)")
    parser.add_argument("--every", type=float, default=0.25, help="evaluate every this fraction of an epoch")
    parser.add_argument("--fraction", type=float, default=1.0,
                        help="train on this fraction of the 55,000 (quick looks)")
    parser.add_argument("--precisions", default="auto,32-true",
                        help="our runs, all beside the peer, by trainer.precision (default auto,32-true: bf16 "
                             "here, and float32 from the same seed for the accuracy parity)")
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP_NUM_THREADS of each process (default: 1 side by side, torch's own with "
                             "--sequential; 0: torch's)")
    parser.add_argument("--sequential", action="store_true",
                        help="one process at a time, each with the whole machine (torch's default threads, as "
                             "main.py runs by default): wall seconds as a user sees them; needs an idle machine")
    parser.add_argument("--workdir", default=None, help="keep curves and outputs here (default: a temporary folder)")
    parser.add_argument("--replot", action="store_true", help="only redraw and report from the curves in --workdir")
    parser.add_argument("--plot", default=str(ROOT / "docs" / "img" / "time_to_accuracy.png"))
    parser.add_argument("overrides", nargs="*", help="extra train.py overrides for our recipe")
    parser.add_argument("--worker", choices=["peer"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads is None:
        args.threads = 0 if args.sequential else 1
    if args.worker:
        return peer(args.data, args.peer_epochs, args.every, args.fraction, args.out, args.val_size)
    if args.replot:  # e.g. after stopping a long run: the curves written so far
        work = Path(args.workdir)
        curves = {PEER: [json.loads(line) for line in (work / "peer.jsonl").read_text().splitlines()]}
        for precision in args.precisions.split(","):
            path = work / f"ours-{precision}.jsonl"
            if path.exists():
                curves[f"{OURS}, precision={precision}"] = [json.loads(x) for x in path.read_text().splitlines()]
        return report(curves, args.target if args.target is not None else curves[PEER][-1]["acc"], args)

    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or tmp
        os.makedirs(work, exist_ok=True)
        root = prepared_root(args.data, tmp)
        # Side by side (the default), whatever else loads the machine loads all of them alike; --sequential gives
        # each process the whole machine in turn.
        peer_out, peer_log = os.path.join(work, "peer.jsonl"), os.path.join(work, "peer.log")
        peer_proc = start(peer_cmd(root, args, peer_out), peer_log, args.threads)
        print(f"peer started ({args.peer_epochs} epochs); output {peer_log}", flush=True)
        if args.sequential:
            peer_curve = finish(peer_proc, peer_out, peer_log)
            print(f"  peer: last {100 * peer_curve[-1]['acc']:.2f}% at {peer_curve[-1]['s']:.1f} s", flush=True)
        ours = {}
        for precision in args.precisions.split(","):
            out, log = os.path.join(work, f"ours-{precision}.jsonl"), os.path.join(work, f"ours-{precision}.log")
            ours[precision] = start(ours_cmd(root, args, precision, out, work), log, args.threads), out, log
            if args.sequential:
                ours[precision][0].wait()
        curves: dict[str, list[dict]] = {}
        for precision, (proc, out, log) in ours.items():
            curve = curves[f"{OURS}, precision={precision}"] = finish(proc, out, log)
            print(f"  ours, precision={precision}: {len(curve)} evaluations, last {100 * curve[-1]['acc']:.2f}% at "
                  f"{curve[-1]['s']:.1f} s", flush=True)
        curves = {PEER: finish(peer_proc, peer_out, peer_log), **curves}
        print(f"  peer: last {100 * curves[PEER][-1]['acc']:.2f}% at {curves[PEER][-1]['s']:.1f} s", flush=True)
    target = args.target if args.target is not None else curves[PEER][-1]["acc"]
    report(curves, target, args)


def report(curves: dict[str, list[dict]], target: float, args) -> None:
    """The issue's measure: our seconds to `target` against the peer's whole run (its 14 epochs, which is what it
    takes to reach its final accuracy, the default target); beside it, the stricter ratio against the peer's
    first evaluation at or above the target."""
    table = {name: (seconds_to(c, target, "s"), seconds_to(c, target, "cpu_s")) for name, c in curves.items()}
    peer_s, peer_cpu = table.pop(PEER)
    full_s, full_cpu = curves[PEER][-1]["s"], curves[PEER][-1]["cpu_s"]
    threads = f"{args.threads} thread(s) each" if args.threads else "torch's default threads"
    threads += ", one process at a time" if getattr(args, "sequential", False) else ", side by side"
    print(f"\nTime to {100 * target:.2f}% validation accuracy (Fashion-MNIST, 55,000 train / 5,000 held out), "
          f"{cpu_model()}, {os.cpu_count()} cores, {threads}, {time.strftime('%Y-%m-%d')}")
    print("| run | wall s | CPU s | peer's whole run / ours (wall, CPU) | peer's first at target / ours (wall, CPU) |")
    print("|---|---:|---:|---:|---:|")
    print(f"| {PEER}, all {args.peer_epochs} epochs, float32 | {full_s:.1f} | {full_cpu:.1f} | 1.00x, 1.00x | |")
    print(f"| {PEER}, first evaluation at the target | {_s(peer_s)} | {_s(peer_cpu)} | | 1.00x, 1.00x |")
    for name, (t, cpu) in table.items():
        print(f"| {name} | {_s(t)} | {_s(cpu)} | {_ratio(full_s, t)}, {_ratio(full_cpu, cpu)} | "
              f"{_ratio(peer_s, t)}, {_ratio(peer_cpu, cpu)} |")
    for name, curve in curves.items():
        best = max(curve, key=lambda p: p["acc"])
        print(f"{name}: final {100 * curve[-1]['acc']:.2f}%, best {100 * best['acc']:.2f}% "
              f"(at {best['cpu_s']:.0f} CPU s)")
    title = (f"Fashion-MNIST, time to {100 * target:.2f}% val acc: {cpu_model()} ({os.cpu_count()} cores), "
             f"{time.strftime('%Y-%m-%d')}")
    plot(curves, target, Path(args.plot), title)
    print(f"curves: {args.plot}")


if __name__ == "__main__":
    main()
