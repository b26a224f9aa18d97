"""A raw ``deepspeed.initialize`` engine with the framework-free core (no Lightning).

    deepspeed --num_gpus 2 examples/raw_deepspeed.py --stage 3                  # GPUs, NCCL
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 examples/raw_deepspeed.py --stage 3   # CPU, gloo
    torchrun --standalone --nproc_per_node=2 examples/raw_deepspeed.py --stage 2 --optimizer linbreg

The controller looks through the engine's ZeRO optimizer to the fp32 partitions it steps,
so the proximal step (or LinBreg's threshold) makes zeros that the next step keeps, and
counts the ZeRO-3 partitions without their padding. ``--accumulate N`` splits each batch of
16 into N micro-batches (DeepSpeed's ``gradient_accumulation_steps``): the loop counts
optimizer steps with ``engine.global_steps``. ``--out DIR`` writes ``rank<N>.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import deepspeed
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, DistributedSampler

from dist_bregman import BregmanConfig, SparsityController, comm, regularized_groups
from dist_bregman.digits import digits_splits
from dist_bregman.init import sparse_init_
from dist_bregman.optim import LinBreg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", type=int, default=3, choices=(1, 2, 3))
    parser.add_argument("--optimizer", default="sgd", choices=("sgd", "linbreg"))
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps")
    parser.add_argument(
        "--accumulate", type=int, default=1, choices=(1, 2, 4), help="micro-batches per step"
    )
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--local_rank", type=int, default=0, help="set by the deepspeed launcher")
    args = parser.parse_args()

    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    comm.release_deepspeed_shm()  # on CPU, DeepSpeed's /dev/shm files would outlive the job
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10)
    )
    if args.optimizer == "linbreg":
        sparse_init_(
            model, 0.05
        )  # Bregman training grows a sparse network (before ZeRO-3 partitions it)
        optimizer: torch.optim.Optimizer = LinBreg(regularized_groups(model), lr=0.05, momentum=0.9)
        lam = {"initial_lambda": 0.1, "max_lambda": 10.0}
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        lam = {"initial_lambda": 1e-3, "max_lambda": 1e-2}
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        config={
            "train_micro_batch_size_per_gpu": 16 // args.accumulate,
            "gradient_accumulation_steps": args.accumulate,
            "zero_optimization": {"stage": args.stage},
            "zero_allow_untested_optimizer": True,
        },
    )
    config = BregmanConfig(
        target_sparsity=0.9,
        lambda_rule="multiplicative",
        lambda_update_rate=2.0,
        min_lambda=1e-6,
        update_frequency=10,
        verbose=1,
        **lam,
    )
    controller = SparsityController(engine, config)
    controller.attach(engine.optimizer)

    train = digits_splits().train
    sampler = DistributedSampler(train, shuffle=True, seed=0)
    loader = DataLoader(train, batch_size=16 // args.accumulate, sampler=sampler, drop_last=True)
    epoch = 0
    while engine.global_steps < args.steps:
        sampler.set_epoch(epoch)
        for x, y in loader:
            loss = F.cross_entropy(engine(x.to(engine.device)), y.to(engine.device))
            engine.backward(loss)
            engine.step()  # an optimizer step once every `accumulate` micro-batches
            controller.observe_loss(loss)
            controller.update_if_due(engine.global_steps)  # counts optimizer steps
            if engine.global_steps == args.steps:
                break
        epoch += 1

    report = controller.measure()
    rank = comm.get_rank()
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        record = {
            "rank": rank,
            "lambda": controller.lambda_,
            "steps": engine.global_steps,
            "updates": controller.updates,
            "sparsity": report.sparsity,
            "per_parameter": report.per_parameter,
            "penalty": float(controller.regularization_loss().detach()),
        }
        (args.out / f"rank{rank}.json").write_text(json.dumps(record))
    if rank == 0:
        print(
            f"ZeRO-{args.stage} {args.optimizer}: final sparsity {100 * report.sparsity:.3f}% "
            f"lambda {controller.lambda_:.8f}",
            flush=True,
        )
    del engine  # it holds process groups: release it before they go (see comm.shutdown)
    comm.shutdown()


if __name__ == "__main__":
    main()
