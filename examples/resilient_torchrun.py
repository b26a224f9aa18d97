"""A raw ``torchrun`` job that survives a killed rank: checkpoints, restart, exact resume.

    torchrun --standalone --nproc_per_node=2 --max-restarts=1 examples/resilient_torchrun.py \
        --out /tmp/job --kill-rank 1 --kill-at-step 70

Every ``--checkpoint-every`` steps rank 0 writes model, optimizer, controller and step
atomically (``torch.save`` of plain tensors and numbers: loads with
``weights_only=True``). When a worker dies, torchrun restarts every worker
(``--max-restarts``); each one loads the last checkpoint and goes on. Batches are a pure
function of (step, rank), so the resumed job follows the same trajectory as one that was
never interrupted. ``metrics.jsonl`` gets one line per lambda update; on resume the lines
after the checkpoint's step (written by the dead attempt, about to be written again) are
cut, so nothing before the checkpoint is lost and nothing is duplicated.
``--kill-rank R --kill-at-step S`` SIGKILLs rank R at step S, in the first attempt only.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

from dist_bregman import BregmanConfig, SparsityController, comm
from dist_bregman.digits import digits_splits


def batch(step: int, rank: int, world: int, size: int, data: Any) -> tuple[Any, Any]:
    """The batch of ``rank`` at ``step``: the same in every attempt."""
    x, y = data.tensors
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(step))
    chosen = order[rank * size : (rank + 1) * size] if world * size <= len(y) else order[:size]
    return x[chosen], y[chosen]


def init_process_group(attempt: int) -> None:
    """gloo over torchrun's store, under a key prefix per attempt.

    After a restart the store still holds the dead attempt's rendezvous keys (each rank's
    gloo address): plain ``init_process_group("gloo")`` was seen to connect to those
    stale addresses and fail ("Connection refused"). A prefix per attempt starts clean.
    """
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    hosted = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # the agent hosts it
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world,
        is_master=rank == 0 and not hosted,
        timeout=timedelta(seconds=60),
    )
    prefixed = dist.PrefixStore(f"attempt{attempt}", store)
    dist.init_process_group(
        "gloo", store=prefixed, rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )


def save(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a crash mid-write leaves the previous checkpoint intact


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--checkpoint-every", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=16, help="per rank")
    parser.add_argument("--kill-rank", type=int, default=None)
    parser.add_argument("--kill-at-step", type=int, default=None)
    args = parser.parse_args()

    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    init_process_group(attempt)
    rank, world = dist.get_rank(), dist.get_world_size()
    args.out.mkdir(parents=True, exist_ok=True)
    checkpoint, metrics = args.out / "checkpoint.pt", args.out / "metrics.jsonl"

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    config = BregmanConfig(
        target_sparsity=0.8,
        initial_lambda=1e-3,
        lambda_rule="multiplicative",
        lambda_update_rate=2.0,
        min_lambda=1e-6,
        max_lambda=0.05,
        update_frequency=10,
        guard_steps=True,
    )
    controller = SparsityController(model, config)
    controller.attach(optimizer)

    step = 0
    if checkpoint.exists():
        state = torch.load(checkpoint, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        controller.load_state_dict(state["controller"])
        step = int(state["step"])
        if rank == 0 and metrics.exists():  # drop what the dead attempt wrote after it
            kept = [
                line
                for line in metrics.read_text().splitlines()
                if json.loads(line)["step"] <= step
            ]
            metrics.write_text("".join(line + "\n" for line in kept))
        print(f"rank {rank} attempt {attempt}: resumed at step {step}", flush=True)
    comm.barrier()  # nobody writes metrics before rank 0 has cut them

    train = digits_splits().train
    while step < args.steps:
        x, y = batch(step, rank, world, args.batch_size, train)
        loss = F.cross_entropy(ddp(x), y)
        loss.backward()
        if controller.gradients_finite([optimizer], step + 1):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        controller.observe_loss(loss)
        decision = controller.update_if_due(step)
        if decision is not None and rank == 0:
            line = {"step": step, "lambda": decision.new, "sparsity": decision.sparsity}
            with metrics.open("a") as handle:
                handle.write(json.dumps(line) + "\n")
        if step % args.checkpoint_every == 0:
            if rank == 0:
                state = {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "controller": controller.state_dict(),
                    "step": step,
                }
                save(checkpoint, state)
            comm.barrier()  # nobody runs past a checkpoint that is not on disk yet
        if attempt == 0 and rank == args.kill_rank and step == args.kill_at_step:
            print(f"rank {rank}: SIGKILL at step {step}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    report = controller.measure()
    if rank == 0:
        result = {"sparsity": report.sparsity, "lambda": controller.lambda_, "step": step}
        (args.out / "final.json").write_text(json.dumps(result))
        print(f"final sparsity {100 * report.sparsity:.3f}% lambda {controller.lambda_:.8f}")
    del ddp
    comm.shutdown()


if __name__ == "__main__":
    main()
