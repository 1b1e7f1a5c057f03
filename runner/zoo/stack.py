"""A plain stack of square linear layers: the seed's 100B-parameter example, for planning at any size.

``LinearStack(1000, 10000)`` is ``nn.Sequential`` of 1000 ``nn.Linear(10000, 10000)``: about 100B
parameters, 400 GB in fp32. It takes hidden states, not token ids, so it is for ``mode=plan``.
"""
from __future__ import annotations

import torch
from torch import nn


class LinearStack(nn.Sequential):
    def __init__(self, n_layers: int = 1000, width: int = 10000):
        super().__init__(*(nn.Linear(width, width) for _ in range(n_layers)))
        self.width = width

    def block_order(self) -> list[str]:
        """Declared, so planning needs no meta trace (1000 meta matmuls take about a second)."""
        return [str(i) for i in range(len(self))]

    def trace_input(self, batch: int, tokens: int) -> torch.Tensor:
        """What the meta trace feeds the model: hidden states, one row per token."""
        return torch.zeros(batch, tokens, self.width, device="meta")
