"""One model under every strategy on CPU/gloo: wrap it, step it, gather its full weights.

Used inside ranks started by ``tests.helpers.dist.run_ranks``. Gathering uses each
strategy's own machinery (``summon_full_params``, ``full_tensor``, ``GatheredParameters``),
independent of the library's counting, so it is a fair reference.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import prune

STRATEGIES = (
    "ddp",
    "ddp_zero",
    "fsdp1_orig",
    "fsdp1_flat",
    "fsdp2",
    "zero1",
    "zero2",
    "zero3",
    "zero3_persist",
    "zero2_offload",
    "zero3_offload",
)
"""The strategies every matrix test runs (``ddp_zero``: DDP with torch's
``ZeroRedundancyOptimizer`` over the optimizer under test, its parameters as views into the
buckets it broadcasts; ``*_offload``: ZeRO-Offload, the optimizer's fp32 partitions on the
CPU, and at stage 3 the parameters' partitions too). ``wrap`` also knows variants that tests
name where they matter: ``fsdp1_gradop`` (SHARD_GRAD_OP) and ``fsdp2_root`` (the last layer
in the root's group), whose gathered weights outlive a forward, and ``fsdp2_bf16``
(``fsdp2_root`` under bf16 mixed precision), ``zero1_bf16`` (a bf16 model, fp32 gradients:
DeepSpeed's ``BF16_Optimizer``), ``fsdp2_raf`` (resharded after forward to a smaller mesh,
at 4 ranks), ``zero2_through`` (ZeRO-2's wrapper inside a :class:`PassThrough`, as
Accelerate hands it over), ``zero1_rr`` and ``zero2_rr`` (``round_robin_gradients``: the
flat partitions hold the parameters in another order than the model's), ``zero3_sg``
(ZeRO-3 stepping each group in sub-groups: three for the SGD group at 2 ranks); and, at 4 ranks,
the hybrids ``hsdp`` (FSDP2 on a 2 x 2 mesh) and ``fsdp1_hybrid`` (HYBRID_SHARD),
``zero3_hpz`` (ZeRO++ hpZ in groups of 2) and ``fsdp2_tp`` (FSDP2 over tensor parallelism,
2 x 2); and ``tp`` (tensor parallelism alone)."""

FSDP2_APART_FROM_ONE_PROCESS = torch.__version__.startswith("2.8.")
"""torch 2.8's FSDP2 over gloo steps apart from one process, without this library too: a
plain two-rank FSDP2 SGD step was up to 4e-2 off (1.5e-8 on 2.13). That is the oldest torch
pyproject.toml admits (``make test-floors``): tests comparing FSDP2 training with one
process expect to fail there, and the counts are still checked against the gathered
weights."""


def steps_apart(strategy: str) -> bool:
    """Whether training under ``strategy`` is known, on this torch, to step apart from one
    process (:data:`FSDP2_APART_FROM_ONE_PROCESS`)."""
    return FSDP2_APART_FROM_ONE_PROCESS and (strategy.startswith("fsdp2") or strategy == "hsdp")


def expect_apart(request: Any, strategy: str) -> None:
    """Mark the running test as expected to fail where :func:`steps_apart` (strictly: it
    must fail there)."""
    if steps_apart(strategy):
        reason = "torch 2.8's FSDP2 over gloo steps apart from one process"
        request.applymarker(pytest.mark.xfail(strict=True, reason=reason))


def matrix_model(seed: int = 3) -> nn.Sequential:
    """Layer sizes divisible by none of 2, 3, 4 (221, 187, 55 weights; 17, 11, 5 rows), a
    layer pruned twice, natural zeros (whole rows, a column, a partial row)."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(13, 17), nn.ReLU(), nn.Linear(17, 11), nn.ReLU(), nn.Linear(11, 5)
    )
    prune.l1_unstructured(model[0], "weight", amount=0.3)
    prune.random_unstructured(model[0], "weight", amount=0.2)
    with torch.no_grad():
        model[2].weight[::3] = 0.0
        model[2].weight[:, 4] = 0.0
        model[4].weight[1, :5] = 0.0
    return model


LINEARS = ("0", "2", "4")


def effective_weights(
    module: nn.Sequential, linears: Sequence[str] = LINEARS
) -> dict[str, torch.Tensor]:
    """``weight_orig * weight_mask`` (or ``weight``) of the Linears ``linears`` (positions in
    ``module``; the matrix model's by default), as full tensors."""
    out = {}
    for name in linears:
        layer = module[int(name)]
        if hasattr(layer, "weight_mask"):
            out[f"{name}.weight"] = (_full(layer.weight_orig) * layer.weight_mask).detach().clone()
        else:
            out[f"{name}.weight"] = _full(layer.weight).detach().clone()
    return out


def counts(weights: dict[str, torch.Tensor]) -> dict[str, tuple[int, int]]:
    return {k: (int((w != 0).sum()), w.numel()) for k, w in weights.items()}


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t  # type: ignore[operator]


@dataclass
class Wrapped:
    """A model ready to train under one strategy."""

    model: nn.Module
    """What the controller binds to (the wrapper)."""
    module: nn.Sequential
    """The user's model inside it."""
    optimizer: Any
    """What the controller attaches to (a torch optimizer or a DeepSpeed wrapper)."""
    train_step: Callable[[torch.Tensor, torch.Tensor], None]
    gathered: Callable[[], contextlib.AbstractContextManager[None]]
    """Context in which ``module``'s parameters are full on every rank."""
    data_share: tuple[int, int] | None = None
    """``(index, count)``: this rank's share of a global batch, where not ``(rank, world)``
    (tensor-parallel ranks compute on the same samples)."""

    def full_effective(self) -> dict[str, torch.Tensor]:
        with self.gathered():
            return effective_weights(self.module)


def wrap(
    strategy: str,
    module: nn.Sequential,
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
) -> Wrapped:
    if strategy.startswith("zero"):
        return _deepspeed(strategy, module, make_optimizer)
    model: nn.Module
    gathered: Callable[[], contextlib.AbstractContextManager[None]] = contextlib.nullcontext
    share: tuple[int, int] | None = None
    if strategy in ("ddp", "ddp_zero"):
        model = nn.parallel.DistributedDataParallel(module)
    elif strategy.startswith("fsdp1"):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import ShardingStrategy
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        sharding: dict[str, Any] = {}
        if strategy == "fsdp1_gradop":
            sharding = {"sharding_strategy": ShardingStrategy.SHARD_GRAD_OP}
        if strategy == "fsdp1_hybrid":  # HYBRID_SHARD: 2 replicas of 2 shards at 4 ranks
            world = torch.distributed.get_world_size()
            sharding = {
                "sharding_strategy": ShardingStrategy.HYBRID_SHARD,
                "device_mesh": init_device_mesh("cpu", (world // 2, 2)),
            }
        model = FSDP(
            module,
            device_id=torch.device("cpu"),
            use_orig_params=strategy != "fsdp1_flat",
            auto_wrap_policy=ModuleWrapPolicy({nn.Linear}),
            **sharding,
        )

        def gathered() -> contextlib.AbstractContextManager[None]:
            return FSDP.summon_full_params(model, writeback=False)

    elif strategy in ("tp", "fsdp2_tp"):
        share = _tensor_parallel(strategy, module)
        model = module
    elif strategy in ("fsdp2", "fsdp2_root", "fsdp2_bf16", "fsdp2_raf", "hsdp"):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

        world = torch.distributed.get_world_size()
        if strategy == "hsdp":  # 2-D mesh: replicas along dim 0, shards of 2 along dim 1
            mesh = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("replicate", "shard"))
        else:
            mesh = init_device_mesh("cpu", (world,))
        # fsdp2_root: the last layer left to the root's group, as an output layer usually
        # is; FSDP2 keeps that group unsharded after a forward without backward.
        # fsdp2_bf16: that too, under bf16 mixed precision (the gathered copies bf16 casts
        # of the fp32 shards the optimizer steps), as FSDP2 is mostly run on GPUs.
        inner = module[:-1] if strategy in ("fsdp2_root", "fsdp2_bf16") else module
        policy = MixedPrecisionPolicy()
        if strategy == "fsdp2_bf16":
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        # fsdp2_raf: every group resharded after forward to halves of the world, not to
        # all of it (reshard_after_forward=2 at 4 ranks): from a forward to the next
        # backward, and after an eval forward, the modules hold a copy over that mesh.
        # (Otherwise FSDP2's default: the root's group stays gathered after forward.)
        after = {"reshard_after_forward": world // 2} if strategy == "fsdp2_raf" else {}
        for layer in inner:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh, mp_policy=policy, **after)
        fully_shard(module, mesh=mesh, mp_policy=policy, **after)
        model = module

        @contextlib.contextmanager
        def gathered() -> Iterator[None]:
            # A group left gathered (the root's, after a forward) holds copies, bf16 casts
            # under fsdp2_bf16, and fsdp2_raf's post-forward copies are DTensors whose
            # full_tensor() is not the weight (padded rows): read the shards the optimizer
            # steps, of every group.
            for part in module.modules():
                if isinstance(part, FSDPModule):
                    part.reshard()
            yield

    else:
        raise ValueError(strategy)
    optimizer = make_optimizer(model)
    if strategy == "ddp_zero":
        optimizer = zero_redundancy(optimizer, parameters_as_bucket_view=True)

    def train_step(x: torch.Tensor, y: torch.Tensor) -> None:
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()

    return Wrapped(model, module, optimizer, train_step, gathered, share)


def zero_redundancy(built: torch.optim.Optimizer, **options: Any) -> torch.optim.Optimizer:
    """torch's ``ZeroRedundancyOptimizer`` over ``built``'s param groups, its class and
    settings (each group carries its settings: no constructor keywords needed but lr)."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return ZeroRedundancyOptimizer(
        [dict(group) for group in built.param_groups],
        optimizer_class=type(built),
        lr=built.defaults["lr"],
        **options,
    )


class PassThrough(torch.optim.Optimizer):
    """A wrapper as Hugging Face Accelerate's ``AcceleratedOptimizer`` is: a torch optimizer
    by class that never ran ``Optimizer.__init__`` (no step hooks of its own) and hands its
    steps to ``.optimizer`` (a torch optimizer or a DeepSpeed wrapper)."""

    def __init__(self, optimizer: Any) -> None:
        self.optimizer = optimizer

    @property  # type: ignore[override]
    def param_groups(self) -> list:
        return self.optimizer.param_groups

    @property  # type: ignore[override]
    def state(self) -> dict:
        return self.optimizer.state

    def step(self, closure: Callable | None = None) -> None:  # type: ignore[override]
        self.optimizer.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none)


def _tensor_parallel(strategy: str, module: nn.Sequential) -> tuple[int, int]:
    """Make layers 2 and 4 tensor-parallel (column-, then row-wise: ``Shard(0)``,
    ``Shard(1)``) over every rank (``tp``) or, at 4 ranks, over the inner dimension of a
    2 x 2 mesh with FSDP2 over the outer one (``fsdp2_tp``, as Lightning's
    ``ModelParallelStrategy`` lays it out). Layer 0 stays out of the plan (torch's parallel
    styles cannot take a ``torch.nn.utils.prune`` weight): replicated under ``tp``; under
    ``fsdp2_tp`` sharded over the outer dimension only, a copy on each tensor-parallel
    rank. Returns this rank's share of a batch (tensor-parallel ranks share theirs)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    world = torch.distributed.get_world_size()
    if strategy == "tp":
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    else:
        mesh = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("dp", "tp"))
    # Layer 2's output stays a DTensor: made local, its uneven shards (6 and 5 of 11) would
    # be read back as 6 + 6 by layer 4's input conversion.
    plan = {"2": ColwiseParallel(use_local_output=False), "4": RowwiseParallel()}
    parallelize_module(module, mesh["tp"], plan)
    if strategy == "tp":
        return 0, 1
    for layer in (module[0], module[2], module[4]):
        fully_shard(layer, mesh=mesh["dp"])
    fully_shard(module, mesh=mesh["dp"])
    return mesh["dp"].get_local_rank(), world // 2


def _deepspeed(
    strategy: str,
    module: nn.Sequential,
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
) -> Wrapped:
    import deepspeed

    stage = int(strategy[4])
    zero: dict[str, Any] = {"stage": stage}
    if strategy in ("zero3", "zero3_hpz", "zero3_offload"):
        zero["stage3_param_persistence_threshold"] = 0  # every parameter partitioned
    if strategy == "zero3_hpz":  # ZeRO++ hpZ: a secondary copy per group of 2 for forwards
        zero["zero_hpz_partition_size"] = 2
    if strategy.endswith("_rr"):  # the parameters flattened in round-robin order over ranks
        zero["round_robin_gradients"] = True
    if strategy == "zero3_sg":  # every parameter group cut into sub-groups of ~100 elements
        zero |= {"stage3_param_persistence_threshold": 0, "sub_group_size": 100}
    if strategy.endswith("_offload"):  # ZeRO-Offload: the fp32 partitions and their step on
        zero["offload_optimizer"] = {"device": "cpu"}  # the CPU, apart from the model's
        if stage == 3:
            zero["offload_param"] = {"device": "cpu"}  # and ZeRO-3's partitions offloaded
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 4,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,  # offloaded, still the optimizer under test
        "gradient_clipping": 0.0,
    }
    dtype = torch.float32
    if strategy.endswith("_bf16"):  # a bf16 model; at stage 1 with fp32 gradients DeepSpeed
        dtype = torch.bfloat16  # wraps the optimizer in its BF16_Optimizer
        config |= {"bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"}}
    optimizer = make_optimizer(module)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=config)

    def train_step(x: torch.Tensor, y: torch.Tensor) -> None:
        loss = F.cross_entropy(engine(x.to(dtype)).float(), y)
        engine.backward(loss)
        engine.step()

    @contextlib.contextmanager
    def gathered() -> Iterator[None]:
        if stage == 3:
            with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
                yield
        else:
            yield

    # zero2_through: DeepSpeed's wrapper handed over inside another, as Accelerate does
    held = PassThrough(engine.optimizer) if strategy.endswith("_through") else engine.optimizer
    return Wrapped(engine, module, held, train_step, gathered)
