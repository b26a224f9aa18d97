"""Counting is mask-aware, counts natural zeros and gives one number in every state."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from dist_bregman import (
    MagnitudePruner,
    SparsityController,
    SparsityReport,
    kernels,
    measure_sparsity,
    regularized_groups,
    sparsity,
)
from dist_bregman.export import export_sparse, folded_state_dict, gather_state_dict
from dist_bregman.init import magnitude_init_
from dist_bregman.shards import LocalView, Replicated, balanced_owners, place
from dist_bregman.sparsity import count_nonzero, reduce_counts
from dist_bregman.targets import resolve
from tests.helpers.dynamo import dynamo_warnings
from tests.helpers.models import ConvNet, mixed_state_model, reference_counts, sample_inputs


def test_counts_equal_the_folded_reference_in_a_mixed_pruning_state() -> None:
    model = mixed_state_model()
    report = measure_sparsity(model)
    reference = reference_counts(model)
    assert report.per_parameter == reference
    assert report.nonzero == sum(n for n, _ in reference.values())
    assert report.total == sum(t for _, t in reference.values()) == 7 * 11 + 5 * 9 + 187 * 33 + 330
    assert report.sparsity == pytest.approx(1 - report.nonzero / report.total)


def test_stale_weight_attribute_is_never_read() -> None:
    model = mixed_state_model()
    stale = int((model.fc1.weight != 0).sum())  # computed at prune time, before the edits
    assert measure_sparsity(model).per_parameter["fc1.weight"][0] != stale


def test_one_number_before_and_after_forward_repeated_and_after_remove() -> None:
    model = mixed_state_model()
    first = measure_sparsity(model)
    assert measure_sparsity(model) == first
    model(*sample_inputs())  # refreshes every module.weight attribute
    assert measure_sparsity(model) == first
    prune.remove(model.fc1, "weight")
    prune.remove(model.conv, "weight")
    assert isinstance(model.fc1.weight, nn.Parameter)
    assert measure_sparsity(model) == first


def test_layer_pruned_twice_counts_the_combined_mask() -> None:
    model = mixed_state_model()
    orig, mask = model.fc1.weight_orig, model.fc1.weight_mask
    expected = int(((orig != 0) & (mask != 0)).sum())
    assert measure_sparsity(model).per_parameter["fc1.weight"] == (expected, orig.numel())
    assert int((mask == 0).sum()) >= int(0.5 * orig.numel()) + int(0.3 * 0.5 * orig.numel())


def test_regression_seed_bug_zero_vs_99_765_percent_for_the_same_model() -> None:
    """The seed's logs swung between 0.000% and 99.765% for one model: one reader counted
    ``named_parameters()`` (which hold ``weight_orig``, dense), another the ``weight``
    attributes (effective, refreshed by a forward). The model below is 99.765% sparse."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 23), nn.ReLU(), nn.Linear(23, 10))  # 1,702 weights
    pairs = [(model[0], "weight"), (model[2], "weight")]
    prune.global_unstructured(pairs, pruning_method=prune.L1Unstructured, amount=1698)
    model(torch.randn(2, 64))

    def naive_parameters() -> float:
        weights = [p for n, p in model.named_parameters() if "weight" in n]
        zeros = sum(int((p == 0).sum()) for p in weights)
        return zeros / sum(p.numel() for p in weights)

    def naive_attributes() -> float:
        weights = [m.weight for m, _ in pairs]
        return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)

    assert f"{100 * naive_parameters():.3f}%" == "0.000%"
    assert f"{100 * naive_attributes():.3f}%" == "99.765%"
    # An optimizer step changes weight_orig; the attributes stay stale until a forward.
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    model(torch.randn(2, 64)).sum().backward()
    optimizer.step()
    readings = {f"{100 * measure_sparsity(model).sparsity:.3f}%"}
    model(torch.randn(2, 64))
    readings.add(f"{100 * measure_sparsity(model, pairs).sparsity:.3f}%")
    for module, name in pairs:
        prune.remove(module, name)
    readings.add(f"{100 * measure_sparsity(model).sparsity:.3f}%")
    assert readings == {"99.765%"}


def test_default_set_is_linear_conv_embedding_attention_and_rnn_weights_only() -> None:
    names = [t.name for t in resolve(ConvNet())]
    assert names == ["embed.weight", "conv.weight", "fc1.weight", "fc2.weight"]
    layer = nn.TransformerEncoderLayer(16, 4, 32)
    assert [t.name for t in resolve(layer)] == [
        "self_attn.in_proj_weight",
        "self_attn.out_proj.weight",
        "linear1.weight",
        "linear2.weight",
    ]
    separate = nn.MultiheadAttention(16, 4, kdim=8, vdim=12)
    assert [t.name for t in resolve(separate)] == [
        "q_proj_weight",
        "k_proj_weight",
        "v_proj_weight",
        "out_proj.weight",
    ]
    assert [t.name for t in resolve(nn.EmbeddingBag(10, 4))] == ["weight"]
    assert [t.name for t in resolve(nn.LSTMCell(6, 8))] == ["weight_ih", "weight_hh"]
    lstm = nn.LSTM(6, 8, num_layers=2, proj_size=4)  # weight matrices, not the biases
    assert [t.name for t in resolve(lstm)] == [
        f"weight_{kind}_l{layer}" for layer in (0, 1) for kind in ("ih", "hh", "hr")
    ]


def test_explicit_pairs_limit_the_set_and_keep_qualified_names() -> None:
    model = ConvNet()
    report = measure_sparsity(model, [(model.fc2, "weight"), (model.fc2, "bias")])
    assert list(report.per_parameter) == ["fc2.weight", "fc2.bias"]
    assert report.total == 330 + 10


def test_measure_sparsity_in_a_compiled_function_runs_eagerly_without_dynamo_warnings() -> None:
    """Logging sparsity from a compiled step: Dynamo breaks its graph at the call (a
    host-side report, C++ counting) without warning about what it cannot trace, and the
    report is the eager one."""
    model = mixed_state_model()
    expected = measure_sparsity(model)

    def step(x: torch.Tensor) -> tuple[torch.Tensor, SparsityReport]:
        return x * 2, measure_sparsity(model)

    torch._dynamo.reset()
    with dynamo_warnings() as warned:
        _, report = torch.compile(step, backend="eager")(torch.ones(3))
    assert warned == []
    assert report == expected


def test_a_compiled_model_and_its_compiled_submodules_keep_the_plain_names() -> None:
    """``torch.compile`` wraps a module in an ``OptimizedModule`` whose tree holds it under
    ``_orig_mod``: reports and pruner logs keep the names of the model as written (nothing
    is compiled here: compilation waits for the first call)."""
    model = mixed_state_model()
    expected = measure_sparsity(model).per_parameter
    assert measure_sparsity(torch.compile(model)).per_parameter == expected
    inner = nn.Sequential(torch.compile(nn.Linear(4, 3)), nn.ReLU())
    assert list(measure_sparsity(inner).per_parameter) == ["0.weight"]
    assert [t.name for t in SparsityController(torch.compile(inner)).targets] == ["0.weight"]


def test_activation_checkpointing_wrappers_keep_the_plain_names() -> None:
    """``checkpoint_wrapper`` (what FSDP and Lightning's activation checkpointing apply per
    layer) holds the layer under ``_checkpoint_wrapped_module``."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    plain = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
    with torch.no_grad():
        plain[0].weight[:2] = 0.0
    wrapped = nn.Sequential(checkpoint_wrapper(plain[0]), plain[1], checkpoint_wrapper(plain[2]))
    assert measure_sparsity(wrapped).per_parameter == measure_sparsity(plain).per_parameter
    assert list(measure_sparsity(wrapped).per_parameter) == ["0.weight", "2.weight"]


def test_torch_ao_pruning_masks_count_as_the_weight_the_forward_computes() -> None:
    """PyTorch's own sparsifiers (``torch.ao.pruning``) keep the mask in a parametrization
    (``FakeSparsity``): the zeros are the computed weight's, not the original's."""
    from torch.ao.pruning import WeightNormSparsifier

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    sparsifier = WeightNormSparsifier(0.5, sparse_block_shape=(1, 4), zeros_per_block=4)
    sparsifier.prepare(model, [{"tensor_fqn": "0.weight"}, {"tensor_fqn": "2.weight"}])
    sparsifier.step()
    assert int((model[0].parametrizations.weight.original == 0).sum()) == 0
    report = measure_sparsity(model)
    assert report.per_parameter == {"0.weight": (256, 512), "2.weight": (128, 256)}


def test_tied_weights_are_counted_once() -> None:
    embed = nn.Embedding(20, 8)
    head = nn.Linear(8, 20, bias=False)
    head.weight = embed.weight
    model = nn.Sequential(embed, head)
    report = measure_sparsity(model)
    assert report.total == 160
    assert list(report.per_parameter) == ["0.weight"]


def test_natural_zeros_negative_zero_tolerance_and_nan() -> None:
    model = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.0, -0.0, 1e-4, float("nan")]]))
    assert measure_sparsity(model).nonzero == 2  # -0.0 is zero; NaN is not
    assert measure_sparsity(model, zero_tolerance=1e-3).nonzero == 1  # only the NaN
    assert count_nonzero(torch.tensor([0.5, -0.25, 0.125]), None, 0.25).item() == 1
    # Exact: 1e-3 stored in fp32 is 0.0010000000475 > 1e-3, so it is not within tolerance
    # (comparing against the tolerance rounded to nearest in fp32 would say it is).
    assert count_nonzero(torch.tensor([1e-3, 9e-4]), None, 1e-3).item() == 1


def test_bfloat16_and_masked_counts() -> None:
    values = torch.tensor([1.0, 0.0, 2.0, 3.0], dtype=torch.bfloat16)
    mask = torch.tensor([1.0, 1.0, 0.0, 1.0], dtype=torch.bfloat16)
    assert count_nonzero(values, mask).item() == 2
    assert count_nonzero(values, None).dtype == torch.int64


@pytest.mark.parametrize(
    ("pairs", "error", "match"),
    [
        ("fc1", TypeError, "expected a list of"),
        ([("fc1", "weight")], TypeError, "expected a torch.nn.Module"),
        ([(nn.Linear(2, 2), 3)], TypeError, "attribute name as a str"),
        ([(nn.Linear(2, 2), "wieght")], ValueError, "has no tensor attribute 'wieght'"),
        ([], ValueError, "expected at least one"),
        (
            (nn.Linear(2, 2), "weight"),  # had read "parameters_to_prune[0]=Linear(...): expected
            TypeError,  # a (module, name) tuple", the module taken for the first pair
            r"parameters_to_prune=\(Linear, 'weight'\) is one \(module, name\) pair; expected",
        ),
    ],
)
def test_bad_parameter_sets_raise_with_the_entry(pairs: object, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        measure_sparsity(ConvNet(), pairs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "call",
    [
        measure_sparsity,
        regularized_groups,
        SparsityController,
        MagnitudePruner,
        lambda model: magnitude_init_(model, 0.5),
        lambda model: export_sparse(model, "unused.safetensors"),
        gather_state_dict,
        folded_state_dict,
    ],
)
def test_pairs_given_as_the_model_are_refused_by_name(call: Callable[[object], object]) -> None:
    # The seed's parameters_to_prune is a list of (module, name) pairs; given as the model,
    # every entry point had failed on "'list' object has no attribute 'named_modules'".
    model = ConvNet()
    with pytest.raises(
        TypeError, match=r"model=\[\(Conv2d.*: expected the nn.Module .* go in parameters_to_prune"
    ):
        call([(model.conv, "weight")])


def test_module_outside_the_model_and_duplicates_are_rejected() -> None:
    model, stranger = ConvNet(), nn.Linear(3, 3)
    with pytest.raises(ValueError, match="not a submodule"):
        measure_sparsity(model, [(stranger, "weight")])
    with pytest.raises(ValueError, match="listed twice"):
        measure_sparsity(model, [(model.fc1, "weight"), (model.fc1, "weight")])
    with pytest.raises(
        ValueError,
        match=r"None found no Linear, ConvNd, Embedding, MultiheadAttention or RNN weight",
    ):
        measure_sparsity(nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError, match="zero_tolerance"):
        measure_sparsity(model, zero_tolerance=-1.0)


def test_lazy_weights_are_refused_by_name_until_a_forward_materializes_them() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.LazyLinear(2))
    for pairs in (None, [(model[1], "weight")]):
        with pytest.raises(ValueError, match=r"1\.weight: an uninitialized lazy parameter"):
            measure_sparsity(model, pairs)
    with pytest.raises(ValueError, match=r"1\.weight: .*one forward pass"):
        SparsityController(model)
    model(torch.zeros(1, 4))
    assert measure_sparsity(model).total == 4 * 3 + 3 * 2


def test_weights_on_the_meta_device_are_refused_by_name_until_materialized() -> None:
    """torch had answered "Cannot copy out of meta tensor; no data!"."""
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    with pytest.raises(ValueError, match=r"^0\.weight, 2\.weight: on the meta device"):
        measure_sparsity(model)
    model.to_empty(device="cpu")
    for layer in (model[0], model[2]):
        layer.reset_parameters()
    assert measure_sparsity(model).total == 4 * 3 + 3 * 2


def test_a_placement_that_loses_elements_is_an_error_not_a_number() -> None:
    """The guard behind every strategy: counted totals must equal the tensor's size (a
    layout read wrongly, e.g. padding or a lost shard, fails loudly)."""

    class Lossy(Replicated):
        def view(self) -> LocalView:
            view = super().view()
            assert view.values is not None
            return dataclasses.replace(
                view, values=view.values.reshape(-1)[1:], numel=view.numel - 1
            )

    model = ConvNet()
    placements = [Lossy(p.target) for p in place(model, resolve(model))]
    with pytest.raises(
        RuntimeError, match=r"embed\.weight: ranks counted 76 elements, but .* has 77"
    ):
        reduce_counts(placements)


def test_report_of_empty_total_is_nan_not_zero() -> None:
    assert SparsityReport(0, 0, {}).sparsity != SparsityReport(0, 0, {}).sparsity


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_balanced_owners_cover_every_tensor_once_and_balance_bytes(world: int) -> None:
    sizes = [1000, 10, 500, 500, 7, 250, 250, 3, 999]
    owners = balanced_owners(sizes, world)
    assert len(owners) == len(sizes) and set(owners) <= set(range(world))
    loads = [sum(s for s, o in zip(sizes, owners, strict=True) if o == r) for r in range(world)]
    assert max(loads) - min(loads) <= max(sizes)
    assert owners == balanced_owners(sizes, world)  # deterministic


@pytest.mark.parametrize("path", ["kernel", "torch", "mixed"])
def test_structure_counts_rows_and_kernels_in_the_same_buffer(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same numbers whether the CPU kernel counts everything, nothing (no compiler),
    or only some tensors (the rest, e.g. accelerator tensors, by torch ops)."""
    if path == "torch":
        monkeypatch.setattr(kernels, "count_nonzero_many", lambda *args, **kwargs: None)
    if path == "mixed":  # the kernel counts the Linear; the Conv2d is left to torch ops
        count = kernels.count_nonzero_many
        monkeypatch.setattr(
            kernels,
            "count_nonzero_many",
            lambda values, *args: count([v if v.ndim < 3 else None for v in values], *args),
        )
    model = nn.Sequential(nn.Linear(4, 6), nn.Conv2d(2, 3, 3))
    with torch.no_grad():
        model[0].weight[1:3] = 0.0  # 2 of 6 neurons
        model[1].weight[0] = 0.0  # 1 of 3 filters = 2 of 6 kernels
        model[1].weight[2, 1] = 0.0  # 1 more kernel
        model[1].weight[1, 0, 0, 0] = 0.0  # a single zero is neither
    report, extra = reduce_counts(
        place(model, resolve(model)), structure=True, extra=[torch.tensor(7)]
    )
    assert (report.zero_rows, report.rows) == (3, 9)
    assert (report.zero_kernels, report.kernels) == (3, 6)
    assert report.node_sparsity == 3 / 9 and report.kernel_sparsity == 0.5
    assert extra == [7]
    plain, _ = reduce_counts(place(model, resolve(model)))
    assert plain.node_sparsity is None and plain.nonzero == report.nonzero
    pairs = [(model[0], "weight"), (model[0], "bias"), (model[1], "weight")]
    biased, _ = reduce_counts(place(model, resolve(model, pairs)), structure=True)
    assert (biased.zero_rows, biased.rows, biased.zero_kernels, biased.kernels) == (3, 9, 3, 6)


@pytest.mark.parametrize("zero_tolerance", [0.0, 0.3])
def test_counting_together_equals_counting_one_by_one(zero_tolerance: float) -> None:
    """The accelerator path for many small tensors (one flat copy per dtype and mask type,
    a running count read at each slice's bounds) gives each tensor its own count, zero rows
    and zero kernels. (Device-agnostic: run here on CPU tensors.)"""
    generator = torch.Generator().manual_seed(4)
    shapes = [(3, 4), (1,), (7, 2, 3), (5,), (), (6, 3, 2, 2), (4, 5)]
    values = [torch.randn(shape, generator=generator) for shape in shapes]
    values.append(torch.randn(3, 2, generator=generator).to(torch.bfloat16))
    values += [torch.randn(1, 5, generator=generator), torch.randn(1, 1, 3, generator=generator)]
    for v in values:
        v[v.abs() < 0.5] = 0.0
    values[0][1] = 0.0  # zero rows and kernels, some of them under a mask only
    values[2][3:5] = 0.0
    values[2][0, 1] = 0.0
    values[5][::2, 1] = 0.0
    values[6][2] = 0.0
    values[7][0] = 0.0
    values[8][0] = torch.tensor([0.0, 0.0, 0.0, 0.7, 0.9])  # one row: alive, by its end
    values[9][0, 0] = torch.tensor([0.0, 0.0, 2.0])  # one kernel: the same
    values[2][0, 0, 0] = float("nan")
    values[7][1, 1] = float("inf")
    masks = [None] * len(values)
    masks[2] = (torch.rand(7, 2, 3, generator=generator) < 0.5).float()
    masks[6] = torch.ones(4, 5)
    masks[6][0] = 0.0
    counts, structures, nonfinite = sparsity._count_together(
        values, masks, zero_tolerance, structure=True
    )
    assert structures is not None
    flags = [
        sparsity.nonzero_flags(v, m, zero_tolerance) for v, m in zip(values, masks, strict=True)
    ]
    assert [int(c) for c in counts] == [int(f.sum()) for f in flags]
    assert [z.tolist() for z in structures] == [sparsity.zero_structures(f).tolist() for f in flags]
    assert sum(z[0] for z in structures).item() >= 5 and sum(z[1] for z in structures).item() >= 4
    assert int(nonfinite) == 2
    plain_counts, plain_structures, _ = sparsity._count_together(values, masks, zero_tolerance)
    assert [int(c) for c in plain_counts] == [int(c) for c in counts]
    assert plain_structures is None


def test_zero_structures_of_a_shard_with_no_rows_are_zero() -> None:
    for shape in [(0, 5), (0, 2, 3, 3)]:
        assert sparsity.zero_structures(torch.zeros(shape, dtype=torch.bool)).tolist() == [0, 0]
    flags = torch.tensor([[[1, 0], [0, 0]], [[0, 0], [0, 0]]], dtype=torch.bool)
    assert sparsity.zero_structures(flags).tolist() == [1, 3]  # row 1; kernels (0,1), (1,*)


def test_torch_path_counts_nonfinite_exactly_even_when_a_finite_sum_overflows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without the kernel, a finite sum rules out NaN/Inf in one read; a sum that overflows
    (fp16: 4 x 60000) or is NaN falls through to the exact count."""
    monkeypatch.setattr(kernels, "count_nonzero_many", lambda *args, **kwargs: None)
    model = nn.Sequential(nn.Linear(4, 1, bias=False), nn.Linear(4, 2, bias=False)).half()
    with torch.no_grad():
        model[0].weight.fill_(60000.0)  # finite, but its sum is not
        model[1].weight.copy_(torch.tensor([[1.0, 0.0, float("inf"), -float("inf")], [0.0] * 4]))
    report = measure_sparsity(model)
    assert (report.nonfinite, report.nonzero, report.total) == (2, 7, 12)
    with torch.no_grad():
        model[1].weight[1, 0] = float("nan")
    assert measure_sparsity(model).nonfinite == 3
    with torch.no_grad():
        model[1].weight.zero_()
    assert measure_sparsity(model).nonfinite == 0


SHAPES = [(0, 5), (3, 0), (2, 3, 0, 0), (0, 2, 3), (4,), (3, 5), (2, 3, 2)]


@pytest.mark.parametrize("shape", SHAPES)
def test_zero_structures_of_empty_and_plain_shapes_match_any(shape: tuple[int, ...]) -> None:
    """Rows and kernels counted as 'no element of the slice is nonzero', empty slices and
    shards without rows included (the per-slice max must not reduce an empty dimension)."""
    flags = torch.rand(shape, generator=torch.Generator().manual_seed(1)) < 0.3
    expected = [
        sum(not bool(flags[index].any()) for index in itertools.product(*map(range, shape[:lead])))
        if len(shape) > lead
        else 0
        for lead in (1, 2)
    ]
    assert sparsity.zero_structures(flags).tolist() == expected


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float8_weights_count_as_the_same_values_in_float32(dtype: torch.dtype) -> None:
    """torch has no sum or abs for float8 on CPU (measuring raised NotImplementedError);
    the counts, zero rows, non-finite elements and tolerance included, are those of the
    same values held exactly in float32, one by one and counted together."""
    generator = torch.Generator().manual_seed(5)
    model = nn.Sequential(nn.Linear(12, 8), nn.Linear(8, 4))
    special = [0.0, -0.0, float("nan")] + ([float("inf")] if dtype == torch.float8_e5m2 else [])
    with torch.no_grad():
        for layer in model:
            weight = torch.randn(layer.weight.shape, generator=generator) * 0.05
            weight[weight.abs() < 0.03] = 0.0
            weight[1] = 0.0
            weight[0, : len(special)] = torch.tensor(special)
            layer.weight.data = weight.to(dtype)
    reference = nn.Sequential(nn.Linear(12, 8), nn.Linear(8, 4))
    for mine, theirs in zip(model, reference, strict=True):
        theirs.weight.data = mine.weight.data.float()
    for zero_tolerance in (0.0, 0.02):
        counted = _structured_report(model, zero_tolerance)
        expected = _structured_report(reference, zero_tolerance)
        assert counted == expected
        assert counted.nonfinite == 2 * (len(special) - 2) and counted.zero_rows == 2
    weights = [layer.weight.detach() for layer in model]
    counts, _, nonfinite = sparsity._count_together(weights, [None, None], 0.0)
    assert [int(c) for c in counts] == [int(w.float().to(torch.bool).sum()) for w in weights]
    assert int(nonfinite) == 2 * (len(special) - 2)


def _structured_report(model: nn.Module, zero_tolerance: float) -> SparsityReport:
    placements = place(model, resolve(model))
    return reduce_counts(placements, zero_tolerance=zero_tolerance, structure=True)[0]


def test_summed_agreement_words_tell_whether_every_rank_sent_the_same() -> None:
    """What measure_sparsity checks within its one all-reduce: the ranks' words ``f`` and
    ``f*f`` summed, equal ``f`` on every rank exactly when ``W * sum(f*f) == sum(f)**2``."""
    names, sizes = ["0.weight", "2.weight"], [64, 64]

    def summed(ranks: list[list[int]]) -> list[int]:
        return [sum(column) for column in zip(*ranks, strict=True)]

    same = sparsity._agreement_words(names, sizes)
    assert len(same) == 2 * sparsity.DIGEST_WORDS
    assert sparsity._agreed(summed([same] * 4), 4)
    for other_names, other_sizes in ((["2.weight", "3.weight"], sizes), (names, [64, 128])):
        other = sparsity._agreement_words(other_names, other_sizes)
        assert not sparsity._agreed(summed([same, same, other, same]), 4)
    # Equal sums from unequal words (1 + 3 == 2 + 2) are still told apart by the squares.
    pairs = [[1, 0, 0, 1, 0, 0], [3, 0, 0, 9, 0, 0]]
    assert not sparsity._agreed(summed(pairs), 2)
    assert sparsity._agreed(summed([[2, 0, 0, 4, 0, 0]] * 2), 2)


class _ColumnParallelLinear(nn.Module):
    """One tensor-parallel rank's part of a Linear in Megatron's layout: a plain weight of
    the slice's shape, marked as Megatron's ``set_tensor_model_parallel_attributes``
    marks it."""

    def __init__(self, n_in: int, n_out: int, ranks: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out // ranks, n_in))
        self.weight.tensor_model_parallel = True  # type: ignore[attr-defined]
        self.weight.partition_dim = 0  # type: ignore[attr-defined]
        self.weight.partition_stride = 1  # type: ignore[attr-defined]


def test_megatron_style_tensor_parallel_slices_are_refused_by_name() -> None:
    """Counted as replicas, one rank's slice stood for the whole weight, silently: the
    reduced total was the slice's size, so no check caught it."""
    model = nn.Sequential(_ColumnParallelLinear(8, 16, ranks=2), nn.Linear(8, 4))
    pairs = [(model[0], "weight"), (model[1], "weight")]
    calls: list[Callable[[], object]] = [
        lambda: measure_sparsity(model, pairs),
        lambda: SparsityController(model, parameters_to_prune=pairs),
        lambda: MagnitudePruner(model, parameters_to_prune=pairs),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=r"0\.weight are tensor-parallel slices"):
            call()
    assert measure_sparsity(model, pairs[1:]).total == 32  # the plain layer alone: measured
