"""Model factories as a user writes them, for the tool tests (`tests.tools.factories:NAME`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TwoLayer(nn.Module):
    def __init__(self, hidden: int = 12) -> None:
        super().__init__()
        self.encoder = nn.Linear(6, hidden)
        self.decoder = nn.Linear(hidden, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(torch.relu(self.encoder(x)))


class WithLoss(TwoLayer):
    """Returns its own loss: the factory gives no loss_fn."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(super().forward(x), y)


def make(hidden: int = 12):
    g = torch.Generator().manual_seed(1)
    return TwoLayer(hidden), (torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)), F.mse_loss


def make_with_loss():
    g = torch.Generator().manual_seed(2)
    return WithLoss(), (torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g))
