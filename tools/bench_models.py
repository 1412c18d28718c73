"""The models of the speed benchmark (issue 3), each with fixed random inputs and targets.

``mlp``, ``cnn`` and ``transformer`` are plain ``nn.Module`` code that ``torch.fx.symbolic_trace``
can trace, so ``approxcompile.optimize`` sees each product as its own node: attention is written with
``nn.Linear`` projections and ``@`` rather than ``nn.MultiheadAttention`` (whose fused
kernel hides the products from the tracer).

    workload = build("mlp", size="full", seed=0)   # .model, .x, .y
    workload = build("cnn", size="quick")          # tiny dims for smoke tests

``gpt2`` is a Hugging Face ``GPT2LMHeadModel`` (6 layers, d=384, a byte vocabulary of 256,
sequence 256, batch 8; quick: 2 layers, d=64, sequence 32), captured by ``torch.export``; its
output is the logits of every position, its targets one byte per position. Its activation is
``gelu_pytorch_tanh``, the Hugging Face name for GPT-2's tanh-approximated GELU computed by
PyTorch's fused ``gelu(approximate="tanh")`` (the same function to 1e-7): the default
``gelu_new`` spells it in seven elementwise operations over the 4d-wide hidden activations.
On an idle core the exact step took 1.77 s with the fused form against 1.85 s with
``gelu_new``, and the sampled-over-exact ratios were the same (docs/performance.md).

``size="full"`` is the issue's configuration; ``size="quick"`` keeps every layer type and
the layer count but shrinks widths and batches so a whole benchmark run takes seconds.
The quick sizes keep inner dimensions >= 32, so approxcompile still samples, and keep the
first and last layers (which stay exact) cheap, so a budget of 0.2 stays feasible.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Size = Literal["full", "quick"]
CLASSES = 10


class MLP(nn.Module):
    """Linears with ReLU between them; the wide hidden layers make the step matmul-bound."""

    def __init__(self, widths: tuple[int, ...]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True))

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        return self.layers[-1](x)


class CNN(nn.Module):
    """conv 3->c, three c->c 3x3 convs, 2x2 max pooling after the 2nd and 4th, GAP, linear head."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(3 if i == 0 else channels, channels, 3, padding=1) for i in range(4)
        )
        self.head = nn.Linear(channels, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        for i, conv in enumerate(self.convs):
            x = F.relu(conv(x))
            if i in (1, 3):
                x = F.max_pool2d(x, 2)
        return self.head(x.mean(dim=(2, 3)))


class SelfAttention(nn.Module):
    """Multi-head self-attention from four ``nn.Linear`` projections and two ``@`` products.

    ``unflatten``/``flatten`` split and merge the heads without reading ``x.shape``, which
    keeps the traced graph free of shape arithmetic.
    """

    def __init__(self, d: int, heads: int, causal_seq: int | None = None) -> None:
        super().__init__()
        self.heads = heads
        self.scale = (d // heads) ** -0.5
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.out = nn.Linear(d, d)
        # Causal: -1e9 above the diagonal, added to the scores, so masked positions get zero
        # weight (finite, because optimize() refuses weights and buffers holding Inf).
        mask = None if causal_seq is None else torch.full((causal_seq, causal_seq), -1e9).triu(1)
        self.mask: Tensor | None
        self.register_buffer("mask", mask, persistent=False)

    def _split(self, t: Tensor) -> Tensor:
        return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, S, D) -> (B, H, S, D/H)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self._split(self.q(x)), self._split(self.k(x)), self._split(self.v(x))
        scores = (q @ k.transpose(-2, -1)) * self.scale
        att = torch.softmax(scores if self.mask is None else scores + self.mask, dim=-1)
        return self.out((att @ v).transpose(1, 2).flatten(2))


class EncoderLayer(nn.Module):
    """Pre-LayerNorm encoder block: x + attn(ln(x)), then x + mlp(ln(x)) with GELU."""

    def __init__(self, d: int, heads: int, hidden: int, causal_seq: int | None = None) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = SelfAttention(d, heads, causal_seq)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class Transformer(nn.Module):
    """A stack of encoder layers and a linear head on the mean token (input is already embedded)."""

    def __init__(self, d: int, heads: int, hidden: int, layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(d, heads, hidden) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x).mean(dim=1))


@dataclass(frozen=True)
class Workload:
    """A model with the one fixed batch every variant trains on."""

    name: str
    model: nn.Module
    x: Tensor
    y: Tensor

    def describe(self) -> str:
        params = sum(p.numel() for p in self.model.parameters())
        return f"{self.name}: input {tuple(self.x.shape)}, {params / 1e6:.2f}M parameters"


def mlp(size: Size) -> tuple[nn.Module, tuple[int, ...]]:
    """784-4096-4096-4096-10 at batch 256 (quick: 32-256-256-256-10 at batch 32)."""
    if size == "full":
        return MLP((784, 4096, 4096, 4096, CLASSES)), (256, 784)
    return MLP((32, 256, 256, 256, CLASSES)), (32, 32)


def cnn(size: Size) -> tuple[nn.Module, tuple[int, ...]]:
    """128 channels on 32x32 images at batch 32 (quick: 32 channels, 16x16, batch 4)."""
    if size == "full":
        return CNN(128), (32, 3, 32, 32)
    return CNN(32), (4, 3, 16, 16)


def transformer(size: Size) -> tuple[nn.Module, tuple[int, ...]]:
    """d=512, 8 heads, MLP 2048, 4 layers; batch 8 of sequence 128 (quick: d=64, 2 heads, 2 layers)."""
    if size == "full":
        return Transformer(512, 8, 2048, 4), (8, 128, 512)
    return Transformer(64, 2, 128, 2), (2, 32, 64)


class ByteGPT2(nn.Module):
    """``GPT2LMHeadModel`` over bytes: ids (B, T) -> logits (B*T, 256), for cross-entropy per position."""

    def __init__(self, d: int, layers: int, heads: int, seq: int) -> None:
        super().__init__()
        import transformers

        config = transformers.GPT2Config(
            vocab_size=BYTES, n_embd=d, n_layer=layers, n_head=heads, n_positions=seq, use_cache=False,
            bos_token_id=0, eos_token_id=0, activation_function="gelu_pytorch_tanh",
        )  # fmt: skip
        self.lm = transformers.GPT2LMHeadModel(config)

    def forward(self, ids: Tensor) -> Tensor:
        return self.lm(ids).logits.flatten(0, 1)


def gpt2(size: Size) -> tuple[nn.Module, tuple[int, ...]]:
    """Hugging Face GPT-2, 6 layers, d=384, 6 heads, byte vocabulary; batch 8 of sequence 256."""
    if size == "full":
        return ByteGPT2(384, 6, 6, 256), (8, 256)
    return ByteGPT2(64, 2, 2, 32), (2, 32)


BYTES = 256
FACTORIES: dict[str, Callable[[Size], tuple[nn.Module, tuple[int, ...]]]] = {
    "mlp": mlp,
    "cnn": cnn,
    "transformer": transformer,
    "gpt2": gpt2,
}


def build(name: str, size: Size = "full", seed: int = 0) -> Workload:
    """The model and its batch, a pure function of ``(name, size, seed)``.

    Determinism matters: the peak-memory subprocesses rebuild the same workload instead
    of receiving tensors from the parent.
    """
    if name not in FACTORIES:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(FACTORIES)}")
    if size not in ("full", "quick"):
        raise ValueError(f"size must be 'full' or 'quick', got {size!r}")
    torch.manual_seed(seed)
    model, shape = FACTORIES[name](size)
    g = torch.Generator().manual_seed(seed + 1)
    if name == "gpt2":  # token ids in, one target byte per position
        x = torch.randint(0, BYTES, shape, generator=g)
        return Workload(name, model, x, torch.randint(0, BYTES, (shape[0] * shape[1],), generator=g))
    x = torch.randn(shape, generator=g)
    y = torch.randint(0, CLASSES, (shape[0],), generator=g)
    return Workload(name, model, x, y)
