"""Sparsity measurement time against the memory-bandwidth floor and the naive loop.

    python benchmarks/measure_throughput.py --quick          # seconds: CI smoke
    python benchmarks/measure_throughput.py                   # 10 M and 50 M parameters
    python benchmarks/measure_throughput.py --sizes 10 50 200 --out benchmarks/results

Each model is many small tensors plus a few large ones, half of the elements zero. Three
ways to count, timed in interleaved repetitions (so drift on a noisy machine hits all three
alike), medians reported with the ratio to the floor:

* floor: one plain read of the same bytes, ``p.sum()`` per tensor (no counting at all);
* naive: ``(p == 0).sum().item()`` per tensor, the loop people write first;
* dist_bregman: ``measure_sparsity`` (one buffer, one host sync).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from dist_bregman import measure_sparsity


def build_model(million: float, seed: int = 0) -> nn.Module:
    """About ``million`` M fp32 weights: 60% in four large matrices, the rest in
    many small layers (as in a transformer's norms/projections), half zeros."""
    generator = torch.Generator().manual_seed(seed)
    total = int(million * 1e6)
    layers: list[nn.Module] = []
    large = int(0.6 * total) // 4
    side = int(large**0.5)
    layers += [nn.Linear(side, side, bias=False) for _ in range(4)]
    small_side = 64
    n_small = max(1, (total - 4 * side * side) // (small_side * small_side))
    layers += [nn.Linear(small_side, small_side, bias=False) for _ in range(n_small)]
    model = nn.Sequential(*layers)
    with torch.no_grad():
        for layer in layers:
            weight = layer.weight
            weight.copy_(torch.randn(weight.shape, generator=generator))
            weight.mul_(torch.rand(weight.shape, generator=generator) < 0.5)
    return model


def time_interleaved(
    candidates: dict[str, Callable[[], object]], repeats: int
) -> dict[str, list[float]]:
    """Run every candidate once per round, ``repeats`` rounds, after one warm-up round."""
    for fn in candidates.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def run(million: float, repeats: int) -> dict[str, object]:
    model = build_model(million)
    weights = [m.weight for m in model]
    expected = sum(int((w != 0).sum()) for w in weights)
    assert measure_sparsity(model).nonzero == expected  # the fast path must also be right

    candidates: dict[str, Callable[[], object]] = {
        "floor (sum per tensor)": lambda: [w.sum() for w in weights],
        "naive ((p == 0).sum().item())": lambda: [int((w == 0).sum().item()) for w in weights],
        "dist_bregman measure_sparsity": lambda: measure_sparsity(model),
    }
    times = time_interleaved(candidates, repeats)
    floor = statistics.median(times["floor (sum per tensor)"])
    return {
        "parameters": sum(w.numel() for w in weights),
        "tensors": len(weights),
        "median_seconds": {k: statistics.median(v) for k, v in times.items()},
        "ratio_to_floor": {k: statistics.median(v) / floor for k, v in times.items()},
    }


def markdown(results: list[dict[str, object]], threads: int) -> str:
    lines = [
        f"Sparsity measurement on {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, {threads} threads (median of interleaved runs)",
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one tiny model, 3 repeats")
    parser.add_argument("--sizes", type=float, nargs="+", default=[10, 50], help="M params")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", type=Path, default=None, help="folder for JSON + Markdown")
    args = parser.parse_args()
    sizes, repeats = ([0.5], 3) if args.quick else (args.sizes, args.repeats)
    results = [run(size, repeats) for size in sizes]
    table = markdown(results, torch.get_num_threads())
    print(table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "measure_throughput.json").write_text(json.dumps(results, indent=2))
        (args.out / "measure_throughput.md").write_text(table)


if __name__ == "__main__":
    main()
