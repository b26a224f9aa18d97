"""Run a function on N gloo ranks in forked processes, with a deadline.

Forking costs ~0.06 s per test (spawn ~1.3 s); each child uses one thread (a forked OpenMP
pool can deadlock), rendezvous through a FileStore in a fresh temporary folder (no ports,
so parallel tests cannot collide), and ends with barrier + ``os._exit`` (gloo processes
sometimes abort in their destructors otherwise). The parent kills every worker when the
deadline passes, so a hang fails the test instead of stalling CI.
"""

from __future__ import annotations

import functools
import importlib
import multiprocessing
import os
import pickle
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dist_bregman import comm

DIST_ENV = (
    "MASTER_ADDR",
    "MASTER_PORT",
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "NODE_RANK",
)
"""What a launcher (torchrun, Lightning, the deepspeed launcher) sets for its ranks: a test
process must not pass it on, or a child would join the wrong job."""


def deepspeed_shm_files(port: int | str) -> list[Path]:
    """DeepSpeed's CPU all-reduce files of the job on ``port`` still in /dev/shm (66 MB a
    rank, never removed by DeepSpeed: comm.release_deepspeed_shm unlinks them)."""
    pattern = comm.DEEPSPEED_SHM_FILE.format(uid="*", address="*", port=port, rank="*")
    return sorted(Path("/dev/shm").glob(pattern))


def child_env() -> dict[str, str]:
    """The environment for a launched subprocess: this one without :data:`DIST_ENV`, one
    OpenMP thread per process (two cores run two xdist workers, each launching ranks)."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _worker(fn: Callable[..., Any], rank: int, world: int, folder: str, args: tuple) -> None:
    status = 1
    try:
        torch.set_num_threads(1)
        for key in DIST_ENV:
            os.environ.pop(key, None)
        store = dist.FileStore(os.path.join(folder, "store"), world)
        dist.init_process_group(
            "gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=30)
        )
        result = fn(rank, world, *args)
        _write(folder, rank, ("ok", result))
        dist.barrier()
        status = 0
    except BaseException:
        _write(folder, rank, ("error", traceback.format_exc()))
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def _write(folder: str, rank: int, payload: tuple) -> None:
    path = Path(folder) / f"result{rank}.pkl"
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(pickle.dumps(payload))
    tmp.replace(path)


PRELOAD = ("torch._dynamo", "deepspeed", "deepspeed.runtime.zero.muon.muon_optimizer")
"""Modules the ranks import on first use, imported once in the parent instead: a forked
rank inherits them. ``torch.optim.Optimizer()`` imports ``torch._dynamo`` (about 3 s here);
``deepspeed.initialize`` imports DeepSpeed's Muon optimizer, whose module-level
``torch.compile`` loads inductor (about 7 s). Every rank of every test paid that: a ZeRO-3
test on 4 ranks took 9.8 s, 1.9 s with them preloaded, and tests/distributed 241 s, 68 s."""


@functools.cache
def _preload() -> None:
    with warnings.catch_warnings():  # (their own deprecation notices, not the test's)
        warnings.simplefilter("ignore", DeprecationWarning)
        for name in PRELOAD:
            try:
                importlib.import_module(name)
            except ImportError:  # DeepSpeed is optional: its tests skip without it
                break


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 60.0,
    start_method: str = "fork",
) -> list[Any]:
    """``[fn(rank, world_size, *args) for each rank]``, each in its own gloo process.
    ``start_method="spawn"`` where the parent has initialised CUDA (a forked child cannot
    use it); ``fn`` must then be importable (a module-level function)."""
    if start_method == "fork":
        _preload()
    context = multiprocessing.get_context(start_method)
    with tempfile.TemporaryDirectory() as folder:
        procs = [
            context.Process(target=_worker, args=(fn, rank, world_size, folder, args))
            for rank in range(world_size)
        ]
        for proc in procs:
            proc.start()
        deadline = time.monotonic() + timeout
        for proc in procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        hung = [rank for rank, proc in enumerate(procs) if proc.is_alive()]
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join()
        results, errors = [], []
        for rank in range(world_size):
            path = Path(folder) / f"result{rank}.pkl"
            if not path.exists():
                errors.append(f"rank {rank}: no result (exit code {procs[rank].exitcode})")
                continue
            status, value = pickle.loads(path.read_bytes())
            if status == "error":
                errors.append(f"rank {rank} raised:\n{value}")
            results.append(value)
        if hung:
            raise TimeoutError(f"ranks {hung} still running after {timeout}s; killed. {errors}")
        if errors:
            raise AssertionError("\n".join(errors))
        return results
