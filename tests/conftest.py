"""Suite-wide settings: quiet, deterministic, no leaked distributed environment."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.helpers.dist import DIST_ENV

ROOT = Path(__file__).resolve().parents[1]
# DeepSpeed JIT-builds its CPU comm op once; keep it in the git-ignored build folder.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / "build" / "torch_extensions"))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# Two xdist workers on two cores: one intra-op thread each avoids oversubscription.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _clean_distributed_env() -> Iterator[None]:
    """Lightning leaves MASTER_PORT & co. set after a multi-process fit; never leak them."""
    saved = {k: os.environ.get(k) for k in DIST_ENV}
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Fail a grouped test if ``--dist loadgroup`` did not group it. Tests that share one
    launch (a session fixture) share an xdist group so one worker runs them and launches
    once; pytest 9.2 broke grouping silently (xdist renames node ids to group them, which
    pytest 9.2 no longer reads: pytest-dev/pytest-xdist#1386) and the launch then ran on
    both workers."""
    grouped = item.get_closest_marker("xdist_group") is not None
    if grouped and getattr(item.config.option, "loadgroup", False) and "@" not in item.nodeid:
        pytest.fail(
            f"xdist did not group this test (pytest {pytest.__version__}; see "
            f"pytest-dev/pytest-xdist#1386): install the versions in constraints.txt",
            pytrace=False,
        )
