"""Scheduled magnitude pruning in one process: schedules, exact fractions, ties, masks."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from dist_bregman.pruning import MagnitudePruner, PruningConfig, scheduled_amount


def _model(quantized: bool = False) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(13, 17), nn.ReLU(), nn.Linear(17, 11), nn.ReLU(), nn.Linear(11, 5)
    )
    if quantized:  # many exact ties across and within layers
        with torch.no_grad():
            for layer in (model[0], model[2], model[4]):
                layer.weight.copy_(torch.randint(-3, 4, layer.weight.shape).float() / 4)
    return model


WEIGHTS = ("0", "2", "4")


def _weights(model: nn.Sequential) -> list[torch.Tensor]:
    return [model[int(i)].weight.detach() for i in WEIGHTS]


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        ("linear", {0: 0.2, 1: 0.24, 5: 0.4, 10: 0.6, 12: 0.6}),
        ("cubic", {0: 0.2, 1: 0.6 - 0.4 * 0.9**3, 5: 0.6 - 0.4 * 0.5**3, 10: 0.6, 12: 0.6}),
    ],
)
def test_schedule_values_at_each_epoch(schedule: str, expected: dict[int, float]) -> None:
    config = PruningConfig(
        amount=0.2, scheduled_pruning=True, final_amount=0.6, epochs_to_ramp=10, schedule=schedule
    )
    for epoch, value in expected.items():
        assert scheduled_amount(epoch, config) == pytest.approx(value, abs=1e-12)
    assert scheduled_amount(7, PruningConfig(amount=0.3)) == 0.3  # unscheduled: constant


def test_unstructured_global_prunes_exactly_the_smallest_magnitudes_ties_in_order() -> None:
    model = _model(quantized=True)
    weights = [w.clone() for w in _weights(model)]
    event = MagnitudePruner(model, PruningConfig(amount=0.37)).prune(0.37)
    flat = torch.cat([w.reshape(-1) for w in weights])
    k = round(0.37 * flat.numel())
    order = sorted(range(flat.numel()), key=lambda i: (abs(flat[i].item()), i))
    expected = torch.ones(flat.numel(), dtype=torch.bool)
    expected[order[:k]] = False
    kept = torch.cat([w.reshape(-1) != 0 for w in _weights(model)])
    assert torch.equal(kept, expected & (flat != 0))
    assert event.report.total - event.report.nonzero == k


@pytest.mark.parametrize("use_global", [True, False])
@pytest.mark.parametrize("structured", [False, True])
def test_each_event_reaches_the_exact_fraction(use_global: bool, structured: bool) -> None:
    model = _model()
    config = PruningConfig(amount=0.3, use_global=use_global, structured=structured, norm=2.0)
    pruner = MagnitudePruner(model, config)
    for amount in (0.3, 0.45, 0.6):
        pruner.prune(amount)
        weights = _weights(model)
        if structured:
            dead = [int((w.abs().sum(dim=1) == 0).sum()) for w in weights]
            units = [w.shape[0] for w in weights]
        else:
            dead = [int((w == 0).sum()) for w in weights]
            units = [w.numel() for w in weights]
        if use_global and structured:  # the amount is a share of elements: rows reach it
            lengths = [w.shape[1] for w in weights]
            pruned = sum(d * n for d, n in zip(dead, lengths, strict=True))
            k = round(amount * sum(w.numel() for w in weights))
            assert k <= pruned < k + max(lengths)
        elif use_global:
            assert sum(dead) == round(amount * sum(units))
        else:
            assert dead == [round(amount * u) for u in units]


@pytest.mark.parametrize("amount", [0.05, 0.2, 0.35, 0.5, 0.65, 0.8, 0.95])
def test_global_structured_prunes_the_lowest_rows_until_their_elements_reach_the_amount(
    amount: float,
) -> None:
    model = _model(quantized=True)
    with torch.no_grad():  # rows that tie across layers of different row lengths
        for index, layer in enumerate(WEIGHTS):
            model[int(layer)].weight[index : index + 3] = 0.5
            model[int(layer)].weight[4] = 0.0
    weights = [w.clone() for w in _weights(model)]
    MagnitudePruner(model, PruningConfig(structured=True, norm=2.0)).prune(amount)
    rows = []  # (score, layer, row, elements), scored as the pruner does: L2 / length^(1/2)
    for t, weight in enumerate(weights):
        scores = weight.double().pow(2).sum(dim=1).pow(0.5) / weight.shape[1] ** 0.5
        rows += [(float(score), t, r, weight.shape[1]) for r, score in enumerate(scores)]
    k, pruned = round(amount * sum(w.numel() for w in weights)), 0
    expected = [torch.zeros(w.shape[0], dtype=torch.bool) for w in weights]
    for _, t, r, elements in sorted(rows):
        if pruned >= k:
            break
        expected[t][r], pruned = True, pruned + elements
    for before, after, chosen in zip(weights, _weights(model), expected, strict=True):
        zero_before = (before == 0).all(dim=1)  # natural zero rows rank first, and stay
        assert torch.equal((after == 0).all(dim=1), chosen | zero_before)


def test_natural_zeros_count_toward_the_amount() -> None:
    model = _model()
    with torch.no_grad():
        model[2].weight[:6] = 0.0  # 102 natural zeros
    pruner = MagnitudePruner(model, PruningConfig(amount=0.1, use_global=False))
    pruner.prune(0.1)
    assert int((model[2].weight == 0).sum()) == 102  # 10% = 19 < 102: nothing more to do
    pruner.prune(0.7)
    assert int((model[2].weight == 0).sum()) == round(0.7 * 187)


def test_masks_hold_through_optimizer_steps_and_can_be_rederived() -> None:
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    pruner = MagnitudePruner(model, PruningConfig(amount=0.5))
    pruner.attach(optimizer)
    pruner.prune(0.5)
    pruned = [w == 0 for w in _weights(model)]
    before = [w.clone() for w in _weights(model)]
    for _ in range(3):
        model(torch.randn(8, 13)).pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    for w, mask, old in zip(_weights(model), pruned, before, strict=True):
        assert bool((w[mask] == 0).all())
        assert not torch.equal(w[~mask], old[~mask])  # the rest still trains
    masks = [m.clone() for m in pruner.masks]
    pruner.derive_masks()
    assert all(torch.equal(a, b) for a, b in zip(masks, pruner.masks, strict=True))
    pruner.release()
    assert not pruner.active and pruner._handles == []


def _held(pruner: MagnitudePruner) -> set[int]:
    mask = pruner.masks[0]
    assert mask is not None
    return set(torch.nonzero(mask.reshape(-1)).reshape(-1).tolist())


def test_hold_zeros_holds_every_zero_but_a_range_of_places_in_global_order() -> None:
    layer = nn.Linear(4, 5, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.arange(1, 21, dtype=torch.float32).reshape(5, 4))
        layer.weight.view(-1)[1::2][:8] = 0.0  # zeros at 1, 3, ..., 15: places 0-7
    pruner = MagnitudePruner(layer, PruningConfig(amount=0.3), [(layer, "weight")])
    assert pruner.hold_zeros((6, 8)) == 8
    assert _held(pruner) == {1, 3, 5, 7, 9, 11}  # the first 6, as prune(0.3) holds them
    pruner.prune(0.3)
    assert _held(pruner) == {1, 3, 5, 7, 9, 11}
    pruner.hold_zeros((2, 4))
    assert _held(pruner) == {1, 3, 9, 11, 13, 15}
    pruner.hold_zeros()
    assert _held(pruner) == {1, 3, 5, 7, 9, 11, 13, 15}


def test_hold_zeros_counts_zero_as_the_measurement_does() -> None:
    """With a tolerance, a weight within it is a zero (and is made exactly zero when
    held); a masked ``torch.nn.utils.prune`` element is zero whatever ``weight_orig`` holds."""
    layer = nn.Linear(5, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.0, 0.0, 1e-4, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0, 8.0]]))
    prune.custom_from_mask(layer, "weight", torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 1]]))
    pruner = MagnitudePruner(layer, PruningConfig(amount=0.2), [(layer, "weight")])
    assert pruner.hold_zeros((0, 1), zero_tolerance=1e-3) == 4  # places: 0, 1, 2 and 8
    assert _held(pruner) == {1, 2, 8}
    assert layer.weight_orig.view(-1)[2] == 0 and layer.weight_orig.view(-1)[8] == 0


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"amount": 1.2}, ValueError, r"amount=1\.2"),
        ({"scheduled_pruning": True}, ValueError, r"final_amount=None with scheduled_pruning=True"),
        (
            {"amount": 0.5, "scheduled_pruning": True, "final_amount": 0.3},
            ValueError,
            r"final_amount=0\.3",
        ),
        ({"epochs_to_ramp": -1}, ValueError, r"epochs_to_ramp=-1"),
        ({"schedule": "exp"}, ValueError, r"schedule='exp'"),
        ({"norm": 0.0}, ValueError, r"norm=0\.0"),
        ({"prune_every": 0}, ValueError, r"prune_every=0"),
        ({"prune_unit": "batch"}, ValueError, r"prune_unit='batch'"),
        ({"structured": "yes"}, ValueError, r"structured='yes'"),
    ],
)
def test_bad_pruning_settings_name_the_setting(kwargs: dict, error: type, pattern: str) -> None:
    with pytest.raises(error, match=pattern):
        PruningConfig(**kwargs)


def test_a_parametrized_weight_is_refused_and_its_original_prunes_exactly() -> None:
    model = _model()
    nn.utils.parametrizations.weight_norm(model[2])
    with pytest.raises(
        ValueError,
        match=r"2\.weight is computed by a parametrization "
        r"\(_WeightNorm\) from \['2\.parametrizations\.weight\.original0', "
        r"'2\.parametrizations\.weight\.original1'\], so a pruning mask",
    ):
        MagnitudePruner(model, PruningConfig(amount=0.5))
    pairs = [
        (model[0], "weight"),
        (model[2].parametrizations.weight, "original1"),
        (model[4], "weight"),
    ]
    event = MagnitudePruner(model, parameters_to_prune=pairs).prune(0.5)
    total = sum(w.numel() for w in _weights(model))
    assert event.report.total - event.report.nonzero == round(0.5 * total)
    # the forward's weight (g * v / |v|) has the original's zeros
    zeros = sum(int((w == 0).sum()) for w in _weights(model))
    assert zeros == round(0.5 * total)


def test_attention_input_projections_are_pruned_with_the_rest() -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, batch_first=True)
    event = MagnitudePruner(layer, PruningConfig(amount=0.5)).prune(0.5)
    assert event.report.total == 3 * 16 * 16 + 16 * 16 + 2 * 16 * 32
    assert event.report.total - event.report.nonzero == event.report.total // 2
    zeros = int((layer.self_attn.in_proj_weight == 0).sum())
    assert event.report.per_parameter["self_attn.in_proj_weight"] == (3 * 16 * 16 - zeros, 768)
    assert 0 < zeros < 3 * 16 * 16
