"""What ``import dist_bregman`` costs a process, against ``import torch``.

    python benchmarks/import_time.py --quick          # seconds: CI smoke
    python benchmarks/import_time.py --out benchmarks/results

Every rank of a job imports the library, so its import time is paid once per process per
launch. Each statement runs in a fresh interpreter (``python -c``), the candidates
interleaved in rounds (see ``common.time_interleaved``); reported: the median wall time of
the whole process and its ratio to ``import torch`` in the same round. The core import
must not load Lightning (a raw ``torchrun`` loop needs neither it nor its import time):
that statement asserts it, so a regression fails here too.

A second table says where the core import's time goes once torch is loaded: ``python -X
importtime -c "import torch; import dist_bregman"`` in fresh processes, and for each module
outside the package that one of its modules imports first (the outermost such import), its
cumulative time, the median over the runs; the package's own modules take the rest.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
from pathlib import Path

from common import machine, medians, ratios, time_interleaved, write

ROOT = Path(__file__).resolve().parents[1]
STATEMENTS = {
    "python, nothing imported": "pass",
    "import torch": "import torch",
    "import dist_bregman": (
        "import sys, dist_bregman; "
        "assert 'lightning' not in sys.modules, 'import dist_bregman loaded Lightning'"
    ),
    "import dist_bregman + BregmanPruner (loads Lightning)": (
        "import dist_bregman; dist_bregman.BregmanPruner"
    ),
}


def run_statement(code: str, *flags: str) -> str:
    """Run ``python [flags] -c code`` in a fresh interpreter; its stderr."""
    done = subprocess.run(
        [sys.executable, *flags, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    if done.returncode != 0:
        raise RuntimeError(f"python -c {code!r} failed:\n{done.stderr[-2000:]}")
    return done.stderr


BREAKDOWN = "import torch; import dist_bregman"
OWN = "dist_bregman's own modules"
ENTRY = re.compile(r"import time:\s+\d+ \|\s+(\d+) \|( +)(\S+)")


def imported_by_package(stderr: str) -> dict[str, float]:
    """Seconds of ``dist_bregman``'s import after torch, from ``-X importtime`` output:
    ``"total"``, each outermost module outside the package that it imported, and
    :data:`OWN` (the rest). ``-X importtime`` lists a module's imports before it, one level
    deeper (two spaces); reading the lines backwards puts each parent before its children.
    """
    entries = [
        (len(m[2]) // 2, m[3], int(m[1]) / 1e6) for m in map(ENTRY.match, stderr.splitlines()) if m
    ]
    after_torch = next(
        i for i, (level, name, _) in enumerate(entries) if (level, name) == (0, "torch")
    )
    found: dict[str, float] = {"total": 0.0}
    ancestors: list[tuple[int, str]] = []
    for level, name, seconds in reversed(entries[after_torch + 1 :]):
        while ancestors and ancestors[-1][0] >= level:
            ancestors.pop()
        own = name.split(".")[0] == "dist_bregman"
        if level == 0:
            found["total"] += seconds
        elif not own and all(a.split(".")[0] == "dist_bregman" for _, a in ancestors):
            found[name] = seconds
        ancestors.append((level, name))
    found[OWN] = found["total"] - sum(s for n, s in found.items() if n != "total")
    return found


def breakdown(runs: int) -> dict[str, float]:
    """Medians of :func:`imported_by_package` over ``runs`` fresh processes."""
    found = [imported_by_package(run_statement(BREAKDOWN, "-X", "importtime")) for _ in range(runs)]
    names = {name for run in found for name in run}
    medians = {name: statistics.median(run.get(name, 0.0) for run in found) for name in names}
    return dict(sorted(medians.items(), key=lambda item: -item[1]))


def run(repeats: int, warmup: int) -> dict[str, object]:
    candidates = {
        name: (lambda code=code: run_statement(code)) for name, code in STATEMENTS.items()
    }
    times = time_interleaved(candidates, repeats, warmup=warmup)
    return {
        "statements": STATEMENTS,
        "repeats": repeats,
        "median_seconds": medians(times),
        "ratio_to_import_torch": ratios(times, "import torch"),
        "breakdown_seconds": breakdown(repeats),
    }


def markdown(result: dict[str, object]) -> str:
    seconds, ratio = result["median_seconds"], result["ratio_to_import_torch"]
    assert isinstance(seconds, dict) and isinstance(ratio, dict)
    lines = [
        f"Import time, a fresh process per statement, {result['repeats']} interleaved rounds, "
        f"on {machine()}",
        "",
        "| statement | median s | × import torch |",
        "|---|---:|---:|",
    ]
    lines += [f"| {name} | {seconds[name]:.2f} | {ratio[name]:.2f} |" for name in STATEMENTS]
    parts = result["breakdown_seconds"]
    assert isinstance(parts, dict)
    total = parts["total"]
    lines += [
        "",
        f"Where `import dist_bregman` spends its time once torch is loaded: `python -X "
        f'importtime -c "{BREAKDOWN}"`, the median over {result["repeats"]} fresh '
        f"process(es) of each module outside the package that it imports first, those of "
        f"1 ms or more (-X importtime adds its own overhead: compare shares, not seconds "
        f"with the table above)",
        "",
        "| imported | median s | share |",
        "|---|---:|---:|",
    ]
    shown = [n for n in parts if n not in ("total", OWN) and parts[n] >= 0.001][:5]
    lines += [f"| {name} | {parts[name]:.3f} | {parts[name] / total:.0%} |" for name in shown]
    lines.append(f"| {OWN} | {parts[OWN]:.3f} | {parts[OWN] / total:.0%} |")
    lines.append(f"| all of `import dist_bregman` | {total:.3f} | 100% |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one round, no warm-up")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=None, help="folder for JSON + Markdown")
    args = parser.parse_args()
    result = run(1, warmup=0) if args.quick else run(args.repeats, warmup=1)
    write(args.out, "import_time", result, markdown(result))


if __name__ == "__main__":
    main()
