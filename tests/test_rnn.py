"""SentimentRNN: padding never changes a review's output; the model learns sentiment through the real data path."""

from pathlib import Path

import pytest
import torch

from gradlab.data.imdb import IMDBDataModule
from gradlab.models.rnn import SentimentRNN
from gradlab.run.train import build_module
from helpers import compose_config, write_aclimdb


def padded_batch(seqs: list[torch.Tensor], filler: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (B, T) batch; the padding holds a real word id, so only `lengths` can hide it."""
    lengths = torch.tensor([len(s) for s in seqs])
    tokens = torch.full((len(seqs), int(lengths.max()) + 3), filler)  # extra columns beyond the longest, too
    for i, s in enumerate(seqs):
        tokens[i, :len(s)] = s
    return tokens, lengths


@pytest.mark.parametrize("cell,bidirectional,pooling,layers", [
    ("rnn", False, "last", 1), ("rnn", True, "max", 2), ("gru", True, "last", 2),
    ("gru", True, "max", 1), ("lstm", True, "mean", 1), ("lstm", False, "last", 2),
])
def test_padded_packed_batch_equals_each_review_alone(cell, bidirectional, pooling, layers):
    torch.manual_seed(0)
    model = SentimentRNN(vocab_size=50, embed_dim=8, hidden_size=6, num_layers=layers, cell=cell,
                         bidirectional=bidirectional, pooling=pooling).double().eval()
    seqs = [torch.randint(2, 50, (n,)) for n in (7, 1, 12, 3, 12)]
    tokens, lengths = padded_batch(seqs, filler=17)
    batched = model(tokens, lengths)  # packed path
    alone = torch.cat([model(s[None], torch.tensor([len(s)])) for s in seqs])  # no padding: plain path
    assert batched.shape == (5,)
    torch.testing.assert_close(batched, alone, rtol=1e-10, atol=1e-10)
    # And padding does matter without the lengths: the comparison above can fail.
    unmasked = model(tokens, torch.full((5,), tokens.shape[1]))
    assert not torch.allclose(unmasked, alone)


def test_padding_embedding_stays_zero_and_gets_no_gradient():
    model = SentimentRNN(vocab_size=20, embed_dim=4, hidden_size=3)
    tokens, lengths = padded_batch([torch.tensor([3, 4, 5]), torch.tensor([6])], filler=0)
    model(tokens, lengths).sum().backward()
    assert model.embedding.weight[0].abs().sum() == 0 and model.embedding.weight.grad[0].abs().sum() == 0
    assert model.embedding.weight.grad[3].abs().sum() > 0


def test_learns_sentiment_from_tiny_reviews(tmp_path):
    torch.manual_seed(0)
    root = write_aclimdb(tmp_path, n_train=60, n_test=30)
    dm = IMDBDataModule(root=str(root), download=False, val_size=20, batch_size=16, max_vocab_size=64)
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    model = SentimentRNN(vocab_size=64, embed_dim=16, hidden_size=16, cell="gru", dropout=0.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    for _ in range(8):
        for tokens, lengths, labels in dm.train_dataloader():
            optimizer.zero_grad()
            loss_fn(model(tokens, lengths), labels).backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        correct = sum(((model(t, n) > 0).float() == y).sum().item() for t, n, y in dm.test_dataloader())
    assert correct / 60 >= 0.9  # chance is 0.5


def compose_with(overrides: list[str], tmp_path: Path):
    return compose_config("train", overrides, tmp_path)


def test_model_rnn_on_imdb_data_clips_gradients(tmp_path):
    cfg = compose_with(["model=rnn", "data=imdb", "model.cell=lstm", "model.hidden_size=24", "data.max_vocab_size=300"], tmp_path)
    assert cfg.data._target_ == "gradlab.data.imdb.IMDBDataModule"
    module = build_module(cfg)
    net = module.net
    assert isinstance(net.rnn, torch.nn.LSTM) and net.rnn.hidden_size == 24
    assert net.embedding.num_embeddings == 300 and module.hparams.gradient_clip_val == 1.0
    assert isinstance(module.criterion, torch.nn.BCEWithLogitsLoss) and module.binary
    # model=rnn leaves the data group alone: an image data set with it is a config error, not a silent switch
    assert compose_with(["model=rnn"], tmp_path).data._target_.endswith("MNISTDataModule")


@pytest.mark.parametrize("experiment,cell", [("imdb_rnn", "rnn"), ("imdb_gru", "gru")])
def test_experiments_pick_their_cell(experiment, cell, tmp_path):
    cfg = compose_with([f"experiment={experiment}"], tmp_path)
    module = build_module(cfg)
    assert module.net.cell == cell and cfg.data._target_.endswith("IMDBDataModule")
