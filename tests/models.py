"""Small models shared by the multi-process tests."""

from __future__ import annotations

import torch
from torch import nn


class TinyNet(nn.Module):
    """Embedding 13x6 (fallback), matrices 7x6, 9x7, 5x9 (odd: ZeRO cuts mid-row, FSDP2 rows uneven),
    1-D biases and a LayerNorm (fallback)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(13, 6)
        self.l1 = nn.Linear(6, 7)
        self.l2 = nn.Linear(7, 9)
        self.norm = nn.LayerNorm(9)
        self.head = nn.Linear(9, 5, bias=False)

    def forward(self, ids):
        h = self.emb(ids).mean(1)
        h = torch.tanh(self.l1(h))
        h = self.norm(torch.tanh(self.l2(h)))
        return self.head(h)
