"""Text pipeline for sentiment reviews: tokenizer + vocabulary, ragged token storage, bucketed padded batches."""

from typing import Iterator, Optional, Sequence

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from torch.utils.data import BatchSampler, Dataset, Sampler

PAD, UNK = "<pad>", "<unk>"  # ids 0 and 1: the trainer puts special tokens first, in this order


def train_tokenizer(texts: Sequence[str], max_vocab_size: int, min_freq: int) -> Tokenizer:
    """A lower-cased word-level tokenizer whose vocabulary is learned from `texts` only.

    Words and punctuation are split apart ("great!" -> "great", "!"), accents are stripped. The vocabulary
    holds at most `max_vocab_size` entries, the two specials included, so the embedding size is known from
    the config before any data is read; rarer words map to `<unk>`.
    """
    tokenizer = Tokenizer(models.WordLevel(unk_token=UNK))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFD(), normalizers.StripAccents(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordLevelTrainer(vocab_size=max_vocab_size, min_frequency=min_freq,
                                        special_tokens=[PAD, UNK], show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    assert tokenizer.token_to_id(PAD) == 0 and tokenizer.token_to_id(UNK) == 1
    return tokenizer


def encode(tokenizer: Tokenizer, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """All texts as one flat id tensor plus offsets: text i is `ids[offsets[i]:offsets[i + 1]]`.

    Ragged storage keeps 25k reviews in ~30 MB with no padding. An empty text becomes a single `<unk>`
    so that every length is >= 1 (packed sequences reject length 0).
    """
    unk = tokenizer.token_to_id(UNK)
    encoded = [e.ids or [unk] for e in tokenizer.encode_batch(list(texts))]  # Rust, multi-threaded
    lengths = torch.tensor([len(ids) for ids in encoded], dtype=torch.long)
    offsets = torch.zeros(len(encoded) + 1, dtype=torch.long)
    torch.cumsum(lengths, 0, out=offsets[1:])
    ids = torch.tensor([i for e in encoded for i in e], dtype=torch.int32)
    return ids, offsets


class ReviewDataset(Dataset):
    """Encoded reviews with labels; item i is `(ids (L,) long, label float)`, cut to `max_len` tokens.

    `truncate="head"` keeps the first `max_len` tokens, `"tail"` the last ones (where reviews tend to
    state their verdict).
    """

    def __init__(self, ids: torch.Tensor, offsets: torch.Tensor, labels: torch.Tensor,
                 max_len: Optional[int] = None, truncate: str = "head"):
        self.ids, self.offsets, self.labels = ids, offsets, labels.float()
        self.max_len, self.truncate = max_len, truncate
        full = offsets[1:] - offsets[:-1]
        self.lengths = full.clamp(max=max_len) if max_len else full  # (N,) what the model will see

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        if self.max_len and end - start > self.max_len:
            start, end = (start, start + self.max_len) if self.truncate == "head" else (end - self.max_len, end)
        return self.ids[start:end].long(), self.labels[i]


def pad_collate(batch: list[tuple[torch.Tensor, torch.Tensor]], pad_id: int = 0):
    """Pad to the longest review of this batch only: `(tokens (B, T) long, lengths (B,) long, labels (B,))`."""
    seqs, labels = zip(*batch)
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    tokens = torch.full((len(seqs), int(lengths.max())), pad_id, dtype=torch.long)  # (B, T)
    for row, seq in enumerate(seqs):
        tokens[row, :len(seq)] = seq
    return tokens, lengths, torch.stack(labels)


class BucketBatchSampler(BatchSampler):
    """Batches of reviews of similar length, so that little of each padded batch is padding.

    Takes the indices in the order `sampler` gives them (random for training, sequential for evaluation),
    cuts them into chunks of `batch_size * bucket_batches`, sorts each chunk by length, cuts it into
    batches and, when `shuffle_batches`, shuffles the batch order. Training batches thus stay a random draw
    yet nearly uniform in length; `bucket_batches=None` sorts everything at once (evaluation).

    It keeps `BatchSampler`'s signature so that Lightning can swap `sampler` for a `DistributedSampler`
    under DDP: each rank then buckets its own shard, and all ranks get the same number of batches.
    """

    def __init__(self, sampler: Sampler[int], batch_size: int, drop_last: bool, lengths: torch.Tensor,
                 bucket_batches: Optional[int] = 50, shuffle_batches: bool = True, seed: Optional[int] = None):
        super().__init__(sampler, batch_size, drop_last)
        self.lengths = lengths
        self.bucket_batches, self.shuffle_batches = bucket_batches, shuffle_batches
        self.seed = seed

    def __iter__(self) -> Iterator[list[int]]:
        indices = torch.tensor(list(self.sampler), dtype=torch.long)
        # A multiple of batch_size, so only the very last batch can be short (as in BatchSampler).
        chunk = self.batch_size * self.bucket_batches if self.bucket_batches else max(len(indices), 1)
        batches = []
        for part in indices.split(chunk):
            part = part[torch.argsort(self.lengths[part], stable=True)]
            batches.extend(part.split(self.batch_size))
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        # With a seed, the batch order comes from (seed, the sampler's epoch) and not from the global RNG, so a
        # resumed epoch repeats it (gradlab.data.resumable).
        generator = None
        if self.seed is not None:
            generator = torch.Generator().manual_seed(self.seed + getattr(self.sampler, "epoch", 0))
        order = range(len(batches))
        if self.shuffle_batches:
            order = torch.randperm(len(batches), generator=generator).tolist()
        for i in order:
            yield batches[i].tolist()
