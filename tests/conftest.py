import os

import pytest
import torch

from helpers import write_mnist

# One intra-op thread for test runs: on a shared 2-core machine a second torch thread mostly spins waiting for a
# busy core, which makes small models ~5x slower. Bit-exact comparisons need the same count on both sides.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
# The whole suite, and the train.py processes it starts (they inherit the variable), runs on one thread.
os.environ.update(ONE_THREAD)
torch.set_num_threads(1)


def pytest_collection_modifyitems(items):
    """Tests parametrized on the CUDA device get the `cuda` marker: `pytest -m cuda` runs exactly the GPU checks.

    Files with the most slow tests go first (each file's tests stay together, in their order): the two workers
    (pyproject.toml: -n 2 --dist loadfile --no-loadscope-reorder) take files in this order, so a long file starts
    early instead of running alone at the end."""
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if any(str(value) == "cuda" or getattr(value, "type", None) == "cuda" for value in params.values()):
            item.add_marker(pytest.mark.cuda)
    slow = {}
    for item in items:
        slow[item.path] = slow.get(item.path, 0) + (item.get_closest_marker("slow") is not None)
    items.sort(key=lambda item: -slow[item.path])  # stable: file order and test order otherwise kept


@pytest.fixture(autouse=True)
def default_dtype_stays_float32():
    """A test that leaves torch's default dtype changed would change every test after it on the same worker."""
    yield
    leaked = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    assert leaked == torch.float32, f"the test left torch's default dtype at {leaked}"


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory):
    """A tiny MNIST in the real IDX format: 240 train / 60 test images."""
    return write_mnist(tmp_path_factory.mktemp("mnist"))


@pytest.fixture(scope="session")
def cnn_run(mnist_root, tmp_path_factory):
    """One real 2-epoch CNN run on the tiny MNIST (7 steps an epoch, best checkpoint by val/loss), shared by
    the resume, eval/predict and bad-input tests: (run dir, metrics.json as a dict, the command's overrides)."""
    import json

    from helpers import only_run_dir, run_cli, tiny_mnist_args

    out = tmp_path_factory.mktemp("cnn_run")
    args = [*tiny_mnist_args(mnist_root, out), "trainer.max_epochs=2", "trainer.log_every_n_steps=1",
            "callbacks.model_checkpoint.monitor=val/loss", "callbacks.model_checkpoint.mode=min"]
    proc = run_cli("train.py", *args, cwd=out, env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = only_run_dir(out)
    return run_dir, json.loads((run_dir / "metrics.json").read_text()), args
