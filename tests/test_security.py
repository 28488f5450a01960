"""Files from someone else, tried as an attacker would: each gets a clean refusal (exit code 2, one paragraph),
writes no marker file, stays within a memory bound, and changes nothing of the victim run.

The victim is a run folder made here in a blink (an untrained MLP on data=toy, saved as train.py saves it), so
that every case costs well under a second; the crafted files are variations of its checkpoint.
"""

import json
import resource
import shutil
from pathlib import Path

import lightning.pytorch  # noqa: F401  (imported at collection: its log handler then binds to the session's stderr)
import pytest
import torch
from omegaconf import OmegaConf

from helpers import ROOT, fails, run_entry, snapshot
from helpers import compose_config as config

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py





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
def run_dir(victim_template, tmp_path):
    """A copy of the finished run, in this test's own folder."""
    copy = tmp_path / "logs" / "train" / "runs" / victim_template.name
    shutil.copytree(victim_template, copy)
    return copy


@pytest.fixture
def victim(run_dir):
    """A run folder that every failing case below must leave byte for byte as it was."""
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


# ---- unpickling ------------------------------------------------------------------------------------------------
class Payload:
    """Unpickled, it opens (creates) the marker file: proof that code from the file ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def unpickling_calls(source: str, filename: str) -> list[str]:
    """`torch.load` calls without weights_only=True, and any load/fit/test/validate call with weights_only=False."""
    import ast

    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        kw = {k.arg: k.value for k in node.keywords}
        value = kw.get("weights_only")
        is_true = isinstance(value, ast.Constant) and value.value is True
        is_false = isinstance(value, ast.Constant) and value.value is False
        torch_load = node.func.attr == "load" and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
        if (torch_load and not is_true) or (is_false and node.func.attr in (
                "load", "fit", "test", "validate", "predict", "load_checkpoint", "load_from_checkpoint")):
            found.append(f"{filename}:{node.lineno}")
    return found


def test_no_code_path_unpickles(tmp_path):
    files = [*ROOT.glob("*.py"), *(ROOT / "src").rglob("*.py"), *(ROOT / "scripts").rglob("*.py")]
    assert len(files) > 50
    found = [hit for f in files for hit in unpickling_calls(f.read_text(), str(f.relative_to(ROOT)))]
    assert found == []
    # The planted cases: the check sees each of them.
    planted = ("import torch\nx = torch.load(p)\ny = torch.load(p, weights_only=False)\n"
               "trainer.test(m, ckpt_path=best, weights_only=False)\nz = torch.load(p, weights_only=True)\n")
    assert unpickling_calls(planted, "planted.py") == ["planted.py:2", "planted.py:3", "planted.py:4"]


@pytest.mark.parametrize("entry", ["eval", "predict", "train"])
def test_a_pickled_payload_is_refused_everywhere(victim, tmp_path, capsys, entry):
    marker = tmp_path / "marker"
    path = crafted(victim, tmp_path, lambda c: None)
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["extra"] = Payload(marker)
    torch.save(checkpoint, path)
    overrides = {"eval": [f"ckpt_path={path}"], "predict": [f"ckpt_path={path}", f"input={tmp_path}"],
                 "train": [*train_args(tmp_path), f"ckpt_path={path}"]}[entry]
    module = {"eval": "evaluate", "predict": "predict", "train": "train"}[entry]
    before = peak_rss_mb()
    err = fails(f"gradlab.run.{module}", config(entry, overrides, tmp_path / "out"), capsys)
    assert "Refusing to load" in err and not marker.exists()
    assert peak_rss_mb() - before < 200


def test_the_test_stage_never_loads_a_best_checkpoint_from_elsewhere(run_dir, tmp_path):
    """A resumed checkpoint whose ModelCheckpoint state points at a pickle outside the run: never loaded."""
    evil = tmp_path / "evil.ckpt"
    marker = tmp_path / "marker"
    torch.save({"state_dict": Payload(marker)}, evil)
    last = run_dir / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    (key,) = [k for k in checkpoint["callbacks"] if k.startswith("ModelCheckpoint")]
    checkpoint["callbacks"][key]["best_model_path"] = str(evil)
    checkpoint["callbacks"][key]["best_k_models"] = {str(evil): torch.tensor(1.0)}
    torch.save(checkpoint, last)
    run_entry("gradlab.run.train", config("train", [*train_args(tmp_path), f"ckpt_path={last}"], tmp_path / "out"))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert not marker.exists() and evil.exists() and str(evil) not in json.dumps(metrics)
    assert "test/acc" in metrics


def test_a_replaced_best_checkpoint_in_the_run_is_refused(run_dir, tmp_path, capsys):
    marker = tmp_path / "marker"
    (best,) = (run_dir / "checkpoints").glob("epoch_*.ckpt")
    torch.save({"state_dict": Payload(marker)}, best)
    err = fails("gradlab.run.train", config("train", [*train_args(tmp_path), f"ckpt_path={run_dir}"],
                                            tmp_path / "out"), capsys)
    assert "Refusing to load" in err and best.name in err and not marker.exists() and best.exists()


# ---- readers ----------------------------------------------------------------------------------------------------
def test_a_gzip_bomb_is_refused_after_its_header(tmp_path):
    """228 kB of gzip that claims, and holds, 2.6 GB of IDX: refused without decompressing more than the header."""
    import gzip
    import struct

    from gradlab.data.idx import read_header, read_idx

    zeros = gzip.compress(bytes(10_000_000), compresslevel=9)  # a gzip file may be many members one after another
    bomb = tmp_path / "train-images-idx3-ubyte.gz"
    bomb.write_bytes(gzip.compress(struct.pack(">BBBBIII", 0, 0, 8, 3, 3_300_000, 28, 28)) + zeros * 260)
    assert bomb.stat().st_size < 3_000_000  # 2.6 GB once decompressed
    tracemalloc_peak = _peak_of(lambda: read_idx(str(bomb), 3))
    with pytest.raises(Exception, match="claims 3300000 x 28 x 28 items, more than any file of the MNIST family"):
        read_header(str(bomb), 3)
    assert tracemalloc_peak < 5e6

    # A header within the caps, then far more data than it promises: read up to the promise, then refused.
    long = tmp_path / "t10k-images-idx3-ubyte.gz"
    long.write_bytes(gzip.compress(struct.pack(">BBBBIII", 0, 0, 8, 3, 10, 28, 28)) + zeros * 50)
    with pytest.raises(Exception, match="longer than its header says"):
        read_header(str(long), 3)
    assert _peak_of(lambda: read_idx(str(long), 3)) < 5e6


def _peak_of(call) -> float:
    """Peak bytes allocated by Python while `call` runs (it must raise the UserError of a refused file)."""
    import tracemalloc

    from gradlab.errors import UserError

    tracemalloc.start()
    try:
        with pytest.raises(UserError):
            call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_tar_members_outside_the_folder_are_refused(tmp_path):
    import io
    import tarfile

    from gradlab.data.bounded import extract_tar
    from gradlab.errors import UserError

    outside = tmp_path / "outside"
    for name, kind in [("../outside/escaped.txt", "file"), (str(outside / "absolute.txt"), "absolute"),
                       ("aclImdb/link", "symlink")]:
        archive = tmp_path / "evil.tar.gz"
        with tarfile.open(archive, "w:gz") as tar:
            tar.addfile(tarfile.TarInfo("aclImdb/README"), io.BytesIO(b""))
            info = tarfile.TarInfo(name)
            if kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, str(outside)
                tar.addfile(info)
                info = tarfile.TarInfo("aclImdb/link/through.txt")  # a file written through the link
            info.size = 5
            tar.addfile(info, io.BytesIO(b"pwned"))
        root = tmp_path / "root"
        if kind == "absolute":  # the filter takes the leading / off: it lands inside, as root/<path>
            extract_tar(str(archive), str(root))
            assert (root / str(outside / "absolute.txt").lstrip("/")).read_bytes() == b"pwned"
        else:
            with pytest.raises(UserError, match="refused to extract it, a member would land outside"):
                extract_tar(str(archive), str(root))
        assert not outside.exists() and not list(tmp_path.glob("*.txt"))


def test_a_fifo_is_refused_at_once(tmp_path):
    """A FIFO named like an image, text or IDX file: a clear error, never a read that waits for a writer (an alarm
    interrupts the test if one ever does)."""
    import os
    import signal

    from gradlab.data.idx import read_header
    from gradlab.data.images import list_images, load_digit
    from gradlab.data.imdb import read_review
    from gradlab.errors import UserError

    for name in ("digit.png", "review.txt", "train-images-idx3-ubyte"):
        os.mkfifo(tmp_path / name)

    def hung(signum, frame):
        raise TimeoutError("a reader waited on the FIFO")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(10)
    try:
        for call in (lambda: load_digit(str(tmp_path / "digit.png")), lambda: read_review(str(tmp_path / "review.txt")),
                     lambda: read_header(str(tmp_path / "train-images-idx3-ubyte"), 3),
                     lambda: list_images(str(tmp_path / "digit.png"))):
            with pytest.raises(UserError, match="FIFO"):
                call()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_a_50_mb_text_costs_one_mib(tmp_path):
    from gradlab.data.imdb import MAX_REVIEW_BYTES, read_review

    big = tmp_path / "review.txt"
    with open(big, "w", encoding="utf-8") as f:
        f.write("first " + "é" * 25_000_000 + " last")  # 50 MB; two-byte characters, so a cut may split one
    before = peak_rss_mb()
    head, tail = read_review(str(big), "head"), read_review(str(big), "tail")
    assert head.startswith("first ") and tail.endswith(" last")
    assert len(head.encode()) <= MAX_REVIEW_BYTES and len(tail.encode()) <= MAX_REVIEW_BYTES
    assert peak_rss_mb() - before < 20


def test_an_image_of_another_format_than_its_name_is_refused(tmp_path):
    from PIL import Image

    from gradlab.data.images import load_digit
    from gradlab.errors import UserError

    picture = Image.new("L", (28, 28), 0)
    picture.save(tmp_path / "digit.png", format="GIF")  # a GIF named .png
    with pytest.raises(UserError, match="not an image file PIL can read as PNG"):
        load_digit(str(tmp_path / "digit.png"))
    picture.save(tmp_path / "real.png", format="PNG")
    assert load_digit(str(tmp_path / "real.png")).shape == (28, 28)


# ---- run folders ------------------------------------------------------------------------------------------------
HOLD = ("import sys, time\nfrom gradlab.checkpoints.run_dirs import lock_run\nlock_run(sys.argv[1])\n"
        "print('held', flush=True)\ntime.sleep(600)\n")


def test_a_run_in_use_is_skipped_by_last_and_refused_by_name(victim, tmp_path, capsys):
    """A second, real process holds the victim's lock (as train.py does while it trains)."""
    import os
    import subprocess
    import sys

    from gradlab.checkpoints.run_dirs import is_locked

    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(victim)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    try:
        assert holder.stdout.readline().strip() == "held"
        assert is_locked(str(victim))
        out = tmp_path / "out"
        err = fails("gradlab.run.train", config("train", [*train_args(tmp_path), "ckpt_path=last"], out), capsys)
        assert "every run under" in err and "is in use by another process" in err
        err = fails("gradlab.run.train", config("train", [*train_args(tmp_path), f"ckpt_path={victim}"], out), capsys)
        assert f"{victim} is in use: another process is training in it right now" in err
    finally:
        holder.kill()
        holder.wait()
    assert not is_locked(str(victim))  # the kernel dropped the killed holder's lock: nothing stale


def test_last_skips_a_run_in_use_and_says_so(victim, tmp_path, capsys):
    import os
    import subprocess
    import sys

    from gradlab.checkpoints.run_dirs import resolve_checkpoint

    older = save_run(tmp_path, "older")  # a free run, older than the victim
    os.utime(older / "checkpoints" / "last.ckpt", (1, 1))
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(victim)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    try:
        assert holder.stdout.readline().strip() == "held"
        cfg = config("train", [*train_args(tmp_path), "ckpt_path=last"], tmp_path / "out")
        resolve_checkpoint(cfg)
    finally:
        holder.kill()
        holder.wait()
    assert cfg.ckpt_path == str(older / "checkpoints" / "last.ckpt")
    assert f"skipping {victim}, which another process is training in" in capsys.readouterr().out


def test_a_finished_run_resumed_with_other_settings_is_refused_then_kept_when_forced(run_dir, tmp_path, capsys):
    before = snapshot(run_dir)
    old_metrics = json.loads((run_dir / "metrics.json").read_text())
    (best,) = (run_dir / "checkpoints").glob("epoch_*.ckpt")
    best_bytes = best.read_bytes()
    args = [*train_args(tmp_path), f"ckpt_path={run_dir}", "trainer.max_epochs=2", "optimizer.lr=0.5"]
    err = fails("gradlab.run.train", config("train", args, tmp_path / "out"), capsys)
    assert "is a finished run" in err and "trainer.max_epochs=1 in the checkpoint vs 2 now" in err
    assert "optimizer.lr=" in err and "+resume.force=true" in err
    assert snapshot(run_dir) == before

    run_entry("gradlab.run.train", config("train", [*args, "+resume.force=true"], tmp_path / "out"))
    (kept,) = (run_dir / "kept").iterdir()
    assert json.loads((kept / "metrics.json").read_text()) == old_metrics
    assert (kept / best.name).read_bytes() == best_bytes
    new_metrics = json.loads((run_dir / "metrics.json").read_text())
    assert new_metrics["status"] == "completed" and new_metrics["epochs"] == 2


# ---- launcher values ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("params, named", [
    ({"partition": "gpu\n#SBATCH --wrap=touch pwned"}, "hydra.launcher.partition="),
    ({"qos": "normal\rx"}, "hydra.launcher.qos="),
    ({"additional_parameters": {"signal": "USR1@120\necho pwned"}}, "hydra.launcher.additional_parameters.signal="),
    ({"setup": ["module load cuda", "echo a\necho b"]}, "hydra.launcher.setup[1]="),
])
def test_launcher_values_with_control_characters_are_refused(params, named):
    from gradlab.config.rules import check_launcher
    from gradlab.errors import UserError

    good = {"nodes": 1, "tasks_per_node": 1, "timeout_min": 30, "signal_delay_s": 120, "partition": "gpu",
            "setup": ["trap '' USR1"], "additional_parameters": {"signal": "USR1@120"}}
    check_launcher(good)  # plain values pass
    with pytest.raises(UserError, match="holds a control character") as err:
        check_launcher({**good, **params})
    assert named in str(err.value) and "nothing was submitted" in str(err.value)
