"""eval.py reproduces the training run's test metrics; predict.py reads images (and texts) like the model was fed."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ONE_THREAD
from helpers import compose_config, fake_digits, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def only_dir(path: Path) -> Path:
    (child,) = path.iterdir()
    return child


def test_eval_of_a_run_folder_equals_the_test_metrics_of_that_run(cnn_run, tmp_path):
    run_dir, reference, _ = cnn_run
    proc = run_cli("eval.py", f"ckpt_path={run_dir}", f"paths.root_dir={tmp_path}", cwd=tmp_path, env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((only_dir(tmp_path / "logs" / "eval" / "runs") / "metrics.json").read_text())
    # A run folder means its best checkpoint, the one train.py tested.
    assert metrics["checkpoint"] == reference["best_checkpoint"]
    assert metrics["test/acc"] == reference["test/acc"]
    assert metrics["test/loss"] == reference["test/loss"]
    assert "test/acc" in proc.stdout


def reference_probabilities(ckpt_path: str, images: np.ndarray) -> torch.Tensor:
    """The CNN of the checkpoint applied by hand to uint8 (N, 28, 28) images, normalized as MNIST is."""
    from gradlab.models.cnn import MnistCNN

    state = torch.load(ckpt_path, weights_only=True)["state_dict"]
    net = MnistCNN()
    net.load_state_dict({k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")})
    x = (torch.from_numpy(images).float().unsqueeze(1) / 255 - 0.1307) / 0.3081
    with torch.no_grad():
        return net.eval()(x).exp()


def test_predict_on_a_folder_of_generated_images(cnn_run, tmp_path):
    run_dir, reference, _ = cnn_run
    images, _ = fake_digits(4, seed=9)
    folder = tmp_path / "digits"
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i}.png")
    # The same digit, 3x larger and as dark ink on white paper in RGB: inverted and area-averaged back.
    Image.fromarray(255 - images[0]).resize((84, 84), Image.Resampling.NEAREST).convert("RGB").save(folder / "big.png")
    (folder / "notes.png").write_text("not an image")  # skipped, reported, the rest still predicted
    (folder / "readme.txt").write_text("ignored: not an image extension")

    proc = run_cli("predict.py", f"ckpt_path={run_dir}", f"input={folder}", "--json", cwd=tmp_path, env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {Path(r["input"]).name: r for r in json.loads(proc.stdout)}
    assert sorted(rows) == ["0.png", "1.png", "2.png", "3.png", "big.png"]
    assert "skipped 1 of 6 files" in proc.stderr and "notes.png" in proc.stderr

    expected = reference_probabilities(reference["best_checkpoint"], images)
    for i in range(4):
        got = torch.tensor(rows[f"{i}.png"]["probabilities"])
        assert torch.allclose(got, expected[i], atol=2e-6), i
        assert rows[f"{i}.png"]["class"] == int(expected[i].argmax())
    assert torch.allclose(torch.tensor(rows["big.png"]["probabilities"]), expected[0], atol=2e-6)
    assert not (tmp_path / "logs").exists()  # predict writes nothing


def in_process(name: str, overrides: list[str], output_dir: Path):
    """An entry point run as its script runs it, but in this process (no interpreter start, no re-import)."""
    from helpers import run_entry

    cfg = compose_config(name, overrides, output_dir)
    return run_entry({"train": "gradlab.run.train", "predict": "gradlab.run.predict"}[name], cfg)


def test_predict_prints_a_table_of_classes(cnn_run, tmp_path, capsys):
    _, reference, _ = cnn_run
    images, _ = fake_digits(2, seed=3)
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / f"digit{i}.png")
    rows = in_process("predict", [f"ckpt_path={reference['best_checkpoint']}", f"input={tmp_path}", "top_k=2"],
                      tmp_path)
    expected = reference_probabilities(reference["best_checkpoint"], images).argmax(1).tolist()
    assert [r["class"] for r in rows] == expected
    table = capsys.readouterr().out
    for i, k in enumerate(expected):
        line = next(line for line in table.splitlines() if f"digit{i}.png" in line)
        assert rows[i]["name"] in line and f"{rows[i]['probability']:.4f}" in line


@pytest.fixture(scope="module")
def rnn_run(tmp_path_factory):
    """A 2-epoch sentiment RNN on a tiny aclImdb tree: (data root, its best checkpoint)."""
    from helpers import write_aclimdb

    tmp = tmp_path_factory.mktemp("rnn")
    root = write_aclimdb(tmp / "data", n_train=30, n_test=6)
    args = ["model=rnn", "data=imdb", f"paths.data_dir={root}", f"paths.root_dir={tmp}", "data.download=false", "data.val_size=10",
            "data.batch_size=16", "data.max_vocab_size=200", "data.min_freq=1", "trainer.max_epochs=2", "logger=csv",
            "callbacks.grad_norm=null", "callbacks.progress_bar=null",
            "callbacks.model_summary=null"]
    in_process("train", args, tmp / "out")
    return root, json.loads((tmp / "out" / "metrics.json").read_text())["best_checkpoint"]


def test_predict_encodes_text_exactly_as_training_did(rnn_run, tmp_path, capsys):
    """Reference: the data module's own test set (its reader, its cached vocabulary) through the same weights."""
    from gradlab.checkpoints.load import build_module
    from gradlab.data.imdb import IMDBDataModule
    from gradlab.data.text import pad_collate

    root, best = rnn_run
    folder = root / "aclImdb" / "test" / "pos"
    rows = in_process("predict", [f"ckpt_path={best}", f"input={folder}", "json=true"], tmp_path)
    got = {Path(r["input"]).name: r["positive"] for r in rows}
    assert json.loads(capsys.readouterr().out) == rows

    dm = IMDBDataModule(root=str(root), download=False, val_size=10, max_vocab_size=200, min_freq=1)
    dm.setup("test")
    module = build_module(torch.load(best, weights_only=True), best)
    # The reader's order: positive reviews first, by (name length, name).
    names = sorted((p.name for p in folder.glob("*.txt")), key=lambda f: (len(f), f))
    with torch.no_grad():
        for i, name in enumerate(names):
            tokens, lengths, label = pad_collate([dm.test_set[i]])
            assert label.item() == 1.0
            assert got[name] == pytest.approx(module.predict_proba(tokens, lengths).item(), abs=1e-6), name

    # A text given on the command line is the same as that text in a file.
    text = (folder / names[0]).read_text()
    (tmp_path / "one.txt").write_text(text)
    single = in_process("predict", [f"ckpt_path={best}", f"input={tmp_path / 'one.txt'}", "json=true"], tmp_path)
    literal = in_process("predict", [f"ckpt_path={best}", f"input='{text}'", "json=true"], tmp_path)
    assert single[0]["positive"] == literal[0]["positive"] == got[names[0]]


def test_predict_text_rejects_a_file_that_is_not_utf8(rnn_run, tmp_path, capsys):
    root, best = rnn_run
    (tmp_path / "review.txt").write_bytes("Trés bien".encode("latin-1"))
    with pytest.raises(SystemExit) as exit_info:
        in_process("predict", [f"ckpt_path={best}", f"input={tmp_path / 'review.txt'}"], tmp_path)
    assert exit_info.value.code == 2
    assert "review.txt is not UTF-8 text (byte 0xe9 at offset 2)" in capsys.readouterr().err
