"""Every reader of user files, fed random and hand-made nasty files: valid data, or a UserError that names the file.

Never a traceback, a hang, or an allocation the file cannot justify. Property-based (hypothesis), with small example
counts so that each test takes a few seconds; the examples per test are the `max_examples` below.
"""

import gzip
import io
import os
import struct
import sys
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gradlab.errors import UserError
from helpers import ROOT, fake_digits, write_idx

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
FEW = settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def valid_or_user_error(read, path, *args):
    """read(path, *args), or None after a UserError whose message names `path`."""
    try:
        return read(str(path), *args)
    except UserError as err:
        assert str(path) in str(err) or os.path.basename(str(path)) in str(err), str(err)
        return None


def fresh(tmp_path: Path, name: str) -> Path:
    """A new file path under tmp_path per hypothesis example (tmp_path is shared by a test's examples)."""
    fresh.n = getattr(fresh, "n", 0) + 1
    folder = tmp_path / f"ex{fresh.n}"
    folder.mkdir()
    return folder / name


# ---- IDX (MNIST) -----------------------------------------------------------------------------------------------
def idx_bytes(magic: bytes, dims: list[int], data_len: int) -> bytes:
    return magic + struct.pack(f">{len(dims)}I", *dims) + bytes(data_len)


idx_files = st.one_of(
    st.binary(max_size=80),
    st.builds(idx_bytes, st.sampled_from([b"\0\0\x08\x03", b"\0\0\x08\x01", b"\0\0\x09\x03", b"\x1f\x8b\x08\0"]),
              st.lists(st.integers(0, 2**32 - 1), min_size=0, max_size=3), st.integers(0, 64)),
    st.builds(idx_bytes, st.just(b"\0\0\x08\x03"), st.tuples(st.integers(0, 3), st.integers(0, 30),
                                                              st.integers(0, 30)).map(list), st.integers(0, 3000)),
)


@FUZZ
@given(data=idx_files)
def test_idx_header_gives_dims_that_match_the_file_or_a_user_error(tmp_path, data):
    from gradlab.data.idx import read_header

    path = fresh(tmp_path, "train-images-idx3-ubyte")
    path.write_bytes(data)
    dims = valid_or_user_error(read_header, path, 3)
    if dims is not None:
        assert len(dims) == 3 and 16 + dims[0] * dims[1] * dims[2] == len(data)


def test_an_idx_header_claiming_10_to_the_12_images_fails_before_allocating(tmp_path):
    from gradlab.data.idx import check_pair

    images, labels = tmp_path / "train-images-idx3-ubyte", tmp_path / "train-labels-idx1-ubyte"
    images.write_bytes(idx_bytes(b"\0\0\x08\x03", [10**6, 10**3, 10**3], 784))  # 10^12 "images" of 1000x1000
    labels.write_bytes(idx_bytes(b"\0\0\x08\x01", [4_000_000_000], 10))
    tracemalloc.start()
    with pytest.raises(UserError, match="claims 1000000 x 1000 x 1000 items, more than any file of the MNIST"):
        check_pair(str(images), str(labels), 10)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1_000_000  # bytes: the header was read, nothing it promised


@st.composite
def mnist_files(draw):
    """(train images, train labels): random, damaged, or a well-formed pair of n 28x28 images."""
    n = draw(st.integers(0, 12))
    images = draw(st.one_of(idx_files, st.just(idx_bytes(b"\0\0\x08\x03", [n, 28, 28], n * 784))))
    labels = draw(st.one_of(st.binary(max_size=40), st.lists(st.integers(0, 12), min_size=n, max_size=n).map(
        lambda ls: idx_bytes(b"\0\0\x08\x01", [len(ls)], 0) + bytes(ls))))
    return images, labels


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(files=mnist_files())
@example(files=(idx_bytes(b"\0\0\x08\x03", [0, 28, 28], 0), idx_bytes(b"\0\0\x08\x01", [0], 0)))  # no images
@example(files=(idx_bytes(b"\0\0\x08\x03", [1, 28, 28], 784), idx_bytes(b"\0\0\x08\x01", [1], 1)))  # 1 < val
def test_the_mnist_module_reads_any_raw_folder_or_names_the_bad_file(tmp_path, files):
    from gradlab.data.mnist import MNISTDataModule

    images, labels = files
    root = fresh(tmp_path, "data")
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    good_images, good_labels = fake_digits(12, seed=0)
    (raw / "train-images-idx3-ubyte").write_bytes(images)
    (raw / "train-labels-idx1-ubyte").write_bytes(labels)
    write_idx(raw / "t10k-images-idx3-ubyte", good_images)
    write_idx(raw / "t10k-labels-idx1-ubyte", good_labels)
    dm = MNISTDataModule(root=str(root), download=False, val_size=2, batch_size=4)
    try:
        dm.prepare_data()
        dm.setup("fit")
    except UserError as err:
        # A file's problem names the file; too few images for the split names the config key.
        assert str(raw) in str(err) or str(root) in str(err) or "data.val_size=2" in str(err), str(err)
        return
    n = struct.unpack(">I", images[4:8])[0]
    assert len(dm.train_set) + len(dm.val_set) == n and labels[8:] and max(labels[8:]) < 10


# ---- aclImdb -------------------------------------------------------------------------------------------------
names = st.one_of(st.text(st.characters(blacklist_characters="/\0", blacklist_categories=("Cs",)), min_size=1,
                          max_size=12).map(lambda s: s.encode("utf-8")),
                  st.binary(min_size=1, max_size=12).filter(lambda b: b"/" not in b and b"\0" not in b))


@FEW
@given(files=st.lists(st.tuples(st.sampled_from(["pos", "neg"]), names.map(lambda b: b + b".txt"),
                                st.one_of(st.binary(max_size=60), st.text(max_size=60).map(str.encode))),
                      max_size=6))
def test_imdb_split_reads_any_tree_or_names_the_bad_file(tmp_path, files):
    from gradlab.data.imdb import read_split

    folder = fresh(tmp_path, "aclImdb")
    for label in ("pos", "neg"):
        (folder / "train" / label).mkdir(parents=True)
    for label, name, content in files:
        with open(os.path.join(os.fsencode(folder / "train" / label), name), "wb") as f:
            f.write(content)
    try:
        texts, labels = read_split(str(folder), "train")
    except UserError as err:
        assert str(folder) in str(err), str(err)
        return
    assert len(texts) == len(labels) == len({(lab, n) for lab, n, _ in files})
    assert all(isinstance(t, str) for t in texts) and set(labels.tolist()) == {0.0, 1.0}


@FUZZ
@given(content=st.binary(max_size=200))
@example(content=b"one\r\ntwo\rthree<br />four")  # Windows and old Mac line ends read as text mode reads them
def test_a_review_file_is_text_or_a_user_error(tmp_path, content):
    from gradlab.data.imdb import read_review

    path = fresh(tmp_path, "0_7.txt")
    path.write_bytes(content)
    text = valid_or_user_error(read_review, path)
    if text is not None:
        assert text == content.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n").replace("<br />", " ")


# ---- images for predict.py -------------------------------------------------------------------------------------
def png(width: int, height: int, body: bytes = b"") -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(body)) + chunk(b"IEND", b""))


def real_image(kind: str, seed: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 255, (int(rng.integers(1, 40)), int(rng.integers(1, 40))), np.uint8))
    out = io.BytesIO()
    image.save(out, format=kind)
    return out.getvalue()


images = st.one_of(
    st.binary(max_size=100),
    st.builds(png, st.integers(0, 2**31 - 1), st.integers(0, 2**31 - 1), st.binary(max_size=50)),
    st.builds(real_image, st.sampled_from(["PNG", "JPEG", "BMP", "GIF", "TIFF"]), st.integers(0, 99)),
    # a real image cut short or with a few bytes changed
    st.tuples(st.builds(real_image, st.sampled_from(["PNG", "JPEG", "BMP", "GIF"]), st.integers(0, 99)),
              st.floats(0, 1), st.binary(min_size=1, max_size=4)).map(
        lambda t: t[0][:int(len(t[0]) * t[1])] + t[2] + t[0][int(len(t[0]) * t[1]) + len(t[2]):]),
)


@FUZZ
@given(data=images)
def test_an_input_image_becomes_a_28x28_digit_or_a_user_error(tmp_path, data):
    from gradlab.data.images import load_digit

    path = fresh(tmp_path, "digit.png")
    path.write_bytes(data)
    digit = valid_or_user_error(load_digit, path)
    if digit is not None:
        assert digit.shape == (28, 28) and digit.dtype == torch.float32 and 0 <= digit.min() <= digit.max() <= 1


def test_an_image_header_claiming_a_gigapixel_fails_before_decoding(tmp_path):
    from gradlab.data.images import load_digit

    path = tmp_path / "huge.png"
    path.write_bytes(png(10_000, 10_000, b"\0" * 100))  # 10^8 pixels: PIL itself would decode it (limit ~1.8e8)
    tracemalloc.start()
    with pytest.raises(UserError, match="claims 10000 x 10000 pixels"):
        load_digit(str(path))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 5_000_000


# ---- checkpoints -------------------------------------------------------------------------------------------------
def real_checkpoint() -> bytes:
    out = io.BytesIO()
    torch.save({"state_dict": {"w": torch.arange(6.0).reshape(2, 3)}, "gradlab_config": {"model": {}},
                "global_step": 3}, out)
    return out.getvalue()


REAL = real_checkpoint()
checkpoints = st.one_of(
    st.binary(max_size=200),
    st.integers(0, len(REAL)).map(lambda n: REAL[:n]),
    st.tuples(st.integers(0, len(REAL) - 1), st.integers(1, 255)).map(
        lambda t: REAL[:t[0]] + bytes([REAL[t[0]] ^ t[1]]) + REAL[t[0] + 1:]),
)


@FUZZ
@given(data=checkpoints)
def test_a_checkpoint_loads_whole_or_gives_a_user_error(tmp_path, data):
    from gradlab.checkpoints.load import load

    path = fresh(tmp_path, "last.ckpt")
    path.write_bytes(data)
    checkpoint = valid_or_user_error(load, path)
    if checkpoint is not None:
        assert isinstance(checkpoint["state_dict"], dict) and isinstance(checkpoint["gradlab_config"], dict)


# ---- metrics.json, overrides.yaml: reports and ckpt_path=<run folder> --------------------------------------------
json_values = st.recursive(st.none() | st.booleans() | st.floats(allow_nan=False) | st.integers() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                      max_size=3), max_leaves=8)
records = st.one_of(
    st.binary(max_size=80),
    st.builds(lambda v: __import__("json").dumps(v).encode(), json_values),
    st.builds(lambda d: __import__("json").dumps(d).encode(),
              st.fixed_dictionaries({"status": st.sampled_from(["completed", "failed", 3]),
                                     "val/acc": st.one_of(st.floats(allow_nan=False), st.text(max_size=3)),
                                     "best_checkpoint": st.one_of(st.none(), st.text(max_size=10), st.integers())})),
)
override_files = st.one_of(
    st.binary(max_size=80),
    st.builds(lambda v: __import__("yaml").safe_dump(v).encode(), json_values),
    st.lists(st.text(max_size=10).map(lambda s: f"k{s}=v"), max_size=4).map(
        lambda v: __import__("yaml").safe_dump(v).encode()),
)


@FUZZ
@given(metrics=records, overrides=override_files, multirun=st.binary(max_size=40))
def test_the_sweep_report_reads_any_job_files_or_names_the_bad_one(tmp_path, metrics, overrides, multirun):
    sys.path.insert(0, str(ROOT / "scripts"))
    import sweep_report

    sweep = fresh(tmp_path, "sweep")
    (sweep / "0" / ".hydra").mkdir(parents=True)
    (sweep / "0" / ".hydra" / "overrides.yaml").write_bytes(overrides)
    (sweep / "0" / "metrics.json").write_bytes(metrics)
    (sweep / "multirun.yaml").write_bytes(multirun)
    try:
        jobs = sweep_report.read_jobs(sweep)
        metric = sweep_report.sweep_metric(sweep)
    except UserError as err:
        assert str(sweep) in str(err), str(err)
        return
    header, rows = sweep_report.table(sweep_report.ranked(jobs, metric, False), sweep_report.swept_keys(jobs),
                                      [metric])
    assert sweep_report.markdown(header, rows).count("\n") == 2


@FUZZ
@given(metrics=records)
def test_ckpt_path_run_folder_reads_any_metrics_json_or_names_it(tmp_path, metrics):
    from gradlab.checkpoints.run_dirs import _checkpoint_of_run

    run = fresh(tmp_path, "run")
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(REAL)
    (run / "metrics.json").write_bytes(metrics)
    try:
        chosen = _checkpoint_of_run(str(run), best=True)
    except UserError as err:
        assert str(run / "metrics.json") in str(err), str(err)
        return
    assert Path(chosen).parent == run / "checkpoints" and Path(chosen).is_file()


# ---- hand-made nasty cases, through every reader -----------------------------------------------------------------
def _empty(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def _truncated_gzip(path: Path) -> Path:
    path.write_bytes(gzip.compress(b"\0\0\x08\x03" + bytes(2000))[:30])
    return path


def _directory(path: Path) -> Path:
    path.mkdir()
    return path


def _symlink_loop(path: Path) -> Path:
    os.symlink(path.name, path)  # a link to itself: ELOOP on open
    return path


def _non_utf8_name(path: Path) -> Path:
    name = os.path.join(os.fsencode(path.parent), b"\xff\xfe" + os.fsencode(path.name))
    with open(name, "wb") as f:
        f.write(b"\xff\xfe\x00garbage")
    return Path(os.fsdecode(name))


def _pickled_object(path: Path) -> Path:
    torch.save({"state_dict": {}, "gradlab_config": {}, "payload": Exploit()}, path)
    return path


class Exploit:
    """Unpickling it would run a shell command: a checkpoint must never get that far."""

    def __reduce__(self):
        return (os.system, (f"touch {Path.cwd() / 'pwned'}",))


def _read_idx(path):
    from gradlab.data.idx import read_header

    return read_header(path, 3)


READERS = {
    "idx": (_read_idx, "train-images-idx3-ubyte"),
    "review": (lambda p: __import__("gradlab.data.imdb", fromlist=["x"]).read_review(p), "0_7.txt"),
    "image": (lambda p: __import__("gradlab.data.images", fromlist=["x"]).load_digit(p), "digit.png"),
    "image input": (lambda p: __import__("gradlab.data.images", fromlist=["x"]).list_images(p), "digits"),
    "checkpoint": (lambda p: __import__("gradlab.checkpoints.load", fromlist=["x"]).load(p), "last.ckpt"),
    "metrics.json": (lambda p: __import__("gradlab.checkpoints.run_dirs", fromlist=["x"]).read_metrics(p), "metrics.json"),
    "overrides.yaml": (lambda p: __import__("gradlab.checkpoints.run_dirs", fromlist=["x"]).read_overrides(p), "overrides.yaml"),
}
NASTY = {"empty": _empty, "truncated gzip": _truncated_gzip, "directory": _directory, "symlink loop": _symlink_loop,
         "non-UTF-8 name": _non_utf8_name, "pickled object": _pickled_object}


# Nasty but valid: an empty review is an empty text, an empty overrides.yaml no overrides, and any file is its own
# predict.py input list (load_digit then judges it, above).
VALID = {("review", "empty"): "", ("overrides.yaml", "empty"): [],
         **{("image input", n): "itself" for n in ("empty", "truncated gzip", "non-UTF-8 name", "pickled object")}}


@pytest.mark.parametrize("nasty", NASTY)
@pytest.mark.parametrize("reader", READERS)
def test_nasty_files_give_a_user_error_naming_them(tmp_path, reader, nasty):
    read, name = READERS[reader]
    path = NASTY[nasty](tmp_path / name)
    if (reader, nasty) in VALID:
        expected = VALID[reader, nasty]
        assert read(str(path)) == ([str(path)] if expected == "itself" else expected)
        return
    with pytest.raises(UserError) as err:
        read(str(path))
    assert os.path.basename(str(path)) in str(err.value) or str(path) in str(err.value)
    assert not (Path.cwd() / "pwned").exists()
