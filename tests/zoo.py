"""The zoo: small networks of the architectures users train today, each in a LightningModule written the way its
community writes them, and the data each can learn. Shared by test_zoo.py and scripts/bench_observatory.py."""

import math

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

VOCAB, CONTEXT = 32, 12


# ---- lightning-hydra-template's MNISTLitModule + SimpleDenseNet, in that template's style --------------------
class SimpleDenseNet(nn.Module):
    def __init__(self, input_size: int = 16, lin1_size: int = 32, lin2_size: int = 32, lin3_size: int = 32,
                 output_size: int = 10):
        super().__init__()
        self.model = nn.Sequential(
            nn.Linear(input_size, lin1_size), nn.BatchNorm1d(lin1_size), nn.ReLU(),
            nn.Linear(lin1_size, lin2_size), nn.BatchNorm1d(lin2_size), nn.ReLU(),
            nn.Linear(lin2_size, lin3_size), nn.BatchNorm1d(lin3_size), nn.ReLU(),
            nn.Linear(lin3_size, output_size))

    def forward(self, x):
        batch_size, channels, width, height = x.size()
        x = x.view(batch_size, -1)  # (B, 1, W, H) -> (B, C*W*H)
        return self.model(x)


class MNISTLitModule(pl.LightningModule):
    def __init__(self, net: nn.Module, lr: float = 0.001, weight_decay: float = 0.0):
        super().__init__()
        self.save_hyperparameters(logger=False, ignore=["net"])
        self.net = net
        self.criterion = nn.CrossEntropyLoss()

    def forward(self, x: torch.Tensor):
        return self.net(x)

    def model_step(self, batch):
        x, y = batch
        logits = self.forward(x)  # self.forward, never self(x): no LightningModule forward hook runs
        loss = self.criterion(logits, y)
        return loss, torch.argmax(logits, dim=1), y

    def training_step(self, batch, batch_idx):
        loss, preds, targets = self.model_step(batch)
        self.log("train/loss", loss, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(params=self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


# ---- a generic classifier module for plain nn.Module networks -------------------------------------------------
class Classifier(pl.LightningModule):
    def __init__(self, net: nn.Module, lr: float = 1e-3, loss: str = "ce"):
        super().__init__()
        self.net, self.lr, self.loss = net, lr, loss

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self.net(x)
        loss = F.cross_entropy(out, y) if self.loss == "ce" else F.mse_loss(out, x)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


# ---- a decoder-only transformer LM: GELU, LayerNorm, F.scaled_dot_product_attention, tied embeddings ----------
class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, c = x.shape                                                     # (B, T, C)
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))  # (B, H, T, D)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyGPT(nn.Module):
    """Computes its loss inside forward and returns (logits, loss), as nanoGPT does."""

    def __init__(self, vocab: int = VOCAB, d: int = 16, heads: int = 2, layers: int = 2, context: int = CONTEXT):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(context, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight  # tied: one parameter, counted once

    def forward(self, idx, targets=None):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))                                       # (B, T, V)
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss


class LSTMLM(nn.Module):
    def __init__(self, vocab: int = VOCAB, d: int = 16):
        super().__init__()
        self.emb, self.lstm, self.out = nn.Embedding(vocab, d), nn.LSTM(d, d, batch_first=True), nn.Linear(d, vocab)

    def forward(self, idx, targets=None):
        h, _ = self.lstm(self.emb(idx))                                        # (B, T, H)
        logits = self.out(h)
        return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten())


class LanguageModel(pl.LightningModule):
    def __init__(self, net: nn.Module, lr: float = 3e-3):
        super().__init__()
        self.net, self.lr = net, lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        _, loss = self.net(x, y)  # the submodule directly
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.0)


# ---- convolutions in 1-D, 2-D (transposed) and 3-D, with the other activations and norms --------------------
class ConvAutoencoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.ReLU(),
                                 nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.ReLU())
        self.dec = nn.Sequential(nn.ConvTranspose2d(8, 4, 4, stride=2, padding=1), nn.ReLU(),
                                 nn.ConvTranspose2d(4, 1, 4, stride=2, padding=1), nn.Sigmoid())

    def forward(self, x):                                                      # (B, 1, 16, 16)
        return self.dec(self.enc(x))


class Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.norm1 = nn.Conv1d(2, 8, 3, padding=1), nn.GroupNorm(2, 8)
        self.conv2, self.norm2 = nn.Conv1d(8, 8, 3, padding=1), nn.BatchNorm1d(8)
        self.act1, self.act2 = nn.SiLU(), nn.Mish()
        self.fc = nn.Linear(8, 3)

    def forward(self, x):                                                      # (B, 2, L)
        x = self.act1(self.norm1(self.conv1(x)))
        x = self.act2(self.norm2(self.conv2(x)))
        return self.fc(x.mean(-1))


class Conv3dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv3d(1, 4, 3, padding=1), nn.Conv3d(4, 4, 3, padding=1)
        self.norm = nn.RMSNorm(4)
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):                                                      # (B, 1, D, H, W)
        x = F.elu(self.conv1(x))
        x = F.softplus(self.conv2(x)).mean((2, 3, 4))                          # (B, 4)
        x = F.leaky_relu(self.fc1(self.norm(x)), 0.1)
        return self.fc2(torch.tanh(x))


# ---- the data each can learn ------------------------------------------------------------------------------------
def class_data(shape, classes: int = 3, n: int = 32, seed: int = 0):
    """Inputs whose class shifts their mean: learnable by any of the classifiers."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = torch.randn(n, *shape, generator=g) * 0.5 + (y.float() - 1).view(-1, *[1] * len(shape))
    return torch.utils.data.TensorDataset(x, y)


def image_data(n: int = 32, size: int = 16, seed: int = 0):
    """Blobs on a dark field for the autoencoder, in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, 1, size, size, generator=g) > 0.8).float()
    return torch.utils.data.TensorDataset(x, torch.zeros(n, dtype=torch.long))


def token_data(n: int = 32, seed: int = 0, vocab: int = VOCAB, context: int = CONTEXT):
    """Counting sequences modulo `vocab`: the next token is the last one plus a per-sequence stride (1 or 2)."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab, (n, 1), generator=g)
    stride = 1 + torch.randint(0, 2, (n, 1), generator=g)
    seq = (start + stride * torch.arange(context + 1)) % vocab                # (N, T + 1)
    return torch.utils.data.TensorDataset(seq[:, :-1], seq[:, 1:])


def loader(dataset, batch_size: int = 8):
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)


def zoo() -> dict:
    """name -> (make the LightningModule, its dataset, the functional activations applied per forward)."""
    import torchvision

    def vit():
        return torchvision.models.VisionTransformer(image_size=16, patch_size=8, num_layers=1, num_heads=2,
                                                    hidden_dim=16, mlp_dim=32, num_classes=3)

    return {
        "hydra_template_mnist": (lambda: MNISTLitModule(SimpleDenseNet()), class_data((1, 4, 4)), 0),
        "resnet18": (lambda: Classifier(torchvision.models.resnet18(num_classes=3)), class_data((3, 16, 16)), 0),
        "mobilenet_v3_small": (lambda: Classifier(torchvision.models.mobilenet_v3_small(num_classes=3)),
                               class_data((3, 32, 32)), 0),
        "vit": (lambda: Classifier(vit()), class_data((3, 16, 16)), 0),
        "gpt": (lambda: LanguageModel(TinyGPT()), token_data(), 2),          # F.gelu in each of 2 blocks
        "lstm_lm": (lambda: LanguageModel(LSTMLM()), token_data(), 0),
        "conv_autoencoder": (lambda: Classifier(ConvAutoencoder(), loss="mse"), image_data(), 0),
        "conv1d": (lambda: Classifier(Conv1dNet()), class_data((2, 16)), 0),
        "conv3d": (lambda: Classifier(Conv3dNet()), class_data((1, 4, 4, 4)), 4),  # elu, softplus, leaky, tanh
    }


ACTIVATION_MODULES = (nn.ReLU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh,
                      nn.ELU, nn.Softplus, nn.LeakyReLU, nn.RNNBase)
NORM_MODULES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase, nn.RMSNorm)


def count_calls(module: nn.Module, batch, kinds) -> int:
    """How many times modules of these kinds run in one training forward (an independent count by hooks)."""
    calls = []
    handles = [m.register_forward_hook(lambda *a: calls.append(1)) for m in module.modules() if isinstance(m, kinds)]
    module.log = lambda *args, **kwargs: None  # outside a fit: self.log would refuse
    try:
        with torch.no_grad():
            module.training_step(batch, 0)
    finally:
        del module.log
        for h in handles:
            h.remove()
    return len(calls)


def param_layers(module: nn.Module) -> list[str]:
    """Modules with trainable parameters of their own; a tied parameter belongs to the first module holding it."""
    seen, out = set(), []
    for name, m in module.named_modules():
        own = [p for p in m.parameters(recurse=False) if p.requires_grad and id(p) not in seen]
        seen.update(id(p) for p in own)
        if own:
            out.append(name or "model")
    return out


def nll_floor(classes: int) -> float:
    return math.log(classes)
