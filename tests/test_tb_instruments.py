"""The TensorBoard instruments: activation health equals statistics recomputed from plain forward hooks (CNN,
MLP on both backends, RNN; gradient accumulation, bf16 autocast, DDP), the health report's verdicts on planted
runs, and a real TensorBoard server reading the layout, the grad-flow image and the report."""

import json
import math
import socket
import statistics
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from gradlab.models.classifier import ClassifierModule
from gradlab.models.cnn import MnistCNN
from gradlab.models.mlp import ManualMLP, classification_loss
from gradlab.models.rnn import SentimentRNN
from gradlab.observe.activations import SATURATION, ActivationMonitor
from gradlab.observe.events import read_scalars
from gradlab.observe.grad_norm import GradNormMonitor
from gradlab.observe.health_rules import diagnose
from helpers import ROOT, load_script, only_run_dir, run_cli, tiny_mnist_args

# ---------------------------------------------------------------------------------------------------------------
# Reference: plain forward hooks record the activations; float64 statistics computed from them by brute force.

class HookRecorder(Callback):
    """Records, per optimizer step, what `taps` (layer -> (module, kind, transform)) output on training batches."""

    def __init__(self, taps):
        self.taps = taps
        self.seen: dict[int, dict[str, list[torch.Tensor]]] = {}
        self._step = 0

    def on_train_start(self, trainer, pl_module):
        for layer, (module, _, transform) in self.taps.items():
            module.register_forward_hook(partial(self._hook, layer, transform))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._step = trainer.global_step

    def _hook(self, layer, transform, module, args, output):
        if module.training:  # the transform (a relu, a max pool) runs later: here it would count as an activation
            self.seen.setdefault(self._step, {}).setdefault(layer, []).append((transform, output))

    def outputs(self, step: int, layer: str) -> list[torch.Tensor]:
        return [transform(output).detach().double() for transform, output in self.seen[step][layer]]


def reference_stats(outputs: list[torch.Tensor], kind: str) -> dict[str, float]:
    flat = torch.cat([y.flatten() for y in outputs])
    stats = {"mean": flat.mean().item(), "std": flat.std().item()}
    if kind == "tanh":
        stats["saturation"] = (flat.abs() > SATURATION).double().mean().item()
    if kind == "sigmoid":
        stats["saturation"] = ((flat < 1 - SATURATION) | (flat > SATURATION)).double().mean().item()
    if kind == "relu":
        # a unit (feature or channel, dim 1) is dead when it is 0 for every sample of every micro-batch
        alive = torch.stack([y.transpose(0, 1).flatten(1).gt(0).any(1) for y in outputs]).any(0)
        stats["dead"] = 1 - alive.double().mean().item()
    return stats


def first(output):
    return output[0] if isinstance(output, tuple) else output


def cnn_case():
    net = MnistCNN()
    taps = {"conv1": (net.conv1, "relu", torch.relu),
            "conv2": (net.conv2, "relu", lambda y: torch.relu(nn.functional.max_pool2d(y, 2))),
            "fc1": (net.fc1, "relu", torch.relu)}
    x, y = torch.randn(48, 1, 28, 28), torch.randint(0, 10, (48,))
    return net, nn.NLLLoss(), 10, taps, (x, y)


def mlp_case(activation: str, backend: str):
    net = ManualMLP(12, [16, 16], 3, activation=activation, backend=backend)
    net.fused = False  # one hand-written Function per layer (the per-layer path; a no-op where that is all there is)
    layers = net.layers
    taps = {f"layers.fc{i}": (getattr(layers, f"act{i}"), activation, lambda y: y) for i in (1, 2)}
    x, y = torch.randn(48, 12) * 3, torch.randint(0, 3, (48,))
    return net, classification_loss(3, backend), 3, taps, (x, y)


def rnn_case():
    net = SentimentRNN(vocab_size=30, embed_dim=8, hidden_size=8, cell="gru", dropout=0.0)
    taps = {"rnn": (net.rnn, "tanh", lambda out: first(out).data)}  # the packed data: real tokens only
    tokens = torch.randint(1, 30, (48, 9))
    lengths = torch.randint(3, 10, (48,))
    tokens[torch.arange(9) >= lengths[:, None]] = 0
    return net, nn.BCEWithLogitsLoss(), 1, taps, (tokens, lengths, torch.randint(0, 2, (48,)).float())


CASES = {"cnn": cnn_case, "mlp-manual-sigmoid": partial(mlp_case, "sigmoid", "manual"),
         "mlp-manual-relu": partial(mlp_case, "relu", "manual"), "mlp-autograd-tanh": partial(mlp_case, "tanh", "autograd"),
         "rnn": rnn_case}


def train(case: str, tmp_path: Path, every=1, **trainer_kwargs):
    torch.manual_seed(0)
    net, criterion, classes, taps, data = CASES[case]()
    module = ClassifierModule(net, criterion, num_classes=classes, optimizer=partial(torch.optim.SGD, lr=0.1))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*data), batch_size=8)
    recorder = HookRecorder(taps)
    kwargs = dict(max_steps=3, log_every_n_steps=1, accelerator="cpu", enable_progress_bar=False,
                  enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0)
    kwargs.update(trainer_kwargs)
    trainer = pl.Trainer(logger=TensorBoardLogger(str(tmp_path), name="", version=""),
                         callbacks=[ActivationMonitor(log_every_n_steps=every), recorder], **kwargs)
    trainer.fit(module, loader)
    return read_scalars(tmp_path), recorder, taps


@pytest.mark.parametrize("case, kwargs", [
    ("cnn", dict(accumulate_grad_batches=2)),
    ("cnn", dict(precision="bf16-mixed")),
    ("mlp-manual-sigmoid", dict(accumulate_grad_batches=2)),
    ("mlp-manual-relu", dict(precision="bf16-mixed")),
    ("mlp-autograd-tanh", {}),
    ("rnn", dict(accumulate_grad_batches=2)),
])
def test_activation_stats_equal_forward_hook_statistics(tmp_path, case, kwargs):
    scalars, recorder, taps = train(case, tmp_path, **kwargs)
    logged = {t for t in scalars if t.startswith("act/")}
    expected = set()
    for layer, (_, kind, _) in taps.items():
        for step in range(3):
            outputs = recorder.outputs(step, layer)
            assert len(outputs) == kwargs.get("accumulate_grad_batches", 1)  # every micro-batch, once
            for stat, value in reference_stats(outputs, kind).items():
                tag = f"act/{stat}/{layer}"
                expected.add(tag)
                # float32 sums in the callback: the std (a difference of two sums) to 1e-4
                rel = 1e-4 if stat == "std" else 1e-5
                assert dict(scalars[tag])[step] == pytest.approx(value, rel=rel, abs=1e-7), (tag, step)
    assert logged == expected  # nothing logged for layers that are not activations


def test_activation_stats_only_on_logging_steps(tmp_path):
    scalars, _, _ = train("mlp-autograd-tanh", tmp_path, every=None, max_steps=7, log_every_n_steps=3)  # the trainer's
    assert [s for s, _ in scalars["act/saturation/layers.fc1"]] == [0, 3, 6]


def test_grad_norms_and_log10_under_bf16_autocast(tmp_path):
    from test_grad_norm import fit, tiny_module, values

    module = tiny_module()
    fit(module, tmp_path, GradNormMonitor(log_every_n_steps=1), precision="bf16-mixed", max_epochs=1)
    scalars = read_scalars(tmp_path / "tb")
    for name in ("fc1.weight", "fc2.bias"):
        logged = values(scalars, f"grad_norm/{name}")
        assert logged == pytest.approx({s: module.pre[s][name] for s in module.pre}, rel=1e-5)
        assert values(scalars, f"grad_norm_log10/{name}") == pytest.approx(
            {s: math.log10(v) for s, v in logged.items()}, rel=1e-6)
        w0 = {s: module.before[s][name].double() for s in module.pre}
        ratio = {s: (module.after[s][name].double() - w0[s]).norm().item() / w0[s].norm().item() for s in w0}
        assert values(scalars, f"update_ratio/{name}") == pytest.approx(ratio, rel=1e-4)
    assert values(scalars, "update_ratio_log10/band_1e-3") == {s: -3.0 for s in module.pre}


# ---------------------------------------------------------------------------------------------------------------
# Verdicts on planted runs.

def planted_run(tmp_path: Path, net: nn.Module, criterion, classes: int, data, optimizer, steps: int):
    module = ClassifierModule(net, criterion, num_classes=classes, optimizer=optimizer, on_nonfinite_loss="skip")
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*data), batch_size=32, shuffle=True)
    trainer = pl.Trainer(max_steps=steps, log_every_n_steps=1, accelerator="cpu", enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                         logger=TensorBoardLogger(str(tmp_path), name="", version=""),
                         callbacks=[GradNormMonitor(log_every_n_steps=1), ActivationMonitor(log_every_n_steps=1)])
    trainer.fit(module, loader)
    return diagnose(read_scalars(tmp_path))


def test_deep_sigmoid_mlp_is_flagged_vanishing(tmp_path):
    torch.manual_seed(0)
    net = ManualMLP(20, [32] * 10, 3, activation="sigmoid")
    x = torch.randn(256, 20)
    data = (x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long())
    report = planted_run(tmp_path, net, classification_loss(3), 3, data, partial(torch.optim.SGD, lr=0.1), 16)
    (vanishing,) = [f for f in report.findings if f.verdict == "vanishing"]
    assert vanishing.layer == "layers.fc1.weight" and vanishing.steps == (0, 15)
    first = [v for _, v in read_scalars(tmp_path)["grad_norm/layers.fc1.weight"]]
    last = [v for _, v in read_scalars(tmp_path)["grad_norm/layers.out.weight"]]
    assert max(first) < 1e-3 * min(last)  # the planted fault is really there
    assert not report.healthy


def test_learning_rate_x100_is_flagged_update_ratio_too_big(tmp_path):
    """The CNN recipe's Adam at lr 0.1 instead of 1e-3 (the healthy run below uses 1e-3)."""
    from helpers import fake_digits

    torch.manual_seed(0)
    images, labels = fake_digits(256, seed=0)
    data = (torch.tensor(images, dtype=torch.float32).unsqueeze(1) / 255, torch.tensor(labels, dtype=torch.long))
    report = planted_run(tmp_path, MnistCNN(), nn.NLLLoss(), 10, data, partial(torch.optim.Adam, lr=0.1), 12)
    (big,) = [f for f in report.findings if f.verdict == "update ratio too big"]
    ratios = read_scalars(tmp_path, "update_ratio/")
    for name in ("fc1.weight", "fc2.weight"):
        assert statistics.median(v for _, v in ratios[f"update_ratio/{name}"]) > 0.1  # the planted fault is there
        assert name in big.layer
    assert big.steps == (0, 11) and "lower optimizer.lr" in big.fix


def test_healthy_cnn_run_is_reported_healthy_at_the_end_of_fit(cnn_run):
    """conftest's real 2-epoch CNN run (train.py, defaults): health.json says healthy, and grad_report agrees."""
    run_dir, _, _ = cnn_run
    health = json.loads((run_dir / "health.json").read_text())
    assert health["healthy"] is True, health["findings"]
    (finding,) = health["findings"]
    assert finding["verdict"] == "healthy" and finding["steps"] == [0, 13]
    report = load_script("grad_report").main([str(run_dir), "--out", str(run_dir / "again.json")])
    assert json.loads((run_dir / "again.json").read_text()) == health and report.healthy


def test_grad_report_on_a_folder_without_gradients_is_a_user_error(tmp_path):
    proc = run_cli("scripts/grad_report.py", str(tmp_path), cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "No TensorBoard event files" in proc.stderr


# ---------------------------------------------------------------------------------------------------------------
# A real TensorBoard server over a real run.

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, timeout: float = 10):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        body = response.read()
    return body if response.headers.get_content_type() != "application/json" else json.loads(body)


@pytest.fixture
def tensorboard_server(cnn_run):
    run_dir = cnn_run[0]
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(run_dir), "--host",
                             "127.0.0.1", "--port", str(port), "--load_fast=false", "--reload_interval", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:  # up once the run's events are loaded: the text plugin lists its tag
            try:
                if get(f"{base}/data/plugin/text/tags", timeout=5):
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"TensorBoard did not come up: {proc.stderr.read().decode()[-2000:] if proc.poll() is not None else 'timeout'}")
            time.sleep(1)
        yield base, run_dir
    finally:
        proc.kill()
        proc.wait(timeout=30)


@pytest.mark.slow
def test_real_tensorboard_serves_layout_image_and_report(tensorboard_server):
    base, run_dir = tensorboard_server
    params = [n for n, _ in MnistCNN().named_parameters()]  # conv1.weight, conv1.bias, ... fc2.bias

    layout = get(f"{base}/data/plugin/custom_scalars/layout")
    charts = {c["title"]: c for cat in layout["category"] for c in cat["chart"]}
    grad_chart = next(c for t, c in charts.items() if t.startswith("gradient L2 norm"))
    assert grad_chart["multiline"]["tag"] == [f"^grad_norm_log10/{p.replace('.', chr(92) + '.')}$" for p in params]
    ratio_chart = next(c for t, c in charts.items() if t.startswith("update ratio"))
    series = ratio_chart["margin"]["series"]
    assert series[0] == {"value": "update_ratio_log10/band_1e-3", "lower": "update_ratio_log10/band_low",
                         "upper": "update_ratio_log10/band_high"}
    assert [s["value"] for s in series[1:]] == [f"update_ratio_log10/{p}" for p in params]
    dead = next(c for t, c in charts.items() if t.startswith("dead units"))
    assert dead["multiline"]["tag"] == ["^act/dead/conv1$", "^act/dead/conv2$", "^act/dead/fc1$"]
    # the plugin serves the charted series: a chart's tag has the values the run logged
    run = next(iter(get(f"{base}/data/plugin/scalars/tags")))
    query = urllib.parse.urlencode({"run": run, "tag": "grad_norm_log10/fc1.weight"})
    points = get(f"{base}/data/plugin/scalars/scalars?{query}")
    logged = dict(read_scalars(run_dir)["grad_norm/fc1.weight"])
    assert [p[1] for p in points] == list(logged)  # [wall time, step, value] rows
    assert [p[2] for p in points] == pytest.approx([math.log10(v) for v in logged.values()], rel=1e-5)

    images = get(f"{base}/data/plugin/images/tags")
    assert images[run]["grad_flow"]["samples"] == 1
    query = urllib.parse.urlencode({"run": run, "tag": "grad_flow", "sample": 0})
    entries = get(f"{base}/data/plugin/images/images?{query}")
    assert [e["step"] for e in entries] == [7, 14]  # end of each validation epoch (the end of fit is step 14 too)
    png = get(f"{base}/data/plugin/images/individualImage?{entries[-1]['query']}")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"

    text_tags = get(f"{base}/data/plugin/text/tags")
    assert text_tags[run] == ["health/report/text_summary"]
    query = urllib.parse.urlencode({"run": run, "tag": "health/report/text_summary"})
    (entry,) = get(f"{base}/data/plugin/text/text?{query}")
    assert "healthy" in entry["text"] and "nothing to fix" in entry["text"]


# ---------------------------------------------------------------------------------------------------------------
# DDP on 2 CPU processes: after the all-reduce, logged once, equal to what each rank's own hooks saw.

class DDPRecorder(Callback):
    """On every rank: the gradient norms the optimizer steps with, and float64 sums of each activation module's
    outputs on this rank's batch (plain forward hooks), saved to <run>/ref_rank<r>.pt at the end of training."""

    def on_train_start(self, trainer, pl_module):
        self.grads, self.acts, self._step = {}, {}, 0
        for name, module in pl_module.net.named_modules():
            if isinstance(module, nn.ReLU):
                module.register_forward_hook(partial(self._hook, name.replace("act", "fc")))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._step = trainer.global_step

    def _hook(self, layer, module, args, y):
        if not module.training:
            return  # validation
        y = y.detach().double()
        alive = y.gt(0).any(0)
        self.acts.setdefault(self._step, {})[layer] = (y.numel(), y.sum().item(), y.square().sum().item(), alive)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads[trainer.global_step] = {n.removeprefix("net."): p.grad.double().norm().item()
                                           for n, p in pl_module.named_parameters()}

    def on_train_end(self, trainer, pl_module):
        torch.save({"grads": self.grads, "acts": self.acts},
                   Path(trainer.default_root_dir) / f"ref_rank{trainer.global_rank}.pt")


@pytest.mark.slow
def test_ddp_two_processes_log_reduced_values_once(mnist_root, tmp_path):
    import os

    env = {"PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    proc = run_cli("train.py", *tiny_mnist_args(mnist_root, tmp_path), "trainer=ddp_cpu", "trainer.max_epochs=1",
                   "trainer.log_every_n_steps=1", "model=mlp", "model.backend=autograd", "test=false",
                   "+callbacks.ref._target_=test_tb_instruments.DDPRecorder", cwd=tmp_path, env=env, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = only_run_dir(tmp_path)
    refs = [torch.load(run_dir / f"ref_rank{r}.pt", weights_only=False) for r in (0, 1)]
    scalars = read_scalars(run_dir)
    steps = sorted(refs[0]["grads"])
    assert steps == list(range(4))  # 200 training images, batch 32 per rank: 4 steps
    for step in steps:
        for name, norm in refs[0]["grads"][step].items():  # the all-reduced gradient: the same on both ranks
            assert refs[1]["grads"][step][name] == pytest.approx(norm, rel=1e-6)
            assert dict(scalars[f"grad_norm/{name}"])[step] == pytest.approx(norm, rel=1e-5)
        for layer in ("layers.fc1", "layers.fc2"):
            parts = [ref["acts"][step][layer] for ref in refs]  # each rank's own half of the batch
            n, s, ss = (sum(p[i] for p in parts) for i in range(3))
            mean = s / n
            std = math.sqrt((ss - n * mean * mean) / (n - 1))
            dead = 1 - (parts[0][3] | parts[1][3]).double().mean().item()
            assert dict(scalars[f"act/mean/{layer}"])[step] == pytest.approx(mean, rel=1e-6)
            assert dict(scalars[f"act/std/{layer}"])[step] == pytest.approx(std, rel=1e-4)
            assert dict(scalars[f"act/dead/{layer}"])[step] == pytest.approx(dead, abs=1e-9)
    assert [s for s, _ in scalars["act/mean/layers.fc1"]] == steps  # logged once per step (by rank 0)
    assert json.loads((run_dir / "health.json").read_text())["findings"]  # the report, once, from rank 0


def _series(values, steps=None):
    return [(s, float(v)) for s, v in zip(steps or range(len(values)), values)]


def test_stopped_learning_is_one_layer_falling_not_a_converged_loss():
    """Synthetic scalars, 16 logging steps: a model that fits its data (every gradient falls 1e5x together) is
    not flagged; one layer falling 1e4x while the rest keep their gradient is."""
    falling = [10.0 ** (-k / 3) for k in range(16)]           # 1 -> 1e-5
    flat = [1.0] * 16
    converged = {"grad_norm/a.weight": _series(falling), "grad_norm/b.weight": _series(falling),
                 "grad_norm/total": _series(falling)}
    assert diagnose(converged).healthy
    one_stops = {"grad_norm/a.weight": _series(falling), "grad_norm/b.weight": _series(flat),
                 "grad_norm/total": _series(flat)}
    (found,) = [f for f in diagnose(one_stops).findings if f.verdict == "stopped learning"]
    assert found.layer == "a.weight" and found.steps == (12, 15)
