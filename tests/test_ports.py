"""The launch ports of the tests: per-worker blocks that no other worker and no port-0
bind can reach (tests/helpers/ports.py)."""

from __future__ import annotations

import socket

import pytest

from tests.helpers import ports


def test_each_worker_has_its_own_block_below_the_ephemeral_range(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    blocks = []
    for worker in ("gw0", "gw1", "gw2", "gw3"):
        monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
        blocks.append(set(ports._block()))
        assert ports.free_port() in blocks[-1]
    assert sum(map(len, blocks)) == len(set().union(*blocks))  # disjoint
    assert max(set().union(*blocks)) < ports._ephemeral_start()


def test_a_port_in_use_is_passed_over(monkeypatch: pytest.MonkeyPatch) -> None:
    # A block no worker of this suite (-n 2: gw0, gw1) launches jobs from: in gw1's, the
    # port after the held one was once taken too (by an earlier launch there, most likely:
    # CI, 2026-12-07), free_port ran past the offsets given here and the test failed.
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw9")
    monkeypatch.setattr(ports, "_next", iter([0, 0, 1]))
    held = ports._block()[0]
    with socket.socket() as sock:
        sock.bind(("", held))
        sock.listen()
        assert ports.free_port() == held + 1  # offset 0 tried twice (held), then 1
