"""The GPU paths of gradlab, run once on a real GPU, as one table (called by scripts/gpu_check.sh).

    python scripts/gpu_check.py --out /tmp/gpu --mnist DIR --imdb DIR        # on a CUDA machine, ~6 minutes
    python scripts/gpu_check.py --out /tmp/gpu --device cpu --quick           # the same sections on CPU, tiny

Every section runs even when an earlier one fails; each gives one row: what ran, the figures, ok/FAILED.
  cuda tests      `pytest -m cuda`: gradchecks of the hand-written Functions on the device, float32 and bf16 steps
  cnn epoch       one epoch of real MNIST digits through train.py, float32 and bf16-mixed: samples/s, s per epoch
  cnn steady      a 60,000-image MNIST-shaped set: train.py's steady samples/s beside a plain PyTorch loop's
  cnn ablation    the same run with parts taken away (the NaN guard, the instruments, every callback) beside a
                  plain loop, a plain loop with a host sync per step, and bare Lightning: where the time goes
  imdb gru        the imdb_gru recipe's step on packed, bucketed real reviews: reviews/s, projected 3 epochs
  mlp manual      the hand-written MLP against autograd on the device: step time ratio
  grad overhead   the gradient instruments logging every step against off (GPU: host syncs cost most)
  ddp             trainer=ddp on 1 device (NCCL on GPU), then a resume from its last.ckpt
  compile         torch.compile of the CNN: compile time, steady steps/s against eager
"""

import argparse
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # helpers.write_idx: the IDX writer the tests use
from helpers import write_idx  # noqa: E402

ROWS: list[tuple[str, str, str]] = []


def section(name: str):
    def wrap(fn):
        @functools.wraps(fn)
        def run(args):
            start = time.perf_counter()
            try:
                figures = fn(args)
                status = "ok"
            except Exception as err:  # a section's failure is a row, not the end of the check
                figures = f"{type(err).__name__}: {str(err).strip().splitlines()[-1][:160] if str(err).strip() else ''}"
                traceback.print_exc()
                status = "FAILED"
            ROWS.append((name, f"{figures} ({time.perf_counter() - start:.0f} s)", status))
            print(f"[{status}] {name}: {figures}", flush=True)
        return run
    return wrap


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def train(args, *overrides: str, timer: bool = True, root: str | None = None) -> dict:
    """One train.py run in a fresh process (under `root`, a new folder by default); returns its metrics.json
    plus the StepTimer's figures."""
    out = Path(root or tempfile.mkdtemp(dir=args.work))
    timer_file = out / "timer.json"
    trainer = "trainer=gpu" if args.device.startswith("cuda") else "trainer=cpu"
    cmd = [sys.executable, str(ROOT / "train.py"), trainer, f"paths.root_dir={out}", "callbacks.progress_bar=null",
           "callbacks.model_summary=null", *overrides]
    if timer:
        cmd.append(f"+callbacks.timer={{_target_:bench_timer.StepTimer,out:{timer_file},warmup:{args.warmup}}}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "scripts"),
                                                        os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=out, timeout=args.timeout)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip() and "HYDRA_FULL_ERROR" not in ln]
        raise RuntimeError(f"train.py exited {proc.returncode}: {lines[-1] if lines else '(no stderr)'}")
    metrics = json.loads(next(out.rglob("metrics.json")).read_text())
    if timer and timer_file.exists():
        metrics.update(json.loads(timer_file.read_text()))
    metrics["run_dir"], metrics["root"] = str(next(out.rglob("metrics.json")).parent), str(out)
    return metrics


def mnist_like(folder: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """A synthetic MNIST-shaped set in the real IDX format (random pixels, random labels): for speed only."""
    raw = folder / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, n, dtype=np.uint8))
    return folder


# ---- the sections -------------------------------------------------------------------------------------------
@section("cuda tests")
def cuda_tests(args) -> str:
    marker = "cuda" if args.device.startswith("cuda") else "not slow and cuda"
    # -n 0: one process collects the suite once (the suite's own -n 2 would start two workers that collect it too)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0", "-m", marker, "-p", "no:cacheprovider",
                           str(ROOT / "tests")], capture_output=True, text=True, cwd=ROOT, timeout=args.timeout)
    tail = [line for line in proc.stdout.splitlines() if " passed" in line or " failed" in line or "deselected" in line]
    summary = tail[-1].strip("= ") if tail else proc.stdout[-200:]
    if proc.returncode not in (0, 5) or "failed" in summary:  # 5: nothing collected, as on a machine without CUDA
        raise RuntimeError(summary)
    return summary


@section("cnn epoch (real digits)")
def cnn_epoch(args) -> str:
    if not args.mnist:
        return "skipped: no --mnist folder"
    parts = []
    for precision in ("32-true", "bf16-mixed"):
        m = train(args, "experiment=mnist_cnn", f"paths.data_dir={args.mnist}", "data.download=false",
                  "data.val_size=500", "trainer.max_epochs=1", f"trainer.precision={precision}",
                  *(["trainer.limit_train_batches=8"] if args.quick else []))
        parts.append(f"{precision}: {m['samples_per_s']:.0f} samples/s, test/acc {m.get('test/acc', float('nan')):.3f}, "
                     f"run {m['wall_time_s']:.1f} s")
    return "; ".join(parts)


@section("cnn steady (60k synthetic), gradlab vs plain loop")
def cnn_steady(args) -> str:
    n = 2_000 if args.quick else 60_000
    data = mnist_like(Path(args.work) / "synthetic", n, 1_000)
    steps = 20 if args.quick else 400
    ours = train(args, "experiment=mnist_cnn", f"paths.data_dir={data}", "data.download=false", "data.val_size=1000",
                 f"trainer.max_steps={steps}", "trainer.limit_val_batches=0", "test=false")["samples_per_s"]
    plain = plain_cnn_rate(args, steps)
    return f"gradlab {ours:.0f} samples/s, plain loop {plain:.0f} samples/s: ratio {ours / plain:.2f}x"


INSTRUMENTS = ("grad_norm", "grad_noise", "activations", "optimizer_state", "throughput", "grad_flow", "health",
               "layout")
PLUMBING = ("model_checkpoint", "resume", "lr_monitor", "plain_progress")


@section("cnn steady: where the time goes")
def cnn_ablation(args) -> str:
    """The same 60k-image steady run with parts of gradlab taken away, one at a time and then all: which part
    costs what against the plain loop (a GPU step of this CNN is ~2 ms, so host-side time per step shows)."""
    n = 2_000 if args.quick else 60_000
    data = mnist_like(Path(args.work) / "synthetic", n, 1_000)
    steps = 20 if args.quick else 400
    common = ["experiment=mnist_cnn", f"paths.data_dir={data}", "data.download=false", "data.val_size=1000",
              f"trainer.max_steps={steps}", "trainer.limit_val_batches=0", "test=false"]
    off = lambda names: [f"callbacks.{name}=null" for name in names]  # noqa: E731
    variants = {
        "default": [],
        "NaN guard warn": ["callbacks.grad_norm.on_nonfinite=warn"],
        "no instruments": off(INSTRUMENTS),
        "no callbacks": off(INSTRUMENTS + PLUMBING),
        "no callbacks, csv logger": [*off(INSTRUMENTS + PLUMBING), "logger=csv"],
    }
    plain = plain_cnn_rate(args, steps)
    synced = plain_cnn_rate(args, steps, sync_each_step=True)
    bare = bare_lightning_rate(args, steps)
    parts = [f"plain loop {plain:.0f}/s", f"plain loop + 1 host sync a step {synced:.0f}/s ({synced / plain:.2f}x)",
             f"bare Lightning {bare:.0f}/s ({bare / plain:.2f}x)"]
    for name, overrides in variants.items():
        rate = train(args, *common, *overrides)["samples_per_s"]
        parts.append(f"{name} {rate:.0f}/s ({rate / plain:.2f}x)")
    return "; ".join(parts)


def bare_lightning_rate(args, steps: int) -> float:
    """The same CNN and batches in a minimal LightningModule and a plain Trainer (no logger, no callbacks):
    Lightning's own cost per step."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from gradlab.data.tensor_loader import TensorBatches, identity_collate
    from gradlab.models.cnn import MnistCNN

    class Bare(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = MnistCNN()

        def training_step(self, batch, batch_idx):
            if batch_idx == args.warmup:
                sync(args.device)
                self.start = time.perf_counter()
            x, y = batch
            return torch.nn.functional.nll_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.Adadelta(self.parameters(), lr=1.0)

    device = torch.device(args.device)
    n = 64 * (args.warmup + steps)
    data = TensorBatches(torch.randn(n, 1, 28, 28, device=device), torch.randint(0, 10, (n,), device=device))
    module = Bare()
    trainer = pl.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, max_epochs=1,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=args.work)
    trainer.fit(module, DataLoader(data, batch_size=64, collate_fn=identity_collate))
    sync(args.device)
    return steps * 64 / (time.perf_counter() - module.start)


def plain_cnn_rate(args, steps: int, compile_: bool = False, sync_each_step: bool = False) -> float:
    """pytorch/examples' loop on device-resident random batches of 64: samples/s after warm-up. sync_each_step
    reads the loss on the host every step, as a NaN check does."""
    from gradlab.models.cnn import MnistCNN

    device = torch.device(args.device)
    net = MnistCNN().to(device)
    if compile_:
        net = torch.compile(net)
    optimizer = torch.optim.Adadelta(net.parameters(), lr=1.0)
    x = torch.randn(64, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (64,), device=device)
    for step in range(args.warmup + steps):
        if step == args.warmup:
            sync(args.device)
            start = time.perf_counter()
        optimizer.zero_grad()
        loss = torch.nn.functional.nll_loss(net(x), y)
        loss.backward()
        if sync_each_step:
            bool(torch.isfinite(loss))
        optimizer.step()
    sync(args.device)
    return steps * 64 / (time.perf_counter() - start)


@section("imdb gru (cuDNN, packed + bucketed real reviews)")
def imdb_gru(args) -> str:
    if not args.imdb:
        return "skipped: no --imdb folder"
    m = train(args, "experiment=imdb_gru", f"data.root={args.imdb}", "data.download=false", "data.val_size=500",
              "trainer.max_steps=" + ("10" if args.quick else "120"), "trainer.limit_val_batches=0", "test=false")
    per_s = m["samples_per_s"]
    return f"{per_s:.0f} reviews/s; the 3-epoch recipe (22,500 reviews an epoch) ~{3 * 22_500 / per_s / 60:.1f} min"


@section("mlp: hand-written backward vs autograd")
def mlp_manual(args) -> str:
    from gradlab.models.mlp import ManualMLP, classification_loss

    device = torch.device(args.device)
    rows = []
    for hidden, activation in (([512, 256], "relu"), ([256] * 20, "tanh")):
        times = {}
        for backend in ("manual", "autograd"):
            torch.manual_seed(0)
            net = ManualMLP(784, hidden, 10, activation, backend=backend).to(device)
            loss_fn = classification_loss(10, backend)
            optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
            x, y = torch.randn(256, 784, device=device), torch.randint(0, 10, (256,), device=device)
            samples = []
            for step in range(args.warmup + (20 if args.quick else 200)):
                sync(args.device)
                start = time.perf_counter()
                optimizer.zero_grad()
                loss_fn(net(x), y).backward()
                optimizer.step()
                sync(args.device)
                if step >= args.warmup:
                    samples.append(time.perf_counter() - start)
            times[backend] = statistics.median(samples)
        name = f"784-{'-'.join(map(str, hidden[:2]))}{'...' if len(hidden) > 2 else ''} {activation}"
        rows.append(f"{name}: {times['manual'] * 1e3:.2f} ms vs {times['autograd'] * 1e3:.2f} ms "
                    f"= {times['manual'] / times['autograd']:.2f}x")
    return "; ".join(rows)


@section("gradient instruments every step vs off")
def grad_overhead(args) -> str:
    data = mnist_like(Path(args.work) / "synthetic_small", 4_000, 500)
    steps = "20" if args.quick else "300"
    common = ["model=cnn", f"paths.data_dir={data}", "data.download=false", "data.val_size=500",
              f"trainer.max_steps={steps}", "trainer.limit_val_batches=0", "test=false"]
    off = train(args, *common, "callbacks.grad_norm=null")["samples_per_s"]
    on = train(args, *common, "callbacks.grad_norm.log_every_n_steps=1")["samples_per_s"]
    out = f"grad_norm every step: {100 * (off / on - 1):+.1f}% step time"
    default = ROOT / "conf" / "callbacks" / "default.yaml"
    if "grad_noise" in default.read_text():
        noise = train(args, *common, "callbacks.grad_norm=null", "callbacks.grad_noise.log_every_n_steps=1")
        out += f"; grad_noise every step: {100 * (off / noise['samples_per_s'] - 1):+.1f}%"
    return out


@section("ddp on 1 device, then resume")
def ddp_resume(args) -> str:
    data = mnist_like(Path(args.work) / "synthetic_small", 4_000, 500)
    strategy = ["trainer=ddp", "trainer.devices=1"] if args.device.startswith("cuda") else ["trainer=ddp_cpu",
                                                                                              "trainer.devices=1"]
    common = ["model=cnn", f"paths.data_dir={data}", "data.download=false", "data.val_size=500", "test=false",
              "trainer.limit_val_batches=2"]
    first = train(args, *strategy, *common, "trainer.max_steps=20", "callbacks.resume.every_n_train_steps=10",
                  timer=False)
    run_dir = first["run_dir"]
    last = Path(run_dir) / "checkpoints" / "last.ckpt"
    # A resumed run continues in the folder of the run it resumes, under the same root. The first run finished
    # (max_steps=20), so going on to 30 steps changes a finished run's settings: +resume.force=true says so.
    second = train(args, *strategy, *common, "trainer.max_steps=30", f"ckpt_path={last}", "+resume.force=true",
                   timer=False,
                   root=first["root"])
    if second["steps"] != 30:
        raise RuntimeError(f"resumed run ended at step {second['steps']}, expected 30")
    backend = "nccl" if args.device.startswith("cuda") else "gloo"
    return f"{backend}: 20 steps, last.ckpt, resumed to step {second['steps']}; val/acc {second.get('val/acc', 0):.3f}"


@section("torch.compile of the CNN")
def compile_cnn(args) -> str:
    steps = 10 if args.quick else 200
    eager = plain_cnn_rate(args, steps)
    start = time.perf_counter()
    compiled = plain_cnn_rate(args, steps, compile_=True)  # its warm-up steps include the compilation
    total = time.perf_counter() - start
    return (f"eager {eager:.0f} samples/s, compiled {compiled:.0f} samples/s ({compiled / eager:.2f}x); "
            f"compile + run {total:.0f} s")


SECTIONS = [cuda_tests, cnn_epoch, cnn_steady, cnn_ablation, imdb_gru, mlp_manual, grad_overhead, ddp_resume, compile_cnn]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for gpu_check.md (the table) and gpu_check.json")
    parser.add_argument("--mnist", help="a folder holding MNIST/raw/ (real digits)")
    parser.add_argument("--imdb", help="a folder holding aclImdb/train/{pos,neg}")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu, to try the script here")
    parser.add_argument("--quick", action="store_true", help="a few steps per section (to test the script)")
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of every rate")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per subprocess")
    parser.add_argument("--only", nargs="*", help="run only the sections whose name starts with one of these")
    args = parser.parse_args(argv)
    if args.quick:
        args.warmup = min(args.warmup, 2)  # a quick section trains only a few steps
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda, but torch sees no CUDA device; use --device cpu to try the script here.",
              file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.work = tempfile.mkdtemp(prefix="gradlab-gpu-check-")
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    header = (f"gradlab GPU check, {time.strftime('%Y-%m-%d %H:%M')}: {device}, torch {torch.__version__}, "
              f"CUDA {torch.version.cuda}, bf16 {torch.cuda.is_bf16_supported() if torch.cuda.is_available() else '-'}")
    print(header, flush=True)
    for run in SECTIONS:
        if not args.only or any(run.__name__.startswith(o) for o in args.only):
            run(args)
    lines = [header, "", "| section | result | status |", "| --- | --- | --- |",
             *(f"| {name} | {figures} | {status} |" for name, figures, status in ROWS)]
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    (out / "gpu_check.json").write_text(json.dumps({"header": header, "rows": ROWS}, indent=2))
    print("\n".join(lines))
    shutil.rmtree(args.work, ignore_errors=True)
    return 1 if any(status == "FAILED" for _, _, status in ROWS) else 0


if __name__ == "__main__":
    sys.exit(main())
