"""Files from someone else, tried as an attacker would: each gets a clean refusal (exit code 2, one paragraph),
writes no marker file, stays within a memory bound, and changes nothing of the victim run.

The victim is a run folder made here in a blink (an untrained MLP on data=toy, saved as train.py saves it), so
that every case costs well under a second; the crafted files are variations of its checkpoint.
"""

import hashlib
import json
import resource
import shutil
from pathlib import Path

import lightning.pytorch  # noqa: F401  (imported at collection: its log handler then binds to the session's stderr)
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from gradlab.errors import EXIT_USER_ERROR
from helpers import ROOT, run_entry

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def config(name: str, overrides: list[str], output_dir: Path):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(name, overrides=[*overrides, f"paths.output_dir={output_dir}"])


def fails(module: str, cfg, capsys) -> str:
    """Run an entry point in-process; it must exit with code 2 and a one-paragraph message, which is returned."""
    with pytest.raises(SystemExit) as exit_info:
        run_entry(module, cfg)
    assert exit_info.value.code == EXIT_USER_ERROR
    err = capsys.readouterr().err
    message = err[err.index("error: "):]
    assert "Traceback" not in message
    return message


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


TOY = ["model=mlp", "data=toy", "model.hidden=[8]", "data.n_train=64", "data.n_val=32", "data.n_test=32",
       "callbacks.grad_norm=null", "callbacks.grad_noise=null", "callbacks.progress_bar=null",
       "callbacks.model_summary=null", "logger=csv", "trainer.max_epochs=1"]


def train_args(root: Path) -> list[str]:
    return [*TOY, f"paths.root_dir={root}"]


def save_run(root: Path, name: str = "victim") -> Path:
    """A finished run folder as train.py leaves it (a real 1-epoch toy run, in-process: about a second)."""
    run_dir = root / "logs" / "train" / "runs" / name
    cfg = config("train", train_args(root), run_dir)
    run_entry("gradlab.run.train", cfg)
    (run_dir / ".hydra").mkdir()  # as Hydra writes it: the mark of a run folder that ckpt_path=<run> resumes in
    (run_dir / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "completed"
    return run_dir


@pytest.fixture(scope="module")
def victim_template(tmp_path_factory):
    return save_run(tmp_path_factory.mktemp("template"))


@pytest.fixture
def victim(victim_template, tmp_path):
    """A run folder that every failing case below must leave byte for byte as it was."""
    run_dir = tmp_path / "logs" / "train" / "runs" / victim_template.name
    shutil.copytree(victim_template, run_dir)
    before = snapshot(run_dir)
    yield run_dir
    assert snapshot(run_dir) == before, "a refused file changed the victim run"


def crafted(victim: Path, tmp_path: Path, edit) -> Path:
    """A copy of the victim's checkpoint, changed by `edit(checkpoint)`; it still loads with weights_only=True."""
    checkpoint = torch.load(victim / "checkpoints" / "last.ckpt", weights_only=True)
    edit(checkpoint)
    path = tmp_path / "crafted.ckpt"
    torch.save(checkpoint, path)
    torch.load(path, weights_only=True)  # the attack is only interesting if this passes
    return path


# ---- the config stored in a checkpoint -------------------------------------------------------------------------
# Each writes the marker file if it is ever called: functions reached through module globals (which Hydra's own
# block list of 1.3.8 does not stop), a real gradlab function that writes files, and a blocked one.
CHAINS = [
    ("gradlab.data.imdb.torch.save", lambda m: ["pwned", str(m)]),
    ("gradlab.data.imdb.os.makedirs", lambda m: [str(m)]),
    ("gradlab.data.imdb._save_atomic", lambda m: ["pwned", str(m)]),
    ("gradlab.checkpoints.load.os.system", lambda m: [f"touch {m}"]),
    ("torch.save", lambda m: ["pwned", str(m)]),
]


@pytest.mark.parametrize("entry", ["eval", "predict"])
@pytest.mark.parametrize("target, args", CHAINS, ids=[t for t, _ in CHAINS])
def test_a_stored_config_builds_nothing_off_the_allow_list(victim, tmp_path, capsys, entry, target, args):
    marker = tmp_path / "marker"

    def edit(checkpoint):
        checkpoint["gradlab_config"]["model"]["criterion"] = {"_target_": target, "_args_": args(marker)}
        if entry == "predict":  # predict.py reads images for MNIST-family runs: it gets as far as the model
            checkpoint["gradlab_config"]["data"]["_target_"] = "gradlab.data.mnist.MNISTDataModule"

    path = crafted(victim, tmp_path, edit)
    overrides = [f"ckpt_path={path}"] + ([f"input={tmp_path}"] if entry == "predict" else [])
    err = fails(f"gradlab.run.{'evaluate' if entry == 'eval' else 'predict'}",
                config(entry, overrides, tmp_path / "out"), capsys)
    assert f"model.criterion._target_={target!r}" in err and "not on the list of what a checkpoint may build" in err
    assert not marker.exists()


def test_a_stored_config_may_not_use_hydra_keys_or_unknown_arguments(victim, tmp_path, capsys):
    def partial(checkpoint):
        checkpoint["gradlab_config"]["model"]["criterion"] = {"_target_": "torch.nn.CrossEntropyLoss",
                                                              "_partial_": True}
    err = fails("gradlab.run.evaluate", config("eval", [f"ckpt_path={crafted(victim, tmp_path, partial)}"],
                                                tmp_path / "out"), capsys)
    assert "model.criterion the Hydra key(s) _partial_" in err

    def interpolation(checkpoint):  # nothing in a stored config is resolved: a resolver would run code
        checkpoint["gradlab_config"]["data"]["n_train"] = "${gradlab.claim_dir:" + str(tmp_path / "claimed") + "}"
    err = fails("gradlab.run.evaluate", config("eval", [f"ckpt_path={crafted(victim, tmp_path, interpolation)}"],
                                                tmp_path / "out"), capsys)
    assert "data (gradlab.data.toy.ToyDataModule) cannot be built from the config stored in the file" in err
    assert not (tmp_path / "claimed").exists()


def test_the_allow_list_builds_what_train_py_stored(victim, tmp_path):
    """The independent reference: Hydra's instantiate of the same stored config gives the same module."""
    from hydra.utils import instantiate

    from gradlab.checkpoints.load import build_module, load

    path = str(victim / "checkpoints" / "last.ckpt")
    checkpoint = load(path)
    ours = build_module(checkpoint, path)
    theirs = instantiate(checkpoint["gradlab_config"]["model"], _convert_="object")
    theirs.load_state_dict(checkpoint["state_dict"])
    x = torch.randn(5, 3)
    assert type(ours.net) is type(theirs.net) and type(ours.criterion) is type(theirs.criterion)
    assert torch.equal(ours(x), theirs.eval()(x))
