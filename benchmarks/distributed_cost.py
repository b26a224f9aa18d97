"""What distribution costs: measurement and step time at world size 1 and 2 (CPU, gloo),
and the bytes the collectives move.

    python benchmarks/distributed_cost.py --quick    # seconds: CI smoke
    python benchmarks/distributed_cost.py --out benchmarks/results

The same global model (the 2.4 M-parameter MLP of ``step_overhead.py``) and the same global
batch (128; 64 per rank at world 2), as DDP and as FSDP2 (``fully_shard`` per layer). Each
rank uses one torch thread, so world 2 has twice the cores of world 1. Launches alternate
(world 1, world 2, world 1, ...) so drift hits both; reported: medians over launches of
each launch's median.

Bytes are recorded, not computed: every ``all_reduce`` and ``broadcast`` the library issues
goes through ``torch.distributed``, which this script wraps to add up ``numel * itemsize``
during one ``SparsityController.update`` (measure + lambda decision). DDP's gradient
all-reduce runs in C++ buckets and is not seen by the wrapper; it is listed, for scale, as
the gradient bytes one step must reduce (every parameter, fp32).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from common import machine, mlp, write
from torch import nn
from torch.nn import functional as F

from dist_bregman import BregmanConfig, SparsityController

LAYOUTS = ("ddp", "fsdp2")


def build_model(width: int, depth: int) -> nn.Module:
    model = mlp(width, depth)
    with torch.no_grad():  # half of the weights zero, as in a pruned model
        for module in model:
            if isinstance(module, nn.Linear):
                module.weight.mul_(torch.rand(module.weight.shape) < 0.5)
    return model


class ByteCounter:
    """Wraps ``dist.all_reduce`` / ``dist.broadcast`` to add up what they move."""

    def __init__(self) -> None:
        self.bytes = 0
        self.calls = 0
        self.active = False
        for name in ("all_reduce", "broadcast"):
            original = getattr(dist, name)

            def counted(tensor: torch.Tensor, *args: Any, _f: Any = original, **kw: Any) -> Any:
                if self.active:
                    self.bytes += tensor.numel() * tensor.element_size()
                    self.calls += 1
                return _f(tensor, *args, **kw)

            setattr(dist, name, counted)


def worker(rank: int, world: int, folder: str, layout: str, settings: dict[str, int]) -> None:
    torch.set_num_threads(1)
    store = dist.FileStore(os.path.join(folder, "store"), world)
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    counter = ByteCounter()
    model = build_model(settings["width"], settings["depth"])
    if layout == "ddp":
        wrapped: nn.Module = nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import fully_shard

        for module in model:
            if isinstance(module, nn.Linear):
                fully_shard(module)
        wrapped = fully_shard(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    controller = SparsityController(wrapped, BregmanConfig(initial_lambda=1e-4, update_frequency=1))
    controller.attach(optimizer)

    counter.active = True
    controller.update(1)
    update_bytes, update_calls = counter.bytes, counter.calls
    counter.active = False

    measure_times = []
    for _ in range(settings["measures"]):
        dist.barrier()
        start = time.perf_counter()
        controller.measure()
        measure_times.append(time.perf_counter() - start)

    generator = torch.Generator().manual_seed(rank)
    per_rank = settings["batch"] // world
    x = torch.randn(per_rank, 256, generator=generator)
    y = torch.randint(0, 10, (per_rank,), generator=generator)
    step_times = []
    for _ in range(settings["steps"]):
        dist.barrier()
        start = time.perf_counter()
        loss = F.cross_entropy(wrapped(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_times.append(time.perf_counter() - start)
    step_times = step_times[2:]  # warm-up: allocator, first all-gathers

    result = {
        "measure_s": statistics.median(measure_times),
        "step_s": statistics.median(step_times),
        "update_bytes": update_bytes,
        "update_calls": update_calls,
    }
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, result)
    if rank == 0:
        Path(folder, "result.json").write_text(json.dumps(gathered))
    dist.barrier()
    del wrapped, controller, optimizer
    dist.destroy_process_group()
    os._exit(0)


def launch(world: int, layout: str, settings: dict[str, int], timeout: float) -> list[dict]:
    context = multiprocessing.get_context("fork")
    with tempfile.TemporaryDirectory() as folder:
        procs = [
            context.Process(target=worker, args=(r, world, folder, layout, settings))
            for r in range(world)
        ]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(deadline - time.monotonic(), 0.1))
        alive = [p for p in procs if p.is_alive()]
        for p in alive:
            p.kill()
        path = Path(folder, "result.json")
        if alive or not path.exists():
            raise RuntimeError(f"world {world} {layout}: workers failed or timed out")
        return list(json.loads(path.read_text()))


def run(settings: dict[str, int], launches: int, timeout: float) -> list[dict[str, Any]]:
    """Per layout: world 1 and world 2 launched alternately ``launches`` times each."""
    model = build_model(settings["width"], settings["depth"])
    parameters = sum(p.numel() for p in model.parameters())
    rows = []
    for layout in LAYOUTS:
        per_world: dict[int, list[list[dict]]] = {1: [], 2: []}
        for _ in range(launches):
            for world in (1, 2):
                per_world[world].append(launch(world, layout, settings, timeout))
        for world, results in per_world.items():
            # A launch's time is its slowest rank's (the others wait for it).
            measure = statistics.median(max(r["measure_s"] for r in ranks) for ranks in results)
            step = statistics.median(max(r["step_s"] for r in ranks) for ranks in results)
            first = results[0][0]
            rows.append(
                {
                    "layout": layout,
                    "world": world,
                    "parameters": parameters,
                    "measure_ms": 1e3 * measure,
                    "step_ms": 1e3 * step,
                    "update_bytes_per_rank": first["update_bytes"],
                    "update_collectives": first["update_calls"],
                    "gradient_bytes_per_step": 4 * parameters,
                }
            )
    return rows


def markdown(rows: list[dict[str, Any]], settings: dict[str, int]) -> str:
    lines = [
        f"Distributed cost, {rows[0]['parameters']:,}-parameter MLP, global batch "
        f"{settings['batch']}, gloo, 1 thread per rank, on {machine()}. Bytes: what one "
        f"measurement + lambda update sends per rank (all-reduce + broadcast), against the "
        f"fp32 gradient bytes one training step reduces.",
        "",
        "| layout | world | measure ms | step ms | update bytes | update collectives "
        "| gradient bytes/step |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['layout']} | {r['world']} | {r['measure_ms']:.3f} | {r['step_ms']:.2f} "
            f"| {r['update_bytes_per_rank']} | {r['update_collectives']} "
            f"| {r['gradient_bytes_per_step']:,} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, one launch each")
    parser.add_argument("--launches", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="folder for JSON + Markdown")
    args = parser.parse_args()
    if args.quick:
        settings = {"width": 64, "depth": 2, "batch": 16, "measures": 3, "steps": 4}
        launches = 1
    else:
        settings = {"width": 1024, "depth": 3, "batch": 128, "measures": 50, "steps": 30}
        launches = args.launches
    rows = run(settings, launches, timeout=120.0)
    write(args.out, "distributed_cost", rows, markdown(rows, settings))


if __name__ == "__main__":
    main()
