"""The classic MNIST CNN of pytorch/examples `mnist/main.py`.

Same layers, same parameters (its state dict loads into pytorch/examples' `Net` and back), same function;
two implementation choices make a CPU training step faster than the reference code (`scripts/bench_cnn.py`),
each one exact:

* max pool before the second relu: relu is monotonic, so `relu(maxpool(x)) == maxpool(relu(x))`, values and
  gradients alike (where the window max is <= 0 both give 0), and the relu runs on 4x fewer elements;
* dropout after flatten: dropout is elementwise, so it commutes with the reshape (and draws the same mask).

Trained with `model.channels_last=true` (the `model=cnn` default) the convolutions and the max pool run in
NHWC layout, where oneDNN's CPU kernels are fastest (the NCHW 2x2 max pool alone costs ~5 ms per batch).
"""

import torch
import torch.nn.functional as F
from torch import nn


class MnistCNN(nn.Module):
    """conv(1→32,3) → relu → conv(32→64,3) → relu → maxpool 2 → dropout → fc(9216→128) → relu → dropout → fc(128→C).

    Returns log-probabilities, so the matching criterion is `nn.NLLLoss`.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, hidden: int = 128,
                 dropout_conv: float = 0.25, dropout_fc: float = 0.5):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 32, 3)  # 28x28 -> 26x26
        self.conv2 = nn.Conv2d(32, 64, 3)           # 26x26 -> 24x24
        self.dropout1 = nn.Dropout(dropout_conv)
        # 9216 = 64 channels x 12 x 12 (24x24 halved by the 2x2 max pool).
        self.fc1 = nn.Linear(64 * 12 * 12, hidden)
        self.dropout2 = nn.Dropout(dropout_fc)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, 1, 28, 28)
        x = F.relu(self.conv1(x))                   # (B, 32, 26, 26)
        x = F.relu(F.max_pool2d(self.conv2(x), 2))  # (B, 64, 12, 12): pool, then relu (equal, see above)
        x = self.dropout1(torch.flatten(x, 1))      # (B, 9216), channel-major like the reference
        x = self.dropout2(F.relu(self.fc1(x)))      # (B, 128)
        return F.log_softmax(self.fc2(x), dim=1)    # (B, C)
