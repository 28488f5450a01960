import pytest

from helpers import write_mnist


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory):
    """A tiny MNIST in the real IDX format: 240 train / 60 test images."""
    return write_mnist(tmp_path_factory.mktemp("mnist"))
