"""L1: value, subgradient and prox against closed forms."""

from __future__ import annotations

import torch

from dist_bregman.regularizers import L1


def test_prox_is_soft_thresholding_with_exact_zeros() -> None:
    torch.manual_seed(0)
    x = torch.randn(1000, dtype=torch.float64)
    t = 0.4
    expected = torch.sign(x) * torch.clamp(x.abs() - t, min=0.0)
    out = x.clone()
    L1().prox_(out, t)
    assert torch.equal(out, expected)
    assert int((out == 0).sum()) == int((x.abs() <= t).sum())


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
