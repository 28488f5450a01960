"""Writers for tiny data files in the real on-disk formats, and a way to run the real CLI."""

import hashlib
import importlib.util
import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gradlab.errors import EXIT_USER_ERROR

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    """scripts/<name>.py as a module, so its main(argv) runs in-process."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file as in the MNIST distribution: magic (0, 0, 0x08 = ubyte, ndim), big-endian dims, data."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    with open(path, "wb") as f:
        f.write(struct.pack(">BBBB", 0, 0, 0x08, array.ndim))
        f.write(struct.pack(f">{array.ndim}I", *array.shape))
        f.write(array.tobytes())


def fake_digits(n: int, seed: int, num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Learnable 28x28 "digits": class k lights a 6x6 patch at a class-specific place, plus noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % num_classes
    rng.shuffle(labels)
    images = rng.integers(0, 60, size=(n, 28, 28))
    for i, k in enumerate(labels):
        r, c = 3 + 7 * (k // 4 % 3), 3 + 6 * (k % 4)
        images[i, r:r + 6, c:c + 6] = 255
    return images.astype(np.uint8), labels.astype(np.uint8)


def write_mnist(root: Path, folder: str = "MNIST", n_train: int = 240, n_test: int = 60) -> Path:
    """root/<folder>/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte, readable by torchvision."""
    raw = root / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        images, labels = fake_digits(n, seed)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return root


def run_cli(script: str, *args: str, cwd: Path, timeout: int = 240, env: dict | None = None, fresh: bool = False):
    """Run one of the repo's entry points (train.py, eval.py, ...) as a user would: its own process, its exit
    code, its stdout and stderr (see `start_cli`)."""
    proc = start_cli(script, *args, cwd=cwd, env=env, fresh=fresh)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def start_cli(script: str, *args: str, cwd: Path, env: dict | None = None, fresh: bool = False,
              new_session: bool = False):
    """Start an entry point in the background: a handle with Popen's pid, poll, wait, communicate, kill and
    returncode; stdout and stderr are kept for communicate().

    The process is a fork of this test process, which has imported torch and Lightning already (~5 s of CPU a
    start on 2 cores), and then starts up as a new interpreter would: `env`, a `sitecustomize` of a folder that
    `env`'s PYTHONPATH adds (tests/no_internet, tests/frozen_clock), default signals, warnings and logging. A new
    interpreter (`python script.py`, as in a shell) when `fresh` is true, GRADLAB_TEST_FRESH=1 is set, or `env`
    asks for another thread count."""
    extra = {"PYTHONUNBUFFERED": "1", "COLUMNS": "200", **(env or {})}
    if fresh or os.environ.get("GRADLAB_TEST_FRESH") == "1" or not _forkable(extra):
        return subprocess.Popen([sys.executable, str(ROOT / script), *args], cwd=cwd, env={**os.environ, **extra},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=None if new_session else default_ctrl_c, start_new_session=new_session)
    return ForkedCli(ROOT / script, list(args), cwd, {**os.environ, **extra}, new_session)


def _forkable(extra: dict) -> bool:
    """Whether a fork of this process can start up as a new interpreter with `extra` in its environment would."""
    for key, value in extra.items():
        if key == "OMP_NUM_THREADS":
            if value != os.environ.get("OMP_NUM_THREADS") or int(value) != _torch_threads():
                return False
        elif key.startswith(("PYTHON", "OMP_", "MKL_", "CUDA_", "LD_", "MALLOC_")) and key not in ("PYTHONPATH",
                                                                                                     "PYTHONUNBUFFERED"):
            return False
    return True


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


# What a new interpreter starts with, before pytest wraps warnings and logging inside each test.
_STARTUP_WARNING_FILTERS = list(__import__("warnings").filters)


class ForkedCli:
    """An entry point in a forked child (see `start_cli`): the parts of subprocess.Popen the tests use."""

    def __init__(self, script: Path, args: list[str], cwd: Path, env: dict, new_session: bool):
        import tempfile

        self.args = [sys.executable, str(script), *args]
        self.returncode = None
        self._out, self._err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
        self.pid = os.fork()
        if self.pid == 0:  # the child: become `python script args` and never return into pytest
            if new_session:
                os.setsid()
            os._exit(_forked_main(script, args, cwd, env, self._out.fileno(), self._err.fileno()))

    def poll(self):
        if self.returncode is None:
            done, status = os.waitpid(self.pid, os.WNOHANG)
            if done:
                self.returncode = os.waitstatus_to_exitcode(status)  # -N for a signal, as subprocess reports it
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(0.02)
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        self.wait(timeout)
        texts = []
        for f in (self._out, self._err):
            f.seek(0)
            texts.append(f.read().decode("utf-8", errors="replace"))
        return texts[0], texts[1]

    def send_signal(self, number: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, number)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)


def _forked_main(script: Path, args: list[str], cwd: Path, env: dict, out_fd: int, err_fd: int) -> int:
    """In the forked child: stdin from /dev/null, stdout and stderr to the files, signals, warnings, logging and
    atexit as a new interpreter has them, then the script as __main__. Returns the exit code."""
    import atexit
    import io
    import logging
    import runpy
    import threading
    import traceback
    import warnings

    code = 1
    try:
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        os.dup2(out_fd, 1)
        os.dup2(err_fd, 2)
        sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False))
        sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=True)
        sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), write_through=True, errors="backslashreplace")
        sys.__stdout__, sys.__stderr__ = sys.stdout, sys.stderr
        for number in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP):
            signal.signal(number, signal.default_int_handler if number == signal.SIGINT else signal.SIG_DFL)
        atexit._clear()  # pytest's and xdist's exit hooks are not the script's
        warnings.filters[:] = _STARTUP_WARNING_FILTERS
        warnings.showwarning = warnings._showwarning_orig
        warnings._filters_mutated()
        warnings.onceregistry.clear()
        threading.excepthook = threading.__excepthook__
        sys.excepthook = sys.__excepthook__
        root = logging.getLogger()
        for handler in list(root.handlers):
            root.removeHandler(handler)
        root.setLevel(logging.WARNING)
        # Lightning's loggers as the entry points find them: imported after Hydra's logging is set up, `lightning`
        # with the stderr handler it adds on import, its subpackages passing records up to the root's handlers.
        top = logging.getLogger("lightning")
        if not any(type(h) is logging.StreamHandler for h in top.handlers):
            top.addHandler(logging.StreamHandler())
        for name in ("lightning.pytorch", "lightning.fabric"):
            logger = logging.getLogger(name)
            for handler in [h for h in logger.handlers if type(h) is logging.StreamHandler]:
                logger.removeHandler(handler)
            logger.propagate = True
        from hydra.core.global_hydra import GlobalHydra

        GlobalHydra.instance().clear()
        os.environ.clear()
        os.environ.update(env)
        for folder in [f for f in env.get("PYTHONPATH", "").split(os.pathsep) if f]:
            if folder not in sys.path:
                sys.path.append(folder)
                if (Path(folder) / "sitecustomize.py").exists():  # what `site` runs at start-up
                    runpy.run_path(str(Path(folder) / "sitecustomize.py"), run_name="sitecustomize")
        os.chdir(cwd)
        sys.argv = [str(script), *args]
        sys.path.insert(0, str(script.parent))
        runpy.run_path(str(script), run_name="__main__")
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        if not isinstance(stop.code, (int, type(None))):
            print(stop.code, file=sys.stderr)
    except KeyboardInterrupt:  # uncaught, Python ends by SIGINT: the shell sees 130, subprocess -2
        traceback.print_exc()
        code = -signal.SIGINT
    except BaseException:
        traceback.print_exc()
        code = 1
    try:  # as the interpreter ends: wait for the script's threads, run its exit hooks, flush
        threading._shutdown()
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        traceback.print_exc()
    if code < 0:
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return code


def default_ctrl_c() -> None:
    """Ctrl-C as in a user's shell. An ignored SIGINT is inherited through exec, and Python then installs no
    KeyboardInterrupt handler: Lightning ignores SIGINT after handling one, so a test process that ran such a fit
    in-process would hand its children a deaf Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def only_run_dir(root: Path) -> Path:
    """The one folder a single train.py run made under root/logs/train/runs (fails, listing them, if not one)."""
    runs = list((root / "logs" / "train" / "runs").iterdir())
    assert len(runs) == 1, runs
    return runs[0]


def compose_config(name: str = "train", overrides=(), output_dir: Path | None = None, hydra: bool = False):
    """conf/<name>.yaml composed with the overrides, as the entry point sees it (`output_dir`: what Hydra's run sets
    paths.output_dir to; `hydra`: with the `hydra` node, as a launcher sees it). The one way tests compose."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    overrides = [*overrides, *([f"paths.output_dir={output_dir}"] if output_dir is not None else [])]
    GlobalHydra.instance().clear()  # nothing another test initialised (another config folder) leaks in
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(name, overrides=overrides, return_hydra_config=hydra)


def tiny_mnist_args(data_root: Path, out: Path) -> list[str]:
    """Overrides for a fast real run on the tiny IDX data."""
    return [f"paths.data_dir={data_root}", f"paths.root_dir={out}", "data.val_size=40",
            "data.download=false", "data.batch_size=32", "callbacks.progress_bar=null",
            "callbacks.model_summary=null"]


POSITIVE = ["great", "wonderful", "superb", "loved", "brilliant", "moving"]
NEGATIVE = ["awful", "boring", "terrible", "hated", "dull", "waste"]
NEUTRAL = ["the", "film", "plot", "actor", "scene", "movie", "was", "and", "story", "music", "a", "it"]


def fake_review(rng: np.random.Generator, positive: bool) -> str:
    """A review whose sentiment words give the label away: filler, punctuation, `<br />` markup as in aclImdb."""
    cue = POSITIVE if positive else NEGATIVE
    words = list(rng.choice(NEUTRAL, size=int(rng.integers(4, 30))))
    for _ in range(int(rng.integers(1, 4))):
        words.insert(int(rng.integers(0, len(words) + 1)), str(rng.choice(cue)))
    cut = int(rng.integers(1, len(words)))
    # Real reviews glue paragraphs with no space around the markup: "end.<br /><br />Next".
    return " ".join(words[:cut]) + ".<br /><br />" + " ".join(words[cut:]) + "!"


def write_aclimdb(root: Path, n_train: int = 40, n_test: int = 10, seed: int = 0,
                  test_word: str | None = None, markers: bool = False) -> Path:
    """root/aclImdb/{train,test}/{pos,neg}/<id>_<rating>.txt with n per label, as in aclImdb_v1.tar.gz.

    `test_word` is appended to every test review (a word the vocabulary must never learn); `markers`
    appends to each train review a word of its own, `marker<label><id>`, to trace where a review went.
    """
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for label in ("pos", "neg"):
            folder = root / "aclImdb" / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                rating = int(rng.integers(7, 11)) if label == "pos" else int(rng.integers(1, 5))
                text = fake_review(rng, label == "pos")
                if split == "test" and test_word:
                    text += f" {test_word}"
                if split == "train" and markers:
                    text += f" marker{label}{i}"
                (folder / f"{i}_{rating}.txt").write_text(text, encoding="utf-8")
    return root


def run_entry(module: str, cfg):
    """In-process, what train.py, eval.py and predict.py do with their composed config: check it, import the run
    module (`gradlab.run.train`, ...), run it."""
    import importlib

    from gradlab.config.cli import checked

    with checked(cfg):
        return importlib.import_module(module).run(cfg)


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
    """Every file below `folder` by its hash: compared before and after, nothing of a run may change."""
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}
