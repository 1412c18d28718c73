"""Train from ``export_training`` artifacts with ONNX Runtime, and bring the weights home.

::

    art = export_training(fast, (x,), "artifacts", optimizer="sgd")
    run = OrtTrainer(art, lr=0.05)
    losses = run.fit(batches)          # [(inputs, labels), ...], with a tqdm bar
    run.load_into(model)               # trained parameters -> model.state_dict(), exactly
    run.evaluate(x, y)                 # the exact eval graph's loss

The checkpoint holds every trainable parameter under its ``state_dict()`` key (the exporter
names initializers by it), so the round trip copies float32 arrays into the same tensors;
sampled linear weights, stored transposed as ``<key>__t``, are transposed back on the way.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from approxcompile.export.artifacts import Artifacts, require_ort
from approxcompile.export.lower import ExportError, restore_layout
from approxcompile.export.quiet import quiet

Batch = tuple[Sequence[torch.Tensor] | torch.Tensor, torch.Tensor]


def _numpy(t: torch.Tensor | np.ndarray) -> np.ndarray:
    return t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


class OrtTrainer:
    """One ORT training session over an artifact directory (``Module`` + ``Optimizer``)."""

    def __init__(
        self,
        artifacts: Artifacts,
        *,
        lr: float | None = None,
        seed: int | None = None,
        threads: int | None = None,
    ) -> None:
        require_ort()
        import onnxruntime
        from onnxruntime.training import api

        if seed is not None:
            onnxruntime.set_seed(seed)  # ORT's RandomUniform draws (random sampling methods)
        options = onnxruntime.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.artifacts = artifacts
        try:
            self.state = api.CheckpointState.load_checkpoint(str(artifacts.checkpoint))
            with quiet():  # ORT warns about the optimizer graph's shapes while loading it
                self.module = api.Module(
                    str(artifacts.training_model),
                    self.state,
                    str(artifacts.eval_model),
                    session_options=options,
                )
                self.optimizer = api.Optimizer(str(artifacts.optimizer_model), self.module)
        except Exception as e:  # ORT raises RuntimeError / Fail / InvalidGraph with pages of detail
            first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
            raise ExportError(
                f"OrtTrainer: ONNX Runtime cannot load the artifacts in {artifacts.directory}: "
                f"{first.strip()}; check them with Artifacts.load or export again"
            ) from e
        if lr is not None:
            self.optimizer.set_learning_rate(lr)
        self._generator = torch.Generator().manual_seed(0 if seed is None else seed)

    def _feeds(
        self,
        inputs: Sequence[torch.Tensor] | torch.Tensor,
        labels: torch.Tensor,
        noise: Sequence[torch.Tensor] | None,
    ) -> list[np.ndarray]:
        inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
        if len(inputs) != self.artifacts.inputs:
            raise ValueError(f"the graph takes {self.artifacts.inputs} input(s), got {len(inputs)}")
        if noise is None:
            noise = [torch.rand(s.size, generator=self._generator) for s in self.artifacts.noise]
        return [*map(_numpy, inputs), *map(_numpy, noise), _numpy(labels)]

    def step(
        self,
        inputs: Sequence[torch.Tensor] | torch.Tensor,
        labels: torch.Tensor,
        noise: Sequence[torch.Tensor] | None = None,
    ) -> float:
        """One training step (forward, ORT-built backward, optimizer update); returns the loss."""
        self.module.train()
        loss = self.module(*self._feeds(inputs, labels, noise))
        self.optimizer.step()
        self.module.lazy_reset_grad()
        return float(np.asarray(loss).reshape(-1)[0])

    def fit(self, batches: Iterable[Batch], *, epochs: int = 1, progress: bool = True) -> list[float]:
        """Train over ``batches`` ``epochs`` times; returns every step's loss."""
        batches = list(batches)
        losses: list[float] = []
        with tqdm(total=epochs * len(batches), desc="ORT training", disable=not progress) as bar:
            for _ in range(epochs):
                for inputs, labels in batches:
                    losses.append(self.step(inputs, labels))
                    bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
                    bar.update()
        return losses

    def evaluate(self, inputs: Sequence[torch.Tensor] | torch.Tensor, labels: torch.Tensor) -> float:
        """The loss of the exact eval graph on one batch."""
        self.module.eval()
        feeds = self._feeds(inputs, labels, noise=())[: self.artifacts.inputs] + [_numpy(labels)]
        return float(np.asarray(self.module(*feeds)).reshape(-1)[0])

    def parameters(self, *, trainable_only: bool = False) -> dict[str, np.ndarray]:
        """The checkpoint's tensors by ``state_dict()`` key and in the module's layout (frozen too)."""
        return dict(
            restore_layout(name, np.array(p.data), self.artifacts.transposed)
            for name, p in self.state.parameters
            if p.requires_grad or not trainable_only
        )

    def gradients(self) -> dict[str, np.ndarray]:
        """The last step's gradients by checkpoint name, as ORT holds them (``<key>__t`` = W.T)."""
        return {name: np.array(p.grad) for name, p in self.state.parameters if p.requires_grad}

    def load_into(self, model: nn.Module) -> nn.Module:
        """Copy the trained parameters into ``model``'s tensors (in place) and return it."""
        return load_parameters(model, self.parameters())

    def save(self, path: str | Path) -> Path:
        """Write the checkpoint (parameters and optimizer state) to ``path``."""
        from onnxruntime.training import api

        api.CheckpointState.save_checkpoint(self.state, str(path), include_optimizer_state=True)
        return Path(path)


def load_parameters(model: nn.Module, params: dict[str, Any]) -> nn.Module:
    """``model.state_dict()[name].copy_(params[name])`` for every name; shapes must match."""
    state = model.state_dict()
    unknown = sorted(set(params) - set(state))
    if unknown:
        raise ExportError(
            f"load_parameters: the checkpoint has {unknown[:3]} which the model does not; was it "
            "exported from this model?"
        )
    with torch.no_grad():
        for name, value in params.items():
            target = state[name]
            source = torch.from_numpy(np.ascontiguousarray(value))
            if tuple(source.shape) != tuple(target.shape):
                raise ExportError(
                    f"load_parameters: {name} has shape {tuple(source.shape)} in the checkpoint and "
                    f"{tuple(target.shape)} in the model"
                )
            target.copy_(source.to(target.dtype))
    return model
