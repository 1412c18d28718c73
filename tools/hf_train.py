"""A Hugging Face model optimized by approxcompile and trained: a plain loop and ``transformers.Trainer``.

A byte-level GPT-2 (``GPT2LMHeadModel``, random initial weights, built offline from a config)
learns to predict Python source: the training text is the standard library's own ``.py``
files (read from this interpreter's install, sorted by path; every tenth file is held out).
From the same initial weights it is trained

- ``exact``: as written, with a plain loop (AdamW, a fixed batch order);
- ``loop@B``: ``approxcompile.optimize(model, B)`` with the same loop;
- ``trainer@B``: the same optimized module handed to ``transformers.Trainer``
  (``compute_loss_func`` computes the next-byte loss; Trainer calls ``model(input_ids=...)``;
  its own defaults apply: gradients clipped at norm 1, no weight decay on biases and norms),

and evaluated in eval mode (exact products) on held-out text: loss in bits per byte.

    .venv/bin/python tools/hf_train.py                       # the guide's worked example
    .venv/bin/python tools/hf_train.py --quick               # seconds: a smoke test
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from torch import nn

import approxcompile


def stdlib_bytes(limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) bytes of the standard library's ``.py`` files, at most ``limit`` each."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.is_file())
    train, held = bytearray(), bytearray()
    for i, path in enumerate(files):
        part = held if i % 10 == 9 else train
        if len(part) < limit:
            part += path.read_bytes()
    return torch.tensor(list(train[:limit]), dtype=torch.long), torch.tensor(
        list(held[:limit]), dtype=torch.long
    )


def batches(data: torch.Tensor, steps: int, batch: int, seq: int, seed: int) -> torch.Tensor:
    """(steps, batch, seq) windows at random offsets: the same order for every variant."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(data) - seq - 1, (steps, batch), generator=g)
    return data[starts[..., None] + torch.arange(seq)]


def next_byte_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def make_model(args: argparse.Namespace) -> nn.Module:
    torch.manual_seed(args.seed)
    config = transformers.GPT2Config(
        vocab_size=256, n_embd=args.d, n_layer=args.layers, n_head=args.heads, n_positions=args.seq,
        use_cache=False, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


@torch.no_grad()
def held_out_bits(model: nn.Module, data: torch.Tensor, args: argparse.Namespace) -> float:
    was = model.training
    model.eval()
    windows = batches(data, args.eval_batches, args.batch, args.seq, seed=12345)
    loss = sum(float(next_byte_loss(model(input_ids=w).logits, w)) for w in windows) / len(windows)
    model.train(was)
    return loss / math.log(2)


def plain_loop(model: nn.Module, train: torch.Tensor, args: argparse.Namespace) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    model.train()
    losses = []
    torch.manual_seed(args.seed)
    for ids in batches(train, args.steps, args.batch, args.seq, seed=args.seed):
        loss = next_byte_loss(model(input_ids=ids).logits, ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item() / math.log(2))
    return losses


class _Windows(torch.utils.data.Dataset):
    def __init__(self, windows: torch.Tensor) -> None:
        self.windows = windows.flatten(0, 1)

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.windows[i], "labels": self.windows[i]}


def with_trainer(model: nn.Module, train: torch.Tensor, args: argparse.Namespace) -> list[float]:
    data = _Windows(batches(train, args.steps, args.batch, args.seq, seed=args.seed))
    with tempfile.TemporaryDirectory() as out:
        targs = transformers.TrainingArguments(
            output_dir=out, max_steps=args.steps, per_device_train_batch_size=args.batch,
            learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.01,
            logging_steps=max(1, args.steps // 10), save_strategy="no", report_to=[], use_cpu=True,
            seed=args.seed, dataloader_drop_last=True, disable_tqdm=True, remove_unused_columns=False,
        )  # fmt: skip

        def loss_fn(outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
            return next_byte_loss(outputs.logits, labels)

        trainer = transformers.Trainer(model=model, args=targs, train_dataset=data, compute_loss_func=loss_fn)
        trainer.train()
    return [h["loss"] / math.log(2) for h in trainer.state.log_history if "loss" in h]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=float, default=0.5)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a tiny model and a few steps (smoke test)")
    p.add_argument("--out", default="docs/hf_train.json")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.layers, args.d, args.heads, args.seq, args.batch = 4, 2, 64, 2, 32, 4
        args.eval_batches, args.budget = 2, 0.7
    train, held = stdlib_bytes(4_000_000)
    base = make_model(args)
    rows: dict[str, dict[str, Any]] = {}
    example = (batches(train, 1, args.batch, args.seq, seed=999)[0],)
    for name in ("exact", f"loop@{args.budget:g}", f"trainer@{args.budget:g}"):
        model = copy.deepcopy(base)
        start = time.perf_counter()
        info: dict[str, Any] = {}
        if name != "exact":
            model = approxcompile.optimize(model, args.budget, example_inputs=example)
            plan = model.meta["approxcompile"]
            info = {"optimize_s": time.perf_counter() - start, "frontend": plan.frontend,
                    "planned_fraction": plan.fraction,
                    "sampled": sum(n.sampled for n in plan.nodes), "candidates": len(plan.nodes)}  # fmt: skip
        start = time.perf_counter()
        losses = (
            with_trainer(model, train, args) if name.startswith("trainer") else plain_loop(model, train, args)
        )
        info |= {"train_s": time.perf_counter() - start, "final_train_bits": losses[-1]}
        info["held_out_bits_per_byte"] = held_out_bits(model, held, args)
        rows[name] = info
        print(name, json.dumps(info), flush=True)
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "settings": vars(args),
        "rows": rows,
    }
    if not args.quick:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
