"""The first command on a machine without internet, console lines printed once, plain progress on a pipe, and a
train-only folder of gzipped IDX files: what a newcomer sees of `python train.py`."""

import gzip
import json
import math
import os
import re

import pytest

from conftest import ONE_THREAD
from gradlab.data.mnist import SAMPLE_NOTE
from helpers import ROOT, fake_digits, only_run_dir, run_cli, write_idx

# Python imports tests/no_internet/sitecustomize.py at start-up: every connection beyond loopback fails at once.
NO_INTERNET = {"PYTHONPATH": os.pathsep.join(p for p in (str(ROOT / "tests" / "no_internet"),
                                                          os.environ.get("PYTHONPATH")) if p),
               "GRADLAB_ROOT": ".", **ONE_THREAD}  # GRADLAB_ROOT as if unset: data/ and logs/ under the cwd
PROGRESS = re.compile(r"epoch (\d+)/(\d+)  step (\d+)/(\d+)  train/loss (\S+)  val/acc (\S+)  ([\d,]+) samples/s  "
                      r"ETA (\d+:\d\d:\d\d)$")


def progress_lines(text: str) -> list[tuple]:
    """(epoch, epochs, step, steps, train/loss, val/acc or None, samples/s, ETA) of each plain progress line."""
    rows = []
    for line in text.splitlines():
        match = PROGRESS.search(line)
        if match:
            e, es, s, ss, loss, acc, rate, eta = match.groups()
            rows.append((int(e), int(es), int(s), int(ss), float(loss), None if acc == "-" else float(acc),
                         int(rate.replace(",", "")), eta))
    return rows


def assert_each_line_once(proc, train_log: str) -> None:
    console = proc.stdout + proc.stderr
    for line in ("GPU available: False", "Trainer already configured with model summary callbacks"):
        assert console.count(line) == 1, (line, console[-3000:])
        assert train_log.count(line) == 1
    for advert in ("Tip:", "litlogger", "litmodels", "LeafSpec"):
        assert advert not in console and advert not in train_log


# ---- the README's first command ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def readme_run(tmp_path_factory):
    """`python train.py` in an empty folder, offline, output to a pipe (as in CI): (process, run dir)."""
    cwd = tmp_path_factory.mktemp("fresh_clone")
    proc = run_cli("train.py", cwd=cwd, env=NO_INTERNET, timeout=900, fresh=True)  # a new interpreter, as typed
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc, only_run_dir(cwd)


@pytest.mark.slow
def test_readme_first_command_trains_on_the_shipped_sample_offline(readme_run):
    proc, run_dir = readme_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["data"] == SAMPLE_NOTE and metrics["status"] == "completed"
    assert 0.85 < metrics["test/acc"] <= 1.0  # 1,000 real held-out digits; chance is 0.1
    assert metrics["steps"] == metrics["epochs"] * 58  # 3,667 training digits in batches of 64
    # One loud line, and none of torchvision's mirror-by-mirror download errors.
    assert proc.stderr.count("MNIST could not be downloaded") == 1
    assert "data.allow_sample=false" in proc.stderr
    for chatter in ("Failed to download", "Tried http", "Error downloading", "Traceback"):
        assert chatter not in proc.stdout + proc.stderr


@pytest.mark.slow
def test_readme_first_command_prints_each_line_once_and_progress(readme_run):
    proc, run_dir = readme_run
    assert_each_line_once(proc, (run_dir / "train.log").read_text())
    rows = progress_lines(proc.stdout)
    epochs = json.loads((run_dir / "metrics.json").read_text())["epochs"]
    assert {r[0] for r in rows} == set(range(1, epochs + 1))
    assert all(r[1] == epochs and r[3] == epochs * 58 for r in rows)
    assert rows[-1][2] == epochs * 58 and rows[-1][7] == "0:00:00"
    assert [r[2] for r in rows] == sorted(r[2] for r in rows) and all(math.isfinite(r[4]) for r in rows)
    assert progress_lines((run_dir / "train.log").read_text()) == rows


# ---- a train-only folder of .gz files, on a pipe --------------------------------------------------------------
@pytest.fixture(scope="module")
def train_only_run(tmp_path_factory):
    """Fashion-MNIST's two train files only, gzipped as downloaded; 2 epochs, a progress line after every batch."""
    root = tmp_path_factory.mktemp("fashion_train_only")
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    images, labels = fake_digits(140, seed=0)
    for name, array in (("train-images-idx3-ubyte", images), ("train-labels-idx1-ubyte", labels)):
        write_idx(raw / name, array)
        (raw / f"{name}.gz").write_bytes(gzip.compress((raw / name).read_bytes()))
        (raw / name).unlink()
    out = tmp_path_factory.mktemp("train_only_out")
    proc = run_cli("train.py", "data=fashion_mnist", f"data.root={root}", "data.download=false", "test=false",
                   f"paths.root_dir={out}", "data.val_size=12", "data.batch_size=32", "trainer.max_epochs=2",
                   "callbacks.plain_progress.every_n_minutes=1e-9", cwd=out, env=ONE_THREAD)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc, only_run_dir(out)


def test_train_only_gzipped_folder_trains_with_test_false(train_only_run):
    proc, run_dir = train_only_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == 2 * 4 and "val/acc" in metrics  # 128 training images in batches of 32
    assert "test/acc" not in metrics and "data" not in metrics
    assert "has no test split: training works, testing will not" in proc.stdout


def test_console_prints_each_line_once_without_adverts(train_only_run):
    proc, run_dir = train_only_run
    assert_each_line_once(proc, (run_dir / "train.log").read_text())


def test_plain_progress_lines_on_a_pipe(train_only_run):
    proc, run_dir = train_only_run
    rows = progress_lines(proc.stdout)
    # A line after each of the 8 batches (every_n_minutes ~0), and one at each epoch's end after validation.
    assert [r[2] for r in rows] == [1, 2, 3, 4, 4, 5, 6, 7, 8, 8]
    assert [r[0] for r in rows] == [1] * 5 + [2] * 5 and all(r[1] == 2 and r[3] == 8 for r in rows)
    assert [r[5] is None for r in rows] == [True] * 4 + [False] * 6  # val/acc once the first validation ran
    assert all(math.isfinite(r[4]) and r[4] > 0 and r[6] > 0 for r in rows)
    assert rows[-1][7] == "0:00:00"
    # The lines replace the rich bar, which without a terminal would print only its last frame, at the end.
    assert "Epoch 1/1" not in proc.stdout and "━━ 4/4" not in proc.stdout
    assert progress_lines((run_dir / "train.log").read_text()) == rows
