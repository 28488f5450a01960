"""experiment=mnist_fast and trainer.precision=auto: the recipe runs on the reference network; auto follows the CPU."""

import json

import pytest
import torch
import torch.nn.functional as F

from gradlab.run.precision import choose, cpu_flags
from helpers import only_run_dir, run_cli, tiny_mnist_args


@pytest.mark.parametrize("accelerator, flags, cuda_bf16, expected", [
    ("auto", {"avx512f", "avx512_bf16", "avx2"}, None, "bf16-mixed"),       # AMD Zen 4/5, Intel Cooper Lake
    ("cpu", {"avx512f", "amx_bf16", "amx_tile"}, None, "bf16-mixed"),       # Intel Sapphire Rapids (AMX)
    ("auto", {"avx512f", "avx512bw", "avx2"}, None, "32-true"),             # AVX-512, no BF16 (Skylake-SP..Ice Lake)
    ("auto", {"avx2", "fma"}, None, "32-true"),
    ("auto", set(), None, "32-true"),                                      # flags unknown (macOS, Windows)
    ("auto", {"avx2"}, True, "bf16-mixed"),                                # an Ampere+ GPU wins over the CPU
    ("gpu", {"avx512_bf16"}, False, "32-true"),                            # a GPU without bf16 (e.g. V100)
    ("cpu", {"avx2"}, True, "32-true"),                                    # accelerator=cpu: the CPU decides
    ("mps", {"avx512_bf16"}, None, "32-true"),
])
def test_auto_precision_follows_the_hardware(accelerator, flags, cuda_bf16, expected):
    precision, reason = choose(accelerator, flags, cuda_bf16)
    assert precision == expected and reason


def test_cpu_flags_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512f avx512_bf16\n\n"
                    "processor\t: 1\nflags\t\t: fpu avx2 avx512f avx512_bf16\n")
    assert cpu_flags(str(info)) == {"fpu", "avx2", "avx512f", "avx512_bf16"}
    assert cpu_flags(str(tmp_path / "missing")) == set()


def test_label_smoothing_on_log_probs_is_exact():
    """The recipe's CrossEntropyLoss gets log-probs: it must equal smoothed NLL computed by hand in float64."""
    torch.manual_seed(0)
    z = torch.randn(32, 10, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 10, (32,))
    logp = F.log_softmax(z, dim=1)  # what MnistCNN returns
    loss = torch.nn.CrossEntropyLoss(label_smoothing=0.1)(logp, y)
    by_hand = 0.9 * F.nll_loss(logp, y) + 0.1 * (-logp).mean()  # (1 - eps) NLL + eps x uniform target
    torch.testing.assert_close(loss, by_hand, rtol=1e-12, atol=1e-12)
    (g_loss,) = torch.autograd.grad(loss, z, retain_graph=True)
    (g_hand,) = torch.autograd.grad(by_hand, z)
    torch.testing.assert_close(g_loss, g_hand, rtol=1e-10, atol=1e-12)


def test_fast_recipe_trains_and_its_checkpoint_loads_into_the_reference_net(mnist_root, tmp_path):
    proc = run_cli("train.py", "experiment=mnist_fast", *tiny_mnist_args(mnist_root, tmp_path),
                   "trainer.max_epochs=2", "test=false", cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected, _ = choose("auto", cpu_flags(), torch.cuda.is_bf16_supported() if torch.cuda.is_available() else None)
    assert proc.stdout.count("trainer.precision=auto:") == 1
    assert f"trainer.precision=auto: {expected}" in proc.stdout
    run_dir = only_run_dir(tmp_path)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == 2 * 7  # 2 epochs x ceil(200 / 32)
    assert 0.0 <= metrics["val/acc"] <= 1.0
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["gradlab_config"]["model"]["criterion"]["label_smoothing"] == 0.1
    state = {k.removeprefix("net."): v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    from gradlab.models.reference_net import Net

    ref = Net()
    ref.load_state_dict(state)  # strict: the same names and shapes as pytorch/examples' Net
    from gradlab.models.cnn import MnistCNN

    ours = MnistCNN()
    ours.load_state_dict(state)
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), ref.eval()(x), rtol=1e-5, atol=1e-5)
    # and the weights moved: the lr schedule trained the network (not a freshly initialised copy)
    assert not torch.equal(state["fc2.weight"], MnistCNN().state_dict()["fc2.weight"])
