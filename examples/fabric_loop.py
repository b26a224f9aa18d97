"""A Lightning Fabric training loop with the framework-free core (no Trainer).

    python examples/fabric_loop.py --devices 2                     # Fabric starts the ranks
    torchrun --standalone --nproc_per_node=2 examples/fabric_loop.py --strategy fsdp2
    python examples/fabric_loop.py --devices 2 --steps 60 --out /tmp/ranks

``--strategy ddp`` replicates the model; ``--strategy fsdp2`` shards every Linear layer over
the ranks with FSDP2 (Fabric's ``ModelParallelStrategy``, data-parallel only). The
controller is given the module Fabric returns and the optimizer built *after* it: sharding
replaces the parameters, and an optimizer built before holds the old ones (the controller
refuses it: its weights would never be stepped). Both strategies report the same global
sparsity and lambda on every rank. With ``--out DIR`` every rank writes ``rank<N>.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.strategies import DDPStrategy, ModelParallelStrategy
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.nn import functional as F
from torch.utils.data import DataLoader

from dist_bregman import BregmanConfig, SparsityController, comm
from dist_bregman.digits import digits_splits


def shard(module: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """FSDP2 over the data-parallel ranks: each Linear layer, then the rest."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh["data_parallel"])
    fully_shard(module, mesh=mesh["data_parallel"])
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--strategy", choices=("ddp", "fsdp2"), default="ddp")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--target", type=float, default=0.9)
    parser.add_argument("--batch-size", type=int, default=16, help="per rank")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    strategy = (
        DDPStrategy(process_group_backend=backend)
        if args.strategy == "ddp"
        else ModelParallelStrategy(
            parallelize_fn=shard,
            data_parallel_size=args.devices,
            tensor_parallel_size=1,
            process_group_backend=backend,
        )
    )
    fabric = L.Fabric(accelerator="auto", devices=args.devices, strategy=strategy)
    fabric.launch()
    fabric.seed_everything(0)

    model = nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10)
    )
    model = fabric.setup_module(model)
    optimizer = fabric.setup_optimizers(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
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
    loader = fabric.setup_dataloaders(  # a DistributedSampler, its epoch set at each pass
        DataLoader(train, batch_size=args.batch_size, shuffle=True, drop_last=True)
    )
    step, seen_lambdas = 0, []
    while step < args.steps:
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            fabric.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            controller.observe_loss(loss)
            if controller.update_if_due(step) is not None:
                seen_lambdas.append(controller.lambda_)
            if step == args.steps:
                break

    report = controller.measure()
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        record = {
            "rank": fabric.global_rank,
            "lambda": controller.lambda_,
            "lambdas": seen_lambdas,
            "sparsity": report.sparsity,
            "nonzero": report.nonzero,
            "total": report.total,
        }
        (args.out / f"rank{fabric.global_rank}.json").write_text(json.dumps(record))
    fabric.print(f"final sparsity {100 * report.sparsity:.3f}% lambda {controller.lambda_:.8f}")
    # The wrapped model (DDP's reducer, FSDP2's state) holds the process group, and so does
    # the controller through it: drop them, then end the group (see comm.shutdown: left to
    # the interpreter, gloo ranks sometimes abort at exit).
    del model, optimizer, controller
    comm.shutdown()


if __name__ == "__main__":
    main()
