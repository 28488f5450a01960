"""Training throughput of gradlab's IMDB data path + RNN vs the classic one-review-at-a-time loop.

    python scripts/bench_rnn.py --data /tmp/imdb          # a folder holding aclImdb/train/{pos,neg}
    python scripts/bench_rnn.py --data /tmp/imdb --cell lstm --repeats 5

All rows train the same network, `SentimentRNN` built from `conf/model/rnn.yaml` (the `model=rnn` defaults,
or `--cell`), with Adam and total-norm clipping, on the same real training reviews cut to `data.max_len`
tokens, in one process, interleaved `--repeats` times (the table gives medians):

- classic: batch size 1, one review per step (the textbook loop); no padding, so no packing either.
- padded batches: `data.batch_size` reviews in random order, padded to the longest and packed.
- gradlab: the `imdb` data module's loader (length-bucketed batches, padded per batch, packed).

Warm-up steps are left out of every rate. About 4 minutes on a 2-core CPU with the defaults.
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from torch.utils.data import DataLoader

from gradlab.data.imdb import IMDBDataModule, dataset_folder, has_split
from gradlab.data.text import pad_collate
from gradlab.models.rnn import SentimentRNN

ROOT = Path(__file__).resolve().parents[1]


def default_config(overrides: list[str]):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=["model=rnn", "data=imdb", *overrides])


def train_rate(model: SentimentRNN, batches, warmup: int, steps: int) -> tuple[float, float]:
    """(reviews/s, tokens/s) over `steps` training steps after `warmup` ones."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    model.train()
    reviews = tokens = 0
    for step, (x, lengths, y) in enumerate(batches):
        if step == warmup:
            start, reviews, tokens = time.perf_counter(), 0, 0
        optimizer.zero_grad()
        loss_fn(model(x, lengths), y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        reviews, tokens = reviews + len(y), tokens + int(lengths.sum())
        if step + 1 == warmup + steps:
            break
    elapsed = time.perf_counter() - start
    return reviews / elapsed, tokens / elapsed


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="/tmp/imdb", help="a folder holding aclImdb/train (default /tmp/imdb)")
    parser.add_argument("--cell", choices=["rnn", "lstm", "gru"], help="default: model.cell of conf/model/rnn.yaml")
    parser.add_argument("--classic-steps", type=int, default=300, help="reviews timed in the batch-1 loop")
    parser.add_argument("--batched-steps", type=int, default=40, help="batches timed in the batched loops")
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of each rate (default 3)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of all rows, interleaved (default 3)")
    args = parser.parse_args(argv)
    if not has_split(dataset_folder(args.data), "train"):
        sys.exit(f"No aclImdb/train/pos and train/neg under {args.data}: extract aclImdb_v1.tar.gz (or the "
                 f"train-only archive) there, e.g. tar -xzf aclImdb_v1.tar.gz -C {args.data}")

    cfg = default_config([f"model.cell={args.cell}"] if args.cell else [])
    net_kwargs = {k: v for k, v in cfg.model.net.items() if k != "_target_"}
    dm = IMDBDataModule(root=args.data, batch_size=cfg.data.batch_size, max_len=cfg.data.max_len,
                        max_vocab_size=cfg.data.max_vocab_size, min_freq=cfg.data.min_freq, download=False)
    dm.prepare_data()
    dm.setup("fit")
    train_set = dm.train_set

    def classic():  # one review per step, in random order: (1, L) with no padding
        for i in torch.randperm(len(train_set)).tolist():
            ids, label = train_set[i]
            yield ids[None], torch.tensor([len(ids)]), label[None]

    def padded():  # random batches, padded to their longest review, packed
        return iter(DataLoader(train_set, batch_size=cfg.data.batch_size, shuffle=True, collate_fn=pad_collate))

    rows = {
        "classic loop, batch 1": (classic, args.classic_steps),
        f"padded random batches of {cfg.data.batch_size}, packed": (padded, args.batched_steps),
        "gradlab `model=rnn` (bucketed, padded per batch, packed)": (dm.train_dataloader, args.batched_steps),
    }
    results = {name: [] for name in rows}
    for r in range(args.repeats):
        for name, (batches, steps) in rows.items():
            torch.manual_seed(r)
            model = SentimentRNN(**net_kwargs)
            results[name].append(train_rate(model, iter(batches()), args.warmup, steps))
            print(f"  round {r + 1}/{args.repeats} {name}: {results[name][-1][0]:.1f} reviews/s", flush=True)

    med = {name: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v))
           for name, v in results.items()}
    base = med["classic loop, batch 1"][0]
    net = cfg.model
    print(f"\nIMDB training throughput: {net.cell} cell, embed {net.embed_dim}, hidden {net.hidden_size} x "
          f"{net.num_layers} layer(s), bidirectional={net.bidirectional}, pooling={net.pooling}, "
          f"max_len {cfg.data.max_len}; median of {args.repeats}, torch threads {torch.get_num_threads()}, "
          f"{os.cpu_count()} cores")
    print("| path | reviews/s | tokens/s | vs classic |")
    print("|---|---:|---:|---:|")
    for name, (reviews, tokens) in med.items():
        print(f"| {name} | {reviews:.1f} | {tokens:,.0f} | {reviews / base:.1f}x |")


if __name__ == "__main__":
    main()
