"""The core is framework-free: a raw torchrun or DeepSpeed loop imports and runs it without
Lightning; the Lightning callbacks load on first use."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

import dist_bregman
from dist_bregman.callbacks.bregman import BregmanPruner
from dist_bregman.callbacks.pruning import SafeModelPruning
from dist_bregman.callbacks.sparse_averaging import (
    SparseStochasticWeightAveraging,
    SparseWeightAveraging,
)

# Lightning made unimportable (None in sys.modules), then what the raw loops use: the
# controller measures, updates lambda and takes its proximal step; LinBreg steps.
WITHOUT_LIGHTNING = textwrap.dedent(
    """
    import sys
    for name in ("lightning", "pytorch_lightning", "lightning_fabric", "torchmetrics"):
        sys.modules[name] = None

    import torch
    import torch.nn.functional as F
    from torch import nn

    import dist_bregman
    from dist_bregman import BregmanConfig, SparsityController, comm, measure_sparsity
    from dist_bregman.digits import digits_splits
    from dist_bregman.init import sparse_init_
    from dist_bregman.optim import LinBreg

    torch.manual_seed(0)
    x, y = digits_splits().train.tensors
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    config = BregmanConfig(target_sparsity=0.5, update_frequency=1, initial_lambda=1e-2)
    controller = SparsityController(model, config)
    controller.attach(optimizer)
    for step in range(1, 6):
        loss = F.cross_entropy(model(x[:64]), y[:64])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        controller.observe_loss(loss)
        assert controller.update_if_due(step) is not None
    zeros = sum(int((m.weight == 0).sum()) for m in model if isinstance(m, nn.Linear))
    assert zeros > 0 and measure_sparsity(model).nonzero == 64 * 32 + 32 * 10 - zeros

    linbreg = LinBreg(model.parameters(), lr=0.1, lambda_=1e-2)
    F.cross_entropy(model(x[:64]), y[:64]).backward()
    linbreg.step()
    assert comm.get_world_size() == 1
    assert not any(name.split(".")[0] in ("lightning", "torchmetrics")
                   for name, module in sys.modules.items() if module is not None)
    try:
        dist_bregman.BregmanPruner
    except ImportError as error:
        print("callback:", error)
    """
)


def test_the_core_runs_without_lightning() -> None:
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_LIGHTNING],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "callback:" in done.stdout and "lightning" in done.stdout, done.stdout


def test_the_callbacks_load_on_first_use() -> None:
    assert dist_bregman.BregmanPruner is BregmanPruner
    assert dist_bregman.SafeModelPruning is SafeModelPruning
    assert dist_bregman.SparseWeightAveraging is SparseWeightAveraging
    assert dist_bregman.SparseStochasticWeightAveraging is SparseStochasticWeightAveraging
    lazy = {"BregmanPruner", "SafeModelPruning", "SparseWeightAveraging"}
    assert lazy | {"SparseStochasticWeightAveraging"} <= set(dist_bregman.__all__)
    with pytest.raises(AttributeError, match="no attribute 'Nothing'"):
        dist_bregman.Nothing  # noqa: B018
