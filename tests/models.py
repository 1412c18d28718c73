"""Small models shared by the tests (and the CLI tests' MODULE:FACTORY)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    def __init__(self, sizes: tuple[int, ...] = (64, 128, 128, 128, 10)) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        return self.layers[-1](x)


class CNN(nn.Module):
    def __init__(self, channels: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv3 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.head = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.relu(self.bn(self.conv3(x)))
        return self.head(x.mean(dim=(2, 3)))


class Attention(nn.Module):
    """Single-head self-attention written with F.linear and @, to exercise function nodes."""

    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.qkv = nn.Parameter(torch.randn(3 * d, d) / d**0.5)
        self.proj = nn.Linear(d, d)
        self.out = nn.Linear(d, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        q, k, v = F.linear(x, self.qkv).chunk(3, dim=-1)
        att = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        x = x + self.proj(torch.matmul(att, v))
        return self.out(x)


class Encoder(nn.Module):
    """One pre-norm transformer block and a pooled head: LayerNorms, attention matmuls, an MLP."""

    def __init__(self, d: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)  # equal fresh weights (all ones)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        att = torch.softmax(self.q(h) @ self.k(h).transpose(-1, -2) / h.shape[-1] ** 0.5, dim=-1)
        x = x + self.o(att @ self.v(h))
        x = x + self.fc2(F.gelu(self.fc1(self.ln2(x))))
        return self.head(x.mean(1))


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return MLP()


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return CNN()


def encoder() -> nn.Module:
    torch.manual_seed(0)
    return Encoder()


def attention() -> nn.Module:
    torch.manual_seed(0)
    return Attention()


def guide_mlp() -> nn.Module:
    """The user guide's quick-start model, 784-512-512-512-10 (docs/guide.md runs it)."""
    torch.manual_seed(0)
    return MLP((784, 512, 512, 512, 10))
