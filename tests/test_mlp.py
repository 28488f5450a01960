"""ManualMLP: the hand-written backend against the autograd backend on identical weights, the toy data,
and model=mlp end to end through train.py."""

import json
import math

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from gradlab.autograd.memory import step_memory
from gradlab.data.toy import ToyDataModule
from gradlab.errors import UserError
from gradlab.models.mlp import ManualMLP, classification_loss
from helpers import only_run_dir, run_cli, tiny_mnist_args

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
ACTIVATIONS = ["sigmoid", "tanh", "relu", "leaky_relu"]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def twin_nets(dtype=torch.float64, device="cpu", num_classes=5, **kwargs):
    """The same network from both backends, the autograd one loaded with the manual one's weights."""
    torch.manual_seed(0)
    manual = ManualMLP(12, [16, 8], num_classes, backend="manual", **kwargs)
    reference = ManualMLP(12, [16, 8], num_classes, backend="autograd", **kwargs)
    reference.load_state_dict(manual.state_dict())
    return manual.to(device, dtype), reference.to(device, dtype)


def batch(dtype, device, num_classes=5, n=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 2, 2, generator=g, dtype=torch.float64).to(device, dtype)  # flattened to 12 inside
    y = torch.randint(0, max(num_classes, 2), (n,), generator=g).to(device)
    return x, (y.to(dtype) if num_classes == 1 else y)


def test_backends_have_the_same_parameters_and_buffers():
    manual, reference = twin_nets(batch_norm=True)
    assert manual.state_dict().keys() == reference.state_dict().keys()
    shapes = [{k: v.shape for k, v in net.state_dict().items()} for net in (manual, reference)]
    assert shapes[0] == shapes[1]
    names = {type(m).__module__.split(".")[0] for m in manual.modules() if not list(m.children())}
    assert names == {"gradlab"}  # the manual backend uses no torch layer's forward
    assert "layers.fc1.weight" in manual.state_dict() and "layers.bn1.running_var" in manual.state_dict()


@pytest.mark.parametrize("batch_norm", [False, True])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_one_step_same_loss_and_gradients(activation, batch_norm, device):
    manual, reference = twin_nets(device=device, activation=activation, batch_norm=batch_norm)
    x, y = batch(torch.float64, device)
    losses = []
    for net, backend in ((manual, "manual"), (reference, "autograd")):
        loss = classification_loss(5, backend)(net(x), y)
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-12, atol=1e-12)
    for (name, p), q in zip(manual.named_parameters(), reference.parameters(), strict=True):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("activation, batch_norm", [("sigmoid", False), ("relu", True), ("tanh", True)])
def test_n_sgd_steps_reach_the_same_weights(activation, batch_norm, dtype, tol, device):
    manual, reference = twin_nets(dtype, device, activation=activation, batch_norm=batch_norm)
    runs = [(manual, classification_loss(5, "manual")), (reference, classification_loss(5, "autograd"))]
    optimizers = [torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9) for net, _ in runs]
    for step in range(8):
        x, y = batch(dtype, device, seed=step)
        for (net, criterion), opt in zip(runs, optimizers):
            opt.zero_grad()
            criterion(net(x), y).backward()
            opt.step()
    start = ManualMLP(12, [16, 8], 5, activation=activation, batch_norm=batch_norm).to(device, dtype)
    moved = False
    for (name, ours), theirs, before in zip(manual.state_dict().items(), reference.state_dict().values(),
                                            start.state_dict().values()):
        torch.testing.assert_close(ours, theirs, rtol=tol, atol=tol, msg=name)  # running stats too
        moved |= name.endswith("weight") and not torch.allclose(ours, before.to(ours))
    assert moved
    x, _ = batch(dtype, device, seed=99)
    torch.testing.assert_close(manual.eval()(x), reference.eval()(x), rtol=tol, atol=tol)  # eval-mode BN


def test_binary_output_uses_bce_with_logits(device):
    manual, reference = twin_nets(device=device, num_classes=1, activation="tanh")
    x, y = batch(torch.float64, device, num_classes=1)
    assert manual(x).shape == (10,)
    assert isinstance(classification_loss(1, "autograd"), nn.BCEWithLogitsLoss)
    for net, backend in ((manual, "manual"), (reference, "autograd")):
        classification_loss(1, backend)(net(x), y).backward()
    for p, q in zip(manual.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("activation", ["tanh", "leaky_relu"])
def test_keeps_and_peaks_no_more_memory_than_autograd(activation):
    """Counted tensor by tensor (gradlab.autograd.memory: deterministic, not a timing). Each activation saves its output,
    which the next linear saves anyway; autograd's leaky relu keeps its input too, one activation per layer."""
    x, y = torch.randn(64, 32), torch.randint(0, 10, (64,))
    mem = {}
    for backend in ("manual", "autograd"):
        torch.manual_seed(0)
        net = ManualMLP(32, [48] * 6, 10, activation, backend=backend)
        mem[backend] = step_memory(net, classification_loss(10, backend), torch.optim.SGD(net.parameters(), 0.1),
                                   x, y)
    (kept, peak), (ref_kept, ref_peak) = mem["manual"], mem["autograd"]
    activation_bytes = 64 * 48 * 4
    assert 6 * activation_bytes <= kept <= ref_kept  # the six hidden outputs, which both must keep
    assert peak <= ref_peak
    if activation == "leaky_relu":
        assert ref_kept - kept >= 6 * activation_bytes


def test_backward_twice_needs_retain_graph_as_in_autograd():
    torch.manual_seed(0)
    x, y = torch.randn(4, 12), torch.randint(0, 5, (4,))
    net = ManualMLP(12, [8, 6], 5, batch_norm=True)
    loss = classification_loss(5)(net(x), y)
    loss.backward(retain_graph=True)
    first = net.layers.fc1.weight.grad.clone()
    loss.backward()  # the saved tensors were kept for it
    torch.testing.assert_close(net.layers.fc1.weight.grad, 2 * first)
    with pytest.raises(RuntimeError, match="second time"):
        loss.backward()  # but not after a backward without retain_graph


def test_cumulative_running_average_momentum_none_matches_torch():
    """momentum=None: running statistics are the plain average over batches, as nn.BatchNorm1d keeps them."""
    manual, reference = twin_nets(activation="tanh", batch_norm=True)
    for net in (manual, reference):
        for m in net.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.momentum = None
    for seed in range(3):
        x, _ = batch(torch.float64, "cpu", seed=seed)
        manual(x), reference(x)
    ref = reference.state_dict()
    for k, v in manual.state_dict().items():
        torch.testing.assert_close(v, ref[k], rtol=1e-12, atol=1e-12, msg=k)
    assert ref["layers.bn1.num_batches_tracked"].item() == 3


def test_autocast_matches_autograd(device):
    dtype = torch.bfloat16 if device == "cpu" else torch.float16
    manual, reference = twin_nets(torch.float32, device, activation="relu", batch_norm=True)
    x, y = batch(torch.float32, device, n=32, seed=5)
    results = []
    for net, backend in ((manual, "manual"), (reference, "autograd")):
        with torch.autocast(device, dtype=dtype):
            logits = net(x)
            loss = classification_loss(5, backend)(logits, y)
        loss.backward()
        assert logits.dtype == dtype and loss.dtype == torch.float32
        results.append((loss, [p.grad for p in net.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=2e-2, atol=2e-2)
    for ours, theirs in zip(results[0][1], results[1][1], strict=True):
        assert ours.dtype == torch.float32
        torch.testing.assert_close(ours, theirs, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("activation, expected_var", [
    # Xavier: Var(W) = gain² · 2 / (fan_in + fan_out), gain 1 for sigmoid, 5/3 for tanh
    ("sigmoid", 2 / (400 + 300)),
    ("tanh", (5 / 3) ** 2 * 2 / (400 + 300)),
    # Kaiming (fan_in): Var(W) = 2 / fan_in for relu, 2 / ((1 + a²) fan_in) for leaky relu
    ("relu", 2 / 400),
    ("leaky_relu", 2 / ((1 + 0.01 ** 2) * 400)),
])
def test_init_follows_the_activation(activation, expected_var):
    torch.manual_seed(0)
    net = ManualMLP(400, [300], 10, activation=activation)
    w = net.layers.fc1.weight
    assert w.var().item() == pytest.approx(expected_var, rel=0.03)  # 120k samples: ~0.4% std error
    assert net.layers.fc1.bias.abs().max().item() == 0


def test_bad_choices_are_user_errors():
    with pytest.raises(UserError, match="model.activation='swish'"):
        ManualMLP(4, [3], 2, activation="swish")
    with pytest.raises(UserError, match="model.backend"):
        ManualMLP(4, [3], 2, backend="jax")
    with pytest.raises(UserError, match="positive sizes"):
        ManualMLP(4, [0], 2)
    with pytest.raises(ValueError, match="more than 1 value per feature"):
        ManualMLP(4, [3], 2, batch_norm=True)(torch.randn(1, 4))


@pytest.mark.slow  # compiling forward and backward takes ~20-40 s on 2 cores
def test_compiled_training_step_matches_eager():
    """The Functions trace into one graph (fullgraph: no silent fallback to eager); AOTAutograd then
    compiles their hand-written backward, which `loss.backward()` runs."""
    torch._dynamo.reset()
    compiled_net, _ = twin_nets(torch.float32, activation="tanh", batch_norm=True)
    eager_net, _ = twin_nets(torch.float32, activation="tanh", batch_norm=True)
    criterion = classification_loss(5, "manual")
    x, y = batch(torch.float32, "cpu")

    def loss_of(net):
        return criterion(net(x), y)

    losses = []
    for net, fn in ((compiled_net, torch.compile(loss_of, fullgraph=True)), (eager_net, loss_of)):
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        loss = fn(net)
        loss.backward()
        opt.step()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(compiled_net.named_parameters(), eager_net.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(compiled_net.layers.bn1.running_mean, eager_net.layers.bn1.running_mean)
    assert compiled_net.layers.bn1.num_batches_tracked.item() == 1


# --- toy data ---------------------------------------------------------------------------------------

def test_toy_xor_is_seeded_and_labelled_by_parity():
    a, b, c = (ToyDataModule(seed=s, noise=0.1) for s in (0, 0, 1))
    for dm in (a, b, c):
        dm.setup()
    xa, ya = a.train_set.tensors
    assert xa.shape == (800, 3) and ya.dtype == torch.long
    assert torch.equal(xa, b.train_set.tensors[0]) and not torch.equal(xa, c.train_set.tensors[0])
    # Independent labelling: noise 0.1 never flips the sign of a ±1 corner coordinate (10 sigma).
    assert torch.equal(ya, (xa > 0).sum(1) % 2)
    assert len(a.val_set) == 200 and len(a.test_set) == 200
    assert 0.4 < ya.float().mean() < 0.6


@pytest.mark.parametrize("task, num_classes", [("moons", 2), ("spirals", 3), ("moons", 1)])
def test_toy_tasks_shapes_and_targets(task, num_classes):
    dm = ToyDataModule(task=task, input_dim=2, num_classes=num_classes, n_train=300)
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 2) and x.dtype == torch.float32
    if num_classes == 1:
        assert y.dtype == torch.float32 and set(y.unique().tolist()) <= {0.0, 1.0}
    else:
        assert y.dtype == torch.long and set(dm.train_set.tensors[1].unique().tolist()) == set(range(num_classes))


@pytest.mark.parametrize("kwargs, named", [(dict(task="circles"), "data.task"),
                                           (dict(task="moons", input_dim=3), "data.input_dim=2"),
                                           (dict(task="xor", num_classes=3), "data.num_classes")])
def test_toy_bad_config_is_a_user_error(kwargs, named):
    with pytest.raises(UserError, match=named):
        ToyDataModule(**kwargs)


# --- through train.py -------------------------------------------------------------------------------

QUIET = ["callbacks.progress_bar=null", "callbacks.model_summary=null"]


def test_fast_dev_run_mlp_on_mnist(mnist_root, tmp_path):
    proc = run_cli("train.py", *tiny_mnist_args(mnist_root, tmp_path), "model=mlp", "model.batch_norm=true",
                   "model.activation=tanh", "model.hidden=[32,16]", "debug=fdr", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((only_run_dir(tmp_path) / "metrics.json").read_text())
    assert metrics["steps"] == 1 and math.isfinite(metrics["test/loss"])
    config = OmegaConf.load(only_run_dir(tmp_path) / ".hydra" / "config.yaml")
    net = config.model.net
    assert net._target_ == "gradlab.models.mlp.ManualMLP" and net.in_features == 784 and net.hidden == [32, 16]
    assert (net.activation, net.batch_norm, net.backend) == ("tanh", True, "manual")


def test_toy_xor_3_4_2_sigmoid_net_learns_through_train_py(tmp_path):
    """The real thing, a few epochs: the hand-written backward must be right for XOR to be learned."""
    proc = run_cli("train.py", "experiment=toy_xor", f"paths.root_dir={tmp_path}", "trainer.max_epochs=3",
                   *QUIET, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = only_run_dir(tmp_path)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["epochs"] == 3 and metrics["steps"] == 75      # 800 points / 32 per batch x 3
    assert metrics["val/acc_best"] >= 0.95 and metrics["test/acc"] >= 0.95  # chance is 0.5

    # test/acc came from the best checkpoint: recompute it by hand from that file and the same data.
    state = torch.load(metrics["best_checkpoint"], weights_only=True)["state_dict"]
    net = ManualMLP(3, [4], 2, activation="sigmoid")
    net.load_state_dict({k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")})
    assert net.layers.fc1.weight.shape == (4, 3) and net.layers.out.weight.shape == (2, 4)
    dm = ToyDataModule()
    dm.setup()
    x, y = dm.test_set.tensors
    with torch.no_grad():
        acc = (net(x).argmax(1) == y).float().mean().item()
    assert acc == pytest.approx(metrics["test/acc"], abs=1e-6)
