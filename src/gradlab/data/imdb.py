"""The Large Movie Review Dataset (aclImdb, 25k train / 25k test reviews) as padded, length-bucketed batches.

The first run reads and tokenizes the text (~10 s) and caches the encoded tensors under
`<aclImdb>/gradlab_cache/<key>/`, keyed by every setting that changes them; later runs load in about a second.
"""

import hashlib
import json
import logging
import os
from typing import Optional

import lightning.pytorch as pl
import torch
from tokenizers import Tokenizer
from torch.utils.data import DataLoader, SequentialSampler
from torchvision.datasets.utils import download_url

from gradlab.config.rules import require, val_count
from gradlab.data.bounded import extract_tar, read_bytes
from gradlab.data.resumable import ResumableLoader, SeededShuffle, run_seed
from gradlab.data.tensor_loader import pin_batches
from gradlab.data.text import BucketBatchSampler, ReviewDataset, encode, pad_collate, train_tokenizer
from gradlab.errors import UserError

log = logging.getLogger(__name__)

URL = "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz"
MD5 = "7c2ac02c03563afcf9b574c7e56c153a"
CACHE_VERSION = 1  # bump when the reading or tokenizing changes, so old caches are not reused


def dataset_folder(root: str) -> str:
    """`<root>/aclImdb` (where the archive extracts), or `root` itself when it already is that folder."""
    if not os.path.isdir(os.path.join(root, "aclImdb")) and os.path.isdir(os.path.join(root, "train", "pos")):
        return root
    return os.path.join(root, "aclImdb")


def has_split(folder: str, split: str) -> bool:
    return all(os.path.isdir(os.path.join(folder, split, label)) for label in ("pos", "neg"))


def clean_review(text: str) -> str:
    """The reviews carry HTML line breaks (`<br />`); they become spaces (in training and in predict.py)."""
    return text.replace("<br />", " ")


# The longest aclImdb review is 13.7 kB; a text file is read up to this many bytes, from the end that
# data.truncate keeps (a 50 MB file costs 1 MiB, not its whole size, before the cut to max_len tokens).
MAX_REVIEW_BYTES = 1 << 20


def read_review(path: str, keep: str = "head", limit: int = MAX_REVIEW_BYTES) -> str:
    """One review file as text (at most `limit` bytes of it, its first or last per `keep`); a file that is not
    UTF-8 or cannot be read stops with its name and the fix.

    Not skipped: aclImdb is UTF-8 throughout, so such a file means a damaged copy, and training on a
    silently smaller set would not be comparable with other runs.
    """
    data = read_bytes(path, limit + 1 if keep == "head" else limit, keep)
    cut = len(data) > limit
    if cut:
        data = data[:limit]
    elif keep == "tail" and len(data) == limit:
        cut = True  # maybe: the read started inside the file
    try:
        text = _decode_cut(data, keep) if cut else data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start}). "
                        "aclImdb is UTF-8 throughout: extract the archive again, or convert the file "
                        "(iconv -f latin1 -t utf-8).") from None
    # Line ends as text mode reads them (\r\n and \r become \n): a file saved on Windows gives the same tokens.
    return clean_review(text.replace("\r\n", "\n").replace("\r", "\n"))


def _decode_cut(data: bytes, keep: str) -> str:
    """UTF-8 of bytes cut at one end (the end away from `keep`), where a character may be split in up to 3 bytes."""
    for drop in range(4):
        try:
            return (data[:len(data) - drop] if keep == "head" else data[drop:]).decode("utf-8")
        except UnicodeDecodeError:
            if drop == 3:
                raise
    raise AssertionError("unreachable")


def read_split(folder: str, split: str) -> tuple[list[str], torch.Tensor]:
    """Texts and 0/1 labels of `<folder>/<split>/{pos,neg}/<id>_<rating>.txt`, in a fixed order."""
    texts, labels = [], []
    for label, name in ((1, "pos"), (0, "neg")):
        directory = os.path.join(folder, split, name)
        try:
            files = [f for f in os.listdir(directory) if f.endswith(".txt")]
        except OSError as err:
            raise UserError(f"Cannot list {directory}: {err.strerror}. Extract {os.path.basename(URL)} again.") from None
        if not files:
            raise UserError(f"{directory} holds no reviews (<id>_<rating>.txt files): a partial extraction? "
                            f"Extract {os.path.basename(URL)} again.")
        for fname in sorted(files, key=lambda f: (len(f), f)):  # the listing order is not stable across disks
            texts.append(read_review(os.path.join(directory, fname)))
            labels.append(label)
    return texts, torch.tensor(labels, dtype=torch.float32)


def missing_data_message(root: str, reason: str) -> str:
    folder = dataset_folder(root)
    return (
        f"IMDB data not found at {folder} ({reason}). Expected the aclImdb tree of {os.path.basename(URL)}: "
        f"train/pos/*.txt and train/neg/*.txt (and test/pos, test/neg for testing), files named <id>_<rating>.txt. "
        f"Fix: extract the archive there (tar -xzf aclImdb_v1.tar.gz -C {root}), point `data.root=` at a folder "
        f"that holds aclImdb/, or run once with internet access so it downloads from {URL}."
    )


class IMDBDataModule(pl.LightningDataModule):
    """Binary sentiment batches `(tokens (B, T) long, lengths (B,) long, labels (B,) float)`.

    The vocabulary (`max_vocab_size` entries with `<pad>`=0 and `<unk>`=1, words seen >= `min_freq` times)
    comes from the training part of the train folder only: neither the validation reviews (a seeded
    `val_size` share of the train folder) nor the test folder influence it. Training reviews longer than
    `max_len` tokens are cut (`truncate`: keep the head or the tail), which bounds the cost of a step;
    validation and test reviews are cut at `eval_max_len` (None: read whole, as evaluation is cheap).
    `batch_size` is per device.
    """

    def __init__(self, root: str = "data", batch_size: int = 64, val_size: int | float = 2500, split_seed: int = 12345,
                 max_vocab_size: int = 25000, min_freq: int = 2, max_len: Optional[int] = 400, truncate: str = "tail",
                 eval_max_len: Optional[int] = None, bucket_batches: int = 50, num_workers: int = 0,
                 pin_memory: Optional[bool] = None, download: bool = True, cache_dir: Optional[str] = None,
                 num_classes: int = 1):
        super().__init__()
        for key, value in (("truncate", truncate), ("max_vocab_size", max_vocab_size), ("val_size", val_size)):
            require(f"data.{key}", value)
        self.save_hyperparameters(logger=False)
        self.folder = dataset_folder(root)
        self.train_set: Optional[ReviewDataset] = None
        self.val_set: Optional[ReviewDataset] = None
        self.test_set: Optional[ReviewDataset] = None
        self.tokenizer_json: Optional[str] = None  # set by setup("fit"), saved in checkpoints

    # ---- download and cache -------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        if not has_split(self.folder, "train"):
            if not self.hparams.download:
                raise UserError(missing_data_message(self.hparams.root, "download is off"))
            try:
                download_url(URL, self.hparams.root, md5=MD5)
            except (OSError, RuntimeError) as err:  # URLError is an OSError
                raise UserError(missing_data_message(self.hparams.root, f"download failed: {err}")) from None
            # Our own extraction, with tarfile's "data" filter: torchvision's writes ../, absolute and linked
            # members outside the folder on Python 3.11 (only the MD5 check guarded it).
            archive = os.path.join(self.hparams.root, os.path.basename(URL))
            extract_tar(archive, self.hparams.root)
            os.remove(archive)
            self.folder = dataset_folder(self.hparams.root)
        self._fit_cache()
        if has_split(self.folder, "test"):
            self._test_cache()

    def cache_dir(self) -> str:
        """One folder per combination of the settings that change the encoded tensors."""
        hp = self.hparams
        n_train = sum(len(os.listdir(os.path.join(self.folder, "train", lab))) for lab in ("pos", "neg"))
        settings = {"version": CACHE_VERSION, "max_vocab_size": hp.max_vocab_size, "min_freq": hp.min_freq,
                    "val_size": hp.val_size, "split_seed": hp.split_seed, "train_files": n_train}
        key = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
        path = os.path.join(hp.cache_dir or os.path.join(self.folder, "gradlab_cache"), key)
        os.makedirs(path, exist_ok=True)
        _write_atomic(os.path.join(path, "settings.json"), json.dumps(settings, indent=2).encode())
        return path

    def _fit_cache(self) -> str:
        path = os.path.join(self.cache_dir(), "fit.pt")
        if os.path.exists(path):
            return path
        texts, labels = read_split(self.folder, "train")
        n_val = self._val_count(len(texts))
        perm = torch.randperm(len(texts), generator=torch.Generator().manual_seed(self.hparams.split_seed))
        val_idx, train_idx = perm[:n_val], perm[n_val:]
        log.info("IMDB: building a vocabulary from %d training reviews and encoding %d reviews (cached in %s)",
                 len(train_idx), len(texts), os.path.dirname(path))
        tokenizer = train_tokenizer([texts[i] for i in train_idx], self.hparams.max_vocab_size, self.hparams.min_freq)
        _write_atomic(os.path.join(os.path.dirname(path), "tokenizer.json"), tokenizer.to_str().encode())
        data = {}
        for name, idx in (("train", train_idx), ("val", val_idx)):
            ids, offsets = encode(tokenizer, [texts[i] for i in idx])
            data[name] = {"ids": ids, "offsets": offsets, "labels": labels[idx]}
        _save_atomic(data, path)
        return path

    def _test_cache(self) -> str:
        cache = self.cache_dir()
        path = os.path.join(cache, "test.pt")
        if os.path.exists(path):
            return path
        tokenizer_file = os.path.join(cache, "tokenizer.json")
        if not os.path.exists(tokenizer_file):
            self._fit_cache()
        tokenizer = Tokenizer.from_file(tokenizer_file)
        texts, labels = read_split(self.folder, "test")
        log.info("IMDB: encoding %d test reviews (cached in %s)", len(texts), cache)
        ids, offsets = encode(tokenizer, texts)
        _save_atomic({"test": {"ids": ids, "offsets": offsets, "labels": labels}}, path)
        return path

    def _val_count(self, n: int) -> int:
        return val_count(self.hparams.val_size, n, "reviews in the train folder")

    # ---- datasets and loaders -----------------------------------------------------------------------------
    def setup(self, stage: Optional[str] = None) -> None:
        if stage in (None, "fit", "validate") and self.train_set is None:
            if not has_split(self.folder, "train"):
                raise UserError(missing_data_message(self.hparams.root, "no train/pos and train/neg folders"))
            if not has_split(self.folder, "test"):
                log.warning("IMDB: %s has no test/pos and test/neg folders: training works, testing will not "
                            "(run with test=false, or extract the full archive).", self.folder)
            fit_cache = self._fit_cache()
            data = torch.load(fit_cache, weights_only=True)  # a cache is a file too: tensors only
            self.train_set = self._dataset(data["train"], self.hparams.max_len)
            self.val_set = self._dataset(data["val"], self.hparams.eval_max_len)
            with open(os.path.join(os.path.dirname(fit_cache), "tokenizer.json")) as f:
                self.tokenizer_json = f.read()
        if stage in (None, "test") and self.test_set is None:
            if not has_split(self.folder, "test"):
                raise UserError(
                    f"The IMDB test split is missing: {self.folder} has no test/pos and test/neg folders "
                    f"(a train-only extraction?). Fix: extract the full {os.path.basename(URL)} there, or run "
                    f"with test=false to train and validate only.")
            self.test_set = self._dataset(torch.load(self._test_cache(), weights_only=True)["test"], self.hparams.eval_max_len)

    def _dataset(self, part: dict, max_len: Optional[int]) -> ReviewDataset:
        return ReviewDataset(part["ids"], part["offsets"], part["labels"], max_len=max_len,
                             truncate=self.hparams.truncate)

    def _loader(self, dataset: ReviewDataset, train: bool) -> DataLoader:
        # Training order and batch order come from (seed, epoch): a run resumed mid-epoch repeats them exactly
        # (gradlab.data.resumable); the loader's own generator keeps iterators off the global RNG.
        seed = run_seed()
        sampler = SeededShuffle(len(dataset), seed) if train else SequentialSampler(dataset)
        batches = BucketBatchSampler(sampler, self.hparams.batch_size, drop_last=False, lengths=dataset.lengths,
                                     bucket_batches=self.hparams.bucket_batches if train else None,
                                     shuffle_batches=train, seed=seed)
        return (ResumableLoader if train else DataLoader)(
            dataset, batch_sampler=batches, collate_fn=pad_collate, num_workers=self.hparams.num_workers,
            pin_memory=pin_batches(self, self.hparams.pin_memory), persistent_workers=self.hparams.num_workers > 0,
            generator=torch.Generator().manual_seed(seed))

    def state_dict(self) -> dict:
        # The vocabulary rides in every checkpoint, so predict.py encodes new text exactly as training did.
        return {"tokenizer": self.tokenizer_json} if self.tokenizer_json else {}

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)  # a crash mid-write never leaves a half cache behind


def _save_atomic(obj, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)
