"""Sparsity measurement time against the memory-bandwidth floor and the naive loop.

    python benchmarks/measure_throughput.py --quick          # seconds: CI smoke
    python benchmarks/measure_throughput.py                   # 10 M and 50 M parameters
    python benchmarks/measure_throughput.py --sizes 10 50 200 --out benchmarks/results
    python benchmarks/measure_throughput.py --device cuda --sizes 10 50 200   # a GPU

Each model is many small tensors plus a few large ones, half of the elements zero. The
ways to count, timed in interleaved repetitions (so drift on a noisy machine hits all of them
alike), medians reported; the ratio to the floor is the median of the per-round ratios:

* floor: one plain read of the same bytes, ``p.sum()`` per tensor (no counting at all);
* naive: ``(p == 0).sum().item()`` per tensor, the loop people write first;
* ``measure_sparsity(model)``: resolves the model's tensors on every call, then counts;
* ``SparsityController.measure()``: what training calls (tensors resolved once);
* the same with ``regularizer="group_l1"``: all-zero rows counted in the same pass.

``DIST_BREGMAN_NO_EXTENSION=1`` times the torch-op fallback (no C++ compiler) instead, and
``--out`` then writes ``measure_throughput_torch_ops.*``.

On CUDA (``--device cuda``) the device is drained before and after each timed call, and one
more floor is timed: ``torch._foreach_norm``, a read of every tensor in a few multi-tensor
kernels (per-tensor launches are what a 600-tensor count pays for there, not bandwidth).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

import torch
from common import machine, medians, ratios, time_interleaved, write
from torch import nn

from dist_bregman import BregmanConfig, SparsityController, kernels, measure_sparsity

FLOOR = "floor (sum per tensor)"


def build_model(million: float, seed: int = 0) -> nn.Module:
    """About ``million`` M fp32 weights in about 600 tensors, like a transformer: 60% in 4
    large matrices, 35% in 24 medium ones, 5% in ~570 small ones; half of the elements zero."""
    generator = torch.Generator().manual_seed(seed)
    total = int(million * 1e6)
    shapes: list[tuple[int, int]] = []
    for share, count in ((0.60, 4), (0.35, 24)):
        side = max(int((share * total / count) ** 0.5), 1)
        shapes += [(side, side)] * count
    small = max(int(0.05 * total / 4096), 1)
    shapes += [(64, 64)] * min(small, 570)
    layers = [nn.Linear(cols, rows, bias=False) for rows, cols in shapes]
    model = nn.Sequential(*layers)
    with torch.no_grad():
        for layer in layers:
            weight = layer.weight
            weight.copy_(torch.randn(weight.shape, generator=generator))
            weight.mul_(torch.rand(weight.shape, generator=generator) < 0.5)
    return model


def run(million: float, repeats: int, device: str = "cpu") -> dict[str, object]:
    model = build_model(million).to(device)
    weights = [m.weight for m in model]
    expected = sum(int((w != 0).sum()) for w in weights)
    assert measure_sparsity(model).nonzero == expected  # the fast path must also be right
    if device == "cpu" and kernels.extension() is None:
        print("note: the CPU counting kernel is unavailable; timing the torch fallback")

    controller = SparsityController(model)
    # Group sparsity also counts all-zero rows (neurons) in the same pass: what every
    # lambda update of a group_l1 run measures.
    grouped = SparsityController(model, BregmanConfig(regularizer="group_l1"))
    report = grouped.measure()
    assert report.nonzero == expected and report.rows == sum(w.shape[0] for w in weights)
    candidates: dict[str, Callable[[], object]] = {
        "naive ((p == 0).sum().item())": lambda: [int((w == 0).sum().item()) for w in weights],
        "measure_sparsity(model)": lambda: measure_sparsity(model),
        "SparsityController.measure()": controller.measure,
        "SparsityController.measure(), rows too (group_l1)": grouped.measure,
    }
    if device != "cpu":
        candidates["fused read (_foreach_norm)"] = lambda: torch._foreach_norm(weights, 1)
    return against_floor(weights, candidates, repeats, device)


def against_floor(
    weights: list[torch.Tensor],
    candidates: dict[str, Callable[[], object]],
    repeats: int,
    device: str,
) -> dict[str, object]:
    """Time ``candidates`` in interleaved rounds after the floor, one plain read of
    ``weights``: the result :func:`markdown` tabulates (``loss_term.py`` shares both)."""
    floor = {FLOOR: lambda: [w.sum() for w in weights]}
    times = time_interleaved({**floor, **candidates}, repeats, device=device)
    return {
        "parameters": sum(w.numel() for w in weights),
        "tensors": len(weights),
        "device": device,
        "median_seconds": medians(times),
        "ratio_to_floor": ratios(times, FLOOR),
    }


def markdown(
    results: list[dict[str, object]], device: str = "cpu", what: str = "Sparsity measurement"
) -> str:
    """The table of ``run``'s results (``loss_term.py`` shares it)."""
    lines = [
        f"{what} on {machine(device)} (medians of interleaved rounds)",
        "",
        "| parameters | tensors | method | median ms | × floor |",
        "|---:|---:|---|---:|---:|",
    ]
    for result in results:
        seconds = result["median_seconds"]
        ratios = result["ratio_to_floor"]
        assert isinstance(seconds, dict) and isinstance(ratios, dict)
        for method, value in seconds.items():
            lines.append(
                f"| {result['parameters']:,} | {result['tensors']} | {method} "
                f"| {1e3 * value:.2f} | {ratios[method]:.2f} |"
            )
    return "\n".join(lines) + "\n"


def command_line(doc: str, repeats: int) -> tuple[argparse.Namespace, list[float], int]:
    """The size sweep's arguments (this script's and ``loss_term.py``'s), with the sizes
    and repeats to run: ``--quick`` is one tiny model, 3 repeats."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one tiny model, 3 repeats")
    parser.add_argument("--sizes", type=float, nargs="+", default=[10, 50], help="M params")
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--out", type=Path, default=None, help="folder for JSON + Markdown")
    args = parser.parse_args()
    if args.quick:
        return args, [0.5], 3
    return args, args.sizes, args.repeats


def main() -> None:
    args, sizes, repeats = command_line(__doc__, repeats=15)
    results = [run(size, repeats, args.device) for size in sizes]
    name = "measure_throughput" + ("" if args.device == "cpu" else "_cuda")
    if args.device == "cpu" and os.environ.get("DIST_BREGMAN_NO_EXTENSION") == "1":
        name += "_torch_ops"  # the fallback, asked for (without a compiler it is noted)
    write(args.out, name, results, markdown(results, args.device))


if __name__ == "__main__":
    main()
