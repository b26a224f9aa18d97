"""What a wheel of the package holds: the files it needs at run time besides its modules;
and the dependency floors `make test-floors` runs the suite at."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

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


def test_the_floors_environment_pins_every_floor_of_the_package() -> None:
    """constraints-floors.txt pins each dependency with a lower bound (core and extras but
    dev) at exactly that bound: the README's floors run is the package's floors, and
    raising one without the other fails here."""
    declared = [Requirement(spec) for spec in metadata.requires("dist_bregman") or []]
    floors: dict[str, Version] = {}
    for requirement in declared:
        if requirement.marker is not None and requirement.marker.evaluate({"extra": "dev"}):
            continue
        lower = [Version(s.version) for s in requirement.specifier if s.operator == ">="]
        assert len(lower) == 1, requirement  # every dependency has a floor
        name = canonicalize_name(requirement.name)
        assert floors.setdefault(name, lower[0]) == lower[0], requirement  # one per package
    pins = {}
    for line in (ROOT / "constraints-floors.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = Version(version)
    assert {name: pins.get(name) for name in floors} == floors
    assert set(pins) - set(floors) == {"numpy"}  # held below 2 for scikit-learn 1.3.2
