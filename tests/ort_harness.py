"""One numeric harness for the export tests: eager PyTorch, the rewritten module, and ONNX Runtime.

Every comparison feeds the same inputs, labels and (for random methods) the same uniform
noise to each side, so differences are float rounding only.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import approxcompile
from approxcompile.export import Artifacts, Lowered, OrtTrainer, export_training, lower_for_export


@dataclass(frozen=True)
class Case:
    """A model factory, its input shape and the method to sample with."""

    name: str
    factory: Callable[[], nn.Module]
    shape: tuple[int, ...]
    method: str = "topk"
    budget: float = 0.5

    def build(self, seed: int = 0) -> tuple[nn.Module, fx.GraphModule, torch.Tensor, torch.Tensor]:
        """``(model, optimized, x, labels)``, with at least one node sampled."""
        g = torch.Generator().manual_seed(seed)
        model = self.factory()
        x = torch.randn(self.shape, generator=g)
        y = torch.randint(0, 10, (self.shape[0],), generator=g)
        torch.manual_seed(seed)
        fast = approxcompile.optimize(model, self.budget, example_inputs=(x,), method=self.method)
        assert approxcompile.report(fast).sampled, f"{self.name}: nothing was sampled"
        return model, fast, x, y


def torch_gradients(
    module: nn.Module, x: torch.Tensor, y: torch.Tensor, noise: Sequence[torch.Tensor] = ()
) -> tuple[float, dict[str, torch.Tensor]]:
    """Cross-entropy loss and every parameter's gradient, in train mode."""
    module.train()
    module.zero_grad()
    loss = F.cross_entropy(module(x, *noise), y)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    module.zero_grad()
    return loss.item(), grads


def ort_gradients(
    art: Artifacts, x: torch.Tensor, y: torch.Tensor, noise: Sequence[torch.Tensor] = ()
) -> tuple[float, dict[str, np.ndarray]]:
    """The loss and the gradients ORT's training graph computes (no optimizer step)."""
    trainer = OrtTrainer(art)
    trainer.module.train()
    loss = trainer.module(x.numpy(), *(n.numpy() for n in noise), y.numpy())
    return float(np.asarray(loss)), trainer.gradients()


def export_with_noise(fast: fx.GraphModule, x: torch.Tensor, out, **kw) -> tuple[Artifacts, Lowered]:
    """Artifacts whose random nodes read fed-in noise, and the matching lowered module.

    The lowered module has the artifacts' layout (sampled linear weights transposed), so
    its parameters and gradients are named and shaped as ORT's.
    """
    art = export_training(fast, (x,), out, noise="input", **kw)
    return art, lower_for_export(fast, noise="input", transpose_weights=True)


def sgd_torch(module: nn.Module, batches, lr: float) -> list[float]:
    """Plain SGD (no momentum) in PyTorch: one loss per step, measured before the update."""
    opt = torch.optim.SGD(module.parameters(), lr=lr)
    module.train()
    losses = []
    for x, y in batches:
        opt.zero_grad()
        loss = F.cross_entropy(module(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def snapshot(model: nn.Module) -> nn.Module:
    """A deep copy, for training the same initial weights twice."""
    return copy.deepcopy(model)
