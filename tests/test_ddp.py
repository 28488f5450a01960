"""DDP on this machine: trainer=ddp_cpu (2 gloo processes) through the real CLI, inside a multirun."""

import json
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gradlab.run.ddp import child_argv
from helpers import run_cli, tiny_mnist_args


def test_child_gets_this_jobs_overrides_and_hydra_flags_but_no_sweep():
    argv = ["train.py", "-m", "--config-name", "train", "optimizer.lr=0.1,0.01", "hydra/launcher=basic", "-cd=conf2"]
    task = ["optimizer.lr=0.01", "seed=3"]
    assert child_argv(argv, task) == ["train.py", "--config-name", "train", "-cd=conf2",
                                      "optimizer.lr=0.01", "seed=3", "hydra.mode=RUN"]


@pytest.fixture(scope="module")
def ddp_sweep(mnist_root, tmp_path_factory):
    """Job 0 and 2 run DDP, job 1 one process. Job 2 only starts its ranks if job 0 cleaned up after itself."""
    out = tmp_path_factory.mktemp("ddp")
    proc = run_cli("train.py", "-m", *tiny_mnist_args(mnist_root, out), "trainer.max_epochs=1",
                   "trainer.log_every_n_steps=1", "trainer=ddp_cpu,cpu,ddp_cpu", cwd=out, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep,) = (out / "logs" / "train" / "multiruns").iterdir()
    return out, sweep


def metrics_of(job_dir: Path) -> dict:
    return json.loads((job_dir / "metrics.json").read_text())


@pytest.mark.slow
def test_ddp_jobs_write_one_run_dir_one_set_of_logs_and_the_same_metrics(ddp_sweep):
    out, sweep = ddp_sweep
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1", "2"]
    assert not (out / "logs" / "train" / "runs").exists()  # rank 1 found the job's dir, made none of its own
    single = metrics_of(sweep / "1")
    for job in ("0", "2"):
        ddp = metrics_of(sweep / job)
        assert ddp["status"] == "completed" and "trainer=ddp_cpu" in ddp["overrides"]
        assert ddp.keys() == single.keys()
        # 200 training images: ceil(100 / 32) = 4 steps per rank, against ceil(200 / 32) = 7 in one process.
        assert (ddp["steps"], single["steps"]) == (4, 7)
        events = sorted((sweep / job / "tensorboard").glob("events.out.tfevents.*"))
        # events.out.tfevents.<time>.<host>.<pid>.<n>: every file from one process.
        assert len({e.name.rsplit(".", 2)[1] for e in events}) == 1 and len(events) >= 1
        assert len(list((sweep / job).rglob(".hydra"))) == 1 and len(list((sweep / job).rglob("*.ckpt"))) == 2
        # each rank's RNG state is in the checkpoint, for resume to give back to that rank
        ckpt = torch.load(sweep / job / "checkpoints" / "last.ckpt", weights_only=True)
        (state,) = [v for k, v in ckpt["callbacks"].items() if "ResumeCheckpoint" in k]
        per_rank = state["rng_per_rank"]
        assert len(per_rank) == 2 and all(r["torch"].dtype == torch.uint8 for r in per_rank)
        assert torch.equal(per_rank[0]["torch"], state["rng"]["torch"])  # rank 0's own, as saved before


@pytest.mark.slow
def test_ddp_validation_metrics_cover_both_ranks(ddp_sweep, mnist_root):
    """val/* of a DDP job equal the same metrics recomputed on the whole val split from the saved weights."""
    from gradlab.data.mnist import MNISTDataModule
    from gradlab.models.cnn import MnistCNN

    _, sweep = ddp_sweep
    metrics = metrics_of(sweep / "0")
    state = torch.load(sweep / "0" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    net = MnistCNN()
    net.load_state_dict({k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")})
    dm = MNISTDataModule(root=str(mnist_root), download=False, val_size=40)
    dm.setup("fit")
    x, y = dm.val_set.tensors  # 40 images: 20 per rank
    with torch.no_grad():
        out = net.eval()(x)
    assert (out.argmax(1) == y).float().mean().item() == pytest.approx(metrics["val/acc"], abs=1e-6)
    assert torch.nn.functional.nll_loss(out, y).item() == pytest.approx(metrics["val/loss"], rel=1e-4)


@pytest.mark.slow
def test_ddp_gradient_norms_are_logged_once_per_step(ddp_sweep):
    _, sweep = ddp_sweep
    acc = EventAccumulator(str(sweep / "0" / "tensorboard"))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("grad_norm/total")]
    assert steps == list(range(metrics_of(sweep / "0")["steps"]))
