"""A small GPT over bytes, written so ``torch.fx`` sees every product as its own node.

Pre-LayerNorm decoder blocks: causal self-attention from four ``nn.Linear`` projections and
two ``@`` products (a fixed causal mask buffer, so the traced graph has no shape arithmetic),
then a GELU MLP. Learned position embeddings, a byte vocabulary of 256, an untied linear head.

    model = ByteGPT(d=256, layers=4, heads=4, seq=128)
    logits = model(ids)            # (B, T) int64 -> (B, T, 256)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

VOCAB = 256


class CausalSelfAttention(nn.Module):
    def __init__(self, d: int, heads: int, seq: int) -> None:
        super().__init__()
        self.heads = heads
        self.scale = (d // heads) ** -0.5
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.out = nn.Linear(d, d)
        # -1e9 above the diagonal, added to the scores: masked positions get zero weight (finite,
        # because optimize() refuses weights and buffers holding Inf)
        mask = torch.full((seq, seq), -1e9).triu(1)
        self.register_buffer("mask", mask, persistent=False)

    def _split(self, t: Tensor) -> Tensor:
        return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, T, D) -> (B, H, T, D/H)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self._split(self.q(x)), self._split(self.k(x)), self._split(self.v(x))
        att = torch.softmax((q @ k.transpose(-2, -1)) * self.scale + self.mask, dim=-1)
        return self.out((att @ v).transpose(1, 2).flatten(2))


class Block(nn.Module):
    def __init__(self, d: int, heads: int, seq: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, heads, seq)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class ByteGPT(nn.Module):
    """Ids ``(B, seq)`` -> next-byte logits ``(B, seq, 256)``; the sequence length is fixed at ``seq``."""

    def __init__(self, *, d: int, layers: int, heads: int, seq: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.pos = nn.Parameter(torch.randn(seq, d) * 0.02)
        self.blocks = nn.ModuleList(Block(d, heads, seq) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, VOCAB)

    def forward(self, ids: Tensor) -> Tensor:
        x = self.embed(ids) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))
