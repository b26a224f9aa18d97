"""What a wheel of the package holds: the files it needs at run time besides its modules."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(120)
def test_the_wheel_ships_the_kernel_source_the_default_job_and_its_type_marker(
    tmp_path: Path,
) -> None:
    """csrc/count_nonzero.cpp (built on first use), digits.yaml (what `dist-bregman fit`
    runs without a config) and py.typed (without it a user's mypy skips our annotations:
    "module is installed, but missing library stubs or py.typed marker")."""
    source = tmp_path / "source"  # a copy: the build writes build/ and egg-info beside it
    source.mkdir()
    shutil.copytree(ROOT / "dist_bregman", source / "dist_bregman")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    built = subprocess.run(
        [
            *pip,
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            str(source),
            "-w",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = tmp_path.glob("dist_bregman-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("csrc/count_nonzero.cpp", "digits.yaml", "py.typed", "shards/zero.py"):
        assert f"dist_bregman/{needed}" in names
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)
