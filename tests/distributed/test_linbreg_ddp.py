"""LinBreg driven by the controller under 2-rank DDP: parameters, v and lambda agree."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

from dist_bregman import BregmanConfig, SparsityController, comm
from dist_bregman.init import sparse_init_
from dist_bregman.optim import AdaBreg, LinBreg
from tests.helpers.dist import run_ranks


def _train(rank: int, world: int, optimizer_name: str) -> dict[str, Any]:
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(12, 48), nn.ReLU(), nn.Linear(48, 4))
    sparse_init_(model, 0.2, generator=torch.Generator().manual_seed(5))
    ddp = DistributedDataParallel(model)
    if optimizer_name == "linbreg":
        optimizer: torch.optim.Optimizer = LinBreg(ddp.parameters(), lr=0.1, momentum=0.9)
    else:
        optimizer = AdaBreg(ddp.parameters(), lr=0.01)
    config = BregmanConfig(
        target_sparsity=0.7,
        initial_lambda=0.05,
        lambda_rule="multiplicative",
        lambda_update_rate=2.0,
        min_lambda=1e-6,
        max_lambda=10.0,
        update_frequency=3,
    )
    controller = SparsityController(model, config)
    controller.attach(optimizer)
    generator = torch.Generator().manual_seed(100 + rank)  # every rank its own data
    lambdas = []
    for step in range(1, 31):
        x, y = (
            torch.randn(16, 12, generator=generator),
            torch.randint(0, 4, (16,), generator=generator),
        )
        F.cross_entropy(ddp(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        if controller.update_if_due(step) is not None:
            lambdas.append(controller.lambda_)
    weights = [p.detach().clone() for p in model.parameters()]
    duals = [optimizer.state[p]["v"].clone() for p in model.parameters()]
    group_lambdas = [g["lambda"] for g in optimizer.param_groups]
    gathered = comm.all_gather_object((weights, duals, lambdas, group_lambdas))
    return {"gathered": gathered, "sparsity": controller.sparsity}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("optimizer_name", ["linbreg", "adabreg"])
def test_parameters_dual_variables_and_lambda_are_identical_on_every_rank(
    optimizer_name: str,
) -> None:
    results = run_ranks(_train, 2, optimizer_name, timeout=90)
    (w0, v0, l0, g0), (w1, v1, l1, g1) = results[0]["gathered"]
    assert len(l0) == 10 and l0 == l1 and g0 == g1 and g0[0] == l0[-1]
    for a, b in zip(w0 + v0, w1 + v1, strict=True):
        assert torch.equal(a, b)
    assert results[0]["sparsity"] == results[1]["sparsity"]
    assert 0.0 < results[0]["sparsity"] < 1.0
    assert any(bool((w == 0).any()) for w in w0)  # exact zeros
