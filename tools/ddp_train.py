"""Data-parallel training of a sampled MLP on MNIST-5k: the train.py of docs/distributed.md.

    .venv/bin/torchrun --nproc_per_node 2 tools/ddp_train.py --epochs 2

Each rank trains on its own shard; only the sampled gradient columns of the compressed
weights are all-reduced. Rank 0 prints the loss, the bytes sent and the test accuracy.
"""

from __future__ import annotations

import argparse
import datetime

import torch
import torch.distributed as dist
import torch.nn.functional as F
from image_data import load_mnist_5k
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import approxcompile
import approxcompile.distributed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--batch", type=int, default=64, help="per rank")
    args = ap.parse_args()

    # gloo works on CPU; a timeout turns a dead peer into an error instead of a hang
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    data = load_mnist_5k(seed=0)
    x, y = data.x_train[rank::world].flatten(1), data.y_train[rank::world]  # this rank's shard

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU())
    model.append(nn.Linear(512, 512)).append(nn.ReLU()).append(nn.Linear(512, 10))
    # The same example input and config on every rank give every rank the same plan.
    example = (data.x_train[: args.batch].flatten(1),)
    config = approxcompile.ApproxConfig(scores="weights")
    fast = approxcompile.optimize(model, args.budget, example_inputs=example, config=config)
    ddp = DistributedDataParallel(fast)
    stats = approxcompile.distributed.register(ddp)  # checks that every rank runs the same plan
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)

    for epoch in range(args.epochs):
        ddp.train()
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))
        for i in range(0, len(order) - args.batch + 1, args.batch):
            idx = order[i : i + args.batch]
            opt.zero_grad()
            loss = F.cross_entropy(ddp(x[idx]), y[idx])
            loss.backward()  # the hook all-reduces the sampled slices here
            opt.step()
        if rank == 0:
            print(
                f"epoch {epoch}: loss {loss.item():.3f}, all-reduced {stats.last_sent_bytes / 2**20:.2f} MB "
                f"of {stats.last_dense_bytes / 2**20:.2f} MB per step ({stats.last_fraction:.3f})"
            )
    if rank == 0:
        fast.eval()  # exact operations
        with torch.no_grad():
            acc = (fast(data.x_test.flatten(1)).argmax(1) == data.y_test).float().mean().item()
        print(f"test accuracy {acc:.3f}; compressed: {', '.join(stats.compressed)}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
