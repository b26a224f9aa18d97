"""Every benchmark keeps working: CI runs each in --quick mode (seconds)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(120)
def test_measure_throughput_quick_writes_json_and_markdown(tmp_path: Path) -> None:
    script = ROOT / "benchmarks" / "measure_throughput.py"
    done = subprocess.run(
        [sys.executable, str(script), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((tmp_path / "measure_throughput.json").read_text())
    assert results[0]["ratio_to_floor"]["floor (sum per tensor)"] == 1.0
    assert set(results[0]["median_seconds"]) == {
        "floor (sum per tensor)",
        "naive ((p == 0).sum().item())",
        "measure_sparsity(model)",
        "SparsityController.measure()",
    }
    assert "| × floor |" in (tmp_path / "measure_throughput.md").read_text()
