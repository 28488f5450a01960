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
    LanguageModel,
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
