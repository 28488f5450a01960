"""Left-right flips for mirror-symmetric data (clothing): training batches half mirrored, evaluation averaged over an
image and its mirror; refused for digits (data.mirror_symmetric says which data allow them), opt-in everywhere."""


import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from gradlab.data.mnist import MNISTDataModule
from gradlab.data.tensor_loader import MirroredBatches
from gradlab.errors import UserError
from gradlab.models.classifier import ClassifierModule
from gradlab.models.cnn import MnistCNN
from test_config_groups import CONF


def test_mirrored_batches_flip_about_half_and_leave_the_data_alone():
    torch.manual_seed(0)
    x = torch.randn(400, 1, 4, 5)
    y = torch.arange(400)
    data = MirroredBatches(x.clone(), y)
    got, labels = data.__getitems__(list(range(400)))
    assert torch.equal(labels, y) and torch.equal(data.tensors[0], x)  # stored images untouched
    flipped = torch.tensor([torch.equal(g, s.flip(-1)) for g, s in zip(got, x)])
    kept = torch.tensor([torch.equal(g, s) for g, s in zip(got, x)])
    assert bool((flipped ^ kept).all())  # each image is itself or its mirror, never both (random data)
    assert 150 < int(flipped.sum()) < 250  # half, give or take 5 standard deviations


def test_flip_tta_averages_the_probabilities_of_image_and_mirror():
    torch.manual_seed(0)
    net = MnistCNN(dropout_conv=0.0, dropout_fc=0.0).double()
    module = ClassifierModule(net, torch.nn.NLLLoss(), num_classes=10, tta_flip=True).double().eval()
    x = torch.randn(6, 1, 28, 28, dtype=torch.float64)
    with torch.no_grad():
        p = (net(x).exp() + net(x.flip(-1)).exp()) / 2  # (B, C), by hand in float64
        got = module._mirror_average(module(x), x)
    torch.testing.assert_close(got, p.log(), rtol=1e-10, atol=1e-12)
    assert not torch.allclose(got, net(x))  # the mirror changes this random network's output
    with pytest.raises(UserError, match="binary"):
        ClassifierModule(net, torch.nn.BCEWithLogitsLoss(), num_classes=1, tta_flip=True)


def test_digits_refuse_training_flips():
    with pytest.raises(UserError, match="not mirror-symmetric"):
        MNISTDataModule(dataset="mnist", hflip=True)
    MNISTDataModule(dataset="fashion_mnist", mirror_symmetric=True, hflip=True)


@pytest.mark.parametrize("data, symmetric", [("mnist", False), ("kmnist", False), ("fashion_mnist", True)])
def test_only_clothing_is_mirror_symmetric_and_flips_stay_opt_in(data, symmetric):
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=mnist_fast", f"data={data}"])
    assert cfg.data.mirror_symmetric is symmetric
    assert cfg.data.hflip is False and cfg.model.tta_flip is False  # their accuracy in mnist_fast is unmeasured
