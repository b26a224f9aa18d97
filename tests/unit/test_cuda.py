"""CUDA paths: the same counts as on CPU, one host sync per measurement, none between.

These run only where a GPU is present (CI here has none); they are what a lent GPU machine
runs: ``pytest tests/unit/test_cuda.py``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from dist_bregman import (
    BregmanConfig,
    BregmanPruner,
    SparsityController,
    measure_sparsity,
    sparsity,
)
from dist_bregman.config import Mode
from dist_bregman.errors import NonFiniteError
from dist_bregman.init import sparse_init_
from dist_bregman.optim import AdaBreg, LinBreg
from dist_bregman.regularizers import L1
from dist_bregman.shards import locate
from dist_bregman.sparsity import reduce_counts
from tests.helpers.lightning import SeedModel, make_trainer, seed_loader
from tests.helpers.models import mixed_state_model, reference_counts

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)"
)
CUDA = torch.device("cuda")


@contextmanager
def host_syncs() -> Iterator[list[str]]:
    """Collect one entry per synchronising CUDA call made inside the block (torch's sync
    debug mode warns on each: copies to the host, ``.item()``, blocking host copies)."""
    found: list[str] = []
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield found
        finally:
            torch.cuda.set_sync_debug_mode("default")
    found += [str(w.message) for w in caught if "called a synchronizing" in str(w.message)]


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(12, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5)
    )


def test_sync_counter_sees_a_sync() -> None:
    """The counter the tests below rely on: ``.item()`` is one sync, a kernel is none."""
    x = torch.ones(3, device=CUDA)
    x.add_(x)
    with host_syncs() as none:
        x.add_(x)
    with host_syncs() as one:
        x.sum().item()
    assert (len(none), len(one)) == (0, 1), (none, one)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("zero_tolerance", [0.0, 1e-2])
def test_counts_on_cuda_equal_the_cpu_counts(dtype: torch.dtype, zero_tolerance: float) -> None:
    def model(device: torch.device | str) -> nn.Module:
        built = mixed_state_model()  # pruned twice, pruned once, natural zeros, plain
        with torch.no_grad():
            built.fc2.weight[0, :5] = 5e-3  # inside the tolerance
            built.fc2.weight[1, 0] = float("nan")
            built.fc2.weight[1, 1] = float("inf")
        return built.to(device=device, dtype=dtype)

    cpu = measure_sparsity(model("cpu"), zero_tolerance=zero_tolerance)
    gpu = measure_sparsity(model(CUDA), zero_tolerance=zero_tolerance)
    assert gpu == cpu
    assert gpu.nonfinite == 2
    if zero_tolerance == 0.0 and dtype == torch.float32:
        assert gpu.per_parameter == reference_counts(model("cpu"))


def test_small_and_large_tensors_take_both_cuda_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tensors up to TOGETHER_NUMEL are counted together, larger ones one by one."""
    monkeypatch.setattr(sparsity, "TOGETHER_NUMEL", 200)  # fc2 (330) alone, the rest together
    cpu = measure_sparsity(mixed_state_model())
    gpu = measure_sparsity(mixed_state_model().to(CUDA))
    assert gpu == cpu


def test_structure_counts_on_cuda_equal_the_cpu_counts() -> None:
    model = mixed_state_model()
    with torch.no_grad():
        model.fc2.weight[3] = 0.0
        model.conv.weight_orig[1, 0] = 0.0
    cpu_report, _ = reduce_counts(locate(model), structure=True)
    gpu_report, _ = reduce_counts(locate(model.to(CUDA)), structure=True)
    assert gpu_report == cpu_report
    assert gpu_report.zero_rows >= 1 and gpu_report.zero_kernels >= 1


def test_one_host_sync_per_measurement() -> None:
    model = mixed_state_model().to(CUDA)
    controller = SparsityController(model, BregmanConfig(regularizer="group_l1"))
    measure_sparsity(model, zero_tolerance=1e-3)  # warm: first calls may initialise things
    controller.measure()
    with host_syncs() as plain:
        measure_sparsity(model)
    with host_syncs() as tolerant:
        measure_sparsity(model, zero_tolerance=1e-3)
    with host_syncs() as structured:
        controller.measure()  # group_l1: rows and kernels counted in the same buffer
    assert [len(plain), len(tolerant), len(structured)] == [1, 1, 1], (
        plain,
        tolerant,
        structured,
    )


def _optimizers() -> dict[str, Callable[[nn.Module], torch.optim.Optimizer]]:
    return {
        "sgd+prox": lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9),
        "linbreg": lambda m: LinBreg(m.parameters(), lr=0.05, momentum=0.9, lambda_=1e-3),
        "adabreg": lambda m: AdaBreg(m.parameters(), lr=1e-3, lambda_=1e-3),
    }


@pytest.mark.parametrize("name", list(_optimizers()))
def test_steps_between_updates_do_not_sync_and_an_update_syncs_once(name: str) -> None:
    model = _mlp().to(CUDA)
    optimizer = _optimizers()[name](model)
    controller = SparsityController(
        model, BregmanConfig(target_sparsity=0.5, initial_lambda=1e-3, update_frequency=4)
    )
    controller.attach(optimizer)
    generator = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(16, 12, generator=generator).to(CUDA), torch.randint(0, 5, (16,)).to(CUDA))
        for _ in range(8)
    ]

    def step(index: int) -> None:
        x, y = batches[index]
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        controller.observe_loss(loss)
        controller.update_if_due(index + 1)

    for index in range(4):  # warm up, including the first update (step 4)
        step(index)
    with host_syncs() as between:
        for index in range(4, 7):
            step(index)
    with host_syncs() as update:
        step(7)  # step 8: measure, decide, set lambda
    assert controller.last_update_step == 8
    assert (len(between), len(update)) == (0, 1), (between, update)


@pytest.mark.parametrize("mode", ["prox", "loss"])
def test_the_loss_term_on_cuda_is_the_cpu_value_without_a_sync(mode: Mode) -> None:
    """The seed adds the term at every step: on CUDA it is read in multi-tensor kernels
    and stays on the device (a host zero copied in would wait for the queue at each
    step); in loss mode its gradient is the CPU one."""
    found = []
    for device in ("cpu", CUDA):
        model = _mlp().to(device)
        controller = SparsityController(model, BregmanConfig(initial_lambda=0.5, mode=mode))
        controller.attach(torch.optim.SGD(model.parameters(), lr=0.1))
        controller.regularization_loss()  # first call outside the count (builds, caches)
        with host_syncs() as syncs:
            term = controller.regularization_loss()
        assert term.device.type == torch.device(device).type
        term.backward()
        grads = [None if p.grad is None else p.grad.cpu() for p in model.parameters()]
        found.append((float(term.detach()), len(syncs), grads))
    (cpu, _, cpu_grads), (gpu, syncs, gpu_grads) = found
    assert syncs == 0 and gpu == pytest.approx(cpu, rel=1e-6)
    for on_cpu, on_gpu in zip(cpu_grads, gpu_grads, strict=True):
        assert (on_cpu is None and on_gpu is None) or torch.equal(on_cpu, on_gpu)
    assert any(grad is not None for grad in gpu_grads) == (mode == "loss")


def test_steps_after_the_support_freeze_do_not_sync() -> None:
    model = _mlp().to(CUDA)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    controller = SparsityController(
        model,
        BregmanConfig(
            target_sparsity=0.6, initial_lambda=1e-2, update_frequency=100, freeze_support_at=2
        ),
    )
    controller.attach(optimizer)
    x, y = torch.randn(16, 12, device=CUDA), torch.randint(0, 5, (16,), device=CUDA)
    for step in range(1, 4):
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        controller.update_if_due(step)
    with host_syncs() as syncs:
        for step in range(4, 7):
            F.cross_entropy(model(x), y).backward()
            optimizer.step()  # the held zeros are re-applied here
            optimizer.zero_grad(set_to_none=True)
            controller.update_if_due(step)
    assert controller.frozen and len(syncs) == 0, syncs
    assert measure_sparsity(model).sparsity == pytest.approx(0.6, abs=1e-3)


def test_the_found_hold_on_cuda_keeps_whole_rows_and_its_steps_do_not_sync() -> None:
    """``freeze_hold="found"`` with group shrinkage: the zeros held are the whole rows
    shrinkage made (above the target: none released), with no sync after the freeze."""
    model = _mlp().to(CUDA)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    config = BregmanConfig(
        target_sparsity=0.6,
        initial_lambda=0.5,
        update_frequency=100,
        regularizer="group_l1",
        freeze_support_at=3,
        freeze_hold="found",
    )
    controller = SparsityController(model, config)
    controller.attach(optimizer)
    x, y = torch.randn(16, 12, device=CUDA), torch.randint(0, 5, (16,), device=CUDA)
    for step in range(1, 7):
        with host_syncs() as syncs:
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            controller.update_if_due(step)
        assert step <= 3 or len(syncs) == 0, syncs
    found = controller.found_sparsity
    assert controller.frozen and found is not None and found > 0.6
    assert measure_sparsity(model).sparsity == found
    for name, weight in model.named_parameters():
        if name.endswith("weight"):
            zero = weight.detach() == 0
            assert torch.equal(zero, zero.all(dim=1, keepdim=True).expand_as(zero)), name


@pytest.mark.parametrize("name", ["linbreg", "adabreg"])
def test_bregman_optimizers_on_cuda_follow_the_cpu_trajectory(name: str) -> None:
    """The CUDA path (multi-tensor kernels) and the CPU path (a loop) are the same method,
    a lambda change included."""
    runs = {}
    for device in ("cpu", "cuda"):
        model = _mlp().to(device)
        optimizer = _optimizers()[name](model)
        generator = torch.Generator().manual_seed(2)
        for step in range(12):
            x = torch.randn(32, 12, generator=generator).to(device)
            y = torch.randint(0, 5, (32,), generator=generator).to(device)
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step == 5:
                optimizer.set_lambda(3e-3)  # type: ignore[attr-defined]
        runs[device] = [p.detach().cpu() for p in model.parameters()]
    for cpu, gpu in zip(runs["cpu"], runs["cuda"], strict=True):
        torch.testing.assert_close(gpu, cpu, rtol=1e-4, atol=1e-5)
        # The same support, up to weights that sit at the threshold within rounding.
        assert int((gpu.eq(0) ^ cpu.eq(0)).sum()) <= 2


def test_sparse_init_on_a_gpu_model_with_a_cpu_or_a_cuda_generator() -> None:
    """A CPU generator gives the CPU model's pattern on a GPU model; a CUDA generator (which
    raised before: the draws were made on the CPU) draws on the GPU, at the rate asked."""
    patterns = {}
    for device in ("cpu", "cuda"):
        model = _mlp().to(device)
        sparse_init_(model, 0.3, generator=torch.Generator().manual_seed(4))
        patterns[device] = [layer.weight.ne(0).cpu() for layer in model[::2]]
    for cpu, gpu in zip(patterns["cpu"], patterns["cuda"], strict=True):
        assert torch.equal(cpu, gpu)
    model = _mlp().to(CUDA)
    sparse_init_(model, 0.3, generator=torch.Generator(device=CUDA).manual_seed(4))
    kept = sum(int(layer.weight.ne(0).sum()) for layer in model[::2])
    total = sum(layer.weight.numel() for layer in model[::2])
    assert abs(kept / total - 0.3) < 0.03
    assert all(bool((layer.bias > 0).all()) for layer in model[::2])


def test_lightning_fit_on_a_gpu_reports_the_model_sparsity(tmp_path: Path) -> None:
    model = SeedModel(lr=0.05)
    pruner = BregmanPruner(
        target_sparsity=0.5, initial_lambda=0.01, lambda_update_rate=0.01, update_frequency=4
    )
    model.bregman_pruner = pruner
    trainer = make_trainer(tmp_path, [pruner], max_epochs=2, accelerator="gpu")
    trainer.fit(model, seed_loader())
    assert trainer.strategy.root_device.type == "cuda"
    # The logged lambda and sparsity stay host tensors (no host-to-GPU copy, which syncs).
    assert trainer.callback_metrics["bregman/lambda"].device.type == "cpu"
    assert trainer.callback_metrics["bregman/sparsity"].device.type == "cpu"
    final = measure_sparsity(model.cpu())
    assert pruner.controller is not None and pruner.controller.updates == 32 // 4
    assert pruner.current_lambda != 0.01
    assert final.sparsity > 0
    assert pruner.controller.measure().sparsity == final.sparsity


def test_proximal_step_on_cuda_equals_the_cpu_step_bit_for_bit() -> None:
    """Small tensors take the multi-tensor kernels, large ones softshrink in place; both
    equal the CPU result exactly, NaN and Inf included."""
    generator = torch.Generator().manual_seed(5)
    tensors = [torch.randn(shape, generator=generator) for shape in [(64, 64), (3,), (512, 256)]]
    tensors[0][0, 0] = float("nan")
    tensors[2][0, 0] = float("nan")
    tensors[2][0, 1] = float("inf")
    on_cpu = [t.clone() for t in tensors]
    on_gpu = [t.to(CUDA) for t in tensors]
    L1().prox_all_(on_cpu, 0.7)
    L1().prox_all_(on_gpu, 0.7)
    for cpu, gpu in zip(on_cpu, on_gpu, strict=True):
        torch.testing.assert_close(gpu.cpu(), cpu, equal_nan=True, rtol=0, atol=0)
    assert torch.isnan(on_gpu[0][0, 0]) and torch.isnan(on_gpu[2][0, 0])


def test_a_checkpoint_state_on_two_devices_is_checked_on_each() -> None:
    """A state dict may mix devices (ZeRO-3 partitions offloaded to the CPU beside GPU
    buffers): the NaN/Inf check reduces per device, never stacks across them."""
    controller = SparsityController(_mlp())
    clean = {"gpu": torch.ones(4, device=CUDA), "cpu": torch.ones(4)}
    controller.check_finite_state(clean)
    for where in ("gpu", "cpu"):
        state = {k: v.clone() for k, v in clean.items()}
        state[where][0] = float("nan")
        with pytest.raises(NonFiniteError, match=r"rank\(s\) \[0\]"):
            controller.check_finite_state(state)


def _ddp_worker(rank: int, world: int) -> tuple[list[float], tuple[int, int], int, int]:
    from torch.nn.parallel import DistributedDataParallel

    model = _mlp().to(CUDA)
    ddp = DistributedDataParallel(model, device_ids=[0])
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    controller = SparsityController(
        ddp, BregmanConfig(target_sparsity=0.5, initial_lambda=0.05, update_frequency=2)
    )
    controller.attach(optimizer)
    generator = torch.Generator().manual_seed(rank)
    lambdas = []
    for step in range(1, 9):
        x = torch.randn(16, 12, generator=generator).to(CUDA)
        y = torch.randint(0, 5, (16,), generator=generator).to(CUDA)
        loss = F.cross_entropy(ddp(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        controller.observe_loss(loss)
        if controller.update_if_due(step) is not None:
            lambdas.append(controller.lambda_)
    with host_syncs() as syncs:
        report = controller.measure()
    local = measure_sparsity(model, sync=False)  # replicas are identical: the whole count
    return lambdas, (report.nonzero, report.total), local.nonzero, len(syncs)


def test_ddp_on_cuda_over_gloo_every_rank_reads_the_same_counts_and_lambda() -> None:
    """Two ranks sharing the GPU (gloo: collectives go through host memory). Every rank
    holds the same lambda history and the same global counts, equal to the full count of
    one replica, read with one host sync."""
    from tests.helpers.dist import run_ranks

    results = run_ranks(_ddp_worker, 2, timeout=120, start_method="spawn")
    assert results[0][:2] == results[1][:2]
    lambdas, (nonzero, total), local_nonzero, syncs = results[0]
    assert len(lambdas) == 4 and lambdas[-1] != 0.05
    assert nonzero == local_nonzero == results[1][2] and total == sum(
        p.numel() for p in _mlp().parameters() if p.ndim >= 2
    )
    assert syncs == 1
