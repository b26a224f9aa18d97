"""Bad numbers and disagreement on ONE rank are seen by every rank; a rank that leaves
early ends the job with an error, not a hang."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from dist_bregman import BregmanConfig, MagnitudePruner, SparsityController, comm, measure_sparsity
from dist_bregman.errors import NonFiniteError, RankDisagreementError
from dist_bregman.init import magnitude_init_
from dist_bregman.sparsity import check_same_tensors
from tests.helpers.dist import deepspeed_shm_files, run_ranks
from tests.helpers.strategies import (
    PassThrough,
    counts,
    effective_weights,
    matrix_model,
    wrap,
    zero_redundancy,
)

TIMEOUT = 60.0


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.Linear(16, 4))


def _controller(model: nn.Module, **settings: Any) -> SparsityController:
    config = BregmanConfig(initial_lambda=0.01, lambda_update_rate=0.5, update_frequency=1)
    for key, value in settings.items():
        object.__setattr__(config, key, value)
    return SparsityController(model, config)


def _nan_loss_on_rank_1(rank: int, world: int) -> dict[str, Any]:
    controller = _controller(_model())
    controller.observe_loss(torch.tensor(float("nan") if rank == 1 else 0.5))
    decision = controller.update(1)
    after = controller.update(2)  # the flag is cleared: the next update is a normal one
    return {
        "skipped": decision.skipped,
        "reason": decision.reason,
        "next": after.skipped,
        "lambda": controller.lambda_,
    }


@pytest.mark.timeout(TIMEOUT + 30)
def test_a_nan_loss_on_one_rank_skips_the_update_on_every_rank() -> None:
    results = run_ranks(_nan_loss_on_rank_1, 2, timeout=TIMEOUT)
    for result in results:
        assert result["skipped"] and "non-finite loss on rank(s) [1]" in result["reason"]
        assert result["next"] is False
    assert results[0]["lambda"] == results[1]["lambda"]


def _nan_gradient_on_rank_1(rank: int, world: int, zero: bool) -> tuple[bool, bool, int]:
    model = _model()
    optimizer: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    if zero:  # torch's ZeroRedundancyOptimizer: the proximal step follows its local one's
        optimizer = zero_redundancy(optimizer)
    controller = _controller(model, guard_steps=True)
    controller.attach(optimizer)
    model(torch.randn(4, 8)).sum().backward()
    if rank == 1:
        model[2].weight.grad[0, 0] = float("inf")
    first = controller.gradients_finite([optimizer], step=7)
    before = [p.detach().clone() for p in model.parameters()]
    controller.drop_step([optimizer])
    optimizer.step()  # gradients are None: a no-op, and no proximal step either
    unchanged = all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    model(torch.randn(4, 8)).sum().backward()
    second = controller.gradients_finite([optimizer], step=8)
    return first, unchanged, int(second)


@pytest.mark.timeout(TIMEOUT + 30)
@pytest.mark.parametrize("zero", [False, True], ids=["sgd", "zero_redundancy"])
def test_a_bad_gradient_on_one_rank_drops_the_step_on_every_rank(
    zero: bool, caplog: pytest.LogCaptureFixture
) -> None:
    results = run_ranks(_nan_gradient_on_rank_1, 2, zero, timeout=TIMEOUT)
    assert results == [(False, True, 1), (False, True, 1)]


def _nan_weight_on_rank_1(rank: int, world: int) -> str:
    model = _model()
    controller = _controller(model)
    if rank == 1:  # a corrupt replica: every tensor, so whichever rank 1 owns is bad
        with torch.no_grad():
            for p in model.parameters():
                p[0] = float("nan")
    with pytest.raises(NonFiniteError) as caught:
        controller.update(3)
    assert controller.lambda_ == 0.01  # never decided from bad numbers
    return str(caught.value)


@pytest.mark.timeout(TIMEOUT + 30)
def test_non_finite_weights_on_one_rank_stop_every_rank_naming_it() -> None:
    messages = run_ranks(_nan_weight_on_rank_1, 2, timeout=TIMEOUT)
    assert messages[0] == messages[1]
    assert "Step 3:" in messages[0] and "rank(s) [1]" in messages[0]


def _diverged_lambda(rank: int, world: int) -> str:
    controller = _controller(_model(), check_agreement_every=2)
    controller.update(1)  # update 1: not checked
    if rank == 2:
        controller.lambda_ += 1e-9  # what a rank-local lambda rule would do
    with pytest.raises(RankDisagreementError) as caught:
        controller.update(2)
    return str(caught.value)


@pytest.mark.timeout(TIMEOUT + 30)
def test_agreement_check_names_the_rank_whose_lambda_diverged() -> None:
    messages = run_ranks(_diverged_lambda, 3, timeout=TIMEOUT)
    assert all(m.startswith("ranks [2] disagree with rank 0") for m in messages)


def _unfrozen_after_ddp(rank: int, world: int) -> list[str]:
    """Layer 3 is frozen when DDP is built, so DDP's reducer leaves it out; unfrozen later
    (a new param group, followed by the controller), its gradients are never averaged and
    each rank steps it on its own data."""
    model = _model()
    for p in model[3].parameters():
        p.requires_grad_(False)
    ddp = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    controller = _controller(ddp, check_agreement_every=1)
    controller.attach(optimizer)
    checked = []
    for step in range(1, 5):
        if step == 3:
            for p in model[3].parameters():
                p.requires_grad_(True)
            optimizer.add_param_group({"params": list(model[3].parameters())})
            controller.follow_groups()
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(10 * step + rank))
        ddp(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        try:
            controller.update(step)
            checked.append(f"step {step}: agreed")
        except RankDisagreementError as error:
            checked.append(f"step {step}: {error}")
            break
    return checked


@pytest.mark.timeout(TIMEOUT + 30)
def test_replicas_that_drift_apart_are_named_by_the_agreement_check() -> None:
    """A replica is counted on one rank, so drifted replicas would be reported as one of
    them; check_agreement_every also compares every replica's sums between ranks."""
    for checked in run_ranks(_unfrozen_after_ddp, 2, timeout=TIMEOUT):
        assert checked[:2] == ["step 1: agreed", "step 2: agreed"]  # healthy until then
        assert checked[2].startswith(
            "step 3: ranks [1] hold other values than rank 0 in replicated tensors (first: "
            "3.weight)"
        ), checked


def _shard_replica_drifts(rank: int, world: int, strategy: str) -> list[str]:
    """HSDP (2 replicas of 2 shards): rank 2 holds a copy of rank 0's shard. After a step
    that agreed, rank 2 changes its copy, as a rank-local write would."""
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))
    wrapped = wrap(strategy, matrix_model(), lambda m: torch.optim.SGD(m.parameters(), lr=0.1))
    controller = _controller(wrapped.model, check_agreement_every=1)
    controller.attach(wrapped.optimizer)
    checked = []
    for step in (1, 2):
        x = torch.randn(4, 13, generator=torch.Generator().manual_seed(step))
        wrapped.train_step(x, x[:, :5].argmax(dim=1))
        if step == 2 and rank == 2:
            view = controller.placements[1].local()  # 2.weight: rank 0's shard, copied here
            assert view.values is not None
            view.values.view(-1)[0] += 1.0
        try:
            controller.update(step)
            checked.append(f"step {step}: agreed")
        except RankDisagreementError as error:
            checked.append(f"step {step}: {error}")
    return checked


@pytest.mark.timeout(TIMEOUT * 2 + 30)
@pytest.mark.parametrize("strategy", ["hsdp", "fsdp1_hybrid"])
def test_replicas_of_a_shard_that_drift_apart_are_named_by_the_agreement_check(
    strategy: str,
) -> None:
    """check_agreement_every had compared whole replicas only (DDP's): HSDP's and
    HYBRID_SHARD's copies of a shard, of which only the first is counted, went unchecked."""
    for checked in run_ranks(_shard_replica_drifts, 4, strategy, timeout=TIMEOUT * 2):
        assert checked[0] == "step 1: agreed"
        assert checked[1].startswith(
            "step 2: ranks [2] hold other values than rank 0 in replicated tensors (first: "
            "2.weight)"
        ), checked


STAGES = ("same_shapes", "other_shapes", "other_counts")
"""How rank 1's stage differs from rank 0's (layers 0-1, 8 wide): its layers only (2-3),
also their shapes (16 wide), also their number (2-4)."""


def _stage(rank: int, stages: str) -> nn.ModuleDict:
    """This rank's own layers, named as in the whole model (as DeepSpeed's PipelineModule
    and torchtitan's stages keep them): rank 0 layers 0-1, rank 1 2-3 (or 2-4)."""
    width = 16 if stages == "other_shapes" and rank == 1 else 8
    layers = 3 if stages == "other_counts" and rank == 1 else 2
    return nn.ModuleDict(
        {str(2 * rank + i): nn.Linear(8 if i == 0 else width, width) for i in range(layers)}
    )


def _stage_size(rank: int, stages: str) -> tuple[int, int]:
    """(tensors, elements) of :func:`_stage`'s weights."""
    weights = [layer.weight.numel() for layer in _stage(rank, stages).values()]
    return len(weights), sum(weights)


def _pipeline_stages(rank: int, world: int, stages: str, pruner: bool) -> str:
    stage = _stage(rank, stages)
    optimizer = torch.optim.SGD(stage.parameters(), lr=0.1)
    with pytest.raises(RankDisagreementError) as caught:
        if pruner:  # SafeModelPruning's core
            MagnitudePruner(stage).attach(optimizer)
        else:
            _controller(stage).attach(optimizer)
    return str(caught.value)


@pytest.mark.timeout(TIMEOUT + 30)
@pytest.mark.parametrize("pruner", [False, True], ids=["controller", "pruner"])
@pytest.mark.parametrize("stages", STAGES)
def test_ranks_holding_different_layers_are_refused_at_attach(stages: str, pruner: bool) -> None:
    """Summed slot by slot, the stages' counts would have read as one stage's model (equal
    shapes: 128 of 128 weights where there are 256) or died in the collective (unequal)."""
    messages = run_ranks(_pipeline_stages, 2, stages, pruner, timeout=TIMEOUT)
    assert messages[0] == messages[1]
    tensors, elements = _stage_size(1, stages)  # rank 1's weights (names differ)
    assert messages[0].startswith(
        f"ranks [1] measure other tensors than rank 0 (rank 0: 2 tensors, 128 elements; "
        f"rank 1: {tensors} tensors, {elements} elements;"
    )
    assert "pipeline stages holding different layers are not supported" in messages[0]


def _measured_stages(rank: int, world: int, stages: str, strided: bool) -> list[str]:
    stage = _stage(rank, stages)
    if strided:  # not the one-pass kernel's (contiguous only): counted by torch ops
        layer = stage[str(2 * rank)]
        layer.weight = nn.Parameter(layer.weight.detach().t().contiguous().t())
    controller = _controller(stage)  # kept to measure, never attached
    calls = (
        lambda: measure_sparsity(stage),
        controller.measure,
        lambda: controller.update(1),
        lambda: magnitude_init_(stage, 0.5),  # MagnitudePruner.prune, unattached
    )
    messages = []
    for call in calls:
        try:
            messages.append(f"not refused: {call()}")
        except RankDisagreementError as error:
            messages.append(str(error))
    local = measure_sparsity(stage, sync=False)
    return [*messages, f"{local.nonzero} of {local.total}"]


@pytest.mark.timeout(TIMEOUT + 30)
@pytest.mark.parametrize("strided", [False, True], ids=["kernel", "torch_ops"])
@pytest.mark.parametrize("stages", STAGES)
def test_measure_sparsity_refuses_ranks_holding_different_layers(
    stages: str, strided: bool
) -> None:
    """measure_sparsity, and a controller's measure and update before any attach: checked
    within their own all-reduce; an unattached magnitude cut (magnitude_init_) checks
    first, as attach does, and leaves the weights alone. Equal shapes had read 128 of 128 on
    both ranks, each rank's names beside its own layers (the model has 256 weights), and
    been cut as one model; other shapes had raised "ranks counted 192 elements, but the
    tensor has 64: shards or replicas were lost or counted twice"; another number of
    tensors had died in the all-reduce (buffers of other lengths: gloo aborted rank 1)."""
    messages = run_ranks(_measured_stages, 2, stages, strided, timeout=TIMEOUT)
    for rank, (*checked, cut, local) in enumerate(messages):
        tensors, elements = _stage_size(rank, stages)
        for message in checked:
            assert message.startswith(
                f"ranks do not all measure the same tensors (rank {rank}: {tensors} tensors, "
                f"{elements} elements;"
            )
            assert "pipeline stages holding different layers are not supported" in message
        assert cut.startswith("ranks [1] measure other tensors than rank 0"), cut
        assert local == f"{elements} of {elements}"  # sync=False: this rank's own, unchecked


def _pp_stage(stage: int) -> nn.Sequential:
    """Stage 0: two layers (one pruned by a mask, natural zeros in the other); stage 1: one
    layer of another shape. Seeded by stage: every rank of a stage builds the same one."""
    torch.manual_seed(stage)
    if stage == 1:
        return nn.Sequential(nn.Linear(16, 5))
    layers = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16))
    prune.l1_unstructured(layers[0], "weight", amount=0.25)
    with torch.no_grad():
        layers[2].weight[::4] = 0.0
    return layers


def _stages_on_a_mesh(rank: int, world: int, strategy: str) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy, fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    hybrid, tp = strategy in HYBRIDS, strategy == "fsdp2_tp"
    shape, dims = ((2, 2), ("pp", "dp"))
    if hybrid:  # (pp 2, rep 2, shard 2): 2 replicas of 2 shards per stage
        shape, dims = (2, 2, 2), ("pp", "rep", "shard")
    elif tp:  # (pp 2, dp 2, tp 2): FSDP2 over tensor parallelism in each stage
        shape, dims = (2, 2, 2), ("pp", "dp", "tp")
    mesh = init_device_mesh("cpu", shape, mesh_dim_names=dims)  # rank = (world / 2) pp + ...
    stage = rank // (world // 2)
    dp = mesh["rep", "shard"] if hybrid else mesh["dp"]
    # The stage's ranks: its data-parallel ones (dp x tp with tensor parallelism).
    group = (mesh[dims[1:]]._flatten() if hybrid or tp else dp).get_group()
    expected = measure_sparsity(_pp_stage(stage), sync=False).per_parameter  # unsharded
    module = _pp_stage(stage)
    dp_only = None
    if tp:  # the last layer of each stage split by tp; stage 0's first (masked) left out
        parallelize_module(module, mesh["tp"], {str(len(module) - 1): ColwiseParallel()})
    if strategy in ("fsdp2", "hsdp", "fsdp2_tp"):  # torchtitan's: FSDP2 on the dp slice
        fully_shard(module, mesh=dp)
        model: nn.Module = module
        if tp:  # measured within dp alone, the other tp rank's shards are missing
            try:
                measure_sparsity(model, group=dp.get_group())
            except RuntimeError as error:
                dp_only = str(error)
    elif strategy in ("fsdp1", "fsdp1_hybrid"):
        model = FullyShardedDataParallel(
            module,
            process_group=(mesh["shard"].get_group(), mesh["rep"].get_group()) if hybrid else group,
            sharding_strategy=ShardingStrategy.HYBRID_SHARD if hybrid else None,
            use_orig_params=True,
            device_id=torch.device("cpu"),
        )
    else:
        model = nn.parallel.DistributedDataParallel(module, process_group=group)
    before = measure_sparsity(model, group=group).per_parameter
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    config = BregmanConfig(target_sparsity=0.5, initial_lambda=0.05, update_frequency=1, verbose=1)
    controller = SparsityController(model, config, group=group)
    controller.attach(optimizer)
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("dist_bregman").addHandler(handler)
    generator = torch.Generator().manual_seed(rank - rank % 2 if tp else rank)  # same per tp
    for step in range(1, 4):
        x = torch.randn(4, 8 if stage == 0 else 16, generator=generator)
        model(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        controller.update_if_due(step)
    trained = controller.measure().per_parameter
    whole = (
        FullyShardedDataParallel.summon_full_params if strategy.startswith("fsdp1") else _no_gather
    )
    gathered = _gathered_counts(model, module, whole)
    cut = MagnitudePruner(model, group=group).prune(0.5).report
    return {
        "stage": stage,
        "expected": expected,
        "before": before,
        "trained": trained,
        "gathered": gathered,
        "lambda": controller.lambda_,
        "cut": (cut.total - cut.nonzero, cut.total),
        "cut_gathered": _gathered_counts(model, module, whole),
        "lambda_lines": sum(" vs target 50.0% → Lambda " in line for line in lines),
        "named": comm.ranks_from_bits(comm.own_bit(group), group),  # this rank's flag
        "disagreeing": _disagreement(
            controller.placements[: 0 if rank == world - 1 else None], group
        ),
        "held": measure_sparsity(model, sync=False).total,  # this rank's own elements
        "dp_only": dp_only,
    }


def _disagreement(placements: list[Any], group: Any) -> str:
    try:
        check_same_tensors(placements, group)
    except RankDisagreementError as error:
        return str(error).split(" (")[0]
    return "agreed"


@contextlib.contextmanager
def _no_gather(model: nn.Module) -> Iterator[None]:
    yield


def _gathered_counts(
    model: nn.Module, module: nn.Sequential, whole: Any
) -> dict[str, tuple[int, int]]:
    """Nonzero and total of each Linear weight, whole (FSDP2's DTensor.full_tensor, a
    collective of the stage's ranks; FSDP1's inside summon_full_params)."""
    linears = [name for name, layer in module.named_children() if isinstance(layer, nn.Linear)]
    with whole(model):
        return counts(effective_weights(module, linears))


HYBRIDS = ("hsdp", "fsdp1_hybrid")


@pytest.mark.timeout(TIMEOUT * 2 + 30)
@pytest.mark.parametrize("strategy", ["ddp", "fsdp1", "fsdp2", *HYBRIDS, "fsdp2_tp"])
def test_a_pipeline_stage_is_measured_within_its_own_ranks(strategy: str) -> None:
    """Pipeline parallelism on a (pp 2, dp 2) mesh: each stage measured, regularized and
    cut within its data-parallel group (group=). FSDP2 on the dp slice had counted a
    shard only on the first pp slice, taking the other stage's ranks for copies of it:
    stage 1 measured nothing ("ranks counted 0 elements, but the tensor has 80"). The
    hybrids (HSDP, FSDP1's HYBRID_SHARD) on (pp 2, rep 2, shard 2), 8 ranks: a shard's
    replicas counted once within the stage. FSDP2 over tensor parallelism on (pp 2, dp 2,
    tp 2): each stage measured within its dp x tp ranks (within dp alone: refused, saying
    so)."""
    world = 4 if strategy in ("ddp", "fsdp1", "fsdp2") else 8
    per = world // 2  # ranks per stage
    results = run_ranks(_stages_on_a_mesh, world, strategy, timeout=TIMEOUT * 2)
    for rank, result in enumerate(results):
        peer = results[result["stage"] * per]  # the stage's first rank
        assert result["before"] == result["expected"]  # == the stage unsharded
        assert result["trained"] == result["gathered"] == peer["trained"]
        assert result["lambda"] == peer["lambda"]
        zeros, total = result["cut"]
        assert zeros == round(0.5 * total) and result["cut"] == peer["cut"]
        assert sum(total - nonzero for nonzero, total in result["cut_gathered"].values()) == zeros
        # What each rank holds (sync=False): the whole stage under DDP; else a stage's first
        # 2 ranks hold it once between them, and the hybrids' other 2 hold the same again.
        held = [results[peer_rank]["held"] for peer_rank in range(rank - rank % per, rank + 1)]
        stage_total = sum(total for _, total in result["expected"].values())
        if strategy == "ddp":
            assert held[-1] == stage_total
        elif strategy == "fsdp2_tp":  # (held: each tp slice has a copy of stage 0's layer 0)
            assert result["dp_only"] is not None  # the dp group alone is refused, saying why
            assert "its dp x tp ranks" in result["dp_only"], result["dp_only"]
        elif rank % per == per - 1:  # (the stage's last rank: every held count is in)
            assert sum(held[:2]) == stage_total and held[2:] in ([], held[:2]), held
    assert results[0]["expected"] != results[per]["expected"]  # two different stages
    # Each stage's lambda lines come from its group's first rank (global ranks 0 and per).
    assert [result["lambda_lines"] for result in results] == ([3] + [0] * (per - 1)) * 2
    # Ranks named in reports (non-finite weights or losses) are global ranks.
    assert [result["named"] for result in results] == [[rank] for rank in range(world)]
    assert [result["disagreeing"] for result in results] == ["agreed"] * per + [
        f"ranks [{world - 1}] measure other tensors than rank {per}"
    ] * per


def _deepspeed_stages(rank: int, world: int) -> tuple[int, dict[str, tuple[int, int]], float]:
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))
    import deepspeed
    from deepspeed.pipe import PipelineModule

    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    layers = [nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 5)]
    with torch.no_grad():
        layers[2].weight[::4] = 0.0  # natural zeros
    net = PipelineModule(
        layers=layers, num_stages=2, loss_fn=nn.CrossEntropyLoss(), partition_method="uniform"
    )
    config = {
        "train_batch_size": 8,
        "train_micro_batch_size_per_gpu": 2,
        "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
        "zero_optimization": {"stage": 1},
        "zero_allow_untested_optimizer": True,
    }
    engine, *_ = deepspeed.initialize(model=net, model_parameters=net.parameters(), config=config)
    group = engine.grid.get_data_parallel_group()
    before = measure_sparsity(engine, group=group).per_parameter
    config = BregmanConfig(target_sparsity=0.5, initial_lambda=0.05, update_frequency=1)
    controller = SparsityController(engine, config, group=group)
    controller.attach(engine.optimizer)
    generator = torch.Generator().manual_seed(rank)
    batches = iter(
        [(torch.randn(2, 8, generator=generator), torch.randint(0, 5, (2,))) for _ in range(8)]
    )
    for step in (1, 2):
        engine.train_batch(data_iter=batches)
        controller.update_if_due(step)
    return engine.stage_id, before, controller.lambda_


@pytest.mark.timeout(TIMEOUT * 2 + 30)
def test_a_deepspeed_pipeline_stage_is_measured_within_its_own_ranks() -> None:
    """DeepSpeed's PipelineModule over ZeRO-1 at (pp 2, dp 2): each stage within its
    data-parallel group, named as in the whole model (its PipelineEngine had been taken
    for a model, and every name began with "module.")."""
    results = run_ranks(_deepspeed_stages, 4, timeout=TIMEOUT * 2)
    assert [(stage, before) for stage, before, _ in results] == [
        *[(0, {"0.weight": (128, 128), "2.weight": (192, 256)})] * 2,
        *[(1, {"4.weight": (80, 80)})] * 2,
    ]
    assert results[0][2] == results[1][2] and results[2][2] == results[3][2]


def _moe_experts(rank: int, world: int) -> tuple[str, str, tuple[int, int]]:
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))
    import deepspeed
    from deepspeed.moe.layer import MoE

    from dist_bregman import measure_sparsity

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 16),
        MoE(hidden_size=16, expert=nn.Linear(16, 16), num_experts=2, ep_size=2, k=1),
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    config = {"train_micro_batch_size_per_gpu": 4}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    with pytest.raises(ValueError) as controller:
        SparsityController(engine)
    with pytest.raises(ValueError) as pruning:  # SafeModelPruning's core
        MagnitudePruner(engine)
    kept = measure_sparsity(engine, parameters_to_prune=[(model[0], "weight")])
    return str(controller.value), str(pruning.value), (kept.nonzero, kept.total)


@pytest.mark.timeout(TIMEOUT + 30)
def test_deepspeed_moe_experts_are_refused_by_name() -> None:
    """Each expert-parallel rank holds its own expert under one name: counted as a replica,
    rank 0's stood for both (480 of the 736 elements of this kind of model counted, by
    hand). Without the experts in the measured set the rest is measured as usual."""
    for controller, pruning, kept in run_ranks(_moe_experts, 2, timeout=TIMEOUT):
        for message in (controller, pruning):
            assert message.startswith("parameters_to_prune: 1.deepspeed_moe.experts.")
            assert "are DeepSpeed MoE expert weights" in message
            assert "allowed: parameters_to_prune without the expert weights" in message
        assert kept == (128, 128)


def _wrapped_after_the_controller(rank: int, world: int, wrapper: str) -> dict[str, Any]:
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16, bias=False))  # one tensor: rank 0 counts it
    with torch.no_grad():
        model[0].weight[:4] = 0.0
    expected = measure_sparsity(model).per_parameter
    controller = SparsityController(model, BregmanConfig(target_sparsity=0.5))  # before:
    optimizer: Any
    if wrapper == "fsdp2":  # in place
        fully_shard(model)
        wrapped: nn.Module = model
    elif wrapper == "zero3":  # the parameters partitioned in place, the engine around them
        os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))
        engine = wrap("zero3", model, lambda m: torch.optim.SGD(m.parameters(), lr=0.1))
        wrapped, optimizer = engine.model, engine.optimizer
    else:  # 64 elements a rank either way: a slice read as the tensor looked whole
        wrapped = FullyShardedDataParallel(
            model, use_orig_params=wrapper == "fsdp1_orig", device_id=torch.device("cpu")
        )
    if wrapper != "zero3":
        optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.1)
    calls = [controller.measure, lambda: controller.attach(optimizer)]
    if wrapper.startswith("fsdp1"):  # the module inside the wrapper, measured as the model
        calls.append(lambda: measure_sparsity(model))
    refusals = []
    for call in calls:
        try:
            refusals.append(f"not refused: {call()}")
        except RuntimeError as error:
            refusals.append(str(error).split(", but it is now ")[1].split(":")[0])
    controller.bind(wrapped)  # as documented
    controller.attach(optimizer)
    return {"refusals": refusals, "bound": controller.measure().per_parameter == expected}


@pytest.mark.timeout(TIMEOUT + 30)
@pytest.mark.parametrize("wrapper", ["fsdp1", "fsdp1_orig", "fsdp2", "zero3"])
def test_a_model_wrapped_after_its_layouts_were_read_is_refused_on_every_rank(
    wrapper: str,
) -> None:
    """A controller built before the model was wrapped, not bound to it since: FSDP1's
    flattened parameters had crashed the process (views of freed storage: SIGSEGV in the
    count), or with use_orig_params each rank's 64-element slice was counted as the whole
    128-element weight, silently; FSDP2's DTensors had crashed the counting kernel;
    ZeRO-3's emptied parameters had measured 0 of 0 elements (and attach failed on a bare
    AssertionError). Now refused on every rank alike, also where only rank 0 counts the
    tensor."""
    results = run_ranks(_wrapped_after_the_controller, 2, wrapper, timeout=TIMEOUT)
    held = {
        "fsdp1": "a view of storage that was freed (FSDP1's parameters outside its forward)",
        "fsdp1_orig": "flattened by FSDP1 into a flat parameter (this rank's slice) of a unit "
        "outside the model given (also where a weight is shared across FSDP1 units, which "
        "FSDP1 does not support",
        "fsdp2": "a DTensor (sharded by fully_shard or tensor parallelism)",
        "zero3": "partitioned by DeepSpeed ZeRO-3 (empty outside its forward)",
    }[wrapper]
    for result in results:
        assert result["refusals"] == [held] * (3 if wrapper.startswith("fsdp1") else 2)
        assert result["bound"]  # bound to the wrapped model: the unsharded counts


def _leave_early(rank: int, world: int) -> None:
    controller = _controller(_model())
    if rank == 1:
        import os

        os._exit(0)  # gone without a word, before the collective
    start = time.monotonic()
    try:
        controller.measure()
    except Exception as error:
        elapsed = time.monotonic() - start
        raise RuntimeError(f"rank 0 failed after {elapsed:.1f}s: {error}") from error
    raise AssertionError("rank 0 measured with a missing peer")


@pytest.mark.timeout(TIMEOUT + 30)
def test_a_rank_that_leaves_early_ends_the_job_with_an_error_not_a_hang() -> None:
    # run_ranks gives each process group a 30 s timeout; gloo notices the closed
    # connection even sooner. Either way rank 0 must fail well inside the deadline.
    start = time.monotonic()
    with pytest.raises(AssertionError) as caught:
        run_ranks(_leave_early, 2, timeout=TIMEOUT)
    assert time.monotonic() - start < TIMEOUT
    assert "rank 0 failed after" in str(caught.value)
    assert "rank 1: no result" in str(caught.value)


def _guard_under_deepspeed(rank: int, world: int, strategy: str, through: bool) -> tuple[int, str]:
    from torch.nn import functional as F

    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))
    module = _model()
    wrapped = wrap(strategy, module, lambda m: torch.optim.SGD(m.parameters(), lr=0.1))
    x = torch.randn(4, 8).to(next(module.parameters()).dtype)  # zero1_bf16: a bf16 model
    loss = F.cross_entropy(wrapped.model(x).float(), torch.randint(0, 4, (4,)))
    wrapped.model.backward(loss)
    visible = sum(p.grad is not None for p in module.parameters())  # what a guard could read
    visible += sum(p.grad is not None for g in wrapped.optimizer.param_groups for p in g["params"])
    controller = _controller(module, guard_steps=True)
    try:  # through: as Accelerate hands DeepSpeed's wrapper over, in a wrapper of its own
        controller.attach(PassThrough(wrapped.optimizer) if through else wrapped.optimizer)
    except ValueError as error:
        return visible, str(error)
    return visible, ""


@pytest.mark.timeout(TIMEOUT + 30)
@pytest.mark.parametrize(
    ("strategy", "through"),
    [("zero1", False), ("zero1", True), ("zero1_bf16", False), ("zero3", False)],
    ids=["zero1", "zero1_passed_through", "zero1_bf16", "zero3"],
)
def test_guard_steps_is_refused_where_deepspeed_hides_the_gradients(
    strategy: str, through: bool
) -> None:
    """Under a ZeRO wrapper no gradient is visible between backward and step, so a guard
    would never fire: attach refuses it (on every rank) instead of silently doing nothing.
    ``BF16_Optimizer`` leaves bf16 copies in ``p.grad`` but steps with its fp32 buffers, which
    a dropped step would not empty (its own norm check skips non-finite steps)."""
    results = run_ranks(_guard_under_deepspeed, 2, strategy, through, timeout=TIMEOUT)
    for visible, message in results:
        assert visible == (6 if strategy == "zero1_bf16" else 0)  # 6: the module's tensors
        assert "guard_steps=True with DeepSpeed's" in message and "allowed:" in message


def _deepspeed_shm(rank: int, world: int, port: str) -> dict[str, Any]:
    # What the deepspeed launcher sets on one node (LOCAL_SIZE: every rank here, so
    # DeepSpeed's CPU backend sets up its shm all-reduce); the port only names the files.
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))
    os.environ.update(LOCAL_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    import deepspeed
    import deepspeed.comm as ds_comm

    deepspeed.init_distributed(dist_backend="gloo")
    mine = comm.DEEPSPEED_SHM_FILE.format(
        uid=os.getuid(), address="127.0.0.1", port=port, rank=rank
    )
    made = Path("/dev/shm", mine).exists()
    comm.release_deepspeed_shm()
    comm.barrier()  # every rank has unlinked its own
    left = [p.name for p in deepspeed_shm_files(port)]
    summed = torch.full((1000,), float(rank + 1))
    ds_comm.inference_all_reduce(summed)  # through the shm buffers, unlinked but mapped
    return {"made": made, "left": left, "sum": summed.unique().tolist()}


@pytest.mark.timeout(TIMEOUT + 30)
def test_deepspeeds_cpu_shm_files_are_unlinked_and_its_all_reduce_still_works() -> None:
    """DeepSpeed's CPU backend leaves a 66 MB /dev/shm file per rank after every job
    (20 GB of them here after a day of test runs): once every rank has mapped them, each
    rank unlinks its own, and the shm all-reduce goes on working through the mappings."""
    pytest.importorskip("deepspeed")
    if not Path("/dev/shm").is_dir():
        pytest.skip("no /dev/shm: DeepSpeed's CPU backend makes no shm files here")
    port = str(50_000 + os.getpid() % 10_000)  # names this test's files only
    results = run_ranks(_deepspeed_shm, 3, port, timeout=TIMEOUT)
    assert [r["made"] for r in results] == [True] * 3
    assert [r["left"] for r in results] == [[]] * 3
    assert [r["sum"] for r in results] == [[6.0]] * 3
