"""Sentiment classifier: embedding -> recurrent layers (RNN, LSTM or GRU) -> pooling over time -> one logit."""

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

CELLS = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}
POOLINGS = ("last", "max", "mean")


class SentimentRNN(nn.Module):
    """`forward(tokens (B, T), lengths (B,)) -> (B,)` logits of the positive class.

    Padded batches go through `pack_padded_sequence`, so a review's logit does not depend on how much
    padding its batch has: the recurrence stops at each review's last real token (and, bidirectionally,
    the backward pass starts there). `pooling` turns the per-step outputs into one vector per review:
    `last` is the final hidden state (both directions' when bidirectional), `max` and `mean` pool the
    outputs of the top layer over the real time steps only.
    """

    def __init__(self, vocab_size: int, embed_dim: int = 64, hidden_size: int = 64, num_layers: int = 1,
                 cell: str = "gru", bidirectional: bool = True, dropout: float = 0.5, pooling: str = "max",
                 padding_idx: int = 0):
        super().__init__()
        if cell not in CELLS:
            raise ValueError(f"cell must be one of {sorted(CELLS)}, not {cell!r}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, not {pooling!r}")
        self.cell, self.pooling, self.padding_idx = cell, pooling, padding_idx
        self.directions = 2 if bidirectional else 1
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=padding_idx)
        # nn.RNN/GRU/LSTM apply `dropout` between stacked layers only; it warns when there is one layer.
        self.rnn = CELLS[cell](embed_dim, hidden_size, num_layers=num_layers, batch_first=True,
                               bidirectional=bidirectional, dropout=dropout if num_layers > 1 else 0.0)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(self.directions * hidden_size, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Orthogonal recurrent weights keep the hidden state's norm through many steps at init, which
        # is what lets a vanilla tanh RNN carry a signal across a few hundred tokens; Xavier for inputs.
        for name, param in self.rnn.named_parameters():
            if name.startswith("weight_hh"):
                for gate in param.data.chunk(param.shape[0] // param.shape[1]):  # one square block per gate
                    nn.init.orthogonal_(gate)
            elif name.startswith("weight_ih"):
                nn.init.xavier_uniform_(param)
            else:
                nn.init.zeros_(param)
                if self.cell == "lstm":
                    # Forget gate (the second of the i, f, g, o blocks) biased open: remember by default.
                    param.data.chunk(4)[1].fill_(0.5)  # b_ih + b_hh = 1
        nn.init.normal_(self.embedding.weight, std=0.1)
        with torch.no_grad():
            self.embedding.weight[self.padding_idx].zero_()

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        emb = self.dropout(self.embedding(tokens))  # (B, T, E)
        batch, steps = tokens.shape
        lengths = lengths.to("cpu")  # packing reads the lengths on the host, even on GPU
        if bool((lengths == steps).all()):
            # No padding at all (common with bucketing and truncation): packing would give the same result,
            # and the plain kernels are several times faster on CPU.
            out, hidden = self.rnn(emb)  # (B, T, D*H)
        else:
            packed = pack_padded_sequence(emb, lengths, batch_first=True, enforce_sorted=False)
            out, hidden = self.rnn(packed)
            out, _ = pad_packed_sequence(out, batch_first=True)  # (B, max(lengths), D*H), zeros past each end
        if self.pooling == "last":
            h_n = hidden[0] if self.cell == "lstm" else hidden  # (layers*D, B, H); LSTM also returns c_n
            features = h_n[-self.directions:].transpose(0, 1).reshape(batch, -1)  # (B, D*H) of the top layer
        else:
            real = torch.arange(out.shape[1]) < lengths[:, None]  # (B, T') True on real tokens
            real = real.to(out.device).unsqueeze(-1)  # (B, T', 1)
            if self.pooling == "max":
                features = out.masked_fill(~real, float("-inf")).amax(dim=1)  # (B, D*H)
            else:
                features = out.sum(dim=1) / lengths.to(out.device, out.dtype)[:, None]  # padding is 0
        return self.head(self.dropout(features)).squeeze(-1)  # (B,)
