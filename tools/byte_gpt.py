"""A small GPT over bytes, written so ``torch.fx`` sees every product as its own node.

Pre-LayerNorm decoder blocks: the benchmark transformer's encoder layer
(``bench_models.EncoderLayer``) with a fixed causal mask buffer added to its attention scores
(so the traced graph has no shape arithmetic), then a GELU MLP. Learned position embeddings,
a byte vocabulary of 256, an untied linear head.

    model = ByteGPT(d=256, layers=4, heads=4, seq=128)
    logits = model(ids)            # (B, T) int64 -> (B, T, 256)
"""

from __future__ import annotations

import torch
from bench_models import EncoderLayer
from torch import Tensor, nn

VOCAB = 256


class ByteGPT(nn.Module):
    """Ids ``(B, seq)`` -> next-byte logits ``(B, seq, 256)``; the sequence length is fixed at ``seq``."""

    def __init__(self, *, d: int, layers: int, heads: int, seq: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.pos = nn.Parameter(torch.randn(seq, d) * 0.02)
        self.blocks = nn.ModuleList(EncoderLayer(d, heads, 4 * d, causal_seq=seq) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, VOCAB)

    def forward(self, ids: Tensor) -> Tensor:
        x = self.embed(ids) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))
