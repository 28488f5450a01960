"""`+tune=lr_find`: Lightning's range test on a real (tiny) run; the suggestion is where the recorded loss falls fastest."""

import json

import numpy as np
import pytest
from matplotlib.image import imread
from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

from gradlab.observe.events import read_scalars
from helpers import only_run_dir, run_cli, tiny_mnist_args


@pytest.mark.slow
def test_lr_find_suggests_the_steepest_descent_and_trains_with_it(mnist_root, tmp_path):
    out = tmp_path / "out"
    short = ["trainer.max_steps=3", "test=false", "trainer.log_every_n_steps=1"]
    proc = run_cli("train.py", *tiny_mnist_args(mnist_root, out), "+tune=lr_find", "tune.apply=true",
                   "tune.num_training=60", "tune.min_lr=1e-5", "tune.max_lr=1", *short, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = only_run_dir(out)
    curve = json.loads((run_dir / "lr_find.json").read_text())
    lr, loss, suggested = np.array(curve["lr"]), np.array(curve["loss"]), curve["suggested_lr"]
    assert len(lr) >= 20 and np.all(np.diff(lr) > 0)

    # The slope of the recorded (smoothed) loss per decade of lr; the first 10 points are the smoothing's warm-up.
    slope = np.gradient(loss, np.log10(lr))
    fastest = slope[10:].min()
    at = int(np.argmin(np.abs(lr - suggested)))
    assert fastest < 0 and at >= 10
    assert slope[at] <= 0.5 * fastest, (suggested, slope[at], fastest)  # the loss falls at least half as fast there
    assert lr[at] < lr[np.argmin(loss)]  # ... on the way down, before the loss is lowest (beyond, it diverges)

    assert imread(run_dir / "lr_find.png").ndim == 3  # a real PNG
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={IMAGES: 0})
    acc.Reload()
    assert "lr_find/loss_vs_lr" in acc.Tags()[IMAGES]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["suggested_lr"] == pytest.approx(suggested)
    # tune.apply=true: training ran with the suggestion (LearningRateMonitor's record of the optimizer's lr).
    lrs = read_scalars(run_dir / "tensorboard", prefix="lr-")
    assert [v for _, v in lrs["lr-Adam"]] == pytest.approx([suggested] * 3, rel=1e-6)
    # ... and the training after the range test is the run one gets by setting that lr: same weights, same batches.
    plain = tmp_path / "plain"
    proc = run_cli("train.py", *tiny_mnist_args(mnist_root, plain), f"optimizer.lr={suggested!r}", *short, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plain_dir = only_run_dir(plain)
    assert read_scalars(plain_dir / "tensorboard", prefix="train/loss") == \
        read_scalars(run_dir / "tensorboard", prefix="train/loss")
