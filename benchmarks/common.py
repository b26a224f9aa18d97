"""What every benchmark shares: interleaved timing, ratios within a round, output files.

This machine (and most shared ones) drifts: a number taken a minute after another is not
comparable to it. So every benchmark runs all of its candidates once per round, in a
random order, and reports for each the median over rounds of its time divided by the
reference's time in the same round.
"""

from __future__ import annotations

import json
import platform
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn


def mlp(width: int, depth: int, seed: int = 0) -> nn.Sequential:
    """``256 -> width (x depth hidden layers) -> 10`` with ReLU: the model of the step and
    distributed benchmarks (about 2.4 M parameters at width 1024, depth 3)."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(256, width), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.ReLU()]
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


def time_interleaved(
    candidates: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    device: torch.device | str = "cpu",
    before_timing: Callable[[], object] | None = None,
) -> dict[str, list[float]]:
    """Seconds of each candidate in each of ``repeats`` rounds, after ``warmup`` rounds.

    Each round runs the candidates in a fresh random order (seeded: reruns repeat it). A
    candidate that churns memory or caches slows whatever runs right after it; rotating one
    fixed order, as this did before, changes who goes first but not who follows whom, so
    the same candidate always paid for the same predecessor (``measure_sparsity(model)``
    always ran right after the naive loop, which made it 2-6% slower than right after the
    controller's measurement in a one-off check at 10 M). On CUDA the device is
    drained before the clock starts and before it stops, so a candidate pays for the kernels
    it queued (and not for its predecessor's). ``before_timing`` runs once between the
    warm-up and the timed rounds."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    for _ in range(warmup):
        for fn in candidates.values():
            fn()
    if before_timing is not None:
        before_timing()
    names = list(candidates)
    times: dict[str, list[float]] = {name: [] for name in names}
    order = random.Random(0)
    for _ in range(repeats):
        for name in order.sample(names, len(names)):
            sync()
            start = time.perf_counter()
            candidates[name]()
            sync()
            times[name].append(time.perf_counter() - start)
    return times


def ratios(times: dict[str, list[float]], reference: str) -> dict[str, float]:
    """Median over rounds of ``time / reference time`` in the same round."""
    base = times[reference]
    return {
        name: statistics.median(t / b for t, b in zip(values, base, strict=True))
        for name, values in times.items()
    }


def medians(times: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(values) for name, values in times.items()}


def cpu_model() -> str:
    """The CPU's model name where Linux reports it, with its family, model and AVX-512,
    else the architecture. (Results moved between machines: the same seeds trained to
    accuracies 0.15-0.3 points apart on two x86_64 CPUs, and their speeds differ
    several-fold, so a table names the CPU. Two of ours were both just "AMD EPYC", a Zen 1
    and a Zen 4: the family and model tell them apart.)"""
    try:
        first = Path("/proc/cpuinfo").read_text().split("\n\n", 1)[0]  # one processor
    except OSError:
        first = ""
    fields = {}
    for line in first.splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    if "model name" not in fields:
        return platform.processor() or platform.machine()
    details = [platform.machine()]
    if "cpu family" in fields and "model" in fields:
        details.append(f"family {fields['cpu family']} model {fields['model']}")
    if "avx512f" in fields.get("flags", "").split():
        details.append("AVX-512")
    return f"{fields['model name']} ({', '.join(details)})"


def machine(device: torch.device | str = "cpu") -> str:
    """One line naming what the numbers were measured on."""
    cpu = cpu_model()
    if torch.device(device).type == "cuda":
        return (
            f"{torch.cuda.get_device_name(device)} (host {cpu}), torch {torch.__version__}, "
            f"Python {platform.python_version()}"
        )
    return (
        f"{cpu}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
        f"Python {platform.python_version()}"
    )


def write(out: Path | None, name: str, results: object, table: str, indent: int | None = 2) -> None:
    """Print the table; with ``out``, also write ``<name>.json`` (raw) and ``<name>.md``.
    ``indent=None`` writes the JSON on one line (long per-step traces: a fifth the size)."""
    print(table)
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(results, indent=indent) + "\n")
    (out / f"{name}.md").write_text(table)
