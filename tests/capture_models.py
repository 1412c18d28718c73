"""Models symbolic tracing gets wrong or cannot trace, for the capture tests (tiny, random weights).

Each builder returns ``(model, example_inputs, other_inputs)``: ``other_inputs`` have another
batch size and, where the model has one, another sequence length.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

Built = tuple[nn.Module, tuple[Any, ...], tuple[Any, ...]]


class NoGradInside(nn.Module):
    """A frozen "teacher" branch computed under ``torch.no_grad()`` inside forward."""

    def __init__(self) -> None:
        super().__init__()
        self.teacher = nn.Linear(64, 64)
        self.a, self.b, self.c = nn.Linear(64, 128), nn.Linear(128, 64), nn.Linear(64, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            t = self.teacher(x)
        return self.c(self.b(F.relu(self.a(x))) + t)


class ReadsTraining(nn.Module):
    """Functional dropout on ``self.training`` and an ``if self.training:`` branch."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(64, 128), nn.Linear(128, 128), nn.Linear(128, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.b(F.relu(self.a(x))))
        if self.training:
            h = h + 0.01 * torch.randn_like(h)  # noise only while training
        return self.c(F.dropout(h, 0.25, training=self.training))


class ShapeMask(nn.Module):
    """A causal mask built from the input's sequence length (``torch.ones(T, T).triu(1)``)."""

    def __init__(self, d: int = 64) -> None:
        super().__init__()
        self.qkv, self.proj, self.head = nn.Linear(d, 3 * d), nn.Linear(d, d), nn.Linear(d, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        scores = (q @ k.transpose(-2, -1)) / q.shape[-1] ** 0.5
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        h = scores.masked_fill(mask, float("-inf")).softmax(-1) @ v
        return self.head(F.relu(self.proj(h)))


class Branchy(nn.Module):
    """Data-dependent control flow: which layer runs depends on the values."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.pos, self.neg, self.out = (
            nn.Linear(64, 128),
            nn.Linear(128, 128),
            nn.Linear(128, 128),
            nn.Linear(128, 8),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.a(x))
        h = self.pos(h) if h.mean() > 0.1 else self.neg(h)
        return self.out(F.relu(h))


def _block(cin: int, cout: int, stride: int = 1, groups: int = 1, k: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
    )


class ResNetish(nn.Module):
    """Residual blocks with BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _block(3, 32)
        self.b1, self.b2 = (
            nn.Sequential(_block(32, 32), _block(32, 32)),
            nn.Sequential(_block(32, 64, 2), _block(64, 64)),
        )
        self.skip = nn.Conv2d(32, 64, 1, 2, bias=False)
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = h + self.b1(h)
        h = self.skip(h) + self.b2(h)
        return self.fc(h.mean((2, 3)))


class MobileNetish(nn.Module):
    """Depthwise 3x3 + pointwise 1x1 blocks: only the 1x1 convolutions can be sampled."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = [_block(3, 32, 2)]
        for cin, cout, s in ((32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2)):
            layers += [_block(cin, cin, s, groups=cin), _block(cin, cout, k=1)]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean((2, 3)))


def transformer_encoder() -> Built:
    layer = nn.TransformerEncoderLayer(64, 4, 128, batch_first=True)
    return (
        nn.TransformerEncoder(layer, 2, enable_nested_tensor=False),
        (torch.randn(4, 24, 64),),
        (torch.randn(3, 40, 64),),
    )


def small(name: str) -> Built:
    """One of the plain-PyTorch models by name."""
    torch.manual_seed(0)
    if name == "transformer_encoder":
        return transformer_encoder()
    if name in ("resnet", "mobilenet"):
        model = ResNetish() if name == "resnet" else MobileNetish()
        return model, (torch.randn(4, 3, 32, 32),), (torch.randn(3, 3, 32, 32),)
    model = {"no_grad": NoGradInside, "training": ReadsTraining, "shape_mask": ShapeMask, "branchy": Branchy}[
        name
    ]()
    if name == "shape_mask":
        return model, (torch.randn(4, 24, 64),), (torch.randn(3, 40, 64),)
    return model, (torch.randn(16, 64),), (torch.randn(9, 64),)


def hf(name: str) -> Built:
    """A tiny Hugging Face model built offline from a config (random weights)."""
    import transformers as T

    torch.manual_seed(0)

    def ids(b: int, t: int, vocab: int = 256) -> torch.Tensor:
        return torch.randint(0, vocab, (b, t))

    common = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128}
    if name == "bert":
        cfg = T.BertConfig(vocab_size=256, max_position_embeddings=128, num_labels=3, **common)
        return T.BertForSequenceClassification(cfg), (ids(4, 24),), (ids(3, 40),)
    if name == "gpt2":
        cfg = T.GPT2Config(
            vocab_size=256,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=128,
            use_cache=False,
            bos_token_id=0,
            eos_token_id=0,
        )
        return T.GPT2LMHeadModel(cfg), (ids(4, 24),), (ids(3, 40),)
    if name == "llama":
        cfg = T.LlamaConfig(
            vocab_size=256, max_position_embeddings=128, num_key_value_heads=2, use_cache=False, **common
        )
        return T.LlamaForCausalLM(cfg), (ids(4, 24),), (ids(3, 40),)
    if name == "vit":
        cfg = T.ViTConfig(image_size=32, patch_size=8, num_channels=3, num_labels=10, **common)
        return T.ViTForImageClassification(cfg), (torch.randn(4, 3, 32, 32),), (torch.randn(3, 3, 32, 32),)
    if name == "t5":
        cfg = T.T5Config(
            vocab_size=256,
            d_model=64,
            d_kv=16,
            d_ff=128,
            num_layers=2,
            num_heads=4,
            use_cache=False,
            decoder_start_token_id=0,
        )
        model = T.T5ForConditionalGeneration(cfg)
        ones = torch.ones
        return (
            model,
            (ids(4, 24), ones(4, 24, dtype=torch.long), ids(4, 12)),
            (ids(3, 40), ones(3, 40, dtype=torch.long), ids(3, 16)),
        )
    raise KeyError(name)
