"""A raw ``torchrun`` training loop with DDP and the framework-free core (no Lightning).

    torchrun --standalone --nproc_per_node=2 examples/raw_torchrun.py
    torchrun --standalone --nproc_per_node=2 examples/raw_torchrun.py --steps 300 --out /tmp/ranks

Each rank trains on its own shard of scikit-learn's digits (DistributedSampler); DDP keeps
the replicas identical; the controller measures the global sparsity with one all-reduce and
broadcasts rank 0's lambda. With ``--out DIR`` every rank writes ``rank<N>.json`` with what
it saw, so the ranks can be compared.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from dist_bregman import BregmanConfig, SparsityController, comm
from dist_bregman.digits import digits_splits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--target", type=float, default=0.9)
    parser.add_argument("--batch-size", type=int, default=16, help="per rank")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if backend == "nccl" else None
    if device is not None:
        torch.cuda.set_device(device)
    torch.manual_seed(0)  # identical initial replicas (DDP would broadcast rank 0's anyway)

    model = nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10)
    )
    model.to(device)
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    config = BregmanConfig(
        target_sparsity=args.target,
        initial_lambda=1e-3,
        lambda_rule="multiplicative",
        lambda_update_rate=2.0,
        min_lambda=1e-6,
        max_lambda=1e-2,
        update_frequency=10,
        verbose=1,
    )
    controller = SparsityController(model, config)
    controller.attach(optimizer)

    train = digits_splits().train
    sampler = DistributedSampler(train, shuffle=True, seed=0)
    loader = DataLoader(train, batch_size=args.batch_size, sampler=sampler, drop_last=True)
    step, epoch, seen_lambdas = 0, 0, []
    while step < args.steps:
        sampler.set_epoch(epoch)
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            loss = F.cross_entropy(ddp(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            controller.observe_loss(loss)
            if controller.update_if_due(step) is not None:
                seen_lambdas.append(controller.lambda_)
            if step == args.steps:
                break
        epoch += 1

    report = controller.measure()
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        record = {
            "rank": rank,
            "lambda": controller.lambda_,
            "lambdas": seen_lambdas,
            "sparsity": report.sparsity,
            "nonzero": report.nonzero,
            "total": report.total,
            "weight_checksum": float(sum(p.detach().double().sum() for p in model.parameters())),
        }
        (args.out / f"rank{rank}.json").write_text(json.dumps(record))
    if rank == 0:
        print(
            f"final sparsity {100 * report.sparsity:.3f}% lambda {controller.lambda_:.8f}",
            flush=True,
        )
    del ddp  # it holds the process group: release it before the group goes (see comm.shutdown)
    comm.shutdown()


if __name__ == "__main__":
    main()
