"""SafeModelPruning's masks under sharding equal the unsharded model's, on every rank."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

from dist_bregman import comm
from dist_bregman.pruning import MagnitudePruner, PruningConfig
from tests.helpers.dist import run_ranks
from tests.helpers.strategies import effective_weights, matrix_model, wrap


def _model() -> torch.nn.Sequential:
    """The matrix model with weights on a coarse grid: ties everywhere, across shards."""
    model = matrix_model()
    with torch.no_grad():
        for index in (0, 2, 4):
            layer = model[index]
            weight = layer.weight_orig if hasattr(layer, "weight_orig") else layer.weight
            weight.copy_(torch.round(weight * 8) / 8)
    return model


def _config(kind: str) -> PruningConfig:
    return {
        "global": PruningConfig(amount=0.55),
        "hold_zeros": PruningConfig(amount=0.55),
        "per_tensor": PruningConfig(amount=0.55, use_global=False),
        # 0.36 of the elements: the cut falls inside a tie of two rows of the first layer
        # (13 elements each), and 6 elements short of the amount take the first of them.
        "structured": PruningConfig(amount=0.36, structured=True, norm=2.0),
    }[kind]


def _pattern(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: weight == 0 for name, weight in weights.items()}


_PROBE = torch.randn(4, 13, generator=torch.Generator().manual_seed(1))

FREE = (40, 150)
"""The places among the zeros (in global element order) that ``hold_zeros`` frees."""


def _held_by_hold_zeros(pruner: MagnitudePruner) -> int:
    """``hold_zeros(FREE)``, then every weight set to 1 where it lives and the masks
    enforced: the zeros left are the held set. Returns the zero count it reported."""
    zeros = pruner.hold_zeros(FREE)
    with torch.no_grad():
        for placement in pruner.placements:
            values = placement.local().values
            if values is not None:
                values.fill_(1.0)
    pruner.enforce()
    return zeros


def _prune_on_ranks(rank: int, world: int, strategy: str, kind: str) -> dict[str, Any]:
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))
    wrapped = wrap(strategy, _model(), lambda m: torch.optim.SGD(m.parameters(), lr=0.2))
    with torch.no_grad():  # a forward before the event (ZeRO++ hpZ keeps copies for them)
        wrapped.model(_PROBE)
    if strategy == "zero3_persist":
        # A training step leaves DeepSpeed's persistent (small) parameters whole on every
        # rank (an eval forward releases them): the copies the event must rebuild. At lr 0
        # the weights stay those the single process prunes.
        for group in wrapped.optimizer.param_groups:
            group["lr"] = 0.0
        wrapped.train_step(_PROBE, torch.zeros(4, dtype=torch.long))
        for group in wrapped.optimizer.param_groups:
            group["lr"] = 0.2
        assert all(p.numel() == p.ds_numel for p in wrapped.module.parameters())
    pruner = MagnitudePruner(wrapped.model, _config(kind))
    pruner.attach(wrapped.optimizer)
    event = pruner.prune(_config(kind).amount)
    if kind == "hold_zeros":
        zeros = _held_by_hold_zeros(pruner)
        return {"held": _pattern(wrapped.full_effective()), "zeros": zeros}
    with torch.no_grad():  # the next forward already computes with the pruned weights
        output = wrapped.model(_PROBE)  # (before a gather below could refresh stale copies)
    pruned = _pattern(wrapped.full_effective())
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):  # the masks must survive steps (and fp32 masters)
        wrapped.train_step(
            torch.randn(4, 13, generator=generator), torch.randint(0, 5, (4,), generator=generator)
        )
    after = _pattern(wrapped.full_effective())
    return {
        "output": output,
        "pruned": pruned,
        "after": after,
        "report": event.report,
        "agree": comm.all_gather_object(event.report),
    }


CASES = [
    (strategy, world, "global")
    for strategy in (
        "ddp",
        "fsdp1_orig",
        "fsdp1_flat",
        "fsdp2",
        "zero1",
        "zero2",
        "zero3",
        "zero3_persist",
    )
    for world in (2, 3)
] + [
    ("ddp_zero", 3, "global"),  # torch's ZeroRedundancyOptimizer: masks after the local step
    ("ddp", 3, "per_tensor"),
    ("fsdp2", 3, "per_tensor"),
    ("zero3", 3, "per_tensor"),
    ("ddp", 2, "structured"),
    ("fsdp2", 3, "structured"),
    ("fsdp2", 4, "structured"),  # 4 ranks: the 5-row layer leaves one rank no rows
    ("hsdp", 4, "global"),  # 2 replicas of 2 shards: ties across shards and replicas
    ("hsdp", 4, "structured"),
    ("fsdp1_hybrid", 4, "global"),
    ("zero3_hpz", 4, "global"),  # ZeRO++ hpZ: the masks reach the copies forwards read
    # Groups a forward leaves gathered: FSDP1 SHARD_GRAD_OP, FSDP2's root group (per
    # tensor there: the global cut leaves the root's layer, the last, at its natural zeros,
    # so a stale gathered copy would pass unseen).
    ("fsdp1_gradop", 2, "global"),
    ("fsdp2_raf", 4, "global"),  # the copy resharded after forward to halves of the world
    ("fsdp2_root", 2, "per_tensor"),
]


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    ("strategy", "world"),
    [("ddp", 3), ("fsdp1_flat", 3), ("fsdp2", 3), ("zero3", 3), ("hsdp", 4), ("zero3_hpz", 4)],
)
def test_hold_zeros_frees_the_same_places_as_one_process(strategy: str, world: int) -> None:
    """A frozen support's swaps name zeros by their place among all zeros in global order
    (``hold_zeros``): uneven shards, replicas and hybrid layouts must give the elements
    the unsharded model gives."""
    single = _model()
    pruner = MagnitudePruner(single, _config("hold_zeros"))
    pruner.prune(0.55)
    before = _pattern(effective_weights(single))  # in global order: 0, 2, 4, row-major
    flat = torch.cat([zero.reshape(-1) for zero in before.values()])
    place = torch.cumsum(flat.to(torch.int64), 0) - 1
    held = flat & ((place < FREE[0]) | (place >= FREE[1]))
    masked = torch.cat(  # a torch.nn.utils.prune mask keeps its zeros, held or not
        [(single[0].weight_mask == 0).reshape(-1), torch.zeros(187 + 55, dtype=torch.bool)]
    )
    zeros = _held_by_hold_zeros(pruner)
    expected = _pattern(effective_weights(single))
    assert zeros == int(flat.sum())
    assert torch.equal(torch.cat([m.reshape(-1) for m in expected.values()]), held | masked)
    for result in run_ranks(_prune_on_ranks, world, strategy, "hold_zeros", timeout=200):
        assert result["zeros"] == zeros
        assert all(torch.equal(result["held"][n], expected[n]) for n in expected)


@pytest.mark.timeout(240)
@pytest.mark.parametrize(("strategy", "world", "kind"), CASES)
def test_masks_equal_the_single_process_masks_on_every_rank(
    strategy: str, world: int, kind: str
) -> None:
    single = _model()
    MagnitudePruner(single, _config(kind)).prune(_config(kind).amount)
    expected = _pattern(effective_weights(single))
    with torch.no_grad():
        output = single(_PROBE)
    results = run_ranks(_prune_on_ranks, world, strategy, kind, timeout=200)
    for result in results:
        assert all(torch.equal(result["pruned"][n], expected[n]) for n in expected)
        torch.testing.assert_close(result["output"], output, rtol=1e-5, atol=1e-6)
        for name, zero in expected.items():  # what was pruned is still zero after steps
            if kind == "structured":  # units are rows; zeros elsewhere may train back
                rows = zero.all(dim=1)
                assert bool(result["after"][name][rows].all())
            else:  # every zero was selected: zeros are the smallest magnitudes
                assert bool((result["after"][name] | ~zero).all())
        assert all(report == results[0]["report"] for report in result["agree"])
    zeros = sum(int(m.sum()) for m in expected.values())
    assert results[0]["report"].total - results[0]["report"].nonzero == zeros


def _structured_on_shards(rank: int, world: int, strategy: str, dim: int) -> str:
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))
    wrapped = wrap(strategy, _model(), lambda m: torch.optim.SGD(m.parameters(), lr=0.2))
    try:
        MagnitudePruner(wrapped.model, PruningConfig(structured=True, dim=dim))
    except ValueError as error:
        return str(error)
    return "accepted"


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("strategy", "dim", "expected"),
    [
        ("zero3", 0, "rows are not whole on any rank (the strategy splits it into flat shards"),
        ("fsdp2", 1, "is sharded over ranks, and slices along dim 1 are not kept whole there"),
    ],
)
def test_structured_pruning_where_slices_are_cut_is_refused(
    strategy: str, dim: int, expected: str
) -> None:
    for message in run_ranks(_structured_on_shards, 2, strategy, dim, timeout=100):
        assert message.startswith("structured=True") and expected in message, message
