"""The Bregman optimizers' state through a distributed checkpoint under FSDP2 (2 ranks; HSDP
and FSDP2 over tensor parallelism at 4), and through FSDP1's optimizer state dicts.

``torch.distributed.checkpoint`` (what Lightning's FSDP2 strategy saves with) stores a
DTensor's parts at their offsets from every rank, and a plain tensor once, as a replica.
LinBreg's ``v`` (the weights follow from it at every step) and the moments must come back
on each rank as that rank saved them: resuming must give the uninterrupted run; so must a
one-file checkpoint of the gathered state, loaded by broadcast from rank 0. FSDP1's
``FSDP.optim_state_dict`` (Lightning's FSDPStrategy) unflattens each state tensor shaped as
its flat-shard view, full or sharded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from dist_bregman import regularized_groups
from dist_bregman.optim import AdaBreg, LinBreg, ProxSGD
from tests.helpers.dist import run_ranks
from tests.helpers.strategies import Wrapped, matrix_model, wrap

OPTIMIZERS = {  # for tests.helpers.strategies.wrap: from the model, after wrapping
    "linbreg": lambda m: LinBreg(m.parameters(), lr=0.1, lambda_=0.05, momentum=0.9),
    "adabreg": lambda m: AdaBreg(m.parameters(), lr=0.01, lambda_=0.05),
    "proxsgd": lambda m: ProxSGD(m.parameters(), lr=0.1, lambda_=0.05, momentum=0.9),
}


def _build(name: str, rows: int, hsdp: bool = False) -> Wrapped:
    """FSDP2 over all ranks, or HSDP: shards of 2, replicated across the pairs."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(12, rows), nn.ReLU(), nn.Linear(rows, 4))
    return wrap("hsdp" if hsdp else "fsdp2", module, OPTIMIZERS[name])


def _train(run: Wrapped, steps: range, rank: int) -> None:
    for step in steps:
        generator = torch.Generator().manual_seed(1000 * step + rank)  # per rank data
        x = torch.randn(8, 12, generator=generator)
        run.train_step(x, x[:, :4].argmax(dim=1))


def _save(run: Wrapped, checkpoint: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(run.model, run.optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=checkpoint)


def _load(run: Wrapped, checkpoint: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(run.model, run.optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=checkpoint)
    set_state_dict(
        run.model, run.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
    )


def _full_state(run: Wrapped) -> list[torch.Tensor]:
    """Every state value (tensors gathered whole: a collective), in a fixed order."""
    values = [s[key] for s in run.optimizer.state.values() for key in sorted(s)]
    return [v.full_tensor() if isinstance(v, torch.Tensor) else torch.tensor(v) for v in values]


def _same_shards(whole: Wrapped, resumed: Wrapped) -> list[bool]:
    """Per parameter, whether this rank's shards of the two FSDP2 runs are bit for bit equal."""
    pairs = zip(whole.model.parameters(), resumed.model.parameters(), strict=True)
    return [torch.equal(a.to_local(), b.to_local()) for a, b in pairs]  # type: ignore[attr-defined]


def _resume(
    rank: int, world: int, folder: str, name: str, rows: int, hsdp: bool = False
) -> dict[str, Any]:
    whole = _build(name, rows, hsdp)
    _train(whole, range(12), rank)
    first = _build(name, rows, hsdp)
    _train(first, range(6), rank)
    _save(first, f"{folder}/ckpt")
    resumed = _build(name, rows, hsdp)
    _load(resumed, f"{folder}/ckpt")
    _train(resumed, range(6, 12), rank)
    return {
        "same": _same_shards(whole, resumed),
        "zeros": sum(int((p.to_local() == 0).sum()) for p in resumed.model.parameters()),  # type: ignore[attr-defined]
        "state_kinds": sorted(
            {type(v).__name__ for s in resumed.optimizer.state.values() for v in s.values()}
        ),
    }


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("rows", [9, 10], ids=["uneven_shards", "even_shards"])
def test_a_dcp_checkpoint_resumes_the_uninterrupted_run(
    name: str, rows: int, tmp_path: Path
) -> None:
    """Before: the state was plain local tensors. With uneven shards (9 rows: 5 + 4) the
    load failed on a size mismatch; with even ones one rank's ``v`` was loaded on both and
    that rank's weights became the other rank's at the next step."""
    results = run_ranks(_resume, 2, str(tmp_path), name, rows, timeout=100)
    for result in results:
        assert all(result["same"]), result["same"]
        assert "Tensor" not in result["state_kinds"]  # every state tensor a DTensor
    assert sum(result["zeros"] for result in results) > 0  # the L1 steps made zeros


@pytest.mark.timeout(120)
def test_a_dcp_checkpoint_under_hsdp_resumes_the_uninterrupted_run(tmp_path: Path) -> None:
    """4 ranks, shards of 2 replicated twice (``Replicate``, ``Shard(0)``): each replica
    pair holds the same state, which DCP saves once and loads into both."""
    results = run_ranks(_resume, 4, str(tmp_path), "linbreg", 9, True, timeout=100)
    for result in results:
        assert all(result["same"]), result["same"]
        assert "Tensor" not in result["state_kinds"]


def _resume_consolidated(rank: int, world: int, folder: str, name: str) -> list[bool]:
    """Lightning's ModelParallelStrategy with ``save_distributed_checkpoint=False``: full
    state dicts gathered (offloaded to the CPU) on every rank, one file from rank 0, loaded
    with ``broadcast_from_rank0=True``."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    whole, first = _build(name, 9), _build(name, 9)
    _train(whole, range(12), rank)
    _train(first, range(6), rank)
    gathered = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = {
        "model": get_model_state_dict(first.model, options=gathered),
        "optim": get_optimizer_state_dict(first.model, first.optimizer, options=gathered),
    }
    if rank == 0:
        torch.save(state, f"{folder}/full.pt")
    torch.distributed.barrier()
    resumed = _build(name, 9)
    state = torch.load(f"{folder}/full.pt", weights_only=True)
    broadcast = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(resumed.model, state["model"], options=broadcast)
    set_optimizer_state_dict(resumed.model, resumed.optimizer, state["optim"], options=broadcast)
    _train(resumed, range(6, 12), rank)
    return _same_shards(whole, resumed)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", ["linbreg", "adabreg"])
def test_a_consolidated_fsdp2_checkpoint_resumes_the_uninterrupted_run(
    name: str, tmp_path: Path
) -> None:
    for same in run_ranks(_resume_consolidated, 2, str(tmp_path), name, timeout=100):
        assert same == [True] * 4, same


def _saved_state(rank: int, world: int, folder: str, name: str) -> list[torch.Tensor]:
    run = _build(name, 9)
    _train(run, range(5), rank)
    _save(run, folder)
    return _full_state(run)


def _loaded_state(rank: int, world: int, folder: str, name: str) -> list[torch.Tensor]:
    run = _build(name, 9)
    _load(run, folder)
    return _full_state(run)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", ["linbreg", "adabreg"])
def test_a_dcp_checkpoint_saved_at_two_ranks_loads_at_three(name: str, tmp_path: Path) -> None:
    """The state is laid out as the parameters, so a distributed checkpoint reshards it as
    it reshards the weights (and torch's own optimizers' state): 9 rows as 5 + 4, loaded
    as 3 + 3 + 3."""
    saved = run_ranks(_saved_state, 2, str(tmp_path), name, timeout=50)[0]
    loaded = run_ranks(_loaded_state, 3, str(tmp_path), name, timeout=50)
    assert len(saved) >= 12  # of 4 parameters: lambda, v and momentum (or step and moments)
    for rank in loaded:
        assert all(torch.equal(a, b) for a, b in zip(saved, rank, strict=True))


def _resume_fsdp2_tp(rank: int, world: int, folder: str, name: str) -> list[bool]:
    """As :func:`_resume`, on the shard matrix's FSDP2-over-TP layout (2 x 2): layer 0 a
    copy per TP rank, layers 2 and 4 split column- and row-wise. TP ranks share the data."""

    def build() -> Wrapped:
        return wrap("fsdp2_tp", matrix_model(), OPTIMIZERS[name])

    def train(run: Wrapped, steps: range) -> None:
        index = run.data_share[0] if run.data_share else rank
        for step in steps:
            x = torch.randn(8, 13, generator=torch.Generator().manual_seed(1000 * step + index))
            run.train_step(x, x[:, :5].argmax(dim=1))

    whole, first = build(), build()
    train(whole, range(12))
    train(first, range(6))
    _save(first, f"{folder}/ckpt")
    resumed = build()
    _load(resumed, f"{folder}/ckpt")
    train(resumed, range(6, 12))
    return _same_shards(whole, resumed)


@pytest.mark.timeout(150)
@pytest.mark.parametrize("name", ["linbreg", "adabreg"])
def test_a_dcp_checkpoint_under_fsdp2_over_tensor_parallelism_resumes_bit_for_bit(
    name: str, tmp_path: Path
) -> None:
    for same in run_ranks(_resume_fsdp2_tp, 4, str(tmp_path), name, timeout=120):
        assert same == [True] * 6, same


FSDP1_OPTIMIZERS = {  # FSDP1 hands the optimizer 1-D views: weights named by the groups
    "linbreg": lambda m: LinBreg(regularized_groups(m), lr=0.1, lambda_=0.05, momentum=0.9),
    "adabreg": lambda m: AdaBreg(regularized_groups(m), lr=0.01, lambda_=0.05),
}


def _fsdp1(name: str) -> Wrapped:
    """FSDP1 (use_orig_params, a unit per Linear) over 9 and 7 rows: uneven flat shards."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(12, 9), nn.ReLU(), nn.Linear(9, 7), nn.ReLU(), nn.Linear(7, 4))
    return wrap("fsdp1_orig", module, FSDP1_OPTIMIZERS[name])


def _fsdp1_state_dict_type(run: Wrapped, kind: str) -> Any:
    """FSDP1's state dicts: ``full`` (gathered on every rank), ``rank0`` (the optimizer
    state gathered to rank 0 only, and loaded from rank 0 only: the others pass nothing and
    get their part by broadcast) or ``sharded``. Not offloaded: torch's CPU offload of a
    CPU model crashes (SGD too)."""
    from torch.distributed.fsdp import (
        FullOptimStateDictConfig,
        FullStateDictConfig,
        ShardedOptimStateDictConfig,
        ShardedStateDictConfig,
        StateDictType,
    )
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    if kind == "sharded":
        return FSDP.state_dict_type(
            run.model,
            StateDictType.SHARDED_STATE_DICT,
            ShardedStateDictConfig(),
            ShardedOptimStateDictConfig(),
        )
    return FSDP.state_dict_type(
        run.model,
        StateDictType.FULL_STATE_DICT,
        FullStateDictConfig(offload_to_cpu=False, rank0_only=False),
        FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=kind == "rank0"),
    )


def _fsdp1_save(run: Wrapped, path: str, kind: str) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with _fsdp1_state_dict_type(run, kind):
        state = {"model": run.model.state_dict()}
        state["optim"] = FSDP.optim_state_dict(run.model, run.optimizer)
    torch.save(state, path)


def _fsdp1_load(run: Wrapped, path: str, kind: str) -> dict[str, Any]:
    """Load, and return the optimizer state dict as the loaded run would save it."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    state = torch.load(path, weights_only=False)
    if kind == "rank0" and torch.distributed.get_rank() > 0:
        state["optim"] = {}  # only rank 0 reads the optimizer state
    with _fsdp1_state_dict_type(run, kind):
        run.model.load_state_dict(state["model"])
        optim = FSDP.optim_state_dict_to_load(run.model, run.optimizer, state["optim"])
        run.optimizer.load_state_dict(optim)
        return FSDP.optim_state_dict(run.model, run.optimizer)


def _fsdp1_resume(rank: int, world: int, folder: str, name: str, kind: str) -> list[bool]:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    whole, first = _fsdp1(name), _fsdp1(name)
    _train(whole, range(12), rank)
    _train(first, range(6), rank)
    _fsdp1_save(first, f"{folder}/ckpt{rank}.pt", kind)
    torch.distributed.barrier()
    resumed = _fsdp1(name)
    _fsdp1_load(resumed, f"{folder}/ckpt{0 if kind == 'rank0' else rank}.pt", kind)
    _train(resumed, range(6, 12), rank)
    with FSDP.summon_full_params(whole.model), FSDP.summon_full_params(resumed.model):
        pairs = zip(whole.model.parameters(), resumed.model.parameters(), strict=True)
        return [torch.equal(a, b) for a, b in pairs]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["full", "rank0", "sharded"])
@pytest.mark.parametrize("name", sorted(FSDP1_OPTIMIZERS))
def test_fsdp1_optimizer_state_dicts_resume_the_uninterrupted_run(
    name: str, kind: str, tmp_path: Path
) -> None:
    """FSDP1's own optimizer state dicts (``FSDP.optim_state_dict``, what Lightning's
    FSDPStrategy checkpoints; it keeps only state tensors shaped as their parameter, or
    0-d) carry ``v``, the momentum and the moments of each flat shard's weights. Loaded
    from rank 0 only (``rank0``), the scalar state the optimizers kept as numbers had
    failed: "'float' object has no attribute 'cpu'"."""
    for same in run_ranks(_fsdp1_resume, 2, str(tmp_path), name, kind, timeout=100):
        assert same == [True] * 6, same


def _fsdp1_saved(rank: int, world: int, path: str, name: str) -> dict[str, Any]:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    run = _fsdp1(name)
    _train(run, range(5), rank)
    _fsdp1_save(run, path if rank == 0 else f"{path}.{rank}", "full")
    with _fsdp1_state_dict_type(run, "full"):
        return FSDP.optim_state_dict(run.model, run.optimizer)  # type: ignore[no-any-return]


def _fsdp1_loaded(rank: int, world: int, path: str, name: str) -> dict[str, Any]:
    run = _fsdp1(name)
    loaded = _fsdp1_load(run, path, "full")
    _train(run, range(5, 7), rank)  # and it steps
    return loaded


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", sorted(FSDP1_OPTIMIZERS))
def test_a_full_fsdp1_optimizer_state_saved_at_two_ranks_loads_at_three(
    name: str, tmp_path: Path
) -> None:
    """A full optimizer state dict holds whole tensors, so it loads at another world size
    (flat shards 2 ways, then 3) and gives back what was saved."""
    path = str(tmp_path / "full.pt")
    saved = run_ranks(_fsdp1_saved, 2, path, name, timeout=50)[0]
    loaded = run_ranks(_fsdp1_loaded, 3, path, name, timeout=50)
    values = [(key, item) for key, s in sorted(saved["state"].items()) for item in s.items()]
    assert len(values) >= 18  # 6 parameters: v and momentum (or step and two moments), ...
    for rank in loaded:
        assert rank["param_groups"] == saved["param_groups"]
        for key, (slot, value) in values:
            assert torch.equal(torch.as_tensor(rank["state"][key][slot]), torch.as_tensor(value))
