"""DDP on CPU/gloo: replicas counted once, one all-reduce, lambda identical on every rank."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

from dist_bregman import BregmanConfig, SparsityController, measure_sparsity
from tests.helpers.dist import run_ranks
from tests.helpers.models import mixed_state_model, reference_counts

TIMEOUT = 90.0


class CollectiveCounter:
    """Counts the collectives ``dist_bregman.comm`` issues (it is the only caller)."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {"all_reduce": 0, "broadcast": 0}
        self._saved: dict[str, Any] = {}

    def __enter__(self) -> CollectiveCounter:
        for name in self.calls:
            original = getattr(dist, name)
            self._saved[name] = original

            def counted(
                *args: Any, _name: str = name, _original: Any = original, **kwargs: Any
            ) -> Any:
                self.calls[_name] += 1
                return _original(*args, **kwargs)

            setattr(dist, name, counted)
        return self

    def __exit__(self, *exc: object) -> None:
        for name, original in self._saved.items():
            setattr(dist, name, original)


def _measure_on_ranks(rank: int, world: int) -> dict[str, Any]:
    model = mixed_state_model(seed=3)
    ddp = DistributedDataParallel(model)  # replicas: identical on every rank
    with CollectiveCounter() as counter:
        report = measure_sparsity(ddp)
    local = measure_sparsity(model, sync=False)
    return {
        "report": report,
        "local": local,
        "calls": dict(counter.calls),
        "reference": reference_counts(model),
    }


@pytest.mark.timeout(TIMEOUT + 30)
@pytest.mark.parametrize("world", [2, 3])
def test_replicas_are_counted_once_with_one_all_reduce(world: int) -> None:
    results = run_ranks(_measure_on_ranks, world, timeout=TIMEOUT)
    single = measure_sparsity(mixed_state_model(seed=3))
    for result in results:
        assert result["calls"] == {"all_reduce": 1, "broadcast": 0}
        assert result["report"] == single  # identical integers on every rank, == unsharded
        assert result["report"].per_parameter == result["reference"]
        assert result["local"] == single  # sync=False counts everything locally


def _conv_net() -> nn.Module:
    """Zero rows (filters, neurons) and zero kernels, for group sparsity's counts."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8, 4)
    )
    with torch.no_grad():
        net[0].weight[:3] = 0.0
        net[2].weight[1, :2] = 0.0
        net[4].weight[0] = 0.0
    return net


def _group_counts(rank: int, world: int) -> list[tuple[Any, ...]]:
    ddp = DistributedDataParallel(_conv_net())
    controller = SparsityController(ddp, BregmanConfig(regularizer="group_l1"))
    reports = [controller.measure()]  # checked in its own buffer (words first, padded)
    controller.attach(torch.optim.SGD(ddp.parameters(), lr=0.0))
    reports.append(controller.measure())  # checked at attach: the buffer as it is
    return [(r.per_parameter, r.zero_rows, r.rows, r.zero_kernels, r.kernels) for r in reports]


@pytest.mark.timeout(TIMEOUT + 30)
def test_rows_and_kernels_are_counted_alike_before_and_after_attach() -> None:
    """Group sparsity's counts ride in the measurement buffer beside the elements'; before
    attach that buffer also carries the agreement words (first) and zero padding."""
    report = SparsityController(_conv_net(), BregmanConfig(regularizer="group_l1")).measure()
    single = (report.per_parameter, report.zero_rows, report.rows)
    single += (report.zero_kernels, report.kernels)
    assert single[1:] == (4, 20, 11, 88)
    for reports in run_ranks(_group_counts, 2, timeout=TIMEOUT):
        assert reports == [single, single]


def _different_local_views(rank: int, world: int) -> dict[str, Any]:
    # No DDP: each rank trains its own copy on its own data, so local weights differ.
    torch.manual_seed(100 + rank)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    controller = SparsityController(
        model, BregmanConfig(initial_lambda=0.02, lambda_update_rate=0.05, update_frequency=3)
    )
    controller.attach(optimizer)
    lambdas, calls = [], []
    for step in range(1, 13):
        x, y = torch.randn(16, 8), torch.randint(0, 4, (16,))
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        with CollectiveCounter() as counter:
            decision = controller.update_if_due(step)
        if decision is not None:
            lambdas.append(decision.new)
            calls.append(dict(counter.calls))
    local = measure_sparsity(model, sync=False).sparsity
    return {"lambdas": lambdas, "sparsity": controller.sparsity, "local": local, "calls": calls}


@pytest.mark.timeout(TIMEOUT + 30)
def test_lambda_is_identical_on_every_rank_even_when_local_views_differ() -> None:
    results = run_ranks(_different_local_views, 3, timeout=TIMEOUT)
    assert len({r["local"] for r in results}) > 1  # the ranks really do see different models
    assert all(r["lambdas"] == results[0]["lambdas"] for r in results)
    assert all(r["sparsity"] == results[0]["sparsity"] for r in results)
    assert len(results[0]["lambdas"]) == 4
    assert all(c == {"all_reduce": 1, "broadcast": 1} for r in results for c in r["calls"])


def _data(steps: int, per_rank: int, world: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(7)
    return [
        (
            torch.randn(per_rank * world, 12, generator=generator),
            torch.randint(0, 5, (per_rank * world,), generator=generator),
        )
        for _ in range(steps)
    ]


def _initial_model() -> nn.Module:
    torch.manual_seed(11)
    return nn.Sequential(nn.Linear(12, 40), nn.ReLU(), nn.Linear(40, 5))


def _train(
    model: nn.Module, forward: nn.Module, batches: list, rank: int, world: int
) -> tuple[list, dict]:
    optimizer = torch.optim.SGD(forward.parameters(), lr=0.1, momentum=0.9)
    config = BregmanConfig(
        target_sparsity=0.7, initial_lambda=0.01, lambda_update_rate=0.05, update_frequency=4
    )
    controller = SparsityController(model, config)
    controller.attach(optimizer)
    trajectory = []
    for step, (x, y) in enumerate(batches, start=1):
        shard = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
        F.cross_entropy(forward(x[shard]), y[shard]).backward()
        optimizer.step()
        optimizer.zero_grad()
        decision = controller.update_if_due(step)
        if decision is not None:
            trajectory.append((step, controller.last_report.nonzero, decision.new))
    return trajectory, {k: v.clone() for k, v in model.state_dict().items()}


def _ddp_run(rank: int, world: int, batches: list) -> tuple[list, dict]:
    model = _initial_model()
    return _train(model, DistributedDataParallel(model), batches, rank, world)


@pytest.mark.timeout(TIMEOUT + 30)
def test_ddp_training_matches_the_single_process_run() -> None:
    batches = _data(steps=24, per_rank=8, world=2)
    single_model = _initial_model()
    single_trajectory, single_weights = _train(
        single_model, single_model, copy.deepcopy(batches), 0, 1
    )
    results = run_ranks(_ddp_run, 2, batches, timeout=TIMEOUT)
    counts = [nonzero for _, nonzero, _ in single_trajectory]
    assert len(counts) == 6 and len(set(counts)) == 6  # the zeros really move...
    assert min(counts) > 0 and max(counts) < 12 * 40 + 40 * 5  # ...through the middle
    for trajectory, weights in results:
        assert trajectory == single_trajectory  # counts and lambda exactly
        for key, value in single_weights.items():
            torch.testing.assert_close(weights[key], value, rtol=1e-5, atol=1e-6)
    assert results[0][1].keys() == single_weights.keys()
