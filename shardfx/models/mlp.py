"""A small multilayer perceptron: the simplest model every pass is tried on first.

Uneven widths (e.g. hidden=(37,)) are supported on purpose, so that sharding
passes meet sizes that do not divide the world size.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    """Linear -> [BatchNorm1d] -> GELU for each hidden width, then a final Linear.

    Parameters are named `layers.{i}.weight` (Linear i) and `norms.{i}.weight`
    (the BatchNorm after hidden Linear i), so graph node names stay readable.
    BatchNorm is included to give passes a module with buffers and
    train/eval-dependent behaviour.
    """

    def __init__(
        self,
        d_in: int = 16,
        hidden: Sequence[int] = (32, 32),
        d_out: int = 8,
        batchnorm: bool = False,
        bias: bool = True,
    ) -> None:
        super().__init__()
        widths = [d_in, *hidden, d_out]
        self.layers = nn.ModuleList(nn.Linear(w_in, w_out, bias=bias) for w_in, w_out in pairwise(widths))
        # One norm per hidden layer; the output layer is left unnormalised.
        self.norms = nn.ModuleList(nn.BatchNorm1d(w) for w in hidden) if batchnorm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, d_in) -> (B, d_out)."""
        *hidden_layers, out_layer = self.layers
        for i, layer in enumerate(hidden_layers):
            x = layer(x)  # (B, hidden[i])
            if self.norms is not None:
                x = self.norms[i](x)
            x = F.gelu(x)
        return out_layer(x)  # (B, d_out)
