"""The core without Lightning: proximal step, loss term, lambda schedule and state."""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import prune

from dist_bregman import BregmanConfig, MagnitudePruner, SparsityController, kernels
from dist_bregman.config import Mode
from dist_bregman.guards import LOSS_FOLD
from dist_bregman.optim import LinBreg
from tests.helpers.dynamo import dynamo_warnings
from tests.helpers.models import COMPUTED_WEIGHTS, compute_weight
from tests.helpers.strategies import PassThrough


def _model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


def _batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(8, 6, generator=generator), torch.randint(0, 3, (8,), generator=generator))
        for _ in range(n)
    ]


def _train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    controller: SparsityController,
    batches: list,
    add_loss_term: bool,
    start: int = 1,
) -> None:
    for step, (x, y) in enumerate(batches, start=start):
        loss = F.cross_entropy(model(x), y)
        if add_loss_term:
            loss = loss + controller.regularization_loss()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        controller.observe_loss(loss)
        controller.update_if_due(step)


def test_proximal_step_is_sgd_then_soft_threshold_with_lr_times_lambda() -> None:
    model = _model()
    controller = SparsityController(
        model, BregmanConfig(initial_lambda=0.5, update_frequency=10**6)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    controller.attach(optimizer)
    x, y = _batches(1)[0]
    F.cross_entropy(model(x), y).backward()
    expected = {}
    for name, p in model.named_parameters():
        moved = p.detach() - 0.1 * p.grad
        if name.endswith("weight"):
            moved = torch.sign(moved) * torch.clamp(moved.abs() - 0.1 * 0.5, min=0)
        expected[name] = moved
    optimizer.step()
    for name, p in model.named_parameters():
        assert torch.allclose(p.detach(), expected[name], atol=1e-7), name
    assert int((model[0].weight == 0).sum()) > 0  # exact zeros, biases untouched
    assert int((model[0].bias == 0).sum()) == 0


def test_proximal_step_uses_each_param_groups_own_lr() -> None:
    model = _model()
    controller = SparsityController(model, BregmanConfig(initial_lambda=1.0))
    optimizer = torch.optim.SGD(
        [{"params": [model[0].weight], "lr": 0.01}, {"params": [model[2].weight], "lr": 0.2}],
        lr=0.1,
    )
    controller.attach(optimizer)
    before = [model[0].weight.detach().clone(), model[2].weight.detach().clone()]
    optimizer.step()  # no gradients: the optimizer moves nothing, the prox still shrinks
    for weight, old, lr in zip(
        [model[0].weight, model[2].weight], before, [0.01, 0.2], strict=True
    ):
        assert torch.equal(weight.detach(), torch.sign(old) * torch.clamp(old.abs() - lr, min=0))


def test_each_param_groups_lambda_scale_scales_its_threshold_and_loss_term() -> None:
    """Per layer strength for any optimizer: threshold ``lr * lambda * lambda_scale``, and
    the loss term weights each layer the same way (its gradient too, in loss mode)."""
    model = _model()
    controller = SparsityController(model, BregmanConfig(initial_lambda=1.0))
    optimizer = torch.optim.SGD(
        [
            {"params": [model[0].weight], "lambda_scale": 0.25},
            {"params": [model[2].weight, model[0].bias, model[2].bias]},
        ],
        lr=0.1,
    )
    controller.attach(optimizer)
    before = [model[0].weight.detach().clone(), model[2].weight.detach().clone()]
    term = controller.regularization_loss()
    assert term.item() == pytest.approx(
        (0.25 * before[0].abs().sum() + before[1].abs().sum()).item()
    )
    optimizer.step()  # no gradients: the optimizer moves nothing, the prox still shrinks
    for weight, old, threshold in zip(
        [model[0].weight, model[2].weight], before, [0.025, 0.1], strict=True
    ):
        expected = torch.sign(old) * torch.clamp(old.abs() - threshold, min=0)
        assert torch.equal(weight.detach(), expected)

    model = _model()
    controller = SparsityController(model, BregmanConfig(initial_lambda=0.5, mode="loss"))
    groups = [{"params": [model[0].weight], "lambda_scale": 3.0}, {"params": [model[2].weight]}]
    controller.attach(torch.optim.SGD(groups, lr=0.1))
    controller.regularization_loss().backward()
    assert torch.equal(model[0].weight.grad, 1.5 * model[0].weight.detach().sign())
    assert torch.equal(model[2].weight.grad, 0.5 * model[2].weight.detach().sign())


@pytest.mark.parametrize(
    ("scale", "error", "pattern"),
    [(-0.5, ValueError, r"param group 1 lambda_scale=-0\.5"), (None, TypeError, "got NoneType")],
)
def test_a_bad_lambda_scale_in_a_plain_optimizer_is_refused_at_attach(
    scale: object, error: type, pattern: str
) -> None:
    model = _model()
    controller = SparsityController(model, BregmanConfig())
    groups = [{"params": [model[0].weight]}, {"params": [model[2].weight], "lambda_scale": scale}]
    with pytest.raises(error, match=pattern):
        controller.attach(torch.optim.SGD(groups, lr=0.1))


def test_seed_loss_term_does_not_double_the_strength_in_prox_mode() -> None:
    base = _model()
    runs = []
    for add_loss_term in (False, True):
        model = copy.deepcopy(base)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        controller = SparsityController(
            model, BregmanConfig(initial_lambda=0.05, update_frequency=5)
        )
        controller.attach(optimizer)
        _train(model, optimizer, controller, _batches(20), add_loss_term)
        runs.append((model.state_dict(), controller.lambda_))
    (plain, lam_plain), (with_term, lam_term) = runs
    assert lam_plain == lam_term
    for key in plain:
        assert torch.equal(plain[key], with_term[key]), key


def test_prox_mode_loss_term_has_the_penalty_value_and_no_gradient_into_weights() -> None:
    model = _model()
    controller = SparsityController(model, BregmanConfig(initial_lambda=0.25))
    term = controller.regularization_loss()
    expected = 0.25 * (model[0].weight.abs().sum() + model[2].weight.abs().sum())
    assert term.requires_grad and term.item() == pytest.approx(expected.item())
    term.backward()
    assert model[0].weight.grad is None


@pytest.mark.parametrize("mode", ["prox", "loss"])
def test_the_term_is_the_same_through_the_kernel_and_torch_ops(
    mode: Mode, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The C++ L1 sum (float32 layers, a pruned one read as weight_orig * mask) and torch
    ops (the bfloat16 layer, and every layer where the kernel is missing) give one value,
    and in loss mode one gradient, bit for bit."""
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.Linear(16, 3))
    prune.random_unstructured(model[0], "weight", amount=0.5)
    model[3].to(torch.bfloat16)
    config = BregmanConfig(initial_lambda=0.5, mode=mode)
    controller = SparsityController(model, config)
    held = [model[0].weight_orig, model[2].weight, model[3].weight]
    groups = [{"params": held[:1], "lambda_scale": 0.25}, {"params": held[1:]}]
    controller.attach(torch.optim.SGD(groups, lr=0.1))
    effective = [model[0].weight, model[2].weight, model[3].weight]
    expected = 0.5 * sum(
        scale * float(w.detach().double().abs().sum())
        for w, scale in zip(effective, [0.25, 1.0, 1.0], strict=True)
    )
    terms, grads = [], []
    for kernel in (True, False):
        if not kernel:
            monkeypatch.setattr(kernels, "abs_sum_many", lambda values, masks: None)
        term = controller.regularization_loss()
        term.backward()
        terms.append(term.detach())
        grads.append([None if p.grad is None else p.grad.clone() for p in held])
        for p in held:
            p.grad = None
    assert terms[0].dtype == terms[1].dtype == torch.float32
    assert float(terms[0]) == pytest.approx(expected, rel=1e-6)
    assert float(terms[1]) == pytest.approx(expected, rel=1e-6)
    if mode == "prox":
        assert grads == [[None] * 3] * 2  # a value: no gradient reaches the weights
        return
    for fast, slow, p, scale in zip(*grads, held, [0.25, 1.0, 1.0], strict=True):
        assert fast is not None and slow is not None and torch.equal(fast, slow)
        mask = model[0].weight_mask if p is held[0] else 1.0
        assert torch.equal(fast, (0.5 * scale * mask * p.detach().sign()).to(p.dtype))


@pytest.mark.parametrize("mode", ["prox", "loss"])
def test_the_term_reads_no_weight_while_the_penalty_is_off(
    mode: Mode, monkeypatch: pytest.MonkeyPatch
) -> None:
    """During the dense warm-up (and once the support is frozen) the term is 0 without a
    pass over the weights, or under sharding an all-reduce."""
    model = _model()
    config = BregmanConfig(magnitude_start_at=10, mode=mode)
    controller = SparsityController(model, config)
    controller.attach(torch.optim.SGD(model.parameters(), lr=0.1))

    def read(*_: object, **__: object) -> torch.Tensor:
        raise AssertionError("the weights were read")

    monkeypatch.setattr(controller, "_penalty", read)
    term = controller.regularization_loss()
    assert not controller.started and term.requires_grad and float(term.detach()) == 0.0


def test_loss_mode_gradient_is_lambda_times_sign_and_no_hook_acts() -> None:
    model = _model()
    controller = SparsityController(model, BregmanConfig(initial_lambda=0.25, mode="loss"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    controller.attach(optimizer)
    controller.regularization_loss().backward()
    assert torch.equal(model[0].weight.grad, 0.25 * model[0].weight.detach().sign())
    before = model[0].weight.detach().clone()
    optimizer.step()
    assert torch.equal(model[0].weight.detach(), before - 0.1 * 0.25 * before.sign())


def _raw_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, controller: SparsityController
) -> Callable[[torch.Tensor, torch.Tensor, int], None]:
    """A raw loop's whole step, the seed's loss term included (the module docstring's)."""

    def step(x: torch.Tensor, y: torch.Tensor, number: int) -> None:
        loss = F.cross_entropy(model(x), y) + controller.regularization_loss()
        loss.backward()
        controller.follow_groups()
        if controller.gradients_finite([optimizer], number):  # the guarded loop's check
            optimizer.step()
        optimizer.zero_grad()
        controller.observe_loss(loss)
        controller.update_if_due(number)

    return step


@pytest.mark.parametrize("mode", ["prox", "loss"])
def test_a_compiled_step_runs_the_controller_eagerly_and_steps_as_eager(mode: Mode) -> None:
    """A raw loop's step under torch.compile (Dynamo with its eager backend: the tracing,
    no code generation) breaks its graph at the controller's calls, with none of Dynamo's
    warnings about the C++ kernels and host-side decisions it cannot trace, and trains
    as without it: the weights (to rounding), lambda (updated every 3 steps) and the
    measurement exactly."""
    results = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        model = _model()
        config = BregmanConfig(
            initial_lambda=0.05, lambda_update_rate=0.1, update_frequency=3, mode=mode
        )
        controller = SparsityController(model, config)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        controller.attach(optimizer)
        step = _raw_step(model, optimizer, controller)
        run = torch.compile(step, backend="eager") if compiled else step
        with dynamo_warnings() as warned:
            for number, (x, y) in enumerate(_batches(7), start=1):
                run(x, y, number)
        assert warned == []
        weights = [p.detach().clone() for p in model.parameters()]
        results[compiled] = (weights, controller.lambda_, controller.measure())
    (eager, lam, report), (traced, traced_lam, traced_report) = results[False], results[True]
    # Equal bit for bit on torch 2.13 and 2.14; on 2.10 the traced forward rounds an ulp
    # apart (3e-8). A missed or doubled proximal step would move weights by lr * lambda.
    torch.testing.assert_close(traced, eager, rtol=0, atol=1e-6)
    assert (traced_lam, traced_report) == (lam, report) and lam != 0.05
    assert controller.skipped_steps == 0


def test_prox_acts_on_weight_orig_of_a_pruned_layer_and_masked_zeros_stay() -> None:
    model = _model()
    prune.l1_unstructured(model[0], "weight", amount=0.5)
    controller = SparsityController(model, BregmanConfig(initial_lambda=0.1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    controller.attach(optimizer)
    assert list(controller.regularized_names()) == ["0.weight", "2.weight"]
    before = model[0].weight_orig.detach().clone()
    optimizer.step()
    assert torch.equal(
        model[0].weight_orig.detach(), torch.sign(before) * torch.clamp(before.abs() - 0.01, min=0)
    )
    assert controller.measure().per_parameter["0.weight"][0] <= 48


def test_attach_rejects_trainable_targets_no_optimizer_holds_and_skips_frozen() -> None:
    model = _model()
    controller = SparsityController(model)
    with pytest.raises(ValueError, match=r"\['2.weight'\] are trainable but no optimizer holds"):
        controller.attach(torch.optim.SGD([model[0].weight], lr=0.1))
    model[2].weight.requires_grad_(False)
    reachable = SparsityController(model, BregmanConfig(target_sparsity=0.6))
    reachable.attach(torch.optim.SGD([model[0].weight], lr=0.1))
    assert list(reachable.regularized_names()) == ["0.weight"]


@pytest.mark.parametrize("kind", list(COMPUTED_WEIGHTS))
def test_a_computed_weight_is_read_fresh_refused_where_writes_are_lost_and_regularized_in_loss_mode(
    kind: str,
) -> None:
    _, carrier, by = COMPUTED_WEIGHTS[kind]
    model = _model()
    compute_weight(model[0], kind)
    for config in (BregmanConfig(), BregmanConfig(mode="loss", freeze_support_at=10)):
        with pytest.raises(ValueError, match=rf"0\.weight is computed by {by}"):
            SparsityController(model, config)
    controller = SparsityController(model, BregmanConfig(initial_lambda=0.25, mode="loss"))
    with pytest.raises(ValueError, match=r"\['0.weight'\] are trainable but no optimizer holds"):
        controller.attach(torch.optim.SGD(model[2].parameters(), lr=0.1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    controller.attach(optimizer)
    assert list(controller.regularized_names()) == ["0.weight", "2.weight"]
    controller.regularization_loss().backward()
    original = carrier(model[0])
    assert original.grad is not None and original.grad.abs().sum() > 0
    with torch.no_grad():  # its zeros are zeros of the computed weight, with no forward run
        original[:, :2] = 0.0
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    assert model.training and controller.measure().per_parameter["0.weight"][0] == 16 * 6 - 16 * 2
    # Reading leaves the model as it was: spectral_norm's power iteration (training mode)
    # moved its u, v buffers at every measurement.
    assert all(torch.equal(b, buffers[name]) for name, b in model.named_buffers())


def test_detach_removes_the_hook() -> None:
    model = _model()
    controller = SparsityController(model, BregmanConfig(initial_lambda=1.0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    controller.attach(optimizer)
    controller.detach()
    before = model[0].weight.detach().clone()
    optimizer.step()
    assert torch.equal(model[0].weight.detach(), before)


def test_updates_happen_every_update_frequency_steps_once() -> None:
    model = _model()
    controller = SparsityController(
        model, BregmanConfig(update_frequency=3, lambda_update_rate=0.1)
    )
    decisions = [controller.update_if_due(step) for step in [1, 2, 3, 3, 4, 5, 6, 7]]
    assert [d is not None for d in decisions] == [
        False,
        False,
        True,
        False,
        False,
        False,
        True,
        False,
    ]
    assert controller.last_update_step == 6
    assert controller.lambda_ == pytest.approx(1.0 + 2 * 0.1 * 0.8)  # dense model: sparsity 0


def test_non_finite_loss_skips_the_update_and_warns(caplog: pytest.LogCaptureFixture) -> None:
    controller = SparsityController(
        _model(), BregmanConfig(update_frequency=1, lambda_update_rate=0.1)
    )
    controller.observe_loss(torch.tensor(float("nan")))
    with caplog.at_level(logging.WARNING, logger="dist_bregman"):
        decision = controller.update(1)
    assert decision.skipped and controller.lambda_ == 1.0
    assert "Step 1: lambda update skipped: non-finite loss on rank(s) [0]" in caplog.text
    controller.observe_loss(torch.tensor(2.0))  # the flag was consumed: the next update runs
    assert not controller.update(2).skipped and controller.lambda_ > 1.0


def test_a_non_finite_loss_with_on_nonfinite_stop_asks_the_loop_to_stop() -> None:
    for on_nonfinite, stops in (("skip", False), ("stop", True)):
        controller = SparsityController(
            _model(), BregmanConfig(update_frequency=1, on_nonfinite=on_nonfinite)
        )
        controller.observe_loss(torch.tensor(1.0))
        assert not controller.update(1).skipped and not controller.stop_requested
        controller.observe_loss(torch.tensor(float("nan")))
        assert controller.update(2).skipped and controller.stop_requested is stops


def test_a_non_finite_loss_is_remembered_across_checks_of_kept_losses() -> None:
    """Losses are checked in batches of LOSS_FOLD: an Inf early in a long interval still
    skips the update at its end; the next interval starts clean."""
    controller = SparsityController(
        _model(), BregmanConfig(update_frequency=1, lambda_update_rate=0.1)
    )
    controller.observe_loss(torch.tensor(float("inf")))
    for _ in range(2 * LOSS_FOLD + 2):  # 131 losses: two batches checked, three kept
        controller.observe_loss(torch.tensor(0.5))
    assert len(controller.losses.kept) == 3
    assert controller.update(1).skipped
    for loss in (0.5, 0.25, 1.0):
        controller.observe_loss(loss)  # plain floats are accepted too
    assert not controller.update(2).skipped


def test_the_step_guard_reads_sparse_embedding_gradients(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``nn.Embedding(sparse=True)`` gives COO gradients, on which ``amax`` does not run:
    guard_steps raised NotImplementedError at the first step. A NaN among the stored
    values must drop the step; finite ones must not."""
    model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Linear(4, 2))
    controller = SparsityController(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.tensor([1, 2, 2])).sum().backward()
    grad = model[0].weight.grad
    assert grad is not None and grad.is_sparse
    assert controller.gradients_finite([optimizer], 1)
    grad._values()[-1, 0] = float("nan")  # an uncoalesced entry: row 2 is listed twice
    with caplog.at_level(logging.WARNING, logger="dist_bregman"):
        assert not controller.gradients_finite([optimizer], 2)
    assert "Step 2: non-finite gradient on rank(s) [0]" in caplog.text


def test_state_round_trip_and_corrupt_lambda_is_refused(
    caplog: pytest.LogCaptureFixture,
) -> None:
    controller = SparsityController(
        _model(), BregmanConfig(update_frequency=1, lambda_update_rate=0.5)
    )
    controller.update(1)
    state = controller.state_dict()
    restored = SparsityController(
        _model(), BregmanConfig(update_frequency=1, lambda_update_rate=0.5)
    )
    restored.load_state_dict(state)
    assert (restored.lambda_, restored.last_update_step, restored.sparsity) == (
        controller.lambda_,
        1,
        0.0,
    )
    assert restored.update_if_due(1) is None
    torch.save(state, buffer := __import__("io").BytesIO())
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True) == state
    with pytest.raises(ValueError, match="checkpoint lambda=nan"):
        restored.load_state_dict({"lambda": float("nan")})
    with pytest.raises(ValueError, match=r"checkpoint lambda=-0\.5: expected a number >= 0"):
        restored.load_state_dict({"lambda": -0.5})
    assert restored.lambda_ == controller.lambda_  # a refused state changes nothing
    # Resumed with bounds changed since the save: clamped into this run's, and said.
    with caplog.at_level(logging.WARNING, logger="dist_bregman"):
        restored.load_state_dict({"lambda": 500.0})
    assert restored.lambda_ == restored.config.max_lambda == 100.0
    assert "checkpoint lambda 500.00000000 is outside this run's" in caplog.text
    assert "[min_lambda, max_lambda] = [0, 100]: resuming at 100.00000000" in caplog.text


def test_attach_warns_when_shrinkage_alone_zeroes_most_weights_before_lambda_can_react(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with caplog.at_level(logging.WARNING, logger="dist_bregman"):
        SparsityController(model, BregmanConfig(initial_lambda=1e-3)).attach(optimizer)
        assert caplog.text == ""  # 100 steps x 0.05 x 1e-3 = 0.005: a few weights at most
        SparsityController(model).attach(optimizer)  # the seed's defaults: lambda 1.0
    assert "lambda=1: before the first lambda update (update_frequency=100 steps)" in caplog.text
    assert "would zero 100.0% of the regularized weights" in caplog.text


def test_the_shrinkage_warning_counts_whole_groups_under_group_sparsity(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Under group_l1 the proximal step zeroes rows whose norm is within the threshold
    (times sqrt of the row length), not single small weights. Rows of three tiny weights
    to one large one (threshold 100 x 0.05 x 0.01 = 0.05 per weight, row RMS 0.5) had read
    as 75% zeroed; rows of tiny weights only are zeroed whole."""
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.weight.fill_(0.001)
            layer.weight[:, ::4] = 1.0
    config = BregmanConfig(initial_lambda=0.01, regularizer="group_l1")
    with caplog.at_level(logging.WARNING, logger="dist_bregman"):
        SparsityController(model, config).attach(torch.optim.SGD(model.parameters(), lr=0.05))
        assert "would zero" not in caplog.text
        with torch.no_grad():
            model[0].weight.fill_(0.001)  # 128 of the 192 weights, in rows of tiny weights
        SparsityController(model, config).attach(torch.optim.SGD(model.parameters(), lr=0.05))
    assert "would zero 66.7% of the regularized weights" in caplog.text


class _TransposedLinear(nn.Module):
    """Hugging Face GPT-2's ``Conv1D`` layout: a weight matrix in a module type that the
    default set does not know."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight


def test_construction_warns_of_weight_matrices_the_default_set_leaves_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = nn.Sequential(nn.Linear(6, 8), _TransposedLinear(8, 8), nn.LayerNorm(8))
    with caplog.at_level(logging.WARNING, logger="dist_bregman"):
        SparsityController(_model())
        MagnitudePruner(_model())
        assert caplog.text == ""  # nothing left out: no word
        SparsityController(model)
        MagnitudePruner(model)
        SparsityController(model, parameters_to_prune=[(model[0], "weight")])  # chosen
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2  # the controller and the pruner, not for an explicit list
    assert all(
        "1 weight matrix in module types" in line and "1.weight (_TransposedLinear)" in line
        for line in lines
    )
    assert "2.weight" not in caplog.text  # a norm's vector is no matrix


def test_unreachable_target_is_refused_at_attach_with_the_bound() -> None:
    model = _model()  # 96 + 48 weights
    model[2].weight.requires_grad_(False)
    with torch.no_grad():
        model[2].weight[:1] = 0.0  # 16 natural zeros in the frozen layer
    controller = SparsityController(model, BregmanConfig(target_sparsity=0.8))
    with pytest.raises(
        ValueError, match=r"target_sparsity=0.8 is unreachable: 2.weight \(33.3% of"
    ):
        controller.attach(torch.optim.SGD([model[0].weight], lr=0.1))
    bound = (96 + 16) / 144
    with pytest.raises(ValueError, match=f"allowed: target_sparsity <= {bound:.6f}"):
        controller.attach(torch.optim.SGD([model[0].weight], lr=0.1))
    SparsityController(model, BregmanConfig(target_sparsity=bound - 1e-9)).attach(
        torch.optim.SGD([model[0].weight], lr=0.1)
    )
    # lambda_scale 0: optimized, never shrunk, so its nonzeros stay as out of reach
    model[2].weight.requires_grad_(True)
    groups = [{"params": [model[0].weight]}, {"params": [model[2].weight], "lambda_scale": 0}]
    with pytest.raises(ValueError, match=r"unreachable: 2.weight .* lambda_scale=0"):
        controller.attach(torch.optim.SGD(groups, lr=0.1))


def test_out_of_reach_at_a_lenient_attach_holds_lambda_until_a_new_group_brings_it_in(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``attach(strict=False)``: a warning, no update moves lambda; once the optimizer
    gains the frozen layer as a group (a finetuning callback's unfreeze),
    :meth:`follow_groups` attaches again and the proximal step reaches the layer."""
    model = _model()
    model[2].weight.requires_grad_(False)
    config = BregmanConfig(target_sparsity=0.8, initial_lambda=0.5, update_frequency=1)
    controller = SparsityController(model, config)
    optimizer = torch.optim.SGD([model[0].weight], lr=0.1)
    with caplog.at_level(logging.WARNING, logger="dist_bregman"):
        controller.attach(optimizer, strict=False)
    assert "is unreachable: 2.weight" in caplog.text and "lambda is held" in caplog.text
    assert not controller.follow_groups()  # nothing changed: no second attach
    decision = controller.update(1)
    assert decision.skipped and "out of reach" in decision.reason and controller.lambda_ == 0.5
    before = model[2].weight.detach().clone()
    model[2].weight.requires_grad_(True)
    optimizer.add_param_group({"params": [model[2].weight]})
    assert controller.follow_groups() and controller.out_of_reach is None
    optimizer.step()  # no gradients: the proximal step alone, lr * lambda = 0.05
    shrunk = torch.sign(before) * (before.abs() - 0.05).clamp(min=0)
    torch.testing.assert_close(model[2].weight.detach(), shrunk)
    assert not controller.update(2).skipped


def test_a_bregman_optimizer_is_driven_not_hooked() -> None:
    model = _model()
    optimizer = LinBreg(model.parameters(), lr=0.1, lambda_=0.5)
    config = BregmanConfig(initial_lambda=0.02, lambda_update_rate=0.1, update_frequency=2)
    controller = SparsityController(model, config)
    controller.attach(optimizer)
    assert [g["lambda"] for g in optimizer.param_groups] == [0.02, 0.5]  # reg=None group untouched
    assert len(optimizer._optimizer_step_post_hooks) == 0  # no proximal hook on top
    assert sorted(controller.regularized_names()) == ["0.weight", "2.weight"]
    for step, (x, y) in enumerate(_batches(4), start=1):
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        decision = controller.update_if_due(step)
        if decision is not None:
            assert optimizer.param_groups[0]["lambda"] == decision.new == controller.lambda_
    assert controller.lambda_ > 0.02
    with pytest.raises(ValueError, match="mode='loss' with LinBreg"):
        SparsityController(model, BregmanConfig(mode="loss")).attach(optimizer)


@pytest.mark.parametrize("name", ["sgd", "linbreg"])
def test_a_wrapper_that_hands_its_steps_on_is_looked_through(name: str) -> None:
    """attach failed on such a wrapper with torch's AttributeError (it has no step hooks),
    and a Bregman optimizer inside would not have been driven: now the controller acts
    through the optimizer inside, as on it directly, and a dropped step of the wrapper
    takes no proximal step."""

    def run(wrapped: bool) -> tuple[list[torch.Tensor], float, list[torch.Tensor]]:
        model = _model()
        inner: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        if name == "linbreg":
            inner = LinBreg(model.parameters(), lr=0.1)
        optimizer = PassThrough(inner) if wrapped else inner
        config = BregmanConfig(initial_lambda=0.02, lambda_update_rate=0.5, update_frequency=2)
        controller = SparsityController(model, config)
        controller.attach(optimizer)
        _train(model, optimizer, controller, _batches(8), add_loss_term=False)
        trained = [p.detach().clone() for p in model.parameters()]
        F.cross_entropy(model(_batches(1)[0][0]), _batches(1)[0][1]).backward()
        controller.drop_step([optimizer])
        optimizer.step()
        return trained, controller.lambda_, [p.detach().clone() for p in model.parameters()]

    plain, wrapped = run(wrapped=False), run(wrapped=True)
    assert plain[1] == wrapped[1] != 0.02  # lambda moved, alike
    assert all(torch.equal(a, b) for a, b in zip(plain[0], wrapped[0], strict=True))
    assert any(bool((p == 0).any()) for p in wrapped[0])  # zeros made through the wrapper
    assert all(torch.equal(a, b) for a, b in zip(wrapped[0], wrapped[2], strict=True))  # dropped


def test_group_regularizer_counts_and_logs_node_sparsity(caplog: pytest.LogCaptureFixture) -> None:
    model = _model()
    config = BregmanConfig(
        initial_lambda=2.0, regularizer="group_l1", update_frequency=1, verbose=1
    )
    controller = SparsityController(model, config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    controller.attach(optimizer)
    optimizer.step()  # group prox: threshold 0.2*sqrt(6) on rows of the first layer
    with caplog.at_level(logging.INFO, logger="dist_bregman"):
        report = controller.update(1)
    report = controller.last_report
    dead = int((model[0].weight.abs().sum(dim=1) == 0).sum()) + int(
        (model[2].weight.abs().sum(dim=1) == 0).sum()
    )
    assert dead > 0 and report.zero_rows == dead and report.rows == 16 + 3
    assert report.node_sparsity == dead / 19 and report.kernel_sparsity is None
    assert f"Node sparsity {100 * dead / 19:.3f}% ({dead}/19 rows)" in caplog.text


# ---------------------------------------------------------------------------- frozen support
def _regression(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A sparse linear teacher (75% zeros, nonzeros of magnitude >= 1) and noiseless data."""
    generator = torch.Generator().manual_seed(seed)
    teacher = torch.randn(4, 32, generator=generator).sign() * (
        1 + torch.rand(4, 32, generator=generator)
    )
    teacher[torch.rand(4, 32, generator=generator) < 0.75] = 0
    x = torch.randn(256, 32, generator=generator)
    return teacher, x, x @ teacher.T


def _fit_regression(
    freeze_support_at: int, steps: int = 600
) -> tuple[nn.Linear, SparsityController]:
    teacher, x, y = _regression()
    torch.manual_seed(0)
    student = nn.Linear(32, 4, bias=False)
    config = BregmanConfig(
        target_sparsity=float((teacher == 0).float().mean()),
        initial_lambda=0.05,
        lambda_rule="multiplicative",
        lambda_update_rate=2.0,
        min_lambda=1e-4,
        max_lambda=10.0,
        update_frequency=5,
        freeze_support_at=freeze_support_at,
    )
    controller = SparsityController(student, config)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
    controller.attach(optimizer)
    for step in range(1, steps + 1):
        F.mse_loss(student(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        controller.update_if_due(step)
    return student, controller


def test_frozen_support_refits_the_survivors_without_the_l1_bias(
    caplog: pytest.LogCaptureFixture,
) -> None:
    teacher, _, _ = _regression()
    caplog.set_level(logging.INFO, logger="dist_bregman")
    shrunk, _ = _fit_regression(freeze_support_at=0)
    refit, controller = _fit_regression(freeze_support_at=300)
    assert controller.frozen and "Step 300: support frozen: shrinkage found sparsity" in caplog.text

    def relative_error(student: nn.Linear) -> float:
        return float((student.weight.detach() - teacher).norm() / teacher.norm())

    # Both find the teacher's support; only the refit also recovers its values.
    for student in (shrunk, refit):
        assert torch.equal(student.weight.detach() != 0, teacher != 0)
    assert relative_error(shrunk) > 0.01
    assert relative_error(refit) < 1e-4


def test_the_freeze_holds_exactly_the_target_then_steps_are_plain_sgd_on_the_support() -> None:
    model = _model()
    controller = SparsityController(
        model, BregmanConfig(initial_lambda=0.5, update_frequency=1, freeze_support_at=3)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    controller.attach(optimizer)
    batches = _batches(6)
    _train(model, optimizer, controller, batches[:3], add_loss_term=False)
    assert controller.frozen
    frozen_lambda = controller.lambda_
    support = {name: w.detach() != 0 for name, w in _weights(model).items()}
    assert sum(int((~s).sum()) for s in support.values()) > 0  # some zeros are held
    for step, (x, y) in enumerate(batches[3:], start=4):
        F.cross_entropy(model(x), y).backward()
        expected = {
            name: p.detach().add(p.grad, alpha=-0.1) * support.get(name, 1)
            for name, p in model.named_parameters()
        }
        optimizer.step()
        optimizer.zero_grad()
        controller.update_if_due(step)
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), expected[name], rtol=0, atol=0)
    assert controller.lambda_ == frozen_lambda
    report = controller.measure()  # shrinkage had reached ~40%; the freeze held the target
    assert report.total - report.nonzero == round(0.8 * report.total)


def _with_dead_units(masked: bool) -> nn.Sequential:
    """``_model`` with hidden units 0-3 dead (zero rows, bias -1: no gradient reaches
    their weights) and no weight out of them; units 8-15 alive (bias +1), with a zero
    each from input 0 that a gradient regrows when freed. With ``masked``, a
    ``torch.nn.utils.prune`` mask zeroes half of the first layer instead (never regrows)."""
    model = _model()
    first, last = model[0], model[2]
    with torch.no_grad():
        first.weight[:4] = 0.0
        first.bias[:4] = -1.0
        first.bias[8:] = 1.0
        first.weight[8:, 0] = 0.0
        last.weight[:, :4] = 0.0
    if masked:
        prune.random_unstructured(first, "weight", amount=0.5)
    return model


def _frozen_before_the_first_step(
    model: nn.Module,
) -> tuple[SparsityController, torch.optim.Optimizer]:
    """A controller at 25% whose support is frozen now (as ``update_if_due`` freezes it
    at ``freeze_support_at``), before any step could regrow a zero; SGD attached."""
    controller = SparsityController(model, BregmanConfig(target_sparsity=0.25, update_frequency=1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    controller.attach(optimizer)
    controller.freeze_support(0)
    return controller, optimizer


def test_zeros_freed_by_an_overshooting_freeze_that_do_not_regrow_are_swapped_for_held_ones(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """44 zeros (30.6%) at a 25% freeze: the 8 freed are the last in order, the dead
    units' outgoing weights; a step later they are still zero, so they are held and other
    held zeros freed, until the live ones are: the run ends at the target exactly, not
    above it with dead zeros counted as sparsity."""
    model = _with_dead_units(masked=False)
    controller, optimizer = _frozen_before_the_first_step(model)
    dead = [model[0].weight[:4].clone(), model[2].weight[:, :4].clone()]
    with caplog.at_level(logging.INFO, logger="dist_bregman"):
        _train(model, optimizer, controller, _batches(8), add_loss_term=False)
    report = controller.measure()
    held = round(0.25 * report.total)
    assert controller.found_sparsity == pytest.approx(44 / 144)
    assert report.total - report.nonzero == held == 36
    assert bool((model[0].weight[8:, 0] != 0).all())  # the live zeros regrew
    assert torch.equal(model[0].weight[:4], dead[0]) and torch.equal(
        model[2].weight[:, :4], dead[1]
    )
    swaps = [
        r.getMessage() for r in caplog.records if "did not regrow are held now" in r.getMessage()
    ]
    assert [m.split(":")[0] for m in swaps] == ["Step 1", "Step 2"]
    assert "8 zeros beyond the 36 held" in swaps[0] and "4 zeros beyond" in swaps[1]


def test_a_resume_right_after_a_swap_holds_what_the_uninterrupted_run_holds() -> None:
    """Checkpointed at step 1, just after the first swap freed 8 held zeros that have not
    had a step yet (44 zeros in the weights, 36 held): the resumed run must not hold them.
    The held zeros never freed are the first ones in global order, so their count in the
    checkpoint names the held set; the resumed run then equals the uninterrupted one."""
    model = _with_dead_units(masked=False)
    controller, optimizer = _frozen_before_the_first_step(model)
    _train(model, optimizer, controller, _batches(1), add_loss_term=False)
    resumed, state = copy.deepcopy(model), controller.state_dict()
    assert state["untried"] == 28  # 36 held, never freed; 8 of them freed at step 1
    later = _batches(8, seed=7)  # steps 2-9, the same for both runs
    _train(model, optimizer, controller, later, add_loss_term=False, start=2)
    fresh = SparsityController(resumed, controller.config)
    fresh_optimizer = torch.optim.SGD(resumed.parameters(), lr=0.1)
    fresh.attach(fresh_optimizer)
    fresh.load_state_dict(state)
    report = fresh.measure()
    assert report.total - report.nonzero == 44
    _train(resumed, fresh_optimizer, fresh, later, add_loss_term=False, start=2)
    for name, weight in _weights(model).items():
        assert torch.equal(_weights(resumed)[name], weight), name
    report = fresh.measure()
    assert report.total - report.nonzero == 36


def test_a_rollback_into_the_same_frozen_controller_holds_what_the_checkpoint_held() -> None:
    """The controller, frozen and swapped on since, loads step 1's state (with step 1's
    weights): it must hold what step 1 held, named by the state's count, not what it held
    last; then it follows a fresh controller resumed from the same checkpoint exactly."""
    model = _with_dead_units(masked=False)
    controller, optimizer = _frozen_before_the_first_step(model)
    _train(model, optimizer, controller, _batches(1), add_loss_term=False)
    weights, state = copy.deepcopy(model.state_dict()), controller.state_dict()
    resumed = copy.deepcopy(model)
    _train(model, optimizer, controller, _batches(8, seed=3), add_loss_term=False, start=2)
    assert controller.state_dict()["untried"] != state["untried"]  # it swapped on since
    model.load_state_dict(weights)
    controller.load_state_dict(state)
    fresh = SparsityController(resumed, controller.config)
    fresh_optimizer = torch.optim.SGD(resumed.parameters(), lr=0.1)
    fresh.attach(fresh_optimizer)
    fresh.load_state_dict(state)
    later = _batches(8, seed=7)
    _train(model, optimizer, controller, later, add_loss_term=False, start=2)
    _train(resumed, fresh_optimizer, fresh, later, add_loss_term=False, start=2)
    for name, weight in _weights(resumed).items():
        assert torch.equal(_weights(model)[name], weight), name


def test_zeros_that_cannot_regrow_leave_the_run_above_its_target_with_one_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Half the first layer under a ``torch.nn.utils.prune`` mask as well: 78 zeros
    (54%), 42 of them freed beyond the 36 held; a step later 36 are still zero (masked,
    or dead), enough to fill the held set alone: one warning, and no more settling (no
    line at each update after it, no churn of masks)."""
    model = _with_dead_units(masked=True)
    controller, optimizer = _frozen_before_the_first_step(model)
    with caplog.at_level(logging.INFO, logger="dist_bregman"):
        _train(model, optimizer, controller, _batches(10), add_loss_term=False)
    report = controller.measure()
    assert report.total - report.nonzero > round(0.25 * report.total)
    lines = [(r.levelno, r.getMessage()) for r in caplog.records if "beyond the" in r.getMessage()]
    assert [level for level, _ in lines] == [logging.INFO] * (len(lines) - 1) + [logging.WARNING]
    assert "none is left to free" in lines[-1][1]
    assert int(lines[-1][1].split(":")[0].removeprefix("Step ")) < 10  # it stopped early


def test_the_freeze_happens_at_the_first_step_past_it_when_a_loop_skips_steps() -> None:
    """A loop that calls update_if_due every few steps (or resumes past the step) still
    freezes, at the first call at or after freeze_support_at."""
    controller = SparsityController(
        _model(), BregmanConfig(initial_lambda=0.5, update_frequency=4, freeze_support_at=6)
    )
    controller.update_if_due(4)
    assert not controller.frozen
    controller.update_if_due(8)
    assert controller.frozen and controller.last_update_step == 8


def test_a_frozen_support_survives_a_checkpoint_and_holds_zeros_on_resume() -> None:
    model = _model()
    config = BregmanConfig(initial_lambda=0.5, update_frequency=1, freeze_support_at=2)
    controller = SparsityController(model, config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    controller.attach(optimizer)
    _train(model, optimizer, controller, _batches(2), add_loss_term=False)
    state = controller.state_dict()
    assert state["frozen"] is True

    resumed = copy.deepcopy(model)
    zeros = {name: w.detach() == 0 for name, w in _weights(resumed).items()}
    fresh = SparsityController(resumed, config)
    fresh.load_state_dict(state)
    optimizer = torch.optim.SGD(resumed.parameters(), lr=0.1)
    fresh.attach(optimizer)
    assert fresh.frozen and fresh.lambda_ == controller.lambda_
    assert controller.found_sparsity is not None
    assert fresh.found_sparsity == controller.found_sparsity
    _train(resumed, optimizer, fresh, _batches(4, seed=7), add_loss_term=False)
    for name, w in _weights(resumed).items():
        assert torch.equal(w.detach() == 0, zeros[name])  # no zero regrown, none added


def test_a_frozen_support_turns_a_bregman_optimizers_shrinkage_off() -> None:
    model = _model()
    optimizer = LinBreg(model.parameters(), lr=0.1, lambda_=0.5)
    controller = SparsityController(
        model, BregmanConfig(initial_lambda=0.5, update_frequency=1, freeze_support_at=2)
    )
    controller.attach(optimizer)
    _train(model, optimizer, controller, _batches(2), add_loss_term=False)
    assert all(g["lambda"] == 0.0 for g in optimizer.param_groups if g["reg"] is not None)
    support = {name: w.detach() != 0 for name, w in _weights(model).items()}
    _train(model, optimizer, controller, _batches(5, seed=3), add_loss_term=False)
    for name, w in _weights(model).items():
        assert torch.equal(w.detach() != 0, support[name])


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if n.endswith("weight")}


def test_a_frozen_support_turns_the_loss_term_off_in_loss_mode() -> None:
    model = _model()
    config = BregmanConfig(initial_lambda=0.5, update_frequency=1, mode="loss", freeze_support_at=2)
    controller = SparsityController(model, config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    controller.attach(optimizer)
    _train(model, optimizer, controller, _batches(1), add_loss_term=True)
    assert float(controller.regularization_loss().detach()) > 0
    controller.update_if_due(2)  # the freeze
    term = controller.regularization_loss()
    assert controller.frozen and float(term.detach()) == 0.0 and controller.lambda_ > 0


def _linbreg(model: nn.Module) -> LinBreg:
    return LinBreg(model.parameters(), lr=0.5, momentum=0.9, lambda_=0.3)


def test_a_magnitude_start_trains_dense_then_cuts_exactly_to_the_target() -> None:
    model = _model()
    optimizer = _linbreg(model)
    config = BregmanConfig(
        target_sparsity=0.8,
        initial_lambda=0.05,
        lambda_update_rate=0.5,
        update_frequency=1,
        magnitude_start_at=3,
    )
    controller = SparsityController(model, config)
    controller.attach(optimizer)
    regularized = [g for g in optimizer.param_groups if g["reg"] is not None]
    batches = _batches(3)
    _train(model, optimizer, controller, batches[:2], add_loss_term=False)
    # The warm-up: LinBreg at lambda 0 (plain momentum steps), lambda not measured or moved.
    assert not controller.started and controller.last_update_step == 0
    assert controller.lambda_ == 0.05 and all(g["lambda"] == 0.0 for g in regularized)
    assert float(controller.regularization_loss().detach()) == 0.0
    assert all(bool((w != 0).all()) for w in _weights(model).values())
    x, y = batches[2]
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    optimizer.zero_grad()
    controller.update_if_due(3)
    report = controller.measure()
    assert controller.started and report.total - report.nonzero == round(0.8 * report.total)
    assert all(g["lambda"] == controller.lambda_ for g in regularized)
    assert not optimizer.state  # forgotten: v starts from the cut at the next step


def test_after_the_cut_linbreg_runs_as_a_fresh_optimizer_built_on_the_cut_weights() -> None:
    config = BregmanConfig(
        target_sparsity=0.8,
        initial_lambda=0.05,
        lambda_update_rate=0.0,  # lambda stays: the two runs count their steps differently
        update_frequency=1,
    )
    batches = _batches(8)
    model = _model()
    optimizer = _linbreg(model)
    warm = SparsityController(model, dataclasses.replace(config, magnitude_start_at=3))
    warm.attach(optimizer)
    _train(model, optimizer, warm, batches[:3], add_loss_term=False)
    assert warm.started
    cut = copy.deepcopy(model)
    fresh_optimizer = _linbreg(cut)
    fresh = SparsityController(cut, config)
    fresh.attach(fresh_optimizer)
    for step, (x, y) in enumerate(batches[3:], start=4):
        for net, opt, controller, at in (
            (model, optimizer, warm, step),
            (cut, fresh_optimizer, fresh, step - 3),
        ):
            F.cross_entropy(net(x), y).backward()
            opt.step()
            opt.zero_grad()
            controller.update_if_due(at)
    for (name, a), b in zip(model.named_parameters(), cut.parameters(), strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=0, msg=name)
    assert 0.5 < warm.measure().sparsity < 0.8  # some weights regrew; the dense ones did not


def test_a_checkpoint_taken_in_the_warm_up_resumes_in_it() -> None:
    config = BregmanConfig(initial_lambda=0.05, update_frequency=1, magnitude_start_at=5)
    controller = SparsityController(_model(), config)
    assert controller.state_dict()["started"] is False
    restored = SparsityController(_model(), config)
    restored.load_state_dict(controller.state_dict())
    assert not restored.started and restored._lambda() == 0.0
    old = {k: v for k, v in controller.state_dict().items() if k != "started"}
    restored.load_state_dict(old)  # written before the option existed: it had started
    assert restored.started and restored._lambda() == 0.05


def _freeze_group_shrinkage(hold: str) -> tuple[nn.Module, SparsityController]:
    """Group shrinkage over rows for 3 steps (about 22% zeros, all whole rows: the target of
    50% is not reached), the freeze, then 4 more steps."""
    model = _model()
    config = BregmanConfig(
        target_sparsity=0.5,
        initial_lambda=0.5,
        update_frequency=1,
        regularizer="group_l1",
        freeze_support_at=3,
        freeze_hold=hold,
    )
    controller = SparsityController(model, config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    controller.attach(optimizer)
    _train(model, optimizer, controller, _batches(3), add_loss_term=False)
    assert controller.frozen
    _train(model, optimizer, controller, _batches(4, seed=5), add_loss_term=False)
    return model, controller


def test_the_found_hold_keeps_the_whole_zero_rows_of_group_shrinkage() -> None:
    """``freeze_hold="found"`` holds the zeros shrinkage made (whole rows here) and adds
    none; ``"target"`` tops up to the target by single weights, inside live rows."""
    model, controller = _freeze_group_shrinkage("found")
    found = controller.found_sparsity
    assert found is not None and 0.1 < found < 0.5
    assert controller.measure().sparsity == found  # nothing topped up, nothing regrown
    for weight in _weights(model).values():
        zero = weight.detach() == 0
        assert torch.equal(zero, zero.all(dim=1, keepdim=True).expand_as(zero))  # whole rows

    model, controller = _freeze_group_shrinkage("target")
    assert controller.found_sparsity == found and controller.measure().sparsity == 0.5
    partly = [(w == 0).any(dim=1) & (w != 0).any(dim=1) for w in _weights(model).values()]
    assert sum(int(rows.sum()) for rows in partly) > 0  # rows now half alive


def test_the_found_hold_makes_weights_within_the_tolerance_zero_and_holds_them() -> None:
    model = _model()
    config = BregmanConfig(
        initial_lambda=1e-3,
        update_frequency=1,
        zero_tolerance=0.05,
        freeze_support_at=1,
        freeze_hold="found",
    )
    controller = SparsityController(model, config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    controller.attach(optimizer)
    _train(model, optimizer, controller, _batches(1), add_loss_term=False)
    small = {name: w.detach().abs() <= 0.05 for name, w in _weights(model).items()}
    assert all(torch.equal(w.detach() == 0, small[n]) for n, w in _weights(model).items())
    assert 0 < controller.found_sparsity < 0.8  # type: ignore[operator]
    _train(model, optimizer, controller, _batches(3, seed=4), add_loss_term=False)
    for name, weight in _weights(model).items():
        assert torch.equal(weight.detach() == 0, small[name])


def test_replica_sums_name_each_replica_and_compare_equal_with_nan() -> None:
    """What check_agreement_every exchanges per replicated tensor: its name and exact
    float64 sums, as strings, so that two ranks holding the same NaN agree (a NaN float
    compares unequal to itself, and would have read as replicas that drifted apart)."""
    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 2))
    controller = SparsityController(model, BregmanConfig())
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]]))
        model[2].weight[0, 0] = float("nan")
    sums = controller.replica_sums()
    assert [(name, copies) for name, copies, _, _ in sums] == [("0.weight", ()), ("2.weight", ())]
    assert sums[0][2:] == ((1.5).hex(), (15.25).hex())
    assert sums == controller.replica_sums() and sums[1][2] == "nan"


def test_check_agreement_every_does_nothing_in_one_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """One process has no other rank to agree with: check_agreement_every reads no
    replica there (it had read every replicated tensor whole at each check)."""
    controller = SparsityController(_model(), BregmanConfig(check_agreement_every=1))
    calls: list[int] = []
    monkeypatch.setattr(controller, "check_agreement", lambda: calls.append(1))
    controller.update(1)
    controller.update(2)
    assert calls == []
