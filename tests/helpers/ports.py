"""TCP ports for the jobs the tests launch, from a block of its own per xdist worker.

A launcher told "find a free port" binds port 0, closes it and binds the number again
later; in between another job can take it (seen when xdist stopped grouping these tests:
launches failed with EADDRINUSE). The kernel hands out port-0 binds and outgoing
connections from its ephemeral range only, so a block below that range, one per worker,
is never taken by another worker's job or by the kernel: the launching tests can run on
both workers at once. A port still held (a job before, TIME_WAIT, another program) is
skipped by trying to bind it.
"""

from __future__ import annotations

import itertools
import os
import socket
from pathlib import Path

BASE = 20000
"""The first worker's block starts here, far below Linux's ephemeral range (32768 up)."""
BLOCK = 400
"""Ports per worker; consecutive calls walk the block, so a port is reused only after
BLOCK others (long after its TIME_WAIT)."""


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _worker_index() -> int:
    """``gw<n>`` -> n under xdist, 0 without it."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    return int(worker[2:]) if worker.startswith("gw") and worker[2:].isdigit() else 0


def _block() -> range:
    start = BASE + BLOCK * _worker_index()
    if start + BLOCK > _ephemeral_start():
        raise RuntimeError(
            f"xdist worker {_worker_index()}: ports {start}..{start + BLOCK - 1} reach the "
            f"kernel's ephemeral range (from {_ephemeral_start()}); run fewer workers"
        )
    return range(start, start + BLOCK)


_next = itertools.count(os.getpid() % BLOCK)


def free_port() -> int:
    """A port of this worker's block that nothing holds now (the next one in turn)."""
    block = _block()
    for _ in range(len(block)):
        port = block[next(_next) % len(block)]
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("", port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free port in {block.start}..{block.stop - 1}")
