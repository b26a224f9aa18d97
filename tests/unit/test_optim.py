"""LinBreg, AdaBreg, ProxSGD against closed forms and their own definitions."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from dist_bregman.init import magnitude_init_, sparse_init_
from dist_bregman.optim import AdaBreg, LinBreg, ProxSGD
from dist_bregman.regularizers import L1, GroupL1


def _model(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 12), nn.ReLU(), nn.Linear(12, 3)).to(dtype)


def _grads(model: nn.Module, step: int) -> None:
    generator = torch.Generator().manual_seed(step)
    x = torch.randn(16, 5, generator=generator).to(next(model.parameters()).dtype)
    y = torch.randint(0, 3, (16,), generator=generator)
    model.zero_grad()
    F.cross_entropy(model(x).float(), y).backward()


def _run(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, start: int = 0) -> None:
    for step in range(start, start + steps):
        _grads(model, step)
        optimizer.step()


def _soft(x: torch.Tensor, t: float) -> torch.Tensor:
    return torch.sign(x) * torch.clamp(x.abs() - t, min=0)


@pytest.mark.parametrize("delta", [1.0, 0.5, 0.3])
def test_linbreg_without_regularizer_is_sgd_with_lr_times_delta(delta: float) -> None:
    a, b = _model(), _model()
    _run(a, LinBreg([{"params": a.parameters(), "reg": None}], lr=0.1, delta=delta), 5)
    _run(b, torch.optim.SGD(b.parameters(), lr=0.1 * delta), 5)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        if delta in (1.0, 0.5):  # exact in binary floating point
            assert torch.equal(pa, pb)
        else:
            torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)


def test_linbreg_momentum_at_lr_over_one_minus_b_takes_sgd_heavy_ball_steps() -> None:
    """LinBreg's momentum averages ``(1 - b) * lr * g`` where SGD's sums ``g``: at
    ``lr / (1 - b)`` (lambda 0) the two move the weights alike. The quality benchmark and
    the digits config give LinBreg that learning rate for SGD's step size."""
    a, b = _model(), _model()
    beta = 0.9
    _run(a, LinBreg(a.parameters(), lr=0.05 / (1 - beta), momentum=beta, lambda_=0.0), 8)
    _run(b, torch.optim.SGD(b.parameters(), lr=0.05, momentum=beta), 8)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("delta", [0.7, 1.0])  # 1.0: theta is shrunk straight into p
def test_linbreg_momentum_and_l1_follow_the_definition_step_by_step(delta: float) -> None:
    model, reference = _model(), _model()
    lr, lam, beta = 0.2, 0.05, 0.8
    optimizer = LinBreg(model.parameters(), lr=lr, lambda_=lam, delta=delta, momentum=beta)
    ref = {n: p.detach().clone() for n, p in reference.named_parameters()}
    v = {n: t / delta + (lam * t.sign() if t.ndim >= 2 else 0) for n, t in ref.items()}
    m = {n: torch.zeros_like(t) for n, t in ref.items()}
    for step in range(4):
        _grads(reference, step)
        for n, p in reference.named_parameters():
            m[n] = beta * m[n] + (1 - beta) * lr * p.grad
            v[n] = v[n] - m[n]
            theta = delta * (_soft(v[n], lam) if p.ndim >= 2 else v[n])
            with torch.no_grad():
                p.copy_(theta)
    _run(model, optimizer, 4)
    for (name, p), (_, q) in zip(
        model.named_parameters(), reference.named_parameters(), strict=True
    ):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)
        torch.testing.assert_close(optimizer.state[p]["v"], v[name], rtol=1e-6, atol=1e-7)
    assert optimizer.param_groups[1]["reg"] is None and optimizer.param_groups[0]["reg"] == "l1"


def test_from_a_sparse_start_a_weight_is_nonzero_exactly_when_its_evidence_exceeds_lambda() -> None:
    model = _model()
    sparse_init_(model, 0.1, generator=torch.Generator().manual_seed(0))
    start = int((model[0].weight != 0).sum()) + int((model[2].weight != 0).sum())
    optimizer = LinBreg(model.parameters(), lr=0.5, lambda_=0.2)
    counts = []
    for step in range(30):
        _run(model, optimizer, 1, start=step)
        counts.append(int((model[0].weight != 0).sum()) + int((model[2].weight != 0).sum()))
    for weight in (model[0].weight, model[2].weight):
        v = optimizer.state[weight]["v"]
        assert torch.equal(weight != 0, v.abs() > 0.2)  # the support is {|v| > lambda}
    assert start < counts[-1] < weight.numel() + model[0].weight.numel()  # grows, stays sparse


def test_linbreg_starts_exactly_at_the_initial_weights() -> None:
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = LinBreg(model.parameters(), lr=0.0, lambda_=0.3, delta=1.0)
    _run(model, optimizer, 1)
    for p, q in zip(model.parameters(), before, strict=True):
        # prox(theta + 0.3*sign(theta), 0.3) = theta up to the rounding of (|t| + 0.3) - 0.3
        torch.testing.assert_close(p, q, rtol=0, atol=torch.finfo(torch.float32).eps * 0.3)


def test_adabreg_without_regularizer_and_delta_1_is_adam() -> None:
    a, b = _model(), _model()
    _run(a, AdaBreg([{"params": a.parameters(), "reg": None}], lr=0.01), 6)
    _run(b, torch.optim.Adam(b.parameters(), lr=0.01), 6)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-7)


def test_adabreg_is_adam_on_v_then_the_primal_map() -> None:
    model, reference = _model(), _model()
    lr, lam, delta, (b1, b2), eps = 0.01, 0.02, 2.0, (0.9, 0.99), 1e-8
    optimizer = AdaBreg(
        model.parameters(), lr=lr, lambda_=lam, delta=delta, betas=(b1, b2), eps=eps
    )
    ref = {n: p.detach().clone() for n, p in reference.named_parameters()}
    v = {n: t / delta + (lam * t.sign() if t.ndim >= 2 else 0) for n, t in ref.items()}
    m = {n: torch.zeros_like(t) for n, t in ref.items()}
    s = {n: torch.zeros_like(t) for n, t in ref.items()}
    for step in range(1, 5):
        _grads(reference, step - 1)
        for n, p in reference.named_parameters():
            m[n] = b1 * m[n] + (1 - b1) * p.grad
            s[n] = b2 * s[n] + (1 - b2) * p.grad**2
            m_hat, s_hat = m[n] / (1 - b1**step), s[n] / (1 - b2**step)
            v[n] = v[n] - lr * m_hat / (s_hat.sqrt() + eps)
            with torch.no_grad():
                p.copy_(delta * (_soft(v[n], lam) if p.ndim >= 2 else v[n]))
    _run(model, optimizer, 4)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_proxsgd_is_a_gradient_step_then_soft_thresholding() -> None:
    model = _model()
    optimizer = ProxSGD(model.parameters(), lr=0.1, lambda_=0.5)
    _grads(model, 0)
    expected = [
        _soft(p - 0.1 * p.grad, 0.05) if p.ndim >= 2 else p - 0.1 * p.grad
        for p in model.parameters()
    ]
    optimizer.step()
    for p, q in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7)


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: LinBreg(ps, lr=0.1, lambda_=0.02, momentum=0.9),
        lambda ps: AdaBreg(ps, lr=0.01, lambda_=0.02),
        # delta != 1 and a group regularizer: theta in the multi-tensor kernels (with
        # delta 1 and L1 it is shrunk straight into each parameter on both paths)
        lambda ps: LinBreg(ps, lr=0.1, lambda_=0.02, momentum=0.9, delta=0.7),
        lambda ps: AdaBreg(ps, lr=0.01, lambda_=0.02, reg="group_l1"),
    ],
)
def test_foreach_path_equals_the_loop(make) -> None:
    a, b = _model(), _model()
    opt_a, opt_b = make(a.parameters()), make(b.parameters())
    for group in opt_a.param_groups:
        group["foreach"] = True
    for group in opt_b.param_groups:
        group["foreach"] = False
    _run(a, opt_a, 5)
    _run(b, opt_b, 5)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: LinBreg(ps, lr=0.1, lambda_=0.02),
        lambda ps: LinBreg(ps, lr=0.1, lambda_=0.02, momentum=0.9),
        lambda ps: LinBreg(ps, lr=0.1, lambda_=0.02, momentum=0.9, foreach=True),
        lambda ps: AdaBreg(ps, lr=0.01, lambda_=0.02),
        lambda ps: AdaBreg(ps, lr=0.01, lambda_=0.02, foreach=True),
        lambda ps: ProxSGD(ps, lr=0.1, lambda_=0.02, momentum=0.9),
    ],
)
def test_sparse_embedding_gradients_take_the_dense_gradients_steps(make) -> None:
    """``nn.Embedding(sparse=True)`` gives COO gradients (AdaBreg raised on them): every
    optimizer must step as it does on the same gradients made dense."""
    torch.manual_seed(0)
    sparse = nn.Embedding(20, 6, sparse=True)
    with torch.no_grad():
        sparse.weight.mul_(0.1)  # small weights, so the steps below zero some of them
    dense = nn.Embedding(20, 6)
    dense.load_state_dict(sparse.state_dict())
    optimizers = [make(sparse.parameters()), make(dense.parameters())]
    for step in range(4):
        rows = torch.randint(0, 20, (5,), generator=torch.Generator().manual_seed(step))
        for embedding, optimizer in zip((sparse, dense), optimizers, strict=True):
            optimizer.zero_grad()
            embedding(rows).sum().backward()
            optimizer.step()
        assert sparse.weight.grad is not None and sparse.weight.grad.is_sparse
    assert (dense.weight == 0).any() and (dense.weight != 0).any()  # the prox acted
    torch.testing.assert_close(sparse.weight, dense.weight, rtol=1e-6, atol=1e-7)


def test_bf16_parameters_keep_fp32_state_and_are_written_in_place() -> None:
    model = _model(dtype=torch.bfloat16)
    addresses = [p.data_ptr() for p in model.parameters()]
    optimizer = AdaBreg(model.parameters(), lr=0.01, lambda_=0.01)
    _run(model, optimizer, 3)
    assert [p.data_ptr() for p in model.parameters()] == addresses
    for p in model.parameters():
        assert p.dtype == torch.bfloat16
        assert {t.dtype for t in optimizer.state[p].values() if isinstance(t, torch.Tensor)} == {
            torch.float32
        }


def test_closure_is_called_and_its_loss_returned() -> None:
    model = _model()
    optimizer = LinBreg(model.parameters(), lr=0.1)
    calls = []

    def closure() -> float:
        calls.append(1)
        _grads(model, 0)
        return 1.5

    assert optimizer.step(closure) == 1.5 and calls == [1]


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: LinBreg(ps, lr=0.1, lambda_=0.02, momentum=0.9),
        lambda ps: AdaBreg(ps, lr=0.01, lambda_=0.02),
        lambda ps: ProxSGD(ps, lr=0.1, lambda_=0.02, momentum=0.9),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip_continues_bit_identically(make, dtype, tmp_path) -> None:
    """bf16 parameters: torch's load_state_dict casts every floating state tensor to the
    parameter's dtype; ``v`` and the moments must come back in fp32 as they were saved."""
    model = _model(dtype=dtype)
    optimizer = make(model.parameters())
    _run(model, optimizer, 3)
    torch.save({"model": model.state_dict(), "opt": optimizer.state_dict()}, tmp_path / "c.pt")
    _run(model, optimizer, 3, start=3)

    saved = torch.load(tmp_path / "c.pt", weights_only=True)
    fresh = _model(seed=99, dtype=dtype)
    fresh.load_state_dict(saved["model"])
    fresh_optimizer = make(fresh.parameters())
    fresh_optimizer.load_state_dict(saved["opt"])
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        kept, loaded = optimizer.state[p], fresh_optimizer.state[q]
        assert {k: getattr(v, "dtype", None) for k, v in loaded.items()} == {
            k: getattr(v, "dtype", None) for k, v in kept.items()
        }
    _run(fresh, fresh_optimizer, 3, start=3)
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: LinBreg(ps, lr=0.1, lambda_=0.02, momentum=0.9),
        lambda ps: AdaBreg(ps, lr=0.01, lambda_=0.02),
    ],
    ids=["linbreg", "adabreg"],
)
def test_scalar_state_is_saved_as_0d_cpu_tensors_and_read_back_as_numbers(make) -> None:
    """``lambda`` and ``step`` are numbers while training and 0-d CPU tensors in a state
    dict (FSDP1 loading from rank 0 only calls ``.cpu()`` on every state value). A state
    dict of numbers (saved before) loads too, and tensors written straight into the state
    (torch's ZeroRedundancyOptimizer loads its local optimizer so) step on alike."""
    scalar = ("lambda", "step")
    model = _model()
    optimizer = make(model.parameters())
    _run(model, optimizer, 3)
    saved = copy.deepcopy(optimizer.state_dict())  # (as written to a file: not shared)
    tensors = [v for s in saved["state"].values() for k, v in s.items() if k in scalar]
    assert tensors and all(v.dim() == 0 and v.device.type == "cpu" for v in tensors)
    live = [v for s in optimizer.state.values() for k, v in s.items() if k in scalar]
    assert all(isinstance(v, (int, float)) for v in live)

    as_numbers = {
        **saved,
        "state": {
            i: {k: v.item() if k in scalar else v for k, v in s.items()}
            for i, s in saved["state"].items()
        },
    }
    runs = []
    for how in ("tensors", "numbers", "written"):
        fresh = _model(seed=99)
        fresh.load_state_dict(model.state_dict())
        loaded = make(fresh.parameters())
        if how == "written":
            loaded.load_state_dict(copy.deepcopy(saved))  # then the state as a wrapper writes it
            ordered = [p for group in loaded.param_groups for p in group["params"]]
            for index, state in saved["state"].items():
                loaded.state[ordered[index]] = {k: v.clone() for k, v in state.items()}
        else:
            loaded.load_state_dict(copy.deepcopy(saved if how == "tensors" else as_numbers))
            states = [s[k] for s in loaded.state.values() for k in scalar if k in s]
            assert all(isinstance(v, (int, float)) for v in states)
        _run(fresh, loaded, 3, start=3)
        runs.append(fresh)
    _run(model, optimizer, 3, start=3)
    for run in runs:
        for p, q in zip(model.parameters(), run.parameters(), strict=True):
            assert torch.equal(p, q)


def _set_lambda_then_still_step(optimizer: LinBreg, model: nn.Module, value: float) -> None:
    """Set lambda, then one step at lr 0: it applies the change without moving ``v``."""
    optimizer.set_lambda(value)
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    _run(model, optimizer, 1)


@pytest.mark.parametrize("reg", ["l1", "group_l1"])
def test_a_lambda_change_between_positive_values_keeps_v(reg: str) -> None:
    """A rise shrinks the active weights by it and zeroes the ones it passes: lambda moves
    the support, where a restart from theta would leave every active weight in place."""
    model = _model()
    optimizer = LinBreg(model.parameters(), lr=0.5, lambda_=0.05, reg=reg)
    _run(model, optimizer, 6)
    weights = (model[0].weight, model[2].weight)
    duals = [optimizer.state[w]["v"].clone() for w in weights]
    active = sum(int(w.count_nonzero()) for w in weights)
    _set_lambda_then_still_step(optimizer, model, 0.25)
    regularizer = GroupL1() if reg == "group_l1" else L1()
    for weight, v in zip(weights, duals, strict=True):
        state = optimizer.state[weight]
        torch.testing.assert_close(state["v"], v, rtol=0, atol=0)
        torch.testing.assert_close(weight.detach(), regularizer.prox_(v.clone(), 0.25))
        assert state["lambda"] == 0.25
    assert 0 < sum(int(w.count_nonzero()) for w in weights) < active


@pytest.mark.parametrize("reg", ["l1", "group_l1"])
@pytest.mark.parametrize(("old", "new"), [(0.0, 0.25), (0.05, 0.0)])
def test_shrinkage_on_or_off_restarts_from_the_current_theta(
    reg: str, old: float, new: float
) -> None:
    """Keeping ``v`` there would move every active weight by lambda at once."""
    model = _model()
    optimizer = LinBreg(model.parameters(), lr=0.5, lambda_=old, reg=reg)
    _run(model, optimizer, 6)
    before = [p.detach().clone() for p in model.parameters()]
    _set_lambda_then_still_step(optimizer, model, new)
    assert [g["lambda"] for g in optimizer.param_groups] == [new, old]  # biases: reg None
    for p, q in zip(model.parameters(), before, strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)  # theta has not jumped
    # v is theta/delta + new * dJ1(theta): the initialisation rule, at the current theta.
    regularizer = GroupL1() if reg == "group_l1" else L1()
    for weight in (model[0].weight, model[2].weight):
        state = optimizer.state[weight]
        expected = weight.detach() + new * regularizer.subgradient(weight.detach())
        torch.testing.assert_close(state["v"], expected, rtol=0, atol=1e-6)
        assert state["lambda"] == new


def test_weights_get_the_default_regularizer_and_vectors_none() -> None:
    model = _model()
    optimizer = LinBreg(model.parameters(), reg="group_l1", lambda_=0.1)
    assert [(g["reg"], len(g["params"])) for g in optimizer.param_groups] == [
        ("group_l1", 2),
        (None, 2),
    ]
    explicit = LinBreg([{"params": [model[0].bias], "reg": "l1"}])
    assert explicit.param_groups[0]["reg"] == "l1"
    assert [len(p) for p in [optimizer.regularized_params()]] == [2]


@pytest.mark.parametrize("make", [LinBreg, AdaBreg, ProxSGD])
def test_set_lambda_gives_each_group_its_lambda_scale_share(make) -> None:
    """The pruner drives one lambda; a group's ``lambda_scale`` keeps its ratio to it, from
    construction (no ``lambda`` given) through every ``set_lambda`` and a checkpoint."""
    model = _model()
    optimizer = make(
        [
            {"params": [model[0].weight], "lambda_scale": 0.25},
            {"params": [model[2].weight], "lambda_scale": 0.0},
            {"params": [model[0].bias, model[2].bias], "reg": None, "lambda_scale": 3.0},
            # an explicit lambda wins until the first set_lambda
            {"params": [torch.zeros(2, 2)], "reg": "l1", "lambda": 0.5, "lambda_scale": 2.0},
        ],
        lambda_=0.2,
    )
    lambdas = [g["lambda"] for g in optimizer.param_groups]
    assert lambdas == pytest.approx([0.05, 0.0, 0.6, 0.5], rel=1e-15)
    optimizer.set_lambda(0.4)
    lambdas = [g["lambda"] for g in optimizer.param_groups]
    assert lambdas == pytest.approx([0.1, 0.0, 0.6, 0.8], rel=1e-15)  # reg None: untouched
    copy = make([{"params": list(p["params"])} for p in optimizer.param_groups], lambda_=0.2)
    copy.load_state_dict(optimizer.state_dict())
    copy.set_lambda(1.0)
    lambdas = [g["lambda"] for g in copy.param_groups]
    assert lambdas == pytest.approx([0.25, 0.0, 0.6, 2.0], rel=1e-15)


@pytest.mark.parametrize(
    ("build", "error", "pattern"),
    [
        (lambda ps: LinBreg(ps, lr=-1.0), ValueError, r"lr=-1\.0"),
        (
            lambda ps: LinBreg([{"params": list(ps), "lambda_scale": -1}]),
            ValueError,
            r"param group lambda_scale=-1",
        ),
        (
            lambda ps: AdaBreg([{"params": list(ps), "lambda": 1.0, "lambda_scale": "x"}]),
            TypeError,
            r"param group lambda_scale='x'",
        ),
        (lambda ps: LinBreg(ps, delta=0.0), ValueError, r"delta=0\.0: expected a number > 0"),
        (lambda ps: LinBreg(ps, momentum=1.0), ValueError, r"momentum=1\.0"),
        (lambda ps: LinBreg(ps, lambda_=float("nan")), ValueError, r"lambda_=nan"),
        (lambda ps: LinBreg(ps, reg="l0"), ValueError, r"reg='l0': expected 'l1', 'group_l1'"),
        (lambda ps: AdaBreg(ps, betas=(0.9, 1.0)), ValueError, r"betas\[1\]=1\.0"),
        (lambda ps: ProxSGD(ps, lr="fast"), TypeError, r"lr='fast'"),
    ],
)
def test_bad_optimizer_arguments_name_the_setting(build, error: type, pattern: str) -> None:
    with pytest.raises(error, match=pattern):
        build(_model().parameters())


def test_sparse_init_keeps_rate_scales_variance_and_biases_positive() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(400, 300), nn.ReLU(), nn.Linear(300, 200))
    dense_std = [model[0].weight.std().item(), model[2].weight.std().item()]
    sparse_init_(model, 0.2, generator=torch.Generator().manual_seed(1))
    for layer, std in zip([model[0], model[2]], dense_std, strict=True):
        kept = (layer.weight != 0).float().mean().item()
        assert abs(kept - 0.2) < 0.01
        assert abs(layer.weight.std().item() - std) / std < 0.05  # variance preserved
        assert bool((layer.bias > 0).all()) and layer.bias.max() <= 1 / layer.weight.shape[1] ** 0.5
    rows = nn.Linear(50, 400)
    sparse_init_(nn.Sequential(rows), 0.25, rows=True, generator=torch.Generator().manual_seed(2))
    alive = (rows.weight != 0).any(dim=1)
    assert bool(((rows.weight != 0).sum(dim=1)[alive] == 50).all())  # whole rows kept
    assert abs(alive.float().mean().item() - 0.25) < 0.08


def test_magnitude_init_keeps_exactly_the_largest_share_over_all_weights() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 20))
    with torch.no_grad():
        model[2].weight.mul_(3)  # one layer larger: a global cut keeps more of it
        model[0].weight[:5] = 0  # natural zeros are among the smallest
    layers = (model[0], model[2])
    weights = [layer.weight for layer in layers]
    biases = [layer.bias.detach().clone() for layer in layers]
    before = torch.cat([w.detach().abs().flatten() for w in weights])
    sparsity = magnitude_init_(model, 0.25)
    after = torch.cat([w.detach().flatten() for w in weights])
    keep = round(0.25 * before.numel())
    assert int((after != 0).sum()) == keep
    assert sparsity == 1 - keep / before.numel()
    assert bool((after.abs()[after != 0] >= before.topk(keep).values.min()).all())
    assert torch.equal(after[after != 0].abs(), before[after != 0])  # kept ones unchanged
    kept = [(w != 0).float().mean().item() for w in weights]
    assert kept[1] > 0.5 > kept[0]
    assert all(torch.equal(b, layer.bias) for b, layer in zip(biases, layers, strict=True))


@pytest.mark.parametrize(("rate", "pattern"), [(0.0, r"rate=0\.0.*\(0, 1\]"), (1.5, "rate")])
def test_magnitude_init_rejects_a_rate_outside_0_1(rate: float, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        magnitude_init_(_model(), rate)
