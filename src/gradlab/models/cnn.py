"""The classic MNIST CNN of pytorch/examples `mnist/main.py`."""

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
        x = F.relu(self.conv2(x))                   # (B, 64, 24, 24)
        x = F.max_pool2d(x, 2)                      # (B, 64, 12, 12)
        x = torch.flatten(self.dropout1(x), 1)      # (B, 9216)
        x = self.dropout2(F.relu(self.fc1(x)))      # (B, 128)
        return F.log_softmax(self.fc2(x), dim=1)    # (B, C)
