"""The MNIST-family data module on tiny IDX files, against the arrays written."""

import numpy as np
import pytest
import torch
from urllib.error import URLError

from gradlab.data.mnist import MNISTDataModule
from gradlab.data.tensor_loader import TensorBatches
from gradlab.errors import UserError
from helpers import fake_digits, write_mnist


def test_images_decoded_once_and_normalized(mnist_root):
    dm = MNISTDataModule(root=str(mnist_root), download=False, val_size=40)
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    images, labels = fake_digits(240, seed=0)
    expected = (torch.from_numpy(images).float() / 255 - 0.1307) / 0.3081
    x_tr, y_tr = dm.train_set.tensors
    x_va, y_va = dm.val_set.tensors
    assert x_tr.shape == (200, 1, 28, 28) and x_va.shape == (40, 1, 28, 28)
    # The split is a permutation of the training file: every image appears exactly once.
    all_x = torch.cat([x_tr, x_va]).flatten(1)
    order = torch.cat([y_tr, y_va])
    assert sorted(all_x.sum(1).tolist()) == pytest.approx(sorted(expected.flatten(1).sum(1).tolist()), rel=1e-5)
    assert np.bincount(order.numpy()).tolist() == np.bincount(labels).tolist()
    assert dm.test_set.tensors[0].shape == (60, 1, 28, 28)


def test_split_is_fixed_by_split_seed_not_seed(mnist_root):
    def val_labels(split_seed):
        dm = MNISTDataModule(root=str(mnist_root), download=False, val_size=0.2, split_seed=split_seed)
        torch.manual_seed(split_seed + 1)  # the global seed must not matter
        dm.setup("fit")
        return dm.val_set.tensors[0].sum(dim=(1, 2, 3))

    assert torch.equal(val_labels(1), val_labels(1))
    assert not torch.equal(val_labels(1), val_labels(2))


def test_loader_batches_equal_sample_by_sample_stacking():
    x, y = torch.randn(10, 1, 4, 4), torch.arange(10)
    ds = TensorBatches(x, y)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=True, collate_fn=lambda b: b,
                                         generator=torch.Generator().manual_seed(0))
    seen = []
    for xb, yb in loader:
        assert torch.equal(xb, x[yb])
        seen += yb.tolist()
    assert sorted(seen) == list(range(10))


@pytest.mark.parametrize("name, folder", [("fashion_mnist", "FashionMNIST"), ("kmnist", "KMNIST")])
def test_other_family_members_read_their_own_folder(tmp_path, name, folder):
    write_mnist(tmp_path, folder=folder, n_train=30, n_test=10)
    dm = MNISTDataModule(root=str(tmp_path), dataset=name, download=False, val_size=10)
    dm.setup("fit")
    assert len(dm.train_set) == 20 and len(dm.val_set) == 10


def test_failed_download_names_path_files_and_fix(tmp_path, monkeypatch):
    import torchvision.datasets.mnist as tv_mnist

    def no_internet(*args, **kwargs):
        raise URLError("Name or service not known")

    monkeypatch.setattr(tv_mnist, "download_and_extract_archive", no_internet)
    dm = MNISTDataModule(root=str(tmp_path), download=True)
    with pytest.raises(UserError) as err:
        dm.prepare_data()
    msg = str(err.value)
    assert str(tmp_path / "MNIST" / "raw") in msg and "t10k-labels-idx1-ubyte" in msg
    assert "download failed" in msg and "data.root=" in msg


def test_bad_val_size_is_a_user_error(mnist_root):
    dm = MNISTDataModule(root=str(mnist_root), download=False, val_size=240)
    with pytest.raises(UserError, match="val_size"):
        dm.setup("fit")
