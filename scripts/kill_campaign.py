"""SIGKILL a training run at random moments, resume it with ckpt_path=last after each kill, and check nothing is lost.

    python scripts/kill_campaign.py --kills 24            # ~10 min on 2 busy cores; prints a table, exit 1 on any loss
    python scripts/kill_campaign.py --kills 4 --seed 1    # what tests/test_kill_campaign.py runs

The run: the MNIST CNN (dropout, so the RNG state matters) on a tiny MNIST in the real IDX format, 3 epochs of
7 steps, last.ckpt every 2 steps (callbacks.resume.every_n_train_steps=2) besides the epoch-end checkpoints, so
that many moments fall inside a checkpoint write. Kinds of kill (tests/faults.py KillAt):
  batch  in the middle of a training batch (after backward, before the update)
  val    during validation
  test   during the test stage (after training finished)
  ckpt   during a checkpoint write, after a random fraction of its bytes reached the disk (or all, before the rename)
After every kill: every *.ckpt of the run loads with gradlab.checkpoints.load.load. Every resume must run until its next
kill or to the end. A life ends with a test kill or after --per-life kills; its last resume runs to the end and its
metrics.json must equal the uninterrupted run's, number for number.
"""

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the fault injectors and data writers of the test suite
from helpers import run_cli, tiny_mnist_args, write_mnist  # noqa: E402

KINDS = ("batch", "val", "test", "ckpt")
EPOCHS, STEPS_PER_EPOCH, VAL_BATCHES, TEST_BATCHES = 3, 7, 2, 2  # 200 train / 40 val / 60 test images, batch 32
COMPARED = ("train/loss", "train/acc", "val/loss", "val/acc", "val/acc_best", "test/loss", "test/acc", "epochs",
            "steps")


def run_args(data: Path, root: Path) -> list[str]:
    return [*tiny_mnist_args(data, root), f"trainer.max_epochs={EPOCHS}", "trainer.log_every_n_steps=1",
            "callbacks.resume.every_n_train_steps=2", "callbacks.grad_norm=null", "logger=csv"]


def kill_args(kind: str, **params) -> list[str]:
    return ["+callbacks.zz_kill._target_=faults.KillAt", f"+callbacks.zz_kill.kind={kind}",
            *[f"+callbacks.zz_kill.{k}={v}" for k, v in params.items()]]


def env() -> dict:
    return {"OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}


def the_run(root: Path) -> Path | None:
    """The run folder `ckpt_path=last` resumes (its newest last.ckpt); resumes continue in it."""
    found = list((root / "logs" / "train" / "runs").glob("*/checkpoints/last.ckpt"))
    return max(found, key=os.path.getmtime).parent.parent if found else None


def saved_step(run: Path | None) -> int:
    import torch

    last = run / "checkpoints" / "last.ckpt" if run else None
    return torch.load(last, map_location="cpu", weights_only=True)["global_step"] if last and last.exists() else 0


def unreadable_checkpoints(root: Path) -> list[str]:
    """Every checkpoint this life wrote, in any of its run folders, through the loader eval/predict/resume use."""
    from gradlab.checkpoints.load import load
    from gradlab.errors import UserError

    bad = []
    for path in sorted(root.rglob("*.ckpt")):
        try:
            load(str(path))
        except UserError as err:
            bad.append(f"{path.name}: {err}")
    return bad


def choose(rng: random.Random, counts: Counter, step: int) -> tuple[str, dict]:
    """The kind with the fewest kills so far among those still reachable, and a random moment of it."""
    total = EPOCHS * STEPS_PER_EPOCH
    reachable = ["test", "ckpt"] + (["batch", "val"] if step < total else [])
    if step >= total:
        reachable.remove("ckpt")  # a finished fit writes no checkpoint any more
    fewest = min(counts[k] for k in reachable)
    kind = rng.choice([k for k in reachable if counts[k] == fewest])
    if kind == "batch":
        return kind, {"at": rng.randint(step + 1, total)}
    if kind == "val":
        return kind, {"at": rng.randint(step // STEPS_PER_EPOCH, EPOCHS - 1), "batch": rng.randrange(VAL_BATCHES)}
    if kind == "test":
        return kind, {"batch": rng.randrange(TEST_BATCHES)}
    # 1 in 4 after the last byte (before the rename), else a random cut; the first or second save from here.
    return kind, {"at": rng.randint(1, 2 if step + 4 <= total else 1),
                  "fraction": 1.0 if rng.random() < 0.25 else round(rng.random(), 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=24, help="kills in all (default 24)")
    parser.add_argument("--per-life", type=int, default=5, help="most kills of one run before it may finish")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: a new temp folder)")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    out = args.out or Path(tempfile.mkdtemp(prefix="kill_campaign_"))
    data = write_mnist(out / "data")
    start = time.time()

    ref_root = out / "reference"
    proc = run_cli("train.py", *run_args(data, ref_root), cwd=out, env=env(), timeout=600)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        return 1
    reference = json.loads((the_run(ref_root) / "metrics.json").read_text())

    counts, failures, log, lives, processes = Counter(), [], [], 0, 1
    while sum(counts.values()) < args.kills:
        lives += 1
        root = out / f"life_{lives:02d}"
        in_life = 0
        while True:
            run = the_run(root)
            step = saved_step(run)
            finishing = in_life >= args.per_life or sum(counts.values()) >= args.kills
            kind, params = (None, {}) if finishing else choose(rng, counts, step)
            resume = ["ckpt_path=last"] if run else []
            proc = run_cli("train.py", *run_args(data, root), *resume, *(kill_args(kind, **params) if kind else []),
                           cwd=out, env=env(), timeout=600)
            processes += 1
            if kind is None:
                if proc.returncode != 0:
                    failures.append(f"life {lives}: the final resume failed (exit {proc.returncode}): "
                                    f"{proc.stderr[-800:]}")
                else:
                    got = json.loads((the_run(root) / "metrics.json").read_text())
                    diff = {k: (got.get(k), reference.get(k)) for k in COMPARED if got.get(k) != reference.get(k)}
                    if diff or got.get("status") != "completed":
                        failures.append(f"life {lives}: metrics differ from the uninterrupted run: {diff}")
                break
            if proc.returncode != -signal.SIGKILL:
                failures.append(f"life {lives}: {kind} {params} from step {step}: exit {proc.returncode}, "
                                f"not killed: {proc.stderr[-800:]}")
                break
            counts[kind] += 1
            in_life += 1
            bad = unreadable_checkpoints(root)
            failures += [f"life {lives}: after {kind} {params}: unreadable {b}" for b in bad]
            log.append(f"life {lives:2d}  from step {step:2d}  {kind:5s} {params}  -> last.ckpt at step "
                       f"{saved_step(the_run(root))}, {len(bad)} unreadable")
            print(log[-1], flush=True)
            if kind == "test":
                in_life = args.per_life  # training is over: resume to the end and compare
    print()
    print("| kind of kill | kills | resumed fine | unreadable checkpoints after it |")
    print("| --- | ---: | ---: | ---: |")
    for kind in KINDS:
        bad = sum(1 for f in failures if f" {kind} " in f)
        print(f"| {kind} | {counts[kind]} | {counts[kind] - bad} | {sum(1 for f in failures if 'unreadable' in f and f' {kind} ' in f)} |")
    print(f"\n{sum(counts.values())} kills in {lives} runs ({processes} train.py processes incl. the reference), "
          f"{time.time() - start:.0f} s; final metrics.json equal to the uninterrupted run's: "
          f"{lives - sum(1 for f in failures if 'final' in f or 'differ' in f)}/{lives}")
    for f in failures:
        print("FAILED:", f)
    print("all passed" if not failures else f"{len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
