"""The instruments on architectures and training patterns they were not written for (tests/zoo.py): every
parameter in grad_norm/*, every applied activation in act/*, every normalization's output scale, attention
entropy where there is attention, every parameterized layer in grad_noise/*; nothing fails, nothing is skipped."""

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradlab.observe import Observatory
from observed import fit, health, scalars
from zoo import (
    ACTIVATION_MODULES,
    NORM_MODULES,
    Classifier,
    Conv3dNet,
    LanguageModel,
    MNISTLitModule,
    SimpleDenseNet,
    TinyGPT,
    count_calls,
    loader,
    param_layers,
    token_data,
    zoo,
)

ZOO = zoo()
ACT_STATS = ("dead", "saturation", "mean")  # every activation layer has "mean" (leaky_relu: mean and std only)


def observed(name: str, tmp_path, steps: int = 3, **trainer_kwargs):
    make, dataset, functional = ZOO[name]
    torch.manual_seed(0)
    module = make()
    fit(module, loader(dataset), tmp_path, max_steps=steps, **trainer_kwargs)
    return module, scalars(tmp_path), functional, dataset


def layers_of(found: dict, family: str) -> set[str]:
    return {t[len(family):] for t in found if t.startswith(family)}


def check_everything_observed(module, found, functional, dataset, observatory_failures=()):
    params = {n for n, p in module.named_parameters() if p.requires_grad}  # named_parameters: tied ones once
    assert params <= layers_of(found, "grad_norm/"), params - layers_of(found, "grad_norm/")
    assert "grad_norm/total" in found
    batch = next(iter(loader(dataset)))
    acts = count_calls(module, batch, ACTIVATION_MODULES) + functional
    assert len(layers_of(found, "act/mean/")) == acts, sorted(layers_of(found, "act/mean/"))
    assert len(layers_of(found, "act/scale/")) == count_calls(module, batch, NORM_MODULES)
    noise = layers_of(found, "grad_noise/trace_cov/")
    assert set(param_layers(module)) <= noise | {"total"}, set(param_layers(module)) - noise


@pytest.mark.parametrize("name", list(ZOO))
def test_every_parameter_activation_and_layer_is_observed(tmp_path, capsys, name):
    module, found, functional, dataset = observed(name, tmp_path)
    check_everything_observed(module, found, functional, dataset)
    err = capsys.readouterr().err
    assert "instrument error" not in err, err
    assert health(tmp_path)["instrument_failures"] == []
    if name in ("gpt", "vit"):  # attention: entropy per head, normalized to [0, 1]
        heads = {t: dict(s) for t, s in found.items() if t.startswith("act/attn_entropy/")}
        assert len(heads) == (4 if name == "gpt" else 2), heads
        assert all(0 <= v <= 1 for series in heads.values() for v in series.values())


def test_tied_weights_are_counted_once_under_the_first_name(tmp_path):
    module, found, _, _ = observed("gpt", tmp_path, steps=1)
    assert "grad_norm/net.tok.weight" in found and "grad_norm/net.head.weight" not in found
    assert "grad_noise/trace_cov/net.tok" in found and "grad_noise/trace_cov/net.head" not in found


class TwiceAndFrozen(pl.LightningModule):
    """One layer called twice per forward, a frozen layer, and a branch that gets a gradient only on odd steps."""

    def __init__(self):
        super().__init__()
        self.frozen = nn.Linear(8, 8).requires_grad_(False)
        self.shared = nn.Linear(8, 8)
        self.odd = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)
        self.relu, self.tanh = nn.ReLU(), nn.Tanh()  # torch.relu right in training_step would not be watched

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = self.tanh(self.shared(self.relu(self.shared(self.frozen(x)))))
        if batch_idx % 2:
            h = h + self.odd(h)
        return F.cross_entropy(self.head(h), y)

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)


def test_a_layer_called_twice_frozen_layers_and_parameters_without_a_gradient(tmp_path, capsys):
    from zoo import class_data
    torch.manual_seed(0)
    module = TwiceAndFrozen()
    fit(module, loader(class_data((8,))), tmp_path, max_steps=4)
    found = scalars(tmp_path)
    assert not any("frozen" in t for t in found if t.startswith(("grad_norm/", "grad_noise/")))
    assert "grad_norm/shared.weight" in found and "grad_noise/trace_cov/shared" in found  # called twice: once
    assert [s for s, _ in found["grad_norm/odd.weight"]] == [1, 3]  # only the steps that used it
    assert {"shared", "shared#2"} == {t.split("/")[2] for t in found if t.startswith("act/mean/")}
    report = health(tmp_path)
    (frozen,) = [f for f in report["findings"] if f["verdict"] == "frozen"]
    assert "frozen.weight" in frozen["layer"] and "frozen.bias" in frozen["layer"]
    assert not any(f["verdict"] == "stopped learning" for f in report["findings"])
    assert "instrument error" not in capsys.readouterr().err


class TinyGAN(pl.LightningModule):
    """Manual optimization with two optimizers, as in Lightning's GAN example."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.generator = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 8))
        self.discriminator = nn.Sequential(nn.Linear(8, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        real, _ = batch
        g_opt, d_opt = self.optimizers()
        fake = self.generator(torch.randn(real.shape[0], 4))
        ones, zeros = torch.ones(real.shape[0], 1), torch.zeros(real.shape[0], 1)
        d_loss = (F.binary_cross_entropy_with_logits(self.discriminator(real), ones)
                  + F.binary_cross_entropy_with_logits(self.discriminator(fake.detach()), zeros))
        d_opt.zero_grad()
        self.manual_backward(d_loss)
        d_opt.step()
        g_loss = F.binary_cross_entropy_with_logits(self.discriminator(fake), ones)
        g_opt.zero_grad()
        self.manual_backward(g_loss)
        g_opt.step()

    def configure_optimizers(self):
        return (torch.optim.Adam(self.generator.parameters(), lr=1e-3),
                torch.optim.Adam(self.discriminator.parameters(), lr=1e-3))


def test_manual_optimization_with_two_optimizers(tmp_path, capsys):
    from zoo import class_data
    torch.manual_seed(0)
    module = TinyGAN()
    fit(module, loader(class_data((8,))), tmp_path, max_steps=6)
    found = scalars(tmp_path)
    params = {n for n, p in module.named_parameters()}
    assert params <= layers_of(found, "grad_norm/")
    # G's relu, D's leaky_relu on real and on fake: the forward up to the first backward (the generator's
    # step, D on fake again, runs after it, unwatched)
    assert layers_of(found, "act/mean/") == {"generator.0", "discriminator.0", "discriminator.0#2"}
    # grad_noise reads the first optimizer step of a batch (the discriminator's): its layers, estimated
    assert {"discriminator.0", "discriminator.2"} <= layers_of(found, "grad_noise/trace_cov/")
    assert "instrument error" not in capsys.readouterr().err


@pytest.mark.parametrize("trainer_kwargs", [
    dict(accumulate_grad_batches=2),
    dict(precision="bf16-mixed"),
    dict(precision="16-mixed"),  # on CPU Lightning autocasts to float16 without a GradScaler (CUDA only)
])
def test_accumulation_and_mixed_precision(tmp_path, capsys, trainer_kwargs):
    module, found, functional, dataset = observed("gpt", tmp_path, steps=2, **trainer_kwargs)
    check_everything_observed(module, found, functional, dataset)
    assert "instrument error" not in capsys.readouterr().err


def test_torch_compile(tmp_path, capsys):
    """A compiled network: grad_norm and grad_noise see its parameters; activations inside compiled graphs are not
    seen (the function mode does not trace into them), which the instrument neither hides nor fails on."""
    torch.manual_seed(0)
    net = TinyGPT(layers=1)
    module = LanguageModel(torch.compile(net, backend="aot_eager"))
    fit(module, loader(token_data()), tmp_path, max_steps=2)
    found = scalars(tmp_path)
    params = {n for n, p in module.named_parameters()}
    assert params <= layers_of(found, "grad_norm/")
    assert "instrument error" not in capsys.readouterr().err


def test_the_observatory_is_what_the_template_configures(tmp_path):
    """conf/callbacks/default.yaml builds the same instruments, with the same knobs, as Observatory()."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from helpers import ROOT

    conf = OmegaConf.load(ROOT / "conf/callbacks/default.yaml")
    built = {name: instantiate(node) for name, node in conf.items()
             if str(node.get("_target_", "")).startswith("gradlab.observe") and name != "throughput"
             and "out_dir" not in node}
    ours = Observatory(strip_prefix="net.")
    for name, cb in built.items():
        mine = ours[name]
        assert type(mine) is type(cb)
        assert {k: v for k, v in vars(mine).items() if not k.startswith("_") and k != "_console"} == \
               {k: v for k, v in vars(cb).items() if not k.startswith("_") and k != "_console"}, name
    assert {cb.name for cb in ours} - set(built) == {"health"}  # its out_dir is the run's folder: ${paths...}


class BagOfWords(pl.LightningModule):
    """A 10,000-row embedding of which the data uses 20 rows: the shape of a language model's vocabulary."""

    def __init__(self):
        super().__init__()
        self.emb, self.out = nn.Embedding(10_000, 16), nn.Linear(16, 2)

    def training_step(self, batch, batch_idx):
        tokens, y = batch
        return F.cross_entropy(self.out(self.emb(tokens).mean(1)), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class Witness(pl.Callback):
    """Weights and the used rows before each optimizer step, the weights after: an independent record."""

    def __init__(self):
        self.steps = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        w = pl_module.emb.weight
        self.steps.append([w.detach().clone(), w.grad.ne(0).any(1)])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps[-1].append(pl_module.emb.weight.detach().clone())


def test_an_embeddings_update_ratio_is_over_the_rows_the_step_used(tmp_path):
    torch.manual_seed(0)
    tokens = torch.randint(0, 20, (32, 6))
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(tokens, (tokens[:, 0] < 10).long()),
                                       batch_size=8)
    witness = Witness()
    fit(BagOfWords(), data, tmp_path, max_steps=4,
        callbacks=[*Observatory(out_dir=str(tmp_path), grad_norm={"log_every_n_steps": 1}), witness])
    logged = [v for _, v in scalars(tmp_path)["update_ratio/emb.weight"]]
    expected = [((after - before)[used].norm() / before[used].norm()).item() for before, used, after in witness.steps]
    assert logged == pytest.approx(expected, rel=1e-5)
    whole = [((after - before).norm() / before.norm()).item() for before, _, after in witness.steps]
    assert all(w < 0.1 * e for w, e in zip(whole, expected))  # over all 10,000 rows it would look 10x+ smaller
    assert witness.steps[0][1].sum() <= 20


# ---- verdicts on architectures gradlab did not write ----------------------------------------------------------------
EVERY_2 = {k: {"log_every_n_steps": 2} for k in ("grad_norm", "grad_noise", "activations", "optimizer_state")}


def report_of(module: pl.LightningModule, dataset, tmp_path, steps: int = 32) -> list[dict]:
    """The end-of-fit report's findings after `steps` steps (a logging step every 2)."""
    fit(module, loader(dataset), tmp_path, max_steps=steps,
        callbacks=Observatory(**EVERY_2, out_dir=str(tmp_path)))
    return health(tmp_path)["findings"]


@pytest.mark.parametrize("name", list(ZOO))
def test_each_zoo_model_learning_its_task_gets_a_healthy_report(tmp_path, name):
    """Each zoo model with its own optimizer settings (Adam, lr 1e-3 or 3e-3) on data it can learn: the loss
    falls, and the report finds nothing (resnet18 and mobilenet fit their data: every gradient falls together)."""
    make, dataset, _ = ZOO[name]
    torch.manual_seed(0)
    module = make()
    batch = next(iter(loader(dataset)))
    module.log = lambda *args, **kwargs: None
    with torch.no_grad():
        before = float(module.training_step(batch, 0))
    del module.log
    findings = report_of(module, dataset, tmp_path, steps=16)  # 8 readings: the fewest the rules judge
    module.log = lambda *args, **kwargs: None
    with torch.no_grad():
        after = float(module.training_step(batch, 0))
    del module.log
    assert after < before, (before, after)
    assert [f["verdict"] for f in findings] == ["healthy"], findings


def sigmoid_stack() -> nn.Module:
    layers = [nn.Flatten(), nn.Linear(16, 32), nn.Sigmoid()]
    for _ in range(8):
        layers += [nn.Linear(32, 32), nn.Sigmoid()]
    return nn.Sequential(*layers, nn.Linear(32, 10))


def dead_relus() -> nn.Module:
    net = SimpleDenseNet()
    with torch.no_grad():
        net.model[1].bias.fill_(-10.0)  # the first BatchNorm's shift: the ReLU after it sees only negatives
    return net


@pytest.mark.parametrize("fault, model, make, verdict", [
    ("sigmoid stack", "hydra_template_mnist", lambda: MNISTLitModule(sigmoid_stack()), "vanishing"),
    ("dead relus", "hydra_template_mnist", lambda: MNISTLitModule(dead_relus()), "dead units"),
    # Adam at 0.1 instead of 1e-3: the tanh and softplus after the 3-D convolutions are driven flat
    ("lr x100", "conv3d", lambda: Classifier(Conv3dNet(), lr=0.1), "saturated"),
])
def test_each_planted_fault_is_found_on_a_zoo_model(tmp_path, fault, model, make, verdict):
    """The Lightning-Hydra template's MNIST module (tests/zoo.py) and the 3-D conv net, each with one fault planted,
    on the data the healthy test above learns."""
    torch.manual_seed(0)
    findings = report_of(make(), ZOO[model][1], tmp_path)
    assert verdict in {f["verdict"] for f in findings}, findings
