"""One grad_noise reading of a tiny GRU classifier (embedding, GRU, linear head) at its initial weights.

    python tests/grad_noise_ddp.py ddp OUT.json      # 2 CPU processes (gloo), 8 examples each
    python tests/grad_noise_ddp.py single OUT.json   # 1 process, 2 micro-batches of 8 (accumulate_grad_batches=2)

Both see the same 16 examples in the same groups: under DDP without shuffling rank r reads rows r, r+2, ...;
the single process reads the rows in that order, rank 0's first. Run by tests/test_grad_noise.py.
"""

import json
import sys

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from gradlab.models.classifier import ClassifierModule
from gradlab.models.rnn import SentimentRNN
from gradlab.observe.grad_noise import GradNoiseMonitor


def main(mode: str, out: str) -> None:
    pl.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, 30, (16, 7), generator=g)
    y = (x[:, 0] < 15).double()
    if mode == "single":
        order = torch.cat([torch.arange(0, 16, 2), torch.arange(1, 16, 2)])
        x, y = x[order], y[order]
    net = SentimentRNN(vocab_size=30, embed_dim=6, hidden_size=5, cell="gru", dropout=0.0).double()
    module = ClassifierModule(net, F.binary_cross_entropy_with_logits, num_classes=1,
                              optimizer=lambda params: torch.optim.SGD(params, lr=0.1))
    monitor = GradNoiseMonitor(log_every_n_steps=1, smoothing=0.0)
    ddp = mode == "ddp"
    trainer = pl.Trainer(accelerator="cpu", devices=2 if ddp else 1, strategy="ddp" if ddp else "auto",
                         precision="64-true", max_steps=1, accumulate_grad_batches=1 if ddp else 2, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, num_sanity_val_steps=0, callbacks=[monitor],
                         use_distributed_sampler=False)
    data = TensorDataset(x, torch.full((16,), 7), y)
    # Lightning's own distributed sampler would shuffle; this one reads rank r's rows r, r+2, ... in order.
    sampler = DistributedSampler(data, num_replicas=2, rank=trainer.global_rank, shuffle=False) if ddp else None
    loader = DataLoader(data, batch_size=8, shuffle=False, sampler=sampler)
    trainer.fit(module, train_dataloaders=loader)
    if trainer.is_global_zero:
        with open(out, "w") as f:
            json.dump(monitor.last, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
