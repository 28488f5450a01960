"""The prediction behind predict.py: a checkpoint's model on image files (CNN/MLP) or texts (RNN)."""

import json
import os
import sys
from typing import Any

import torch
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from gradlab.checkpoints import load as ckpt
from gradlab.data.images import list_images, load_digit
from gradlab.errors import UserError
from gradlab.config.cli import after_import


def run(cfg: DictConfig) -> list[dict[str, Any]]:
    after_import(cfg)
    path = str(cfg.ckpt_path)
    checkpoint = ckpt.load(path)
    data_cfg = checkpoint["gradlab_config"].get("data") or {}
    target = str(data_cfg.get("_target_", ""))
    if not target.endswith(("MNISTDataModule", "IMDBDataModule")):
        raise UserError(f"{path} was trained on {target or 'unknown data'}; predict.py reads images for MNIST-family "
                        "checkpoints and texts for IMDB ones.")
    module = ckpt.build_module(checkpoint, path).to(cfg.device)
    if target.endswith("MNISTDataModule"):
        rows = predict_images(module, data_cfg, cfg)
    else:
        rows = predict_texts(module, checkpoint, data_cfg, cfg)
    try:
        if cfg.json:
            print(json.dumps(rows, indent=2), flush=True)
        else:
            print_rows(rows, int(cfg.top_k))
    except BrokenPipeError:  # `predict.py ... --json | head`: the reader left, which is fine
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return rows


@torch.no_grad()
def predict_images(module, data_cfg: dict, cfg: DictConfig) -> list[dict[str, Any]]:
    from gradlab.data.mnist import DATASETS  # the normalization the model was trained with

    dataset_cls, mean, std = DATASETS[data_cfg.get("dataset", "mnist")]
    files, images, skipped = list_images(str(cfg.input)), [], []
    for file in files:
        try:
            images.append((file, load_digit(file, cfg.invert)))
        except UserError as err:
            if len(files) == 1:
                raise
            skipped.append(str(err))
    warn_skipped(skipped, len(files))
    if not images:
        raise UserError(f"input={cfg.input}: none of the {len(files)} files could be read as an image.")
    rows = []
    for start in range(0, len(images), int(cfg.batch_size)):
        chunk = images[start:start + int(cfg.batch_size)]
        x = torch.stack([pixels for _, pixels in chunk]).unsqueeze(1)  # (B, 1, 28, 28)
        probs = module.predict_proba(((x - mean) / std).to(cfg.device)).cpu()  # (B, C)
        for (file, _), p in zip(chunk, probs):
            k = int(p.argmax())
            rows.append({"input": file, "class": k, "name": dataset_cls.classes[k], "probability": float(p[k]),
                         "probabilities": [round(float(v), 6) for v in p]})
    return rows


@torch.no_grad()
def predict_texts(module, checkpoint: dict, data_cfg: dict, cfg: DictConfig) -> list[dict[str, Any]]:
    from tokenizers import Tokenizer

    from gradlab.data.imdb import clean_review, read_review
    from gradlab.data.text import ReviewDataset, encode, pad_collate

    vocabulary = (checkpoint.get("IMDBDataModule") or {}).get("tokenizer")
    if not vocabulary:
        raise UserError(f"{cfg.ckpt_path} holds no vocabulary (it was written before checkpoints carried one); "
                        "train again to predict on text.")
    names, texts = read_texts(str(cfg.input), read_review, clean_review)
    tokenizer = Tokenizer.from_str(vocabulary)
    ids, offsets = encode(tokenizer, texts)
    # Cut as in training: the same max_len and the same end of the review kept.
    reviews = ReviewDataset(ids, offsets, torch.zeros(len(texts)), max_len=data_cfg.get("max_len"),
                            truncate=data_cfg.get("truncate", "head"))
    rows, size = [], int(cfg.batch_size)
    for start in range(0, len(reviews), size):
        tokens, lengths, _ = pad_collate([reviews[i] for i in range(start, min(start + size, len(reviews)))])
        positive = module.predict_proba(tokens.to(cfg.device), lengths).cpu()  # (B,)
        for name, p in zip(names[start:start + size], positive.tolist()):
            rows.append({"input": name, "positive": p, "label": "positive" if p >= 0.5 else "negative"})
    return rows


def read_texts(value: str, read, clean) -> tuple[list[str], list[str]]:
    """(names, texts): a .txt file, a folder of them (unreadable ones skipped and reported), or `value` itself."""
    if os.path.isfile(value):
        return [value], [read(value)]
    if not os.path.isdir(value):
        if value.endswith(".txt"):
            raise UserError(f"input={value}: no such file (give the text itself, a .txt file or a folder).")
        return [value if len(value) <= 40 else value[:37] + "..."], [clean(value)]
    files = sorted(os.path.join(value, f) for f in os.listdir(value) if f.endswith(".txt"))
    names, texts, skipped = [], [], []
    for file in files:
        try:
            texts.append(read(file))
            names.append(file)
        except UserError as err:
            skipped.append(str(err))
    warn_skipped(skipped, len(files))
    if not texts:
        raise UserError(f"input={value}: the folder holds no readable .txt files.")
    return names, texts


def warn_skipped(skipped: list[str], total: int) -> None:
    if skipped:  # a folder: one broken file does not spoil the rest, but is reported
        print(f"warning: skipped {len(skipped)} of {total} files:\n  " + "\n  ".join(skipped), file=sys.stderr)


def print_rows(rows: list[dict[str, Any]], top_k: int) -> None:
    table = Table(show_header=True, header_style="bold")
    if "class" in rows[0]:
        for column in ("input", "class", "probability", f"top {top_k}"):
            table.add_column(column, justify="left" if column == "input" else "right")
        for row in rows:
            ranked = sorted(enumerate(row["probabilities"]), key=lambda kv: -kv[1])[:top_k]
            table.add_row(os.path.basename(row["input"]), row["name"], f"{row['probability']:.4f}",
                          "  ".join(f"{k}: {v:.3f}" for k, v in ranked))
    else:
        for column in ("input", "sentiment", "P(positive)"):
            table.add_column(column, justify="left" if column == "input" else "right")
        for row in rows:
            table.add_row(row["input"], row["label"], f"{row['positive']:.4f}")
    Console().print(table)
