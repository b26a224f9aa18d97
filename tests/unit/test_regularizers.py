"""L1: value, subgradient and prox against closed forms."""

from __future__ import annotations

import pytest
import torch

from dist_bregman import regularizers
from dist_bregman.regularizers import L1, GroupL1, Regularizer, resolve


def test_prox_is_soft_thresholding_with_exact_zeros() -> None:
    torch.manual_seed(0)
    x = torch.randn(1000, dtype=torch.float64)
    t = 0.4
    expected = torch.sign(x) * torch.clamp(x.abs() - t, min=0.0)
    out = x.clone()
    L1().prox_(out, t)
    assert torch.equal(out, expected)
    assert int((out == 0).sum()) == int((x.abs() <= t).sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prox_keeps_nan_and_inf_and_takes_strided_views(dtype: torch.dtype) -> None:
    """A NaN weight must stay NaN through the proximal step, or the measurement that
    reports corrupt weights would never see it; strided views take the clamp form."""
    x = torch.tensor([[float("nan"), float("inf"), -float("inf"), 0.3], [-2.0, 0.5, 1.0, 0.0]])
    x = x.to(dtype)
    expected = torch.tensor(
        [[float("nan"), float("inf"), -float("inf"), 0.0], [-1.5, 0.0, 0.5, 0.0]]
    ).to(dtype)
    contiguous, strided = x.clone(), x.clone().t().contiguous().t()
    L1().prox_(contiguous, 0.5)
    L1().prox_all_([strided], 0.5)
    assert not strided.is_contiguous()
    for out in (contiguous, strided):
        torch.testing.assert_close(out, expected, equal_nan=True, rtol=0, atol=0)


def test_prox_into_writes_the_prox_where_layouts_allow_and_nothing_elsewhere() -> None:
    torch.manual_seed(1)
    x = torch.randn(8, 5)
    expected = x.clone()
    L1().prox_(expected, 0.6)
    out = torch.full_like(x, 7.0)
    assert L1().prox_into_(out, x, 0.6) and torch.equal(out, expected)
    for target, source in [
        (torch.full((8, 5), 7.0, dtype=torch.bfloat16), x),  # dtypes differ
        (torch.full((5, 8), 7.0).t(), x),  # strided target
        (torch.full((40,), 7.0), x),  # shapes differ
    ]:
        assert not L1().prox_into_(target, source, 0.6)
        assert bool((target == 7.0).all())


def test_prox_solves_its_minimisation_problem() -> None:
    # prox_t(x) = argmin_z 0.5 (z - x)^2 + t |z|: compare with a dense grid search.
    grid = torch.linspace(-3, 3, 600001, dtype=torch.float64)
    for x, t in [(1.3, 0.5), (-0.2, 0.5), (-2.0, 0.25), (0.0, 1.0)]:
        objective = 0.5 * (grid - x) ** 2 + t * grid.abs()
        z = torch.tensor([x], dtype=torch.float64)
        L1().prox_(z, t)
        assert abs(z.item() - grid[objective.argmin()].item()) <= 1e-5


def test_value_and_subgradient() -> None:
    x = torch.tensor([-2.0, 0.0, 3.0], requires_grad=True)
    reg = L1()
    value = reg.value(x)
    assert value.item() == 5.0
    value.backward()
    assert torch.equal(x.grad, reg.subgradient(x.detach()))
    assert torch.equal(reg.subgradient(x.detach()), torch.tensor([-1.0, 0.0, 1.0]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reg", [L1(), GroupL1()])
def test_values_of_16_bit_weights_are_float32_sums(reg: Regularizer, dtype: torch.dtype) -> None:
    # Summed in their own type, these 4,096 bfloat16 weights' L1 of 3,224.53 comes out as
    # 3,232 (a multiple of 16 there): a reported loss term off in its third digit.
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(0)).to(dtype)
    value = reg.value(x)
    assert value.dtype == torch.float32
    assert float(value) == pytest.approx(float(reg.value(x.double())), rel=1e-6)


@pytest.mark.parametrize("together", [False, True])
def test_l1_values_in_multi_tensor_kernels_are_each_tensors_value(
    together: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a GPU L1 reads its tensors in multi-tensor norms, grouped by dtype; here the CPU
    takes that path when told to: the values (in order) and gradients are the per-tensor
    ones."""
    monkeypatch.setattr(regularizers, "summed_together", lambda x: together)
    generator = torch.Generator().manual_seed(3)
    base = [torch.randn(7, 5, generator=generator) for _ in range(4)]
    base[0][:2] = 0.0  # zeros: gradient 0 there
    dtypes = [torch.float32, torch.bfloat16, torch.float32, torch.float64]
    tensors = [x.to(dtype).requires_grad_() for x, dtype in zip(base, dtypes, strict=True)]
    twins = [x.detach().clone().requires_grad_() for x in tensors]
    values = L1().values(tensors)
    expected = [L1().value(x) for x in twins]
    for value, want in zip(values, expected, strict=True):
        assert value.dtype == want.dtype
        assert float(value.detach()) == pytest.approx(float(want.detach()), rel=1e-6)
    torch.stack([v.double() for v in values]).sum().backward()
    torch.stack([v.double() for v in expected]).sum().backward()
    for x, twin in zip(tensors, twins, strict=True):
        assert torch.equal(x.grad, twin.grad)


def test_group_prox_rows_against_the_block_soft_threshold_formula() -> None:
    torch.manual_seed(1)
    x = torch.randn(7, 9, dtype=torch.float64)
    x[2] = 0.0
    t = 0.3
    expected = torch.zeros_like(x)
    for i, row in enumerate(x):
        norm = row.norm().item()
        if norm > t * 3.0:  # sqrt(9) = 3
            expected[i] = (1 - t * 3.0 / norm) * row
    out = x.clone()
    GroupL1("rows").prox_(out, t)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-15)
    assert int((out.abs().sum(dim=1) == 0).sum()) == int((x.norm(dim=1) <= 0.9).sum())


def test_group_prox_of_a_vector_is_soft_thresholding_groups_of_one() -> None:
    x = torch.tensor([0.5, -0.2, 0.05, -1.0, 0.0], dtype=torch.float64)
    group, plain = x.clone(), x.clone()
    GroupL1("rows").prox_(group, 0.1)
    L1().prox_(plain, 0.1)
    torch.testing.assert_close(group, plain, rtol=0, atol=1e-15)


def test_multi_tensor_prox_equals_the_prox_of_each_tensor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The multi-tensor kernels (small accelerator tensors) give each tensor its prox; run
    here on CPU tensors by taking that path for every tensor."""
    monkeypatch.setattr(regularizers, "multi_tensor", lambda x: True)
    torch.manual_seed(4)
    tensors = [torch.randn(shape) for shape in [(3, 4), (5,), (2, 3, 3)]]
    tensors[0][0, 0] = float("nan")
    together = [t.clone() for t in tensors]
    L1().prox_all_(together, 0.4)
    for t, z in zip(tensors, together, strict=True):
        torch.testing.assert_close(z, L1().prox_(t.clone(), 0.4), rtol=0, atol=0, equal_nan=True)
    assert sum(int((z == 0).sum()) for z in together) > 0


def test_group_prox_is_the_minimiser_of_its_problem() -> None:
    # Optimality: z = prox(x) iff x - z in t*dJ(z); for a nonzero group x_g - z_g =
    # t*sqrt(n)*z_g/||z_g||, for a zero group ||x_g|| <= t*sqrt(n).
    torch.manual_seed(2)
    x = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    t = 1.0  # t*sqrt(n) is about the typical group norm: some groups die, some live
    for by, n in (("rows", 36), ("kernels", 9)):
        reg = GroupL1(by)
        z = x.clone()
        reg.prox_(z, t)
        zg, xg = reg.groups(z), reg.groups(x)
        alive = zg.norm(dim=1) > 0
        residual = xg[alive] - zg[alive]
        torch.testing.assert_close(
            residual, t * n**0.5 * zg[alive] / zg[alive].norm(dim=1, keepdim=True)
        )
        assert bool((xg[~alive].norm(dim=1) <= t * n**0.5 + 1e-12).all())
        assert 0 < int(alive.sum()) < len(alive)


def test_group_value_subgradient_and_kernels_need_convolutions() -> None:
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0]], requires_grad=True)
    reg = GroupL1()
    value = reg.value(x)
    assert value.item() == pytest.approx(2**0.5 * 5.0)
    torch.testing.assert_close(
        reg.subgradient(x.detach()), 2**0.5 * torch.tensor([[0.6, 0.8], [0.0, 0.0]])
    )
    with pytest.raises(ValueError, match="group_l1_kernels needs a ConvNd weight"):
        GroupL1("kernels").value(torch.ones(3, 3))


@pytest.mark.parametrize("reg", [L1(), GroupL1("rows")])
def test_bregman_distance_is_nonnegative_and_zero_on_the_same_face(reg: Regularizer) -> None:
    torch.manual_seed(3)
    for _ in range(20):
        u, v = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
        assert reg.bregman_distance(u, v).item() >= -1e-12
    v = torch.randn(5, 4, dtype=torch.float64)
    assert abs(reg.bregman_distance(2.5 * v, v).item()) < 1e-12  # same signs / directions


def test_resolve_specs() -> None:
    assert isinstance(resolve("l1"), L1) and resolve(None) is None
    assert resolve("group_l1_kernels").spec == "group_l1_kernels"
    mine = GroupL1()
    assert resolve(mine) is mine
    with pytest.raises(ValueError, match=r"reg='l2'"):
        resolve("l2")


@pytest.mark.parametrize("by", ["rows", "kernels"])
def test_group_prox_edits_a_weight_in_channels_last_as_a_contiguous_one(by: str) -> None:
    """A ConvNd weight in channels_last (a CNN trained with AMP) is not contiguous: the
    group prox had raised at the first optimizer step ("needs a contiguous tensor")."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 4, 3, 3, generator=generator)
    weight[::2] *= 0.05  # small rows and kernels, for the prox to zero
    strided = weight.to(memory_format=torch.channels_last)
    assert not strided.is_contiguous()
    reg = GroupL1(by)
    expected = reg.prox_(weight.clone(), 0.1)
    assert reg.prox_(strided, 0.1) is strided  # in place, in its own layout
    torch.testing.assert_close(strided, expected, rtol=1e-6, atol=1e-7)
    assert int((expected == 0).sum()) > 0 and int((expected != 0).sum()) > 0
    transposed = torch.randn(5, 7, generator=generator).t()  # a Linear weight, strided
    if by == "rows":
        expected = reg.prox_(transposed.contiguous(), 0.5)
        torch.testing.assert_close(reg.prox_(transposed, 0.5), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("by", ["rows", "kernels"])
def test_group_l1_takes_a_shard_with_no_rows(by: str) -> None:
    """FSDP2 gives a rank no rows of a layer with fewer rows than ranks."""
    empty = torch.zeros(0, 2, 3, 3)
    reg = GroupL1(by)
    reg.prox_(empty, 0.1)
    assert float(reg.value(empty)) == 0.0 and reg.subgradient(empty).shape == empty.shape


@pytest.mark.parametrize("reg", [L1(), GroupL1("rows"), GroupL1("kernels")])
@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.8, 5.0])
def test_zeroed_counts_what_one_proximal_step_leaves_at_zero(
    reg: Regularizer, threshold: float
) -> None:
    x = torch.randn(6, 4, 3, 3, generator=torch.Generator().manual_seed(3))
    x[1] = 0.0  # a zero row: zero before and after
    expected = int((reg.prox_(x.clone(), threshold) == 0).sum())
    assert reg.zeroed(x, threshold).item() == expected
