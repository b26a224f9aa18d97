"""Shard truth: every strategy x world size gives the unsharded model's counts, identical
on every rank, and the zeros the pruner makes are in the gathered full weights."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from dist_bregman import (
    BregmanConfig,
    SparsityController,
    comm,
    measure_sparsity,
    regularized_groups,
)
from dist_bregman.errors import NonFiniteError
from dist_bregman.export import export_sparse, folded_state_dict, gather_state_dict, load_sparse
from dist_bregman.optim import AdaBreg, LinBreg
from dist_bregman.shards.dtensor import is_dtensor, local_parts
from tests.distributed.test_ddp import CollectiveCounter
from tests.helpers.dist import run_ranks
from tests.helpers.strategies import (
    STRATEGIES,
    counts,
    effective_weights,
    expect_apart,
    matrix_model,
    steps_apart,
    wrap,
    zero_redundancy,
)

Freeze = tuple[int, str, float, int]
"""``(freeze_support_at, freeze_hold, target_sparsity, resume_at)``: 0 for no freeze;
``resume_at``: after that step's update the ranks build a new controller and load the old
one's ``state_dict``, as a resumed run would (0: never); the one-process reference never
does, so the ranks must follow the uninterrupted run."""


def _optimizer(name: str) -> Any:
    if name == "sgd":
        return lambda model: torch.optim.SGD(model.parameters(), lr=0.1)
    return lambda model: LinBreg(regularized_groups(model), lr=0.5)


def _case(rank: int, world: int, strategy: str, optimizer_name: str) -> dict[str, Any]:
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))
    module = matrix_model()
    expected = measure_sparsity(module, sync=False)  # the unsharded model, before wrapping
    wrapped = wrap(strategy, module, _optimizer(optimizer_name))
    lam = 0.02 if optimizer_name == "sgd" else 0.05
    config = BregmanConfig(
        target_sparsity=0.6,
        initial_lambda=lam,
        lambda_update_rate=0.05,
        update_frequency=2,
        magnitude_start_at=3 if optimizer_name == "linbreg_cut" else 0,
    )
    controller = SparsityController(wrapped.model, config)
    with CollectiveCounter() as counter:
        before = controller.measure()
    controller.attach(wrapped.optimizer)
    # The share attach warns with (50 proximal steps of SGD: a threshold of 0.1), summed
    # over ranks as attach sums it; LinBreg is driven, not hooked: nothing is shrunk.
    shrinking = torch.stack(controller.attachment.shrinkage_counts(50))
    share = controller.attachment.shrinkage_share(comm.all_reduce_sum(shrinking).tolist())
    generator = torch.Generator().manual_seed(0)  # the same batches on every rank
    cut = None
    for step in range(1, 7):
        x, y = (
            torch.randn(4, 13, generator=generator),
            torch.randint(0, 5, (4,), generator=generator),
        )
        wrapped.train_step(x, y)
        controller.update_if_due(step)
        if step == config.magnitude_start_at:
            cut = controller.measure()
    with torch.no_grad():  # an eval forward (FSDP2 leaves the root's group unsharded)
        wrapped.model(x.to(next(wrapped.module.parameters()).dtype))  # (zero1_bf16: bf16)
    after = controller.measure()
    local = measure_sparsity(wrapped.model, sync=False)  # what this rank holds, uncounted
    weights = wrapped.full_effective()
    gathered = counts(weights)
    penalty = controller.regularization_loss()  # a collective when sharded
    sharded = any(p.sharded for p in controller.placements)
    whole = gather_state_dict(wrapped.model) if sharded else None  # a collective
    exported: Any = None
    refused_export = None
    with tempfile.TemporaryDirectory() as folder:
        if rank == 0 or not sharded:
            export_sparse(wrapped.model, Path(folder) / "m.safetensors", state_dict=whole)
            state = load_sparse(Path(folder) / "m.safetensors")
            exported = (
                sorted(state),
                all(torch.equal(state[name], w) for name, w in weights.items()),
            )
        if sharded:  # without the whole weights: refused, not written as shards
            try:
                export_sparse(wrapped.model, Path(folder) / "shards.safetensors")
            except ValueError as error:
                refused_export = str(error)
    refused = None
    if strategy.startswith("zero3"):  # NaN in one partition; state_dict() shows none of it
        if rank == world - 1:
            view = next(v for p in controller.placements if (v := p.view()).values is not None)
            view.values[0] = math.nan  # type: ignore[index]  (a view of ds_tensor)
        try:
            controller.check_finite_state(wrapped.module.state_dict())
        except NonFiniteError as error:
            refused = str(error)
    return {
        "counted_by": [
            rank if (counting := p.counter()) is None else counting for p in controller.placements
        ],
        "refused": refused,
        "exported": exported,
        "refused_export": refused_export,
        "penalty": (
            float(penalty),
            controller.lambda_ * float(sum(w.abs().double().sum() for w in weights.values())),
        ),
        "expected": expected.per_parameter,
        "before": before,
        "cut": cut,
        "share": share,
        "after": after,
        "local": local,
        "gathered": gathered,
        "calls": dict(counter.calls),
        "lambda": controller.lambda_,
        "regularized": sorted(controller.regularized_names()),
        "agree": comm.all_gather_object((after, controller.lambda_)),
    }


def _shrink_share(model: nn.Sequential, threshold: float) -> float:
    """The share of the Linear weights (as stepped: ``weight_orig`` under a mask) within
    ``threshold`` of zero, in one process."""
    held = [
        (module.weight_orig if hasattr(module, "weight_orig") else module.weight).detach()
        for module in model
        if isinstance(module, nn.Linear)
    ]
    return sum(int(w.abs().le(threshold).sum()) for w in held) / sum(w.numel() for w in held)


# The proximal step (SGD) at 2, 3 and 4 ranks; LinBreg, which adds no layout of its own,
# at 2. LinBreg over FSDP1 flat parameters is refused by design (tested below). LinBreg from
# a magnitude cut after a dense warm-up where the cut must reach the tensors LinBreg steps:
# DTensor shards, ZeRO-3 partitions (its fp32 copies), FSDP1 views. The hybrids at 4 ranks
# (2 replicas of 2 shards): HSDP (FSDP2 on a 2 x 2 mesh) and FSDP1's HYBRID_SHARD.
CASES = (
    [("sgd", s, w) for s in STRATEGIES for w in (2, 3)]
    + [("sgd", s, 4) for s in ("ddp", "fsdp2", "fsdp1_orig", "hsdp", "fsdp1_hybrid", "zero3_hpz")]
    + [("sgd", s, 2) for s in ("fsdp2_root", "fsdp1_gradop")]  # kept gathered after forward
    + [(o, "fsdp2_bf16", 2) for o in ("sgd", "linbreg")]  # and gathered as bf16 casts
    + [(o, "fsdp2_raf", 4) for o in ("sgd", "linbreg_cut")]  # a post-forward copy
    + [("sgd", "zero1_bf16", w) for w in (2, 3)]  # DeepSpeed's BF16_Optimizer
    + [("linbreg", "zero1_bf16", 2)]
    + [(o, "zero2_through", 2) for o in ("sgd", "linbreg")]  # inside Accelerate's wrapper
    + [("linbreg", s, 2) for s in STRATEGIES if s != "fsdp1_flat"]
    + [("linbreg_cut", s, 2) for s in ("fsdp2", "zero3", "fsdp1_orig")]
    + [("linbreg_cut", s, 4) for s in ("hsdp", "fsdp1_hybrid")]  # every replica masked
    + [(o, "tp", 2) for o in ("sgd", "linbreg")]  # tensor parallelism alone
    + [(o, "fsdp2_tp", 4) for o in ("sgd", "linbreg", "linbreg_cut")]  # FSDP2 over TP
)


@pytest.mark.timeout(240)
@pytest.mark.parametrize(("optimizer_name", "strategy", "world"), CASES)
def test_counts_are_the_unsharded_truth_and_zeros_reach_the_full_weights(
    strategy: str, world: int, optimizer_name: str
) -> None:
    results = run_ranks(_case, world, strategy, optimizer_name, timeout=200)
    first = results[0]
    for result in results:
        assert result["calls"] == {"all_reduce": 1, "broadcast": 0}  # one collective
        assert result["before"].per_parameter == result["expected"]  # == unsharded model
        assert result["after"].per_parameter == result["gathered"]  # == gathered full weights
        assert result["after"] == first["after"] and result["lambda"] == first["lambda"]
        # The whole model's share (the one process's) on every rank, also where ranks hold
        # unequal ends of it (ZeRO-1/2's flat partitions: rank 0 had 96% of 52%).
        expected_share = _shrink_share(matrix_model(), 0.1) if optimizer_name == "sgd" else 0.0
        bf16 = strategy == "zero1_bf16"  # fp32 copies of bf16 weights: 1 or 2 of 463 round over
        assert result["share"] == pytest.approx(expected_share, abs=5e-3 if bf16 else 0)
        assert all(agreed == (first["after"], first["lambda"]) for agreed in result["agree"])
    if not steps_apart(strategy):  # the step itself is torch's there
        assert first["after"].nonzero < first["before"].nonzero  # new exact zeros that stuck
    # sync=False: each rank's own elements, its copy of a replicated shard included (the
    # second replica of an HSDP shard had reported none of it).
    held = [result["local"].total for result in results]
    if strategy in ("hsdp", "fsdp1_hybrid"):
        assert held[2:] == held[:2] and sum(held[:2]) == first["after"].total
    elif strategy == "ddp":
        assert held == [first["after"].total] * world
    for rank, result in enumerate(results):
        # Hybrids: a shard counted at its first replica. FSDP2 over TP: layer 0, outside the
        # TP plan, has a copy per TP rank of the mesh [[0, 1], [2, 3]], counted at TP rank 0.
        if strategy in ("hsdp", "fsdp1_hybrid"):
            expected = [rank % 2] * 3
        elif strategy == "fsdp2_tp":
            expected = [rank - rank % 2, rank, rank]
        else:
            expected = [rank] * 3
        assert result["counted_by"] == expected
    if optimizer_name == "linbreg_cut":  # exactly the target's zeros, then LinBreg from them
        cut = first["cut"]
        assert all(result["cut"] == cut for result in results)
        assert cut.total - cut.nonzero == round(0.6 * cut.total)
        assert first["after"].sparsity > 0.5  # regrowth only: the dense weights stayed gone
    # Rank 0's export of the model as wrapped for training: the plain model's keys and the
    # weights as trained, sharded or not (sharded: from gather_state_dict's whole weights).
    assert first["exported"] == (sorted(folded_state_dict(matrix_model())), True)
    if strategy.startswith(("fsdp", "hsdp", "zero3", "tp")):  # without them, refused
        assert "are measured but not whole tensors" in first["refused_export"]
    if strategy.startswith("zero3"):  # every rank refuses the checkpoint, naming the rank
        assert {r["refused"] for r in results} == {
            f"refusing to save a checkpoint: NaN/Inf in the model state on rank(s) [{world - 1}]"
        }
    for result in results:  # lambda * J(theta), true even where ZeRO-3 parameters are empty
        assert result["penalty"][0] == pytest.approx(result["penalty"][1], rel=1e-5)
    assert first["regularized"] == ["0.weight", "2.weight", "4.weight"]


def _sharded_state_check(rank: int, world: int) -> str | None:
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardedStateDictConfig, StateDictType

    wrapped = wrap("fsdp1_orig", matrix_model(), _optimizer("sgd"))
    controller = SparsityController(wrapped.model)
    sharded = ShardedStateDictConfig(offload_to_cpu=True)  # as Lightning's "sharded" saves
    with FSDP.state_dict_type(wrapped.model, StateDictType.SHARDED_STATE_DICT, sharded):
        state = wrapped.model.state_dict()
    controller.check_finite_state(state)  # clean: passes
    if rank == world - 1:
        part = next(p for t in state.values() for p in local_parts(t) if p.numel())
        part.view(-1)[0] = math.nan
    try:
        controller.check_finite_state(state)
    except NonFiniteError as error:
        return str(error)
    return None


@pytest.mark.timeout(240)
def test_an_fsdp1_sharded_state_dict_is_checked_shard_by_shard() -> None:
    """FSDP1's sharded state dict holds ShardedTensors, whose torch ops raise: the check
    reads their local shards (it crashed the checkpoint before)."""
    results = run_ranks(_sharded_state_check, 2, timeout=200)
    refusal = "refusing to save a checkpoint: NaN/Inf in the model state on rank(s) [1]"
    assert results == [refusal, refusal]


def _linbreg_flat(rank: int, world: int, grouping: str) -> str:
    module = matrix_model()
    wrapped = wrap(
        "fsdp1_flat" if grouping != "default_orig" else "fsdp1_orig",
        module,
        lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
    )
    controller = SparsityController(wrapped.model, BregmanConfig(target_sparsity=0.3))
    try:
        if grouping == "helper":
            regularized_groups(wrapped.model)
        else:
            controller.attach(LinBreg(wrapped.model.parameters(), lr=0.1))
    except ValueError as error:
        return str(error)
    return "no error"


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("grouping", "message"),
    [
        ("default", "over FSDP1 flat parameters (use_orig_params=False)"),
        ("helper", "lives in an FSDP1 flat parameter (use_orig_params=False)"),
        ("default_orig", "FSDP1 hands it 1-D views"),
    ],
)
def test_linbreg_over_fsdp1_flat_parameters_is_refused(grouping: str, message: str) -> None:
    for error in run_ranks(_linbreg_flat, 2, grouping, timeout=90):
        assert message in error


def _optimizer_before_sharding(rank: int, world: int) -> str:
    module = matrix_model()
    early = torch.optim.SGD(module.parameters(), lr=0.1)  # before fully_shard replaces them
    wrapped = wrap("fsdp2", module, lambda m: torch.optim.SGD(m.parameters(), lr=0.1))
    controller = SparsityController(wrapped.model, BregmanConfig(target_sparsity=0.3))
    controller.attach(wrapped.optimizer)  # built after: accepted
    try:
        controller.attach(early)
    except ValueError as error:
        return str(error)
    return "no error"


@pytest.mark.timeout(120)
def test_an_optimizer_built_before_fsdp2_sharded_the_model_is_refused_with_the_cause() -> None:
    """Its tensors are not the model's any more: its steps would never reach the weights
    (a Fabric loop that passed one to setup() with a ModelParallelStrategy did this)."""
    for error in run_ranks(_optimizer_before_sharding, 2, timeout=90):
        assert "are trainable but no optimizer holds them" in error
        assert "an optimizer built before it holds tensors the model no longer has" in error


def _trajectory(
    rank: int, world: int, strategy: str, batches: list, freeze: Freeze, make: Any
) -> dict[str, Any]:
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))
    wrapped = wrap(strategy, matrix_model(), make)
    index, count = wrapped.data_share or (rank, world)
    return _run_trajectory(
        wrapped.model, wrapped.optimizer, wrapped.train_step, batches, index, count, freeze
    ) | {"weights": wrapped.full_effective()}


def _one_process(batches: list, freeze: Freeze, make: Any) -> tuple[dict[str, Any], Any]:
    """The trajectory and final weights of the same training in one process."""
    single = matrix_model()
    optimizer = make(single)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        torch.nn.functional.cross_entropy(single(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()

    reference = _run_trajectory(single, optimizer, step, batches, 0, 1, (*freeze[:3], 0))
    return reference, effective_weights(single)


def _batches(count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        (torch.randn(8, 13, generator=generator), torch.randint(0, 5, (8,), generator=generator))
        for _ in range(count)
    ]


def _assert_ranks_follow(
    strategy: str, batches: list, freeze: Freeze, make: Any, timeout: int, world: int = 2
) -> dict[str, Any]:
    """``world`` ranks under ``strategy`` give the one-process counts and lambdas exactly,
    and its weights and loss term; returns the one-process trajectory."""
    reference, weights = _one_process(batches, freeze, make)
    for result in run_ranks(_trajectory, world, strategy, batches, freeze, make, timeout=timeout):
        assert result["points"] == reference["points"]  # counts and lambda, exactly
        assert result["penalty"] == pytest.approx(reference["penalty"], rel=1e-5)
        for name, weight in weights.items():
            torch.testing.assert_close(result["weights"][name], weight, rtol=1e-5, atol=1e-6)
    return reference


def _run_trajectory(
    model: Any,
    optimizer: Any,
    train_step: Any,
    batches: list,
    part: int,
    parts: int,
    freeze: Freeze,
) -> dict[str, Any]:
    """Train on ``batches``, this rank on part ``part`` of ``parts`` of each; return the
    counts and lambda at every update."""
    config = BregmanConfig(
        target_sparsity=freeze[2],
        initial_lambda=0.02,
        lambda_update_rate=0.05,
        update_frequency=2,
        freeze_support_at=freeze[0],
        freeze_hold=freeze[1],
    )
    controller = SparsityController(model, config)
    controller.attach(optimizer)
    points = []
    for step, (x, y) in enumerate(batches, start=1):
        share = slice(part * len(x) // parts, (part + 1) * len(x) // parts)
        train_step(x[share], y[share])
        if controller.update_if_due(step) is not None:
            points.append((step, controller.last_report.nonzero, controller.lambda_))
        if step == freeze[3]:
            state = controller.state_dict()
            controller.detach()
            controller = SparsityController(model, config)
            controller.attach(optimizer)
            controller.load_state_dict(state)
    total = controller.last_report.total
    penalty = controller.regularization_loss().item()  # a collective when sharded
    return {
        "points": points,
        "found": controller.found_sparsity,
        "total": total,
        "penalty": penalty,
    }


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    "freeze",
    [
        (0, "target", 0.6, 0),
        (5, "target", 0.6, 0),
        (5, "found", 0.6, 0),
        (5, "target", 0.3, 6),
    ],
    ids=[
        "shrinking",
        "support_frozen_at_5",
        "found_support_frozen_at_5",
        "overshot_at_5_resumed_at_6",
    ],
)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_two_ranks_follow_the_one_process_trajectory(
    strategy: str, freeze: Freeze, request: pytest.FixtureRequest
) -> None:
    expect_apart(request, strategy)
    reference = _assert_ranks_follow(strategy, _batches(8), freeze, _optimizer("sgd"), 200)
    points = reference["points"]
    counts_moved = {nonzero for _, nonzero, _ in points[: 2 if freeze[0] else 4]}
    assert len(points) == 4 and len(counts_moved) == len(points[: 2 if freeze[0] else 4])
    total = reference["total"]
    if freeze[:2] == (5, "target"):
        assert points[3][1] == total - round(freeze[2] * total)  # at the target from step 8
        assert points[2][2] == points[3][2]  # and lambda stays
    if freeze[:3] == (5, "target", 0.6):  # shrinkage had found less than the target: topped up
        assert reference["found"] < 0.6 and points[2][1:] == points[3][1:]
    if freeze[:3] == (5, "target", 0.3):  # shrinkage had overshot: zeros freed at step 5
        # that got no gradient (a masked or dead unit's) were still zero at step 6: held
        # then, and live held zeros freed instead (the same ones on every rank, as in one
        # process); the ranks resumed right after that swap, and still followed
        assert reference["found"] > 0.3 and points[2][1] < points[3][1]
    if freeze[:3] == (5, "found", 0.6):  # exactly the zeros shrinkage had made, none added
        assert 0 < reference["found"] < 0.6 and points[2][1:] == points[3][1:]
        assert points[2][1] == round((1 - reference["found"]) * total)


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    "freeze",
    [(0, "target", 0.6, 0), (5, "target", 0.6, 0), (5, "found", 0.6, 0), (5, "target", 0.3, 6)],
    ids=["shrinking", "frozen", "found", "overshot"],
)
@pytest.mark.parametrize(("strategy", "world"), [("tp", 2), ("fsdp2_tp", 4)])
def test_tensor_parallel_ranks_follow_the_one_process_trajectory(
    strategy: str, world: int, freeze: Freeze, request: pytest.FixtureRequest
) -> None:
    """Column- and row-wise sharded layers (``Shard(0)``, ``Shard(1)``), alone and under
    FSDP2 on a 2 x 2 mesh where layer 0, outside the TP plan, has a copy on each TP rank
    (counted on both before: a refused total of 442 for its 221 elements).

    Overshot, the freeze frees surplus zeros by their place in the tie order, which is the
    shards' order (see ``MagnitudePruner.hold_zeros``): under ``Shard(1)`` and FSDP2 over
    TP not the flattened order one process uses, so other zeros may go free than there.
    What must hold is checked: every rank the same, the one process's run up to the
    freeze, the target's zeros held after it and lambda still."""
    expect_apart(request, strategy)
    batches, make = _batches(8), _optimizer("sgd")
    if freeze[2] != 0.3:
        _assert_ranks_follow(strategy, batches, freeze, make, 200, world=world)
        return
    reference, _ = _one_process(batches, freeze, make)
    results = run_ranks(_trajectory, world, strategy, batches, freeze, make, timeout=200)
    points, total = results[0]["points"], results[0]["total"]
    assert all(result["points"] == points for result in results)
    assert points[:2] == reference["points"][:2]
    held = round(0.3 * total)  # at least these zeros from the freeze on, lambda still
    assert all(nonzero <= total - held for _, nonzero, _ in points[2:])
    assert points[2][2] == points[3][2] == reference["points"][3][2]


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("name", "freeze"),
    [
        ("linbreg", (0, "target", 0.6, 0)),
        ("linbreg", (5, "target", 0.6, 6)),
        ("adabreg", (0, "target", 0.6, 0)),
    ],
    ids=["linbreg", "linbreg_frozen_resumed", "adabreg"],
)
def test_bregman_optimizers_under_torchs_zero_redundancy_follow_one_process(
    name: str, freeze: Freeze
) -> None:
    """``ZeroRedundancyOptimizer`` steps each rank's share in a local optimizer and copies
    its own param groups over the local ones before every step: the Bregman optimizer in
    there is driven (lambda written to both), where before it was taken for a plain
    optimizer and got a proximal step on top of its own at a lambda nothing updated
    (lambda then wound up to 3.4 where one process held 0.22)."""
    kind = LinBreg if name == "linbreg" else AdaBreg
    lr = 0.5 if name == "linbreg" else 0.02

    def make(model: nn.Module) -> torch.optim.Optimizer:
        return kind(regularized_groups(model), lr=lr)

    reference = _assert_ranks_follow("ddp_zero", _batches(8), freeze, make, 100)
    assert len({nonzero for _, nonzero, _ in reference["points"]}) > 1  # zeros were made


@pytest.mark.timeout(120)
@pytest.mark.parametrize("strategy", ["zero1_rr", "zero2_rr", "zero3_sg"])
def test_zero_flat_partitions_in_deepspeeds_own_order_follow_one_process(strategy: str) -> None:
    """``round_robin_gradients`` flattens each group's parameters in round-robin order over
    the ranks (at 2 ranks: 0.bias, 2.weight, 4.weight, 0.weight_orig, ...), and ZeRO-3's
    ``sub_group_size`` cuts a group into several flat partitions: the proximal step and the
    held zeros find each weight by DeepSpeed's own layout (SGD: weights and biases share
    the group, so it decides which elements shrink; read in the model's order, the
    round-robin runs left the one-process trajectory)."""
    freeze = (5, "target", 0.6, 0)
    reference = _assert_ranks_follow(strategy, _batches(8), freeze, _optimizer("sgd"), 100)
    assert len({nonzero for _, nonzero, _ in reference["points"]}) > 1  # zeros were made


def _attach_then_resume(rank: int, world: int, folder: str, strategy: str, name: str) -> Any:
    """A raw loop's resume: build, attach the controller, then load the checkpoint (torch's
    ZeroRedundancyOptimizer consolidated to rank 0, as Lightning saves it); returns how far
    the weights and lambda are from the uninterrupted run's."""
    kind, lr = (LinBreg, 0.5) if name == "linbreg" else (AdaBreg, 0.02)
    config = BregmanConfig(
        target_sparsity=0.6, initial_lambda=0.05, lambda_update_rate=0.05, update_frequency=2
    )

    def build() -> tuple[Any, SparsityController]:
        run = wrap(strategy, matrix_model(), lambda m: kind(regularized_groups(m), lr=lr))
        controller = SparsityController(run.model, config)
        controller.attach(run.optimizer)
        return run, controller

    def train(run: Any, controller: SparsityController, steps: range) -> None:
        for step in steps:
            x = torch.randn(4, 13, generator=torch.Generator().manual_seed(1000 * step + rank))
            run.train_step(x, x[:, :5].argmax(dim=1))
            controller.update_if_due(step + 1)

    (whole, whole_controller), (first, controller) = build(), build()
    train(whole, whole_controller, range(10))
    train(first, controller, range(5))
    if strategy == "ddp_zero":
        first.optimizer.consolidate_state_dict(to=0)
    if rank == 0:
        state = {"model": first.module.state_dict(), "optim": first.optimizer.state_dict()}
        torch.save({**state, "controller": controller.state_dict()}, f"{folder}/ckpt.pt")
    torch.distributed.barrier()
    resumed, controller = build()
    state = torch.load(f"{folder}/ckpt.pt", weights_only=True)
    resumed.module.load_state_dict(state["model"])
    resumed.optimizer.load_state_dict(state["optim"])
    controller.load_state_dict(state["controller"])
    train(resumed, controller, range(5, 10))
    expected, got = whole.full_effective(), resumed.full_effective()
    apart = max(float((expected[k] - got[k]).abs().max()) for k in expected)
    return apart, controller.lambda_ - whole_controller.lambda_


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("strategy", "name"),
    [("ddp", "linbreg"), ("ddp_zero", "linbreg"), ("ddp_zero", "adabreg")],
)
def test_a_checkpoint_loaded_after_attach_resumes_the_uninterrupted_run(
    strategy: str, name: str, tmp_path: Path
) -> None:
    """Loading a state dict replaces the optimizer's param groups. ZeroRedundancyOptimizer
    copies its own groups over the local optimizer's before each step, and the lambda the
    controller drove had gone into the groups it held at attach: after the load the local
    LinBreg/AdaBreg stepped at the checkpoint's lambda (5 steps on: weights 4.9e-2 and
    3.2e-2 apart, lambda 2e-3 off). The wrapper's groups are now read at each write."""
    for apart, lambda_apart in run_ranks(
        _attach_then_resume, 2, str(tmp_path), strategy, name, timeout=100
    ):
        assert apart == 0.0 and lambda_apart == 0.0, (apart, lambda_apart)


def _overlapped_zero(rank: int, world: int) -> str:
    model = nn.parallel.DistributedDataParallel(matrix_model())
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer = zero_redundancy(sgd, overlap_with_ddp=True)
    controller = SparsityController(model, BregmanConfig(target_sparsity=0.3))
    with pytest.raises(ValueError, match=r"overlap_with_ddp=True") as caught:
        controller.attach(optimizer)
    return str(caught.value)


@pytest.mark.timeout(120)
def test_zero_redundancy_stepping_inside_ddps_hook_is_refused() -> None:
    """With ``overlap_with_ddp=True`` the local step runs inside DDP's communication hook,
    a functional optimizer without step hooks: no proximal step could follow it."""
    for message in run_ranks(_overlapped_zero, 2, timeout=90):
        assert "allowed: overlap_with_ddp=False" in message


def _post_local_sgd(rank: int, world: int) -> list[str]:
    from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
    from torch.distributed.optim import PostLocalSGDOptimizer

    from dist_bregman import MagnitudePruner

    model = nn.parallel.DistributedDataParallel(matrix_model())
    local = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer = PostLocalSGDOptimizer(local, PeriodicModelAverager(period=4, warmup_steps=0))
    messages = []
    for user in (SparsityController(model), MagnitudePruner(model)):
        with pytest.raises(ValueError) as caught:
            user.attach(optimizer)
        messages.append(str(caught.value))
    return messages


@pytest.mark.timeout(120)
def test_post_local_sgd_is_refused() -> None:
    """torch's ``PostLocalSGDOptimizer`` lets the replicas train apart between averagings:
    no one model to measure or hold at a target. It failed with an AttributeError from
    torch's internals (it has no step hooks)."""
    for messages in run_ranks(_post_local_sgd, 2, timeout=90):
        for message in messages:
            assert message.startswith("PostLocalSGDOptimizer (post-local SGD): every rank")
            assert "allowed: DDP without model averaging" in message


def _loss_mode_on_shards(rank: int, world: int, strategy: str) -> str:
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))
    wrapped = wrap(strategy, matrix_model(), lambda m: torch.optim.SGD(m.parameters(), lr=0.1))
    try:
        SparsityController(wrapped.model, BregmanConfig(mode="loss"))
    except ValueError as error:
        return str(error)
    return "accepted"


def _zero3_gather(rank: int, world: int) -> tuple[int, list[int]]:
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))
    import deepspeed

    wrapped = wrap("zero3", matrix_model(), _optimizer("sgd"))
    sizes: list[int] = []
    original = deepspeed.zero.GatheredParameters

    def recording(params: Any, *args: Any, **kwargs: Any) -> Any:
        sizes.append(sum(int(p.ds_numel) for p in params))
        return original(params, *args, **kwargs)

    deepspeed.zero.GatheredParameters = recording
    try:
        state = gather_state_dict(wrapped.model)
    finally:
        deepspeed.zero.GatheredParameters = original
    return (-1 if state is None else len(state)), sizes


@pytest.mark.timeout(120)
def test_zero3_export_gathers_one_module_at_a_time() -> None:
    """The whole weights of a ZeRO-3 model for the export: rank 0 gets every tensor, and no
    gather holds more than one layer's parameters (all at once would not fit the job that
    needed ZeRO-3)."""
    (count, sizes), (other, _) = run_ranks(_zero3_gather, 2, timeout=100)
    assert count == len(matrix_model().state_dict()) and other == -1
    assert max(sizes) == 13 * 17 + 17  # the largest layer, weight and bias
    assert sum(sizes) == sum(p.numel() for p in matrix_model().parameters())


def _steps_with_the_loss_term(rank: int, world: int, add_term: bool) -> Any:
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))
    make = _optimizer("sgd")
    wrapped = wrap("fsdp2_root", matrix_model(), make)
    controller = SparsityController(wrapped.model, BregmanConfig(initial_lambda=0.01))
    controller.attach(wrapped.optimizer)
    generator = torch.Generator().manual_seed(0)
    terms, gathered = [], []
    for _ in range(3):
        x, y = (
            torch.randn(4, 13, generator=generator),
            torch.randint(0, 5, (4,), generator=generator),
        )
        loss = torch.nn.functional.cross_entropy(wrapped.model(x), y)
        if add_term:  # between forward and backward, where the root's group is gathered
            term = controller.regularization_loss()
            terms.append(float(term.detach()))
            loss = loss + term
            # ...and stays gathered: the term read the shards, backward gathers nothing again
            gathered.append(not is_dtensor(wrapped.module[4].weight))
        loss.backward()
        wrapped.optimizer.step()
        wrapped.optimizer.zero_grad()
    return wrapped.full_effective(), terms, gathered


@pytest.mark.timeout(120)
def test_the_seed_loss_term_inside_a_step_with_weights_in_fsdp2_root_group() -> None:
    """The seed's ``loss + get_regularization_loss()`` in training_step, under FSDP2 with
    the output layer in the root's group (gathered from forward to backward): it raised
    AttributeError; now it reports a value and leaves the steps exactly as without it."""
    plain = run_ranks(_steps_with_the_loss_term, 2, False, timeout=100)
    with_term = run_ranks(_steps_with_the_loss_term, 2, True, timeout=100)
    for (weights, _, _), (weights_term, terms, gathered) in zip(plain, with_term, strict=True):
        assert all(torch.equal(weights[name], weights_term[name]) for name in weights)
        assert len(terms) == 3 and all(t > 0 for t in terms) and gathered == [True] * 3
    assert with_term[0][1] == with_term[1][1]  # the same value on both ranks


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("strategy", "accepted"), [("fsdp2", False), ("zero3", False), ("zero2", True)]
)
def test_loss_mode_needs_whole_tensors(strategy: str, accepted: bool) -> None:
    for message in run_ranks(_loss_mode_on_shards, 2, strategy, timeout=100):
        if accepted:
            assert message == "accepted"
        else:
            assert "mode='loss' needs every measured tensor whole on each rank" in message


def _group_case(rank: int, world: int, strategy: str) -> dict[str, Any]:
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))
    wrapped = wrap(strategy, matrix_model(), lambda m: torch.optim.SGD(m.parameters(), lr=0.1))
    config = BregmanConfig(
        target_sparsity=0.6,
        initial_lambda=0.3,
        lambda_update_rate=0.05,
        update_frequency=2,
        regularizer="group_l1",
    )
    controller = SparsityController(wrapped.model, config)
    controller.attach(wrapped.optimizer)
    generator = torch.Generator().manual_seed(0)
    for step in range(1, 7):
        x = torch.randn(4, 13, generator=generator)
        wrapped.train_step(x, torch.randint(0, 5, (4,), generator=generator))
        controller.update_if_due(step)
    after = controller.measure()  # rows counted in the same buffer (group regularizer)
    weights = wrapped.full_effective()
    dead = sum(int((w.reshape(w.shape[0], -1) == 0).all(dim=1).sum()) for w in weights.values())
    return {
        "after": after,
        "gathered": counts(weights),
        "dead_rows": dead,
        "agree": comm.all_gather_object(after),
    }


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("strategy", "world"), [("ddp", 2), ("fsdp2", 2), ("fsdp2", 4)])
def test_group_sparsity_rows_are_counted_and_shrunk_whole_under_row_layouts(
    strategy: str, world: int
) -> None:
    """Group L1 (rows) under the layouts that keep rows whole. At 4 ranks FSDP2 leaves the
    5-row layer with no rows on the last rank: its empty shard is measured and shrunk too."""
    results = run_ranks(_group_case, world, strategy, timeout=100)
    first = results[0]
    for result in results:
        assert result["after"] == first["after"]
        assert all(agreed == first["after"] for agreed in result["agree"])
        assert result["after"].per_parameter == result["gathered"]
        assert result["after"].zero_rows == result["dead_rows"]
    assert first["after"].rows == 17 + 11 + 5
    assert first["dead_rows"] > 4  # layer 2's four zero rows, and rows the prox removed


def _group_refused(rank: int, world: int, strategy: str) -> str:
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))
    wrapped = wrap(strategy, matrix_model(), lambda m: torch.optim.SGD(m.parameters(), lr=0.1))
    controller = SparsityController(wrapped.model, BregmanConfig(regularizer="group_l1"))
    with pytest.raises(ValueError, match="group_l1 needs whole rows on one rank") as caught:
        controller.attach(wrapped.optimizer)
    return str(caught.value)


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("strategy", "cause"),
    [
        ("fsdp1_orig", "the strategy splits it into flat shards (FSDP1 / ZeRO)"),
        ("zero3", "the strategy splits it into flat shards (FSDP1 / ZeRO)"),
        ("tp", "its DTensor placements (Shard(dim=1),) shard it along a dimension other than 0"),
    ],
)
def test_group_sparsity_where_rows_are_cut_is_refused_naming_the_cut(
    strategy: str, cause: str
) -> None:
    """Under tensor parallelism the message had blamed flat shards (FSDP1 / ZeRO)."""
    for message in run_ranks(_group_refused, 2, strategy, timeout=100):
        assert cause in message, message


def _attention_and_rnn(rank: int, world: int) -> list[bool]:
    """FSDP1 flat parameters and FSDP2 DTensor shards of a Transformer layer (packed
    attention input projection) and an LSTM: the counts are the unsharded model's."""
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    def model() -> nn.Sequential:
        torch.manual_seed(0)
        layers = nn.Sequential(
            nn.TransformerEncoderLayer(12, 3, 20, batch_first=True), nn.LSTM(12, 7)
        )
        with torch.no_grad():
            layers[0].self_attn.in_proj_weight[::5] = 0.0
            layers[0].linear1.weight[:, 3] = 0.0
            layers[1].weight_hh_l0[2] = 0.0
        return layers

    expected = measure_sparsity(model(), sync=False).per_parameter
    assert "0.self_attn.in_proj_weight" in expected and "1.weight_hh_l0" in expected
    flat = FullyShardedDataParallel(
        model(),
        device_id=torch.device("cpu"),
        use_orig_params=False,
        auto_wrap_policy=ModuleWrapPolicy({nn.TransformerEncoderLayer}),
    )
    dtensors = model()
    fully_shard(dtensors[0])
    fully_shard(dtensors)
    return [measure_sparsity(m).per_parameter == expected for m in (flat, dtensors)]


@pytest.mark.timeout(120)
def test_attention_and_rnn_weights_sum_their_shards_to_the_unsharded_counts() -> None:
    assert run_ranks(_attention_and_rnn, 3, timeout=100) == [[True, True]] * 3


def _tiny_zero3(rank: int, world: int) -> tuple[bool, int]:
    """A ZeRO-3 weight of 5 elements at 4 ranks: ``ceil(5 / 4) = 2`` per partition, so the
    last rank's partition starts at element 6, past the end, and holds padding only."""
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 1))
    with torch.no_grad():
        module[2].weight[0, 1] = 0.0
    expected = measure_sparsity(module, sync=False).per_parameter
    wrapped = wrap("zero3", module, _optimizer("sgd"))
    wrapped.train_step(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))
    if rank == world - 1:  # padding only: NaN there must never be read
        with torch.no_grad():
            module[2].weight.ds_tensor.fill_(float("nan"))  # type: ignore[attr-defined]
    report = measure_sparsity(wrapped.model)
    totals = {name: total for name, (_, total) in report.per_parameter.items()}
    return totals == {name: total for name, (_, total) in expected.items()}, report.nonfinite


@pytest.mark.timeout(120)
def test_a_zero3_partition_past_the_end_of_a_small_weight_counts_nothing() -> None:
    assert run_ranks(_tiny_zero3, 4, timeout=100) == [(True, 0)] * 4


def _two_lrs(model: nn.Module) -> torch.optim.SGD:
    """Biases first at one lr, the weights second at another: the proximal threshold is
    each group's lr times lambda, so a weight mapped to the wrong group shrinks wrongly."""
    named = list(model.named_parameters())
    biases = [p for name, p in named if name.endswith("bias")]
    weights = [p for name, p in named if not name.endswith("bias")]
    return torch.optim.SGD([{"params": biases, "lr": 0.3}, {"params": weights, "lr": 0.1}])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("strategy", ["zero2", "zero3"])
def test_deepspeed_partitions_take_the_proximal_step_at_their_own_groups_lr(strategy: str) -> None:
    """DeepSpeed steps flat partitions per param group (ZeRO-3: per sub-group): the
    proximal step must find each measured weight's group, here the second one."""
    _assert_ranks_follow(strategy, _batches(6), (0, "target", 0.6, 0), _two_lrs, 100)


def _scaled_layers(optimizer: str) -> Any:
    """Each Linear's weight in its own param group, at lambda_scale 0.25, 1 and 3: a
    weight read in the wrong group, or a scale lost in a wrapper, shrinks wrongly."""
    scales = {"0": 0.25, "4": 3.0}

    def make(model: nn.Module) -> torch.optim.Optimizer:
        groups: dict[str, list[nn.Parameter]] = {}
        for name, p in model.named_parameters():
            layer = next(part for part in name.split(".") if part.isdigit())
            groups.setdefault("bias" if name.endswith("bias") else layer, []).append(p)
        listed = [
            {"params": params, "lambda_scale": scales.get(key, 1.0)}
            | ({"reg": None} if key == "bias" else {})
            for key, params in groups.items()
        ]
        if optimizer == "sgd":
            return torch.optim.SGD(listed, lr=0.1)
        return LinBreg([g | {"reg": g.get("reg", "l1")} for g in listed], lr=0.5)

    return make


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("optimizer", "strategy"),
    [("sgd", s) for s in ("ddp", "ddp_zero", "fsdp1_orig", "fsdp2", "zero2", "zero3")]
    + [("linbreg", "ddp_zero"), ("linbreg", "fsdp2"), ("linbreg", "zero3")],
)
def test_each_layers_lambda_scale_reaches_its_elements_under_ddp_fsdp_and_zero(
    optimizer: str, strategy: str, request: pytest.FixtureRequest
) -> None:
    """A param group's lambda_scale reaches the proximal step (or the driven LinBreg) on
    each rank's elements, and the loss term: two ranks follow one process, whose run
    differs from the unscaled one. (FSDP1 flat parameters hold every layer in one group;
    ZeRO-1 shares ZeRO-2's layout.)"""
    expect_apart(request, strategy)
    make = _scaled_layers(optimizer)
    freeze = (0, "target", 0.6, 0)
    reference = _assert_ranks_follow(strategy, _batches(6), freeze, make, 100)
    unscaled = _one_process(_batches(6), freeze, _optimizer(optimizer))[0]
    assert reference["points"] != unscaled["points"]


def _weight_and_mask() -> tuple[torch.Tensor, torch.Tensor]:
    """A 12 x 5 weight and a prune mask with whole rows pruned (rows of different ranks)."""
    generator = torch.Generator().manual_seed(0)
    full = torch.randn(12, 5, generator=generator)
    mask = (torch.rand(12, 5, generator=generator) < 0.6).float()
    mask[[2, 3, 9]] = 0
    return full, mask


def _strided_masks(rank: int, world: int, mesh_shape: tuple[int, ...]) -> tuple[Any, ...]:
    """A pruned weight (plain full mask, as FSDP2 leaves buffers) whose values are
    ``_StridedShard`` DTensors: on one mesh dimension each rank holds every other pair of
    rows; on two (FSDP2 over tensor parallelism) each rank's rows are one box of the TP
    shard."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor.placement_types import _StridedShard
    from torch.nn.utils import prune

    from dist_bregman.shards import locate
    from dist_bregman.sparsity import reduce_counts

    mesh = init_device_mesh("cpu", mesh_shape)
    placements: list[Any] = [_StridedShard(0, split_factor=2)]
    if len(mesh_shape) == 2:  # FSDP2 (outer) over TP (inner), as fully_shard lays it out
        placements.append(Shard(0))
    full, mask = _weight_and_mask()
    module = nn.Linear(5, 12, bias=False)
    del module.weight
    module.register_parameter("weight", nn.Parameter(distribute_tensor(full, mesh, placements)))
    prune.identity(module, "weight")  # weight_orig stays the DTensor; the mask a DTensor too
    module.weight_mask = mask  # the plain full buffer
    model = nn.Sequential(module)
    report, _ = reduce_counts(locate(model), structure=True)
    return report.nonzero, report.total, report.zero_rows, report.rows


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mesh_shape", [(2,), (2, 2)], ids=["strided", "fsdp2_over_tp"])
def test_a_full_mask_over_strided_shards_counts_the_rows_each_rank_holds(
    mesh_shape: tuple[int, ...],
) -> None:
    """The mask's part was the box at the first local offset, which a _StridedShard's rows
    need not be: on one mesh dimension 30 nonzeros were counted of 32 here (the FSDP2 over
    TP layout was right, and stays so)."""
    full, mask = _weight_and_mask()
    effective = full * mask
    truth = (int((effective != 0).sum()), 60, int((effective == 0).all(dim=1).sum()), 12)
    results = run_ranks(_strided_masks, math.prod(mesh_shape), mesh_shape, timeout=100)
    assert results == [truth] * len(results)


def _digits_model_parallel(rank: int, world: int) -> dict[str, Any]:
    """The digits MLP's configure_model under a (data 2, tensor 2) mesh, as Lightning's
    ModelParallelStrategy gives it."""
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))
    from torch.distributed.device_mesh import init_device_mesh

    from dist_bregman.models import DigitsMLP

    names = ("data_parallel", "tensor_parallel")
    model = DigitsMLP(hidden=(6, 5))  # 5 features on 2 ranks: uneven row-wise input
    model._device_mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=names)
    model.configure_model()
    placements = {
        name: [type(p).__name__ + str(getattr(p, "dim", "")) for p in param.placements]
        for name, param in model.named_parameters()
        if name.endswith("weight")
    }
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    return {
        "placements": placements,
        "counts": measure_sparsity(model).per_parameter,
        "logits": model(x).detach(),
    }


@pytest.mark.timeout(120)
def test_the_digits_model_splits_its_hidden_layers_over_the_tensor_parallel_mesh() -> None:
    """Column-wise, then row-wise (configs/digits_fsdp2_tp.yaml), FSDP2 over both and over
    the output layer, which has a copy per tensor-parallel rank: the counts and the
    forward are the unsharded model's."""
    from dist_bregman.models import DigitsMLP

    single = DigitsMLP(hidden=(6, 5))
    expected = measure_sparsity(single, sync=False).per_parameter
    logits = single(torch.randn(4, 64, generator=torch.Generator().manual_seed(0))).detach()
    for result in run_ranks(_digits_model_parallel, 4, timeout=100):
        assert result["placements"] == {
            "net.0.weight": ["_StridedShard0", "Shard0"],  # FSDP2 over column-wise rows
            "net.2.weight": ["Shard0", "Shard1"],  # row-wise: the input features split
            "net.4.weight": ["Shard0"],  # the data-parallel mesh only
        }
        assert result["counts"] == expected
        torch.testing.assert_close(result["logits"], logits)
