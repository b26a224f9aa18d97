"""What ``import dist_bregman`` costs a process, against ``import torch``.

    python benchmarks/import_time.py --quick          # seconds: CI smoke
    python benchmarks/import_time.py --out benchmarks/results

Every rank of a job imports the library, so its import time is paid once per process per
launch. Each statement runs in a fresh interpreter (``python -c``), the candidates
interleaved in rounds (see ``common.time_interleaved``); reported: the median wall time of
the whole process and its ratio to ``import torch`` in the same round. The core import
must not load Lightning (a raw ``torchrun`` loop needs neither it nor its import time):
that statement asserts it, so a regression fails here too.
"""

from __future__ import annotations

import argparse
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


def run_statement(code: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    if done.returncode != 0:
        raise RuntimeError(f"python -c {code!r} failed:\n{done.stderr[-2000:]}")


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
