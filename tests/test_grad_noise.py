"""GradNoiseMonitor / PerExampleTap against a float64 brute force (one backward per example), per layer type;
the two-batch estimator's consistency; batch-size invariance; training unchanged; metrics.json and the table."""

import json
import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gradlab.models.classifier import ClassifierModule
from gradlab.models.mlp import ManualMLP, classification_loss
from gradlab.models.rnn import SentimentRNN
from gradlab.observe.grad_noise import GradNoiseMonitor, PerExampleTap, noise_estimates, reading


class TinyCNN(nn.Module):
    """Each conv takes another path of conv2d_sq: windows gathered into one matmul (1 channel), one matmul per
    kernel tap (16 channels, zero padding), the Gram form (4 output positions)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3)                          # 8x8 -> 6x6
        self.conv2 = nn.Conv2d(16, 4, 3, padding=1)               # 6x6 -> 6x6: P=36, I=144, O=4
        self.conv3 = nn.Conv2d(4, 40, 3, stride=2)                # 6x6 -> 2x2: P=4, I=36, O=40
        self.fc = nn.Linear(160, 3)

    def forward(self, x):
        x = torch.tanh(self.conv3(torch.tanh(self.conv2(torch.tanh(self.conv1(x))))))
        return F.log_softmax(self.fc(x.flatten(1)), dim=1)


def nll(out, y):
    return F.nll_loss(out, y)


def bce(out, y):
    return F.binary_cross_entropy_with_logits(out, y)


def make(kind: str, seed: int = 0):
    """(net, loss, inputs (N, ...), targets) in float64."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    n = 96
    if kind == "cnn":
        net, loss = TinyCNN(), nll
        x, y = torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)
    elif kind == "rnn":
        net = SentimentRNN(vocab_size=30, embed_dim=6, hidden_size=5, cell="gru", dropout=0.0, pooling="max")
        loss = bce
        x = torch.randint(1, 30, (n, 7), generator=g)
        y = (x[:, 0] < 15).double()  # learnable from the first token
    else:
        backend = kind.split("_")[1]
        net = ManualMLP(6, [5, 4], 3, activation="tanh", backend=backend)
        loss = classification_loss(3, backend)
        x = torch.randn(n, 6, generator=g)
        y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return net.double(), loss, x.double() if x.is_floating_point() else x, y


def call(net, x):
    return net(x, torch.full((x.shape[0],), x.shape[1])) if isinstance(net, SentimentRNN) else net(x)


def per_example(net, loss, x, y, tap: PerExampleTap) -> dict[str, torch.Tensor]:
    """{layer: (N, D)} gradients of each example's own loss: one backward per example."""
    rows = []
    for i in range(x.shape[0]):
        net.zero_grad()
        loss(call(net, x[i:i + 1]), y[i:i + 1]).backward()
        rows.append({name: torch.cat([p.grad.flatten() for p in params]) for name, _, params in tap.layers})
    return {name: torch.stack([r[name] for r in rows]) for name in rows[0]}


def measure(net, loss, x, y, tap: PerExampleTap):
    """(names, tr(Σ), ‖G‖², ‖g‖²) from one tapped step on the batch (x, y)."""
    net.zero_grad()
    tap.attach()
    loss(call(net, x), y).backward()
    tap.detach()
    names, q, m, n = tap.collect()
    sq = torch.stack([sum(p.grad.square().sum() for p in params) for name, _, params in tap.layers if name in names])
    trace, signal = noise_estimates(q, m, n, sq)
    return names, trace, signal, sq


def brute(grads: torch.Tensor):
    """Unbiased tr(Σ) and ‖G‖² from per-example gradients (N, D): the sample variance and its correction."""
    n = grads.shape[0]
    mean = grads.mean(0)
    trace = (grads - mean).square().sum() / (n - 1)
    return trace, mean.square().sum() - trace / n


@pytest.mark.parametrize("kind", ["mlp_manual", "mlp_autograd", "cnn", "rnn"])
def test_exact_layers_equal_the_brute_force(kind):
    net, loss, x, y = make(kind)
    x, y = x[:24], y[:24]
    tap = PerExampleTap(net)
    ref = per_example(net, loss, x, y, tap)
    names, trace, signal, _ = measure(net, loss, x, y, tap)
    exact = [tap.layers[i][0] for i in range(len(tap.layers)) if i not in tap.estimated]
    assert exact == (["head"] if kind == "rnn" else names)  # the RNN's embedding and GRU are estimated
    for name in exact:
        j = names.index(name)
        t, s = brute(ref[name])
        assert trace[j].item() == pytest.approx(t.item(), rel=1e-6), name
        assert signal[j].item() == pytest.approx(s.item(), rel=1e-6, abs=1e-9 * t.item()), name
        assert (trace[j] / signal[j]).item() == pytest.approx((t / s).item(), rel=1e-5), name


def test_a_conv_sample_is_the_first_rows_exactly_scaled_to_the_batch():
    """conv_sample=0.25 on 24 rows: conv layers sum the brute-force per-example norms of rows 0-5, times 24/6;
    the linear layer still takes all 24 (its norms are cheap)."""
    net, loss, x, y = make("cnn")
    x, y = x[:24], y[:24]
    tap = PerExampleTap(net, conv_sample=0.25)
    ref = per_example(net, loss, x, y, tap)
    net.zero_grad()
    tap.attach()
    loss(call(net, x), y).backward()
    tap.detach()
    names, q, m, n = tap.collect()
    assert n == 24 and m.tolist() == [24.0] * 4
    for name in names:
        norms = ref[name].square().sum(1)
        want = norms[:6].sum() * 4 if name.startswith("conv") else norms.sum()
        assert q[names.index(name)].item() == pytest.approx(want.item(), rel=1e-9), name


def test_a_conv_sample_keeps_the_estimate_unbiased():
    """Over R=300 batches of 16 drawn with replacement from 96 examples, tr(Σ) of each conv layer from 4 rows of
    each batch must average to the population's within 4 standard errors; 4 standard errors are under a third
    of the truth, so that a missing or doubled scale fails."""
    net, loss, x, y = make("cnn")
    tap = PerExampleTap(net, conv_sample=0.25)
    ref = per_example(net, loss, x, y, tap)
    g = torch.Generator().manual_seed(2)
    draws = [measure(net, loss, x[idx], y[idx], tap) for idx in
             (torch.randint(0, x.shape[0], (16,), generator=g) for _ in range(300))]
    for name in ("conv1", "conv2", "conv3"):
        j = draws[0][0].index(name)
        grads = ref[name]
        truth = (grads - grads.mean(0)).square().sum(1).mean()
        est = torch.stack([d[1][j] for d in draws])
        se = est.std() / math.sqrt(len(est))
        assert 4 * se < truth / 3, name
        assert abs(est.mean() - truth) < 4 * se, (name, est.mean().item(), truth.item())


def test_the_two_batch_estimate_is_unbiased_for_recurrent_layers():
    """Embedding and GRU: halves of each batch (one extra backward). Over R=240 batches of 16 drawn with
    replacement from a population of 96 examples, the mean estimate must lie within 4 standard errors
    (std of the R estimates / √R; a false alarm has probability ~6e-5 under the CLT) of the population's
    tr(Σ) and ‖G‖² from per-example gradients; and for tr(Σ) 4 standard errors must be under half the truth, so
    that a factor 2 (a wrong scale or group count) fails. ‖G‖² = ‖g‖² − tr(Σ)/B is only checked for consistency:
    at this init it is far below its noise at batch 16 (B_simple ≫ 16)."""
    net, loss, x, y = make("rnn")
    tap = PerExampleTap(net)
    ref = per_example(net, loss, x, y, tap)
    g = torch.Generator().manual_seed(1)
    draws = [measure(net, loss, x[idx], y[idx], tap) for idx in
             (torch.randint(0, x.shape[0], (16,), generator=g) for _ in range(240))]
    names = draws[0][0]
    for name in ("embedding", "rnn"):
        j = names.index(name)
        grads = ref[name]
        mean = grads.mean(0)
        truth = {"trace": (grads - mean).square().sum(1).mean(), "signal": mean.square().sum()}  # population
        for k, key in ((1, "trace"), (2, "signal")):
            est = torch.stack([d[k][j] for d in draws])
            se = est.std() / math.sqrt(len(est))
            if key == "trace":
                assert 4 * se < 0.5 * truth[key], (name, key)
            assert abs(est.mean() - truth[key]) < 4 * se, (name, key, est.mean().item(), truth[key].item())


def test_b_simple_does_not_depend_on_the_batch_it_is_measured_with():
    """Same weights, fresh examples from one distribution: tr(Σ) and ‖G‖² averaged over 128 batches of 32 and
    over 8 batches of 512 (4,096 examples each), B_simple as their ratio; the two agree within 4 standard
    errors of their difference (delta method on the batch-to-batch spread)."""
    torch.manual_seed(0)
    net = ManualMLP(6, [16], 3, activation="tanh", backend="manual").double()
    loss = classification_loss(3, "manual")
    tap = PerExampleTap(net)
    w = torch.randn(6, 3, dtype=torch.float64)

    def batches(size, count, seed):
        g = torch.Generator().manual_seed(seed)
        for _ in range(count):
            x = torch.randn(size, 6, generator=g, dtype=torch.float64)
            y = torch.distributions.Categorical(logits=2 * x @ w).sample()
            yield x, y

    def b_simple(size, count, seed):
        est = [measure(net, loss, x, y, tap) for x, y in batches(size, count, seed)]
        t = torch.stack([e[1].sum() for e in est])
        s = torch.stack([e[2].sum() for e in est])
        b = t.mean() / s.mean()
        # delta method: Var(T/S) ≈ (Var T/T² + Var S/S² - 2Cov/TS)·b²/count
        c = torch.cov(torch.stack([t, s]))
        var = b ** 2 * (c[0, 0] / t.mean() ** 2 + c[1, 1] / s.mean() ** 2 - 2 * c[0, 1] / (t.mean() * s.mean()))
        return b.item(), (var / count).item()

    (b32, v32), (b512, v512) = b_simple(32, 128, 1), b_simple(512, 8, 2)
    se = math.sqrt(v32 + v512)
    assert 4 * se < 0.25 * b512  # the check has teeth: a 25% discrepancy would fail it
    assert abs(b32 - b512) < 4 * se, (b32, b512, se)


class Data(pl.LightningDataModule):
    def __init__(self, x, y, batch_size):
        super().__init__()
        self.x, self.y, self.batch_size = x, y, batch_size

    def train_dataloader(self):
        args = (self.x, torch.full((len(self.x),), self.x.shape[1])) if not self.x.is_floating_point() else (self.x,)
        return DataLoader(TensorDataset(*args, self.y), batch_size=self.batch_size, shuffle=False)


def fit(kind, callbacks, steps=6, batch_size=16, accumulate=1, dropout=0.3):
    pl.seed_everything(0, verbose=False)
    net, loss, x, y = make(kind)
    if kind == "rnn":
        net.dropout.p = dropout  # dropout draws RNG: the instrument must not shift it
    module = ClassifierModule(net, loss, num_classes=1 if kind == "rnn" else 3,
                              optimizer=lambda params: torch.optim.Adam(params, lr=1e-2))
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", precision="64-true", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=callbacks, accumulate_grad_batches=accumulate, num_sanity_val_steps=0,
                         limit_val_batches=0)
    trainer.fit(module, datamodule=Data(x, y, batch_size))
    return module, (net, loss, x, y)


@pytest.mark.parametrize("kind,dense", [("rnn", "auto"), ("cnn", "auto"), ("rnn", "full"), ("cnn", "full")])
def test_training_takes_exactly_the_update_it_would_without_the_instrument(kind, dense):
    """Every step measured: with the dense-logging economies (auto) and without them (all rows, every estimate)."""
    off, _ = fit(kind, [])
    full = {"conv_sample": 1.0, "estimate_every": 1} if dense == "full" else {}
    monitor = GradNoiseMonitor(log_every_n_steps=1, **full)
    on, _ = fit(kind, [monitor])
    assert monitor.last  # it did measure, on every step
    for (name, a), b in zip(off.state_dict().items(), on.state_dict().values()):
        assert torch.equal(a, b), name


def test_logged_values_under_gradient_accumulation_equal_the_brute_force():
    """Two micro-batches of 8 make the step: exact layers see 16 examples (scaled by k·n, not 1/(k·n)); the
    GRU and embedding use the two micro-batches as groups."""
    monitor = GradNoiseMonitor(log_every_n_steps=100, smoothing=0.0)
    module, (net, loss, x, y) = fit("rnn", [monitor], steps=1, batch_size=8, accumulate=2, dropout=0.0)
    pl.seed_everything(0, verbose=False)
    fresh, _, _, _ = make("rnn")  # the weights before the one step
    tap = PerExampleTap(fresh)
    ref = per_example(fresh, loss, x[:16], y[:16], tap)
    t, s = brute(ref["head"])
    assert monitor.last["grad_noise/trace_cov/head"] == pytest.approx(t.item(), rel=1e-6)
    assert monitor.last["grad_noise/signal/head"] == pytest.approx(s.item(), rel=1e-6)
    assert monitor.last["grad_noise/batch_size"] == 16
    # Groups = the two micro-batches: (Σ_j ‖s_j‖²/8 - 16‖g‖²) / 1 from per-example gradients by hand.
    g = ref["rnn"]
    q = g[:8].sum(0).square().sum() / 8 + g[8:].sum(0).square().sum() / 8
    assert monitor.last["grad_noise/trace_cov/rnn"] == pytest.approx((q - 16 * g.mean(0).square().sum()).item(),
                                                                      rel=1e-6)


def test_dense_logging_takes_the_two_batch_estimate_every_4th_reading(monkeypatch):
    """log_every_n_steps=1: 8 readings, 2 extra backwards (readings 0 and 4). The GRU and embedding are logged at
    those readings only; in between their last values stand in, so the totals still add up all layers."""
    calls = []
    grad = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: calls.append(1) or grad(*a, **k))

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            seen.append(dict(monitor.last))

    seen = []
    monitor = GradNoiseMonitor(log_every_n_steps=1, smoothing=0.0)
    fit("rnn", [monitor, Record()], steps=8)
    assert len(calls) == 2 and monitor.estimate_every == 4
    for step, metrics in enumerate(seen):
        assert "grad_noise/trace_cov/head" in metrics
        assert ("grad_noise/trace_cov/rnn" in metrics) == (step % 4 == 0), step
        last = seen[step - step % 4]  # the reading whose estimate stands in
        total = metrics["grad_noise/trace_cov/head"] + sum(last[f"grad_noise/trace_cov/{k}"]
                                                           for k in ("rnn", "embedding"))
        assert metrics["grad_noise/trace_cov/total"] == pytest.approx(total, rel=1e-12), step
    # and resumed from a checkpoint, the cadence and the stand-ins carry on
    again = GradNoiseMonitor(log_every_n_steps=1, smoothing=0.0)
    again.load_state_dict(monitor.state_dict())
    assert again._readings == 8 and again._held == monitor._held


def test_reading_says_what_a_larger_batch_buys():
    assert reading(3000, 64).startswith("B_simple ≈ 3,000 with batch 64: a larger batch (or more GPUs) would cut")
    assert "past the critical batch" in reading(100, 1024)
    assert "not measurable" in reading(float("nan"), 64)


def test_train_py_writes_the_reading_into_metrics_json_and_the_table(cnn_run):
    from gradlab.observe.events import read_scalars

    run_dir, metrics, _ = cnn_run
    assert metrics["grad_noise/batch_size"] == 32  # logged at step 0 (the default interval is 64 steps)
    scalars = read_scalars(run_dir / "tensorboard", "grad_noise/")
    assert scalars["grad_noise/b_simple/total"][-1][1] == pytest.approx(metrics["grad_noise/b_simple/total"],
                                                                         rel=1e-6)
    assert metrics["grad_noise/reading"] == reading(metrics["grad_noise/b_simple/total"], 32)
    for layer in ("conv1", "conv2", "fc1", "fc2", "total"):
        assert f"grad_noise/snr/{layer}" in scalars
    # tr(Σ) of the layers adds up to the total
    total = sum(scalars[f"grad_noise/trace_cov/{k}"][0][1] for k in ("conv1", "conv2", "fc1", "fc2"))
    assert total == pytest.approx(scalars["grad_noise/trace_cov/total"][0][1], rel=1e-5)
    assert json.loads((run_dir / "metrics.json").read_text()) == metrics


@pytest.mark.slow
def test_ddp_logs_once_the_value_of_one_process_on_the_same_global_batch(tmp_path):
    """2 gloo processes x 8 examples against 1 process x 2 micro-batches of the same 8 + 8 (tests/grad_noise_ddp.py):
    the exact head sums per-example norms over both ranks; the GRU and embedding take each rank's gradient
    (before the all-reduce) as one group, as the single process takes each micro-batch."""
    import subprocess
    import sys

    from helpers import ROOT

    values = {}
    for mode in ("ddp", "single"):
        out = tmp_path / f"{mode}.json"
        proc = subprocess.run([sys.executable, str(ROOT / "tests" / "grad_noise_ddp.py"), mode, str(out)],
                              cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        values[mode] = json.loads(out.read_text())
        assert proc.stderr.count("grad_noise[/]") == 0 and proc.stderr.count("grad_noise:") == 1  # rank 0 only
    ddp, single = values["ddp"], values["single"]
    assert ddp.keys() == single.keys() and ddp["grad_noise/batch_size"] == 16
    assert math.isfinite(ddp["grad_noise/b_simple/embedding"])  # not a nan == nan comparison only
    for tag in ("trace_cov", "signal", "b_simple", "snr"):
        for layer in ("embedding", "rnn", "head", "total"):
            key = f"grad_noise/{tag}/{layer}"
            assert ddp[key] == pytest.approx(single[key], rel=1e-9, nan_ok=True), key


def test_the_moving_averages_travel_in_checkpoints():
    first = GradNoiseMonitor(log_every_n_steps=1)
    fit("cnn", [first], steps=3)
    second = GradNoiseMonitor(log_every_n_steps=1)
    second.load_state_dict(first.state_dict())
    assert second.final_metrics() == first.final_metrics()
    assert torch.equal(second._ema["trace"], first._ema["trace"].double())


def test_batch_norm_in_training_mode_puts_every_layer_on_groups(capsys):
    """Per-example gradients are not defined when batch norm mixes the batch: no layer may claim exact values."""
    torch.manual_seed(0)
    net = ManualMLP(6, [5], 3, batch_norm=True, backend="autograd").double()
    tap = PerExampleTap(net)
    x, y = torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 3, (16,))
    names, trace, _, _ = measure(net, classification_loss(3, "autograd"), x, y, tap)
    assert tap.batch_norm == ["layers.bn1"] and tap.estimated == set(range(len(tap.layers)))
    assert torch.isfinite(trace).all()
    net.eval()  # running statistics: examples independent again, linear layers exact
    measure(net, classification_loss(3, "autograd"), x, y, tap)
    assert tap.batch_norm == [] and {tap.layers[i][0] for i in tap.estimated} == {"layers.bn1"}
