"""The IMDB data module on a tiny aclImdb tree in the real layout, read back through the real reader."""

import json
import os
import re
import shutil
from pathlib import Path
from urllib.error import URLError

import pytest
import torch
from tokenizers import Tokenizer
from torch.utils.data import DistributedSampler, RandomSampler, SequentialSampler

import gradlab.data.imdb as imdb
from gradlab.data.imdb import IMDBDataModule, read_split
from gradlab.data.text import BucketBatchSampler, ReviewDataset, pad_collate
from gradlab.errors import UserError
from helpers import only_run_dir, run_cli, write_aclimdb

N_TRAIN, N_TEST, VAL = 40, 10, 16  # per label, per label, reviews


@pytest.fixture(scope="module")
def imdb_root(tmp_path_factory):
    return write_aclimdb(tmp_path_factory.mktemp("imdb"), N_TRAIN, N_TEST, test_word="testonlyword", markers=True)


def fit_module(root: Path, **kwargs) -> IMDBDataModule:
    dm = IMDBDataModule(root=str(root), download=False, val_size=VAL, **{"min_freq": 1, **kwargs})
    dm.prepare_data()
    dm.setup("fit")
    return dm


def words(text: str) -> list[str]:
    """An independent tokenizer for the tiny reviews (ASCII words and punctuation, lower-cased)."""
    return re.findall(r"\w+|[^\w\s]", text.replace("<br />", " ").lower())


def test_reader_reads_labels_from_folders_and_strips_markup(imdb_root):
    texts, labels = read_split(str(imdb_root / "aclImdb"), "train")
    assert len(texts) == 2 * N_TRAIN and labels.sum() == N_TRAIN
    for label, name in ((1, "pos"), (0, "neg")):
        on_disk = sorted(p.read_text().replace("<br />", " ") for p in (imdb_root / "aclImdb/train" / name).iterdir())
        assert sorted(t for t, y in zip(texts, labels) if y == label) == on_disk
    assert all("<br" not in t for t in texts)
    assert any("<br />" in p.read_text() for p in (imdb_root / "aclImdb/train/pos").iterdir())


def test_vocabulary_comes_from_training_reviews_only(imdb_root):
    dm = fit_module(imdb_root)
    tokenizer = Tokenizer.from_file(os.path.join(dm.cache_dir(), "tokenizer.json"))
    vocab = tokenizer.get_vocab()
    assert vocab["<pad>"] == 0 and vocab["<unk>"] == 1
    assert "testonlyword" not in vocab and "br" not in vocab and "<" not in vocab
    # Each training review carries a word of its own: exactly the training part's markers are known,
    # so every validation review (and only those) has one <unk>, its marker.
    texts, _ = read_split(str(imdb_root / "aclImdb"), "train")
    all_words = {w for t in texts for w in words(t)}
    markers = {w for w in all_words if w.startswith("marker")}
    assert set(vocab) - markers == (all_words - markers) | {"<pad>", "<unk>"}
    assert len(set(vocab) & markers) == len(dm.train_set) == 2 * N_TRAIN - VAL
    unk_count = lambda ds: [int((ds[i][0] == 1).sum()) for i in range(len(ds))]  # noqa: E731
    assert unk_count(dm.val_set) == [1] * VAL and set(unk_count(dm.train_set)) == {0}


def test_vocabulary_cap_keeps_the_most_frequent_words(imdb_root, tmp_path):
    full = fit_module(imdb_root)  # uncapped: decodes the training part back to words, to count them
    full_tokenizer = Tokenizer.from_file(os.path.join(full.cache_dir(), "tokenizer.json"))
    counts: dict[str, int] = {}
    for i in range(len(full.train_set)):
        for t in full.train_set[i][0].tolist():
            word = full_tokenizer.id_to_token(t)
            counts[word] = counts.get(word, 0) + 1

    capped = fit_module(imdb_root, max_vocab_size=10, cache_dir=str(tmp_path))
    vocab = Tokenizer.from_file(os.path.join(capped.cache_dir(), "tokenizer.json")).get_vocab()
    assert len(vocab) == 10 and capped.train_set.ids.max() < 10
    kept = [counts[w] for w in vocab if w not in ("<pad>", "<unk>")]
    dropped = [c for w, c in counts.items() if w not in vocab]
    assert min(kept) >= max(dropped)


def test_encoded_reviews_match_the_text(imdb_root):
    dm = fit_module(imdb_root)
    tokenizer = Tokenizer.from_file(os.path.join(dm.cache_dir(), "tokenizer.json"))
    texts, labels = read_split(str(imdb_root / "aclImdb"), "train")
    by_text = {tuple(words(t)): y for t, y in zip(texts, labels.tolist())}
    for i in range(len(dm.train_set)):
        ids, label = dm.train_set[i]
        decoded = tuple(tokenizer.id_to_token(int(t)) for t in ids)
        assert by_text[decoded] == label.item()


def test_cache_is_reused_and_rebuilt_when_settings_change(imdb_root, tmp_path, monkeypatch):
    calls = []
    real_read = imdb.read_split
    monkeypatch.setattr(imdb, "read_split", lambda *a: calls.append(a) or real_read(*a))
    first = fit_module(imdb_root, cache_dir=str(tmp_path))
    assert len(calls) == 2  # train, then test (prepare_data caches both)

    # Truncation is applied at load time: the same cache serves every max_len.
    again = fit_module(imdb_root, cache_dir=str(tmp_path), max_len=5, eval_max_len=7)
    assert len(calls) == 2
    assert torch.equal(again.train_set.ids, first.train_set.ids)
    assert int(again.train_set.lengths.max()) == 5 and int(again.val_set.lengths.max()) == 7
    assert int(first.val_set.lengths.max()) > 7  # eval_max_len=None: whole reviews

    fit_module(imdb_root, cache_dir=str(tmp_path), max_vocab_size=12)
    fit_module(imdb_root, cache_dir=str(tmp_path), split_seed=7)
    assert len(calls) == 6
    assert len(list(tmp_path.iterdir())) == 3
    settings = [json.loads((d / "settings.json").read_text()) for d in tmp_path.iterdir()]
    assert sorted(s["max_vocab_size"] for s in settings) == [12, 25000, 25000]


@pytest.mark.parametrize("truncate", ["head", "tail"])
def test_truncation_keeps_head_or_tail(truncate):
    ids = torch.arange(2, 22, dtype=torch.int32)
    offsets = torch.tensor([0, 3, 20])  # lengths 3 and 17
    ds = ReviewDataset(ids, offsets, torch.tensor([0.0, 1.0]), max_len=5, truncate=truncate)
    assert ds.lengths.tolist() == [3, 5]
    assert ds[0][0].tolist() == [2, 3, 4]
    assert ds[1][0].tolist() == (list(range(5, 10)) if truncate == "head" else list(range(17, 22)))


def test_collate_pads_each_batch_to_its_longest_review():
    items = [(torch.tensor([5, 6, 7]), torch.tensor(1.0)), (torch.tensor([8]), torch.tensor(0.0))]
    tokens, lengths, labels = pad_collate(items)
    assert tokens.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert lengths.tolist() == [3, 1] and labels.tolist() == [1.0, 0.0]
    assert tokens.dtype == lengths.dtype == torch.long


def padding(batches, lengths) -> int:
    return sum(int(lengths[torch.tensor(b)].max()) * len(b) - int(lengths[torch.tensor(b)].sum()) for b in batches)


def test_bucketed_batches_cover_everything_once_with_little_padding():
    torch.manual_seed(0)
    lengths = torch.randint(1, 500, (1000,))
    train = list(BucketBatchSampler(RandomSampler(range(1000)), 32, False, lengths, bucket_batches=8))
    assert sorted(i for b in train for i in b) == list(range(1000))
    assert len(train) == len(BucketBatchSampler(RandomSampler(range(1000)), 32, False, lengths)) == 32
    random_batches = [b.tolist() for b in torch.randperm(1000).split(32)]
    assert padding(train, lengths) < padding(random_batches, lengths) / 5

    evaluation = list(BucketBatchSampler(SequentialSampler(range(1000)), 32, False, lengths, None, False))
    flat = [i for b in evaluation for i in b]
    assert sorted(flat) == list(range(1000)) and lengths[flat].diff().min() >= 0


def test_bucketing_under_ddp_gives_ranks_disjoint_shards_of_equal_batch_count():
    lengths = torch.randint(1, 500, (1001,))
    shards = [list(BucketBatchSampler(DistributedSampler(range(1001), num_replicas=2, rank=r, seed=3), 16,
                                      False, lengths)) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1])
    seen = [{i for b in s for i in b} for s in shards]
    assert seen[0] | seen[1] == set(range(1001))  # DistributedSampler repeats one index to even out 1001


def test_loaders_yield_the_batch_contract(imdb_root):
    dm = fit_module(imdb_root, batch_size=8, max_len=12)
    tokens, lengths, labels = next(iter(dm.train_dataloader()))
    assert tokens.shape == (8, int(lengths.max())) and lengths.max() <= 12
    assert labels.dtype == torch.float32 and set(labels.tolist()) <= {0.0, 1.0}
    assert all(tokens[i, lengths[i]:].eq(0).all() and tokens[i, :lengths[i]].ne(0).all() for i in range(8))
    dm.setup("test")
    assert sum(len(b[2]) for b in dm.test_dataloader()) == 2 * N_TEST


def test_missing_data_is_one_clear_message(tmp_path, monkeypatch):
    with pytest.raises(UserError, match=r"IMDB data not found at .*aclImdb \(download is off\).*train/pos"):
        IMDBDataModule(root=str(tmp_path), download=False).prepare_data()

    def offline(*args, **kwargs):
        raise URLError("Name or service not known")

    monkeypatch.setattr(imdb, "download_url", offline)
    with pytest.raises(UserError, match=r"download failed.*data\.root="):
        IMDBDataModule(root=str(tmp_path), download=True).prepare_data()


def test_missing_test_split_says_how_to_skip_testing(imdb_root, tmp_path):
    shutil.copytree(imdb_root / "aclImdb" / "train", tmp_path / "aclImdb" / "train")
    dm = fit_module(tmp_path)  # training works without a test folder
    assert len(dm.train_set) == 2 * N_TRAIN - VAL
    with pytest.raises(UserError, match="test=false"):
        dm.setup("test")


def test_root_may_be_the_aclimdb_folder_itself(imdb_root, tmp_path):
    dm = fit_module(imdb_root / "aclImdb", cache_dir=str(tmp_path))
    assert len(dm.val_set) == VAL


def cli_args(data_root: Path, out: Path) -> list[str]:
    return [f"paths.data_dir={data_root}", f"paths.root_dir={out}", "data.download=false",
            "callbacks.progress_bar=null", "callbacks.model_summary=null"]


def test_fast_dev_run_through_train_py(imdb_root, tmp_path):
    proc = run_cli("train.py", "model=rnn", "data=imdb", "debug=fdr", f"data.val_size={VAL}", "data.batch_size=8",
                   *cli_args(imdb_root, tmp_path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = only_run_dir(tmp_path)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == 1 and {"test/acc", "test/loss", "val/acc"} <= metrics.keys()
    config = (run_dir / ".hydra" / "config.yaml").read_text()
    assert "gradlab.data.imdb.IMDBDataModule" in config and "gradlab.models.rnn.SentimentRNN" in config


def test_missing_data_through_train_py_exits_2_without_traceback(tmp_path):
    proc = run_cli("train.py", "model=rnn", "data=imdb", "debug=fdr", *cli_args(tmp_path / "nothing", tmp_path), cwd=tmp_path)
    assert proc.returncode == 2
    assert "IMDB data not found" in proc.stderr and "Traceback" not in proc.stderr
