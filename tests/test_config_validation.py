"""A bad config fails in about a second with one message naming the key, the value and what is allowed."""

import json
import subprocess
import sys

import numpy as np
import pytest

from gradlab.config.cli import check_overrides
from gradlab.config.rules import check
from gradlab.errors import EXIT_USER_ERROR, UserError
from helpers import ROOT, compose_config, fake_digits, run_cli, run_entry, tiny_mnist_args, write_idx

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def exit_message(call, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        call()
    assert exit_info.value.code == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    return err


def test_cli_rejects_a_bad_value_before_importing_anything_heavy(tmp_path):
    proc = run_cli("train.py", "optimizer.lr=-1", f"paths.root_dir={tmp_path}", cwd=tmp_path)
    assert proc.returncode == EXIT_USER_ERROR
    assert proc.stderr.startswith("error: invalid config:\n  optimizer.lr=-1: must be a number > 0\n")
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    # The same checks, run in a fresh interpreter: neither torch nor Lightning may be imported by them.
    probe = (
        "import sys; from hydra import compose, initialize_config_dir; from gradlab.config.rules import check\n"
        f"with initialize_config_dir(config_dir={str(ROOT / 'conf')!r}, version_base='1.3'):\n"
        f"    cfg = compose('train', overrides=['paths.output_dir={tmp_path}'])\n"
        "check(cfg)\n"
        "print(sorted(m for m in ('torch', 'lightning', 'torchvision') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("overrides, expected", [
    (["trainer.max_epoch=1"], "trainer.max_epoch is not a config key; did you mean trainer.max_epochs?"),
    (["model=cnnn"], "model=cnnn: no such option in conf/model/; choose one of cnn, "),
    (["optimizer=adamm"], "optimizer=adamm: no such option in conf/optimizer/; choose one of adadelta, "),
    (["trainr.max_epochs=2", "data.batch_sise=8"],
     "bad overrides:\n  trainr.max_epochs is not a config key; did you mean trainer.max_epochs?"),
])
def test_mistyped_keys_and_options_get_a_suggestion(capsys, overrides, expected):
    err = exit_message(lambda: check_overrides(str(ROOT / "train.py"), "train", overrides), capsys)
    assert expected in err
    if len(overrides) == 2:
        assert "data.batch_sise is not a config key; did you mean data.batch_size?" in err


def test_good_overrides_pass_the_pre_check():
    check_overrides(str(ROOT / "train.py"), "train", ["trainer.max_epochs=2", "model=cnn", "hydra.run.dir=/tmp/x"])


@pytest.mark.parametrize("overrides, expected", [
    (["data.batch_size=abc"], "data.batch_size=abc: must be an integer >= 1"),
    (["optimizer.lr=-1"], "optimizer.lr=-1: must be a number > 0"),
    (["optimizer.lr=0"], "optimizer.lr=0: must be a number > 0"),
    (["data.batch_size=0"], "data.batch_size=0: must be an integer >= 1"),
    (["data.val_size=0"], "data.val_size=0: must be a count >= 1 or a fraction in (0, 1)"),
    (["model.hidden=0"], "model.hidden=0: must be an integer >= 1"),
    (["model=mlp", "model.hidden=[128,0]"], "model.hidden=[128, 0]: must be an integer >= 1 (or a non-empty list"),
    (["model.net.num_classes=5"], "model.net.num_classes=5 differs from model.num_classes=10"),
    (["model.dropout_fc=1.5"], "model.dropout_fc=1.5: must be a number in [0, 1)"),
    (["model=rnn"], "model=rnn reads token ids from data=imdb"),
    (["data=imdb"], "model=rnn reads token ids from data=imdb"),
    (["trainer.min_epochs=5", "trainer.max_epochs=2"], "trainer.min_epochs=5 is more than trainer.max_epochs=2"),
    (["trainer.precision=17"], "trainer.precision=17: must be one of 64-true"),
    (["callbacks.model_checkpoint.monitor=val/accuracy"],
     "callbacks.model_checkpoint.monitor=val/accuracy: must be one of"),
    (["model.on_nonfinite_loss=ignore"], "model.on_nonfinite_loss=ignore: must be one of stop, skip"),
    (["model=mlp", "model.batch_norm=maybe"], "model.batch_norm=maybe: must be true or false"),
    (["optimizer=sgd", "optimizer.momentum=1.2"], "optimizer.momentum=1.2: must be a number in [0, 1)"),
    (["data.allow_sample=maybe"], "data.allow_sample=maybe: must be true or false"),
    (["callbacks.plain_progress.when=sometimes"], "callbacks.plain_progress.when=sometimes: must be one of auto, "),
])
def test_bad_values_name_key_value_and_what_is_allowed(tmp_path, capsys, overrides, expected):
    cfg = compose_config("train", overrides, tmp_path)
    err = exit_message(lambda: run_entry("gradlab.run.train", cfg), capsys)
    assert expected in err
    assert not (tmp_path / "checkpoints").exists()


def test_all_bad_values_are_reported_at_once(tmp_path):
    cfg = compose_config("train", ["data.batch_size=0", "optimizer.lr=-0.1", "trainer.max_epochs=0"], tmp_path)
    with pytest.raises(UserError) as err:
        check(cfg)
    lines = str(err.value).splitlines()
    assert lines[0] == "invalid config:"
    assert {line.split(":")[0].strip() for line in lines[1:-1]} == \
        {"trainer.max_epochs=0", "optimizer.lr=-0.1", "data.batch_size=0"}


def test_a_mistyped_key_inside_a_config_file_is_caught_after_import(tmp_path, capsys):
    # `+` adds a key Hydra does not know, as a typo inside a YAML file would: the Trainer does not take it.
    cfg = compose_config("train", ["+trainer.max_epoch=1"], tmp_path)
    err = exit_message(lambda: run_entry("gradlab.run.train", cfg), capsys)
    assert ("trainer.max_epoch: not an argument of lightning.pytorch.trainer.Trainer; "
            "did you mean trainer.max_epochs?") in err


@pytest.mark.parametrize("name, expected", [
    ("eval", "ckpt_path is required: python eval.py ckpt_path="),
    ("predict", "input is required: python predict.py"),
])
def test_eval_and_predict_name_their_required_values(tmp_path, name, expected):
    with pytest.raises(UserError, match=expected.replace("(", r"\(")):
        check(compose_config(name, [], tmp_path))


def shipped(group: str) -> list[str]:
    return sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml"))


@pytest.mark.parametrize("overrides", [
    *[[f"experiment={name}"] for name in shipped("experiment")],
    *[[f"model={model}", f"debug={debug}", *(["data=imdb"] if model == "rnn" else [])]
      for model in shipped("model") for debug in shipped("debug")],
])
def test_every_shipped_config_passes_the_checks(tmp_path, overrides):
    check(compose_config("train", overrides, tmp_path))


def test_debug_overfit_memorizes_a_few_batches_of_random_labels(tmp_path):
    """Random labels: only memorizing can bring the loss down, so ~0 means the whole path can fit."""
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n, seed in (("train", 240, 0), ("t10k", 60, 1)):
        images, _ = fake_digits(n, seed)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.random.default_rng(seed).integers(0, 10, n).astype(np.uint8))
    args = [*tiny_mnist_args(tmp_path / "data", tmp_path), "model=mlp", "debug=overfit", "logger=csv",
            "callbacks.grad_norm=null"]  # per-step gradient logging would triple the time
    run_entry("gradlab.run.train", compose_config("train", args, tmp_path / "out"))
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["steps"] == 300  # 100 epochs of the same 3 batches
    assert metrics["train/loss"] < 0.01
