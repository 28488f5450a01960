"""GradNormMonitor: logged norms equal norms recomputed from the very gradients the optimizer stepped with;
health warnings and the non-finite stop; the same through the real train.py; the plot script's PNG."""

import json
import math
import os
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import TENSORS, EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from torch import nn

from gradlab.models.classifier import ClassifierModule
from gradlab.observe.events import read_scalars
from gradlab.observe.grad_norm import GradNormMonitor
from helpers import ROOT, load_script, only_run_dir, run_cli, tiny_mnist_args

CLIP = 0.05  # small enough that every step of the tiny net is clipped


class PlantNaN(Callback):
    """Puts a NaN into one gradient at one optimizer step (before any on_before_optimizer_step hook runs)."""

    def __init__(self, step: int, param: str = "net.fc1.weight"):
        self.step, self.param = step, param

    def on_after_backward(self, trainer, pl_module):
        if trainer.global_step == self.step:
            dict(pl_module.named_parameters())[self.param].grad.view(-1)[0] = math.nan


class Recorder(ClassifierModule):
    """A ClassifierModule that writes down, independently of the callback, what each optimizer step saw."""

    def __init__(self, *args, loss_scale: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_scale = loss_scale
        self.pre, self.post, self.before, self.after, self.batches = {}, {}, {}, {}, {}

    def training_step(self, batch, batch_idx):
        self.batches[self.global_step] = batch
        loss = super().training_step(batch, batch_idx)
        return None if loss is None else loss * self.loss_scale  # None: the module skipped a NaN-loss batch

    def on_before_optimizer_step(self, optimizer):
        # Module hooks run after every callback hook: the gradients the callback measured.
        grads = {n.removeprefix("net."): p.grad for n, p in self.named_parameters() if p.grad is not None}
        self.pre[self.global_step] = {n: g.double().norm().item() for n, g in grads.items()}
        self.before[self.global_step] = {n.removeprefix("net."): p.detach().clone() for n, p in self.named_parameters()}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        grads = [p.grad.double().flatten() for p in self.parameters() if p.grad is not None]
        self.post[self.global_step] = torch.cat(grads).norm().item() if grads else 0.0

    def on_train_batch_end(self, outputs, batch, batch_idx):
        step = self.global_step - 1  # the step that just ran
        if step in self.before and step not in self.after:
            self.after[step] = {n.removeprefix("net."): p.detach().clone() for n, p in self.named_parameters()}


def tiny_module(lr: float = 0.1, batch_norm: bool = False, **kwargs) -> Recorder:
    torch.manual_seed(0)
    net = nn.Sequential()
    net.add_module("fc1", nn.Linear(8, 16))  # parameter names as in the real models: net.fc1.weight ...
    if batch_norm:
        net.add_module("bn1", nn.BatchNorm1d(16))
    net.add_module("act1", nn.Tanh())
    net.add_module("fc2", nn.Linear(16, 3))
    return Recorder(net, nn.CrossEntropyLoss(), num_classes=3, optimizer=partial(torch.optim.SGD, lr=lr), **kwargs)


def tiny_loader(n: int = 48, batch_size: int = 8):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)


def fit(module, tmp_path: Path, monitor: GradNormMonitor, extra_callbacks=(), **trainer_kwargs) -> pl.Trainer:
    kwargs = dict(max_epochs=2, log_every_n_steps=1, accelerator="cpu", enable_progress_bar=False,
                  enable_model_summary=False, enable_checkpointing=False)
    kwargs.update(trainer_kwargs)
    trainer = pl.Trainer(logger=TensorBoardLogger(str(tmp_path / "tb"), name="", version=""),
                         callbacks=[monitor, *extra_callbacks], **kwargs)
    trainer.fit(module, tiny_loader())
    return trainer


def values(scalars, tag) -> dict[int, float]:
    return dict(scalars[tag])


def test_logged_norms_equal_the_stepped_gradients(tmp_path):
    """Accumulation over 2 batches and clipping on: every logged number is recomputed from the recorder."""
    module = tiny_module()
    fit(module, tmp_path, GradNormMonitor(log_every_n_steps=1), accumulate_grad_batches=2, gradient_clip_val=CLIP)
    scalars = read_scalars(tmp_path / "tb")
    params = [n.removeprefix("net.") for n, _ in module.named_parameters()]
    assert {t for t in scalars if t.startswith("grad_norm/")} == \
        {f"grad_norm/{p}" for p in params} | {"grad_norm/total", "grad_norm/total_after_clip"}
    steps = sorted(module.pre)
    assert steps == list(range(6))  # 2 epochs x 6 batches / accumulation 2
    for name in params:
        assert values(scalars, f"grad_norm/{name}") == pytest.approx({s: module.pre[s][name] for s in steps}, rel=1e-5)
        w0 = {s: module.before[s][name].double() for s in steps}
        dw = {s: (module.after[s][name].double() - w0[s]).norm().item() for s in steps}
        assert values(scalars, f"param_norm/{name}") == pytest.approx({s: w0[s].norm().item() for s in steps}, rel=1e-5)
        assert values(scalars, f"update_ratio/{name}") == \
            pytest.approx({s: dw[s] / w0[s].norm().item() for s in steps}, rel=1e-4)
    total = values(scalars, "grad_norm/total")
    assert total == pytest.approx({s: math.sqrt(sum(v * v for v in module.pre[s].values())) for s in steps}, rel=1e-5)
    after = values(scalars, "grad_norm/total_after_clip")
    assert after == pytest.approx(module.post, rel=1e-5)
    assert all(total[s] > CLIP for s in steps)  # so the clip really acted, and then:
    assert after == pytest.approx({s: CLIP for s in steps}, rel=1e-4)


def test_interval_follows_trainer_and_histograms(tmp_path):
    module = tiny_module()
    monitor = GradNormMonitor(log_every_n_steps=None, update_ratio=False, histogram_every_n_steps=4)
    fit(module, tmp_path, monitor, log_every_n_steps=3)  # 12 steps
    scalars = read_scalars(tmp_path / "tb")
    assert [s for s, _ in scalars["grad_norm/fc1.weight"]] == [0, 3, 6, 9]
    assert not any(t.startswith(("param_norm/", "update_ratio/")) for t in scalars)
    assert "grad_norm/total_after_clip" not in scalars  # no clipping configured
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"histograms": 0})
    acc.Reload()
    hist = acc.Histograms("grad_hist/fc2.weight")
    assert [h.step for h in hist] == [0, 4, 8]
    assert hist[0].histogram_value.num == module.net.fc2.weight.numel()


def test_fp16_amp_norms_are_unscaled(tmp_path, capsys):
    """Under a GradScaler (scale 2**16) the logged norms are those of the true gradients, recomputed in fp32."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    module = tiny_module()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    fit(module, tmp_path, GradNormMonitor(log_every_n_steps=1), max_epochs=1,
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)], extra_callbacks=[PlantNaN(step=2)])
    total = values(read_scalars(tmp_path / "tb"), "grad_norm/total")
    reference = tiny_module().net
    for step in (0, 1, 3):
        reference.load_state_dict({k: v for k, v in module.before[step].items()})
        reference.zero_grad()
        x, y = module.batches[step]
        nn.functional.cross_entropy(reference(x), y).backward()
        fp32 = torch.cat([p.grad.flatten() for p in reference.parameters()]).norm().item()
        assert total[step] == pytest.approx(fp32, rel=2e-2)  # fp16 autocast rounding, not a 65536x scale
    # The scaler skips the planted inf/NaN step and lowers its scale: routine, so no stop and no warning.
    assert math.isnan(total[2]) and len(module.before) == 6
    assert scaler.get_scale() < 2.0**16
    assert "gradient" not in capsys.readouterr().err


@pytest.mark.parametrize("loss_scale, state, kwargs, layers", [
    # vanishing is relative (gradlab.observe.health_rules.vanishing): fc1's gradient shrunk 1e6x against fc2's
    (1.0, "vanishing", dict(vanishing_threshold=1e-3), ("fc1.weight",)),
    (1e6, "exploding", dict(exploding_threshold=1e3), ("fc1.weight", "fc2.weight", "fc2.bias")),
])
def test_health_warning_after_patience(tmp_path, capsys, loss_scale, state, kwargs, layers):
    module = tiny_module(lr=0.0, loss_scale=loss_scale)  # lr 0: the gradients stay put, step after step
    if state == "vanishing":
        module.net.fc1.weight.register_hook(lambda g: g * 1e-6)
    fit(module, tmp_path, GradNormMonitor(log_every_n_steps=1, patience=3, **kwargs), max_epochs=1)
    err = capsys.readouterr().err
    assert err.count(f"{state} gradient") == 1  # one warning, not one per step
    assert f"{state} gradient at step 2" in err  # the third logging step in a row
    for name in layers:
        assert name in err
    if state == "vanishing":
        assert "fc2.weight" not in err
    assert f"{module.pre[2]['fc1.weight']:.3g}" in err


def test_nonfinite_warn_keeps_training(tmp_path, capsys):
    # The module's own guard would end the run at the first NaN loss that follows: let it skip those batches.
    module = tiny_module(on_nonfinite_loss="skip")
    monitor = GradNormMonitor(log_every_n_steps=1, on_nonfinite="warn")
    trainer = fit(module, tmp_path, monitor, extra_callbacks=[PlantNaN(step=2, param="net.fc1.weight")], max_epochs=1)
    err = capsys.readouterr().err
    assert "non-finite gradient at step 2: fc1.weight = nan" in err
    assert monitor.stopped_at is None and not trainer.should_stop
    assert torch.isnan(module.net.fc1.weight).any()  # warn means the NaN step was applied


@pytest.mark.parametrize("batch_norm", [False, True])
def test_nonfinite_stop_skips_the_step_and_keeps_checkpoints(tmp_path, capsys, batch_norm):
    module = tiny_module(batch_norm=batch_norm)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=1, save_top_k=-1)
    trainer = fit(module, tmp_path, GradNormMonitor(log_every_n_steps=1, on_nonfinite="stop"),
                  extra_callbacks=[PlantNaN(step=3), ckpt], enable_checkpointing=True, max_epochs=3, min_epochs=2)
    err = capsys.readouterr().err
    assert "non-finite gradient at step 3: fc1.weight = nan" in err and "Training stops" in err
    assert str(tmp_path / "ckpt" / "last.ckpt") in err.replace("\n", "")  # the console wraps a long path
    assert trainer.global_step == 4  # ended at once, min_epochs notwithstanding
    # Not one weight moved in the skipped step, and nothing was written after it.
    weights = {n.removeprefix("net."): p.detach() for n, p in module.named_parameters()}
    assert all(torch.equal(weights[n], w) for n, w in module.before[3].items())
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 3
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == \
        ["epoch=0-step=1.ckpt", "epoch=0-step=2.ckpt", "epoch=0-step=3.ckpt", "last.ckpt"]
    for name, tensor in last["state_dict"].items():
        if not name.startswith("net."):
            continue  # metric states such as val_acc_best
        assert torch.isfinite(tensor.float()).all(), name
        if name.removeprefix("net.") in weights:
            assert torch.equal(tensor, weights[name.removeprefix("net.")]), name
    scalars = read_scalars(tmp_path / "tb")
    assert [s for s, _ in scalars["grad_norm/total"]] == [0, 1, 2]  # the NaN step is not logged as data


def test_bad_option_is_a_user_error():
    from gradlab.errors import UserError

    with pytest.raises(UserError, match="on_nonfinite"):
        GradNormMonitor(on_nonfinite="ignore")


# ---------------------------------------------------------------------------------------------------------------
# The real entry point: train.py on tiny IDX files, events read back.

CNN_PARAMS = [f"{layer}.{kind}" for layer in ("conv1", "conv2", "fc1", "fc2") for kind in ("weight", "bias")]


@pytest.fixture(scope="module")
def cnn_run(mnist_root, tmp_path_factory):
    """3 epochs of 7 steps asked for, clipping at 0.5, last.ckpt after every step (the resume callback), and a
    NaN planted at step 9 (the middle of epoch 1)."""
    out = tmp_path_factory.mktemp("cnn")
    proc = run_cli("train.py", *tiny_mnist_args(mnist_root, out), "trainer.max_epochs=3",
                   "callbacks.grad_norm.log_every_n_steps=1", "trainer.gradient_clip_val=0.5",
                   "callbacks.resume.every_n_train_steps=1",
                   "+callbacks.plant_nan._target_=test_grad_norm.PlantNaN", "+callbacks.plant_nan.step=9",
                   "test=false", cwd=out,
                   env={"PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return only_run_dir(out), proc


def test_train_py_cnn_logs_every_layer_consistently(cnn_run):
    scalars = read_scalars(cnn_run[0] / "tensorboard")
    per_layer = [t for t in scalars if t.startswith("grad_norm/") and not t.startswith("grad_norm/total")]
    assert per_layer == [f"grad_norm/{p}" for p in CNN_PARAMS]  # one tag per parameter, in network order
    total, after = values(scalars, "grad_norm/total"), values(scalars, "grad_norm/total_after_clip")
    assert sorted(total) == list(range(9))  # every step up to the NaN one
    for step, value in total.items():
        assert value == pytest.approx(math.sqrt(sum(values(scalars, t)[step] ** 2 for t in per_layer)), rel=1e-5)
        assert after[step] == pytest.approx(min(value, 0.5), rel=1e-4)
    assert any(v > 0.5 for v in total.values())  # the clip acted at least once
    ratios = values(scalars, "update_ratio/fc1.weight")
    assert all(0 < r < 1 for r in ratios.values())


def test_train_py_stop_on_nan_keeps_the_last_good_checkpoint(cnn_run):
    run_dir, proc = cnn_run
    assert "non-finite gradient at step 9: fc1.weight = nan" in proc.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == 10  # 7 steps of epoch 0, then 7, 8 and the skipped 9: no epoch 2
    ckpts = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["epoch_000.ckpt", "last.ckpt"]
    last = torch.load(ckpts / "last.ckpt", weights_only=True)
    assert last["global_step"] == 9  # written after step 8, the last good one, and never overwritten
    assert all(torch.isfinite(t.float()).all() for k, t in last["state_dict"].items() if k.startswith("net."))
    assert str(ckpts / "last.ckpt") in proc.stderr
    assert metrics["best_checkpoint"] == str(ckpts / "epoch_000.ckpt")


def test_plot_script_writes_a_png(cnn_run, tmp_path):
    import matplotlib.image

    plot_main = load_script("plot_grad_flow").main
    out = tmp_path / "flow.png"
    assert plot_main([str(cnn_run[0]), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(out)
    assert image.shape[0] > 300 and image.shape[1] > 600
    assert image[..., :3].std() > 0.05  # not a blank canvas


def test_plot_script_reports_a_run_without_events(tmp_path):
    proc = run_cli("scripts/plot_grad_flow.py", str(tmp_path), cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "No TensorBoard event files" in proc.stderr


@pytest.fixture(scope="module")
def mlp_and_rnn_sweep(tmp_path_factory):
    """model=mlp on tiny MNIST and model=rnn on a tiny aclImdb tree, as the two jobs of one multirun: two experiment
    files of the user's own (found through hydra.searchpath), each choosing its model and data."""
    from helpers import write_aclimdb, write_mnist

    out = tmp_path_factory.mktemp("sweep")
    data = write_aclimdb(write_mnist(out / "data"))
    (out / "conf" / "experiment").mkdir(parents=True)
    for model, data_group in (("mlp", "mnist"), ("rnn", "imdb")):
        (out / "conf" / "experiment" / f"tiny_{model}.yaml").write_text(
            f"# @package _global_\ndefaults:\n  - override /data: {data_group}\n  - override /model: {model}\n")
    proc = run_cli("train.py", "-m", "experiment=tiny_mlp,tiny_rnn", f"hydra.searchpath=[file://{out / 'conf'}]",
                   f"paths.data_dir={data}", f"paths.root_dir={out}",
                   "data.download=false", "data.val_size=20", "data.batch_size=16", "trainer.max_steps=3",
                   "trainer.limit_val_batches=1", "test=false", "callbacks.grad_norm.log_every_n_steps=1",
                   "callbacks.progress_bar=null", "callbacks.model_summary=null", cwd=out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep,) = (out / "logs" / "train" / "multiruns").iterdir()
    return sweep


@pytest.mark.parametrize("job, params", [
    ("0", [f"layers.{layer}.{kind}" for layer in ("fc1", "fc2", "out") for kind in ("weight", "bias")]),
    ("1", ["embedding.weight", "head.weight", "head.bias"] + [
        f"rnn.{kind}_{gate}_l0{rev}" for rev in ("", "_reverse") for kind in ("weight", "bias") for gate in ("ih", "hh")]),
])
def test_train_py_mlp_and_rnn_log_every_layer(mlp_and_rnn_sweep, job, params):
    scalars = read_scalars(mlp_and_rnn_sweep / job / "tensorboard")
    per_layer = {t.removeprefix("grad_norm/") for t in scalars if t.startswith("grad_norm/")} - \
        {"total", "total_after_clip"}
    assert per_layer == set(params)
    total = values(scalars, "grad_norm/total")
    assert sorted(total) == [0, 1, 2]
    for step, value in total.items():
        assert value == pytest.approx(math.sqrt(sum(values(scalars, f"grad_norm/{p}")[step] ** 2 for p in params)),
                                      rel=1e-5)
    if job == "1":  # the RNN clips at its own default of 1.0 (model.gradient_clip_val)
        after = values(scalars, "grad_norm/total_after_clip")
        assert after == pytest.approx({s: min(v, 1.0) for s, v in total.items()}, rel=1e-4)
    else:
        assert "grad_norm/total_after_clip" not in scalars


# ---------------------------------------------------------------------------------------------------------------
# Sweeps: every job has its own TensorBoard layout (observe/layout.py), of its own layers.

def layout_of(tb_dir: Path) -> layout_pb2.Layout:
    acc = EventAccumulator(str(tb_dir), size_guidance={TENSORS: 0})
    acc.Reload()
    (event,) = acc.Tensors("custom_scalars__config__")
    return layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])


def test_every_sweep_job_writes_its_own_layout(mlp_and_rnn_sweep):
    for job, first_param in (("0", "layers.fc1.weight"), ("1", "embedding.weight")):
        layout = layout_of(mlp_and_rnn_sweep / job / "tensorboard")
        grads = layout.category[0].chart[0].multiline.tag
        logged = [t for t in read_scalars(mlp_and_rnn_sweep / job) if t.startswith("grad_norm_log10/")
                  and not t.startswith("grad_norm_log10/total")]
        assert [t.strip("^$").replace("\\", "") for t in grads] == logged  # every layer, in the order logged
        assert grads[0] == f"^grad_norm_log10/{first_param.replace('.', chr(92) + '.')}$"
    # The RNN's recurrent outputs (tanh) are charted too.
    layout = layout_of(mlp_and_rnn_sweep / "1" / "tensorboard")
    acts = {c.title: list(c.multiline.tag) for cat in layout.category if cat.title == "activation health"
            for c in cat.chart}
    assert acts["activation mean"] == ["^act/mean/rnn$"] and "^act/saturation/rnn$" in acts[next(iter(acts))]

