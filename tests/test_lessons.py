"""The lesson scripts run tiny, in-process: their numbers checked against torch autograd, their pictures read back."""

import math

import matplotlib.image
import pytest
import torch
from torch.utils.tensorboard import SummaryWriter

from gradlab.data.toy import lesson_data
from gradlab.errors import UserError
from helpers import load_script


def assert_png(path, min_h=200, min_w=400):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(path)
    assert image.shape[0] >= min_h and image.shape[1] >= min_w
    assert image[..., :3].std() > 0.05  # something was drawn


def test_vanishing_gradients_shows_the_lesson_with_autograd_checked_norms(tmp_path):
    script = load_script("vanishing_gradients")
    out = tmp_path / "vanishing.png"
    results = script.main(["--depth", "6", "--width", "16", "--steps", "3", "--samples", "256", "--batch-size", "64",
                           "--out", str(out)])
    assert list(results) == ["sigmoid", "tanh", "relu", "relu + batch norm"]
    assert_png(out)

    # The hand-written backward's init norms, recomputed by torch autograd on the same weights and batch.
    x, y, classes = lesson_data(None, 256, 0)
    for variant in ("sigmoid", "relu + batch norm"):
        net = script.build(variant, 2, classes, 6, 16, "autograd", 0)
        torch.nn.functional.cross_entropy(net(x[:64]), y[:64]).backward()
        norms = [p.grad.norm().item() for p in net.parameters() if p.ndim == 2]
        assert results[variant]["init"] == pytest.approx(norms, rel=1e-4)
        assert len(norms) == 7  # 6 hidden layers + the output layer

    def first_over_last(variant):
        return results[variant]["init"][0] / results[variant]["init"][-1]

    # Sigmoid's σ' <= 1/4 per layer: its first layer gets orders of magnitude less than its last.
    assert first_over_last("sigmoid") < 1e-2
    assert first_over_last("sigmoid") < first_over_last("relu + batch norm") / 100
    assert first_over_last("sigmoid") < first_over_last("tanh") / 100

    # The health report's verdicts (gradlab.observe.health_rules) on each variant's training steps: sigmoid is flagged.
    verdicts = {variant: [f.verdict for f in r["report"].findings] for variant, r in results.items()}
    assert "vanishing" in verdicts["sigmoid"]
    assert all("vanishing" not in verdicts[v] for v in ("tanh", "relu", "relu + batch norm"))


def test_lr_demo_small_crawls_good_drops_huge_diverges(tmp_path):
    script = load_script("lr_demo")
    out = tmp_path / "lr.png"
    curves = script.main(["--lrs", "0.0001", "0.3", "1000", "--steps", "40", "--samples", "512", "--out", str(out)])
    assert list(curves) == ["lr 0.0001", "lr 0.3", "lr 1000"]
    tiny, good, huge = curves.values()
    assert tiny["loss"][0] == good["loss"][0] == huge["loss"][0]  # the same weights and first batch for all
    assert tiny["diverged_at"] is None and good["diverged_at"] is None and huge["diverged_at"] is not None
    assert len(tiny["loss"]) == 40 and len(huge["loss"]) == huge["diverged_at"] < 40
    assert abs(tiny["loss"][-1] - tiny["loss"][0]) < 0.05 * tiny["loss"][0]  # barely moved
    assert sum(good["loss"][-10:]) < 0.8 * sum(tiny["loss"][-10:])
    assert_png(out)


def first_two_batches_by_hand(samples: int, seed: int = 0, batch: int = 64):
    """The lesson's data, initial weights and first two batches, rebuilt here; grads of the first batch."""
    from gradlab.models.mlp import ManualMLP, classification_loss

    x, y, num_classes = lesson_data(None, samples, seed)
    gen = torch.Generator().manual_seed(seed)
    batches = [torch.randint(0, len(x), (batch,), generator=gen) for _ in range(2)]
    torch.manual_seed(seed)
    model = ManualMLP(x.shape[1], [64, 64], num_classes, "relu")
    loss_fn = classification_loss(num_classes)
    loss_fn(model(x[batches[0]]), y[batches[0]]).backward()
    grads = [p.grad.clone() for p in model.parameters()]

    def loss_after(update):
        with torch.no_grad():
            for p, g in zip(model.parameters(), grads):
                p -= update(g)
            return loss_fn(model(x[batches[1]]), y[batches[1]]).item()

    return grads, loss_after


def test_lr_demo_optimizers_same_start_and_adams_first_step_by_hand(tmp_path):
    out = tmp_path / "opt.png"
    curves = load_script("lr_demo").main(["--optimizers", "sgd", "adam", "--lrs", "0.01", "--steps", "30",
                                          "--samples", "512", "--out", str(out)])
    assert list(curves) == ["sgd lr 0.01", "adam lr 0.01"]
    sgd, adam = curves.values()
    assert sgd["loss"][0] == adam["loss"][0]
    # Adam's first step, bias-corrected: m̂ = g, v̂ = g², so each weight moves by lr·g/(|g| + eps)
    _, loss_after = first_two_batches_by_hand(512)
    assert adam["loss"][1] == pytest.approx(loss_after(lambda g: 0.01 * g / (g.abs() + 1e-8)), rel=1e-5)
    assert sum(adam["loss"][-5:]) < sum(sgd["loss"][-5:])  # adaptive steps move faster at this small rate
    assert_png(out)


def test_lr_demo_clipping_scales_the_first_step_to_the_clip_norm(tmp_path):
    out = tmp_path / "clip.png"
    curves = load_script("lr_demo").main(["--lrs", "3", "--clip", "0.5", "--steps", "2", "--samples", "512",
                                          "--out", str(out)])
    assert list(curves) == ["lr 3", "lr 3, clip 0.5"]
    plain, clipped = curves.values()
    grads, loss_after = first_two_batches_by_hand(512)
    norm = math.sqrt(sum(float(g.square().sum()) for g in grads))  # the total norm over all parameters
    assert plain["grad_norm"][0] == clipped["grad_norm"][0] == pytest.approx(norm, rel=1e-5)
    assert norm > 0.5  # so the clip is active: the step is scaled to length lr x 0.5
    assert clipped["loss"][1] == pytest.approx(loss_after(lambda g: 3 * g * (0.5 / norm)), rel=1e-5)
    assert plain["loss"][1] != pytest.approx(clipped["loss"][1], rel=1e-3)
    assert_png(out)


def test_lr_demo_plots_a_hydra_sweep_from_its_event_files(tmp_path):
    written = {"0": [1.1, 0.9, 0.7, 0.5], "1": [1.1, 2.0, 30.0, math.nan]}
    for job, losses in written.items():
        (tmp_path / job / ".hydra").mkdir(parents=True)
        lr = "0.1" if job == "0" else "5"
        (tmp_path / job / ".hydra" / "overrides.yaml").write_text(
            f"- optimizer=sgd\n- optimizer.lr={lr}\n- trainer.max_epochs=1\n")
        with SummaryWriter(str(tmp_path / job / "tensorboard")) as writer:
            for step, value in enumerate(losses):
                writer.add_scalar("train/loss", value, step)
    out = tmp_path / "sweep.png"
    curves = load_script("lr_demo").main(["--runs", str(tmp_path), "--out", str(out)])
    assert list(curves) == ["optimizer.lr=0.1", "optimizer.lr=5"]  # only what differs between the jobs
    assert curves["optimizer.lr=0.1"]["loss"] == pytest.approx(written["0"])
    assert curves["optimizer.lr=0.1"]["diverged_at"] is None
    assert curves["optimizer.lr=5"]["loss"] == pytest.approx([1.1, 2.0])
    assert curves["optimizer.lr=5"]["diverged_at"] == 2  # 30.0 > 10 x 1.1
    assert_png(out)


def test_lr_demo_runs_without_a_sweep_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="No Hydra jobs"):
        load_script("lr_demo").main(["--runs", str(tmp_path), "--out", str(tmp_path / "x.png")])
