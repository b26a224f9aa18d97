"""Which tensors are measured and regularized, and how to read them truthfully.

A target is a ``(module, name)`` pair, as in ``torch.nn.utils.prune``. Reading it is where
the seed's bug lived: once ``torch.nn.utils.prune`` has touched a module, ``module.weight``
is a plain attribute recomputed only in the forward pre-hook (stale after every optimizer
step), the trainable tensor is ``weight_orig`` and the mask is the buffer ``weight_mask``.
The effective weight is ``weight_orig * weight_mask``. :meth:`Target.tensors` returns that
pair (or the plain parameter and no mask) and nothing else in the project reads a target.
A weight computed from other tensors (weight_norm, spectral_norm) is read as computed now
and cannot be written: :func:`computed_by` names what it is computed from.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import reprlib
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import NamedTuple

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.parameter import is_lazy
from torch.nn.utils import parametrize, prune
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from dist_bregman.errors import first_names

PRUNABLE_MODULES: tuple[type[nn.Module], ...] = (nn.Linear, _ConvNd, nn.Embedding, nn.EmbeddingBag)
"""Module types whose ``weight`` is discovered when no explicit list is given (with
:data:`ATTENTION_WEIGHTS`)."""

ParameterPairs = Sequence[tuple[nn.Module, str]]
"""The ``parameters_to_prune`` format shared with ``torch.nn.utils.prune`` and Lightning."""


def pruning_method(module: nn.Module, name: str) -> prune.BasePruningMethod | None:
    """The ``torch.nn.utils.prune`` method (or container) attached to ``module.name``."""
    hook = recomputing_hook(module, name)
    return hook if isinstance(hook, prune.BasePruningMethod) else None


RecomputingHook = prune.BasePruningMethod | WeightNorm | SpectralNorm


def recomputing_hook(module: nn.Module, name: str) -> RecomputingHook | None:
    """The forward pre-hook that sets ``module.name`` as a plain attribute, stale after
    every optimizer step: a ``torch.nn.utils.prune`` method, or the deprecated
    ``torch.nn.utils.weight_norm`` / ``spectral_norm``."""
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, prune.BasePruningMethod):
            if hook._tensor_name == name:
                return hook
        elif isinstance(hook, (WeightNorm, SpectralNorm)) and hook.name == name:
            return hook
    return None


@dataclasses.dataclass(slots=True, eq=False)
class Target:
    """One measured tensor: ``module.<attr>``, known in reports as ``name``. (A slotted,
    unfrozen dataclass: :func:`~dist_bregman.measure_sparsity` builds one per tensor per
    call, and this is the cheapest record to create: a named tuple takes 1.7 times as
    long (measured: 670 against 380 ns), a frozen dataclass several times.)"""

    name: str
    """Qualified name, e.g. ``"encoder.fc1.weight"``; the key of per-parameter reports."""
    module: nn.Module
    attr: str

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(values, mask)``: the trainable tensor and the prune mask, or ``None``.

        ``values`` is the object the optimizer holds (``weight_orig`` under pruning; the
        same ``Parameter`` object before, during and after ``prune.remove``), so it is also
        what the proximal step must change. A weight computed from other tensors is read as
        the forward computes it now, a temporary that cannot be written (see
        :func:`computed_by`).
        """
        module, attr = self.module, self.attr
        # The common case in one lookup, also for modules with forward pre-hooks (FSDP2
        # puts some on every module it shards). A registered parameter is never computed:
        # parametrize, prune, weight_norm and spectral_norm all move it out of
        # ``_parameters`` (and the last three add a pre-hook), and while it is registered,
        # ``module.<attr>`` cannot be set to anything else.
        value = module._parameters.get(attr)
        if value is not None:
            return value, None
        if module._forward_pre_hooks:
            hook = recomputing_hook(module, attr)
            if isinstance(hook, prune.BasePruningMethod):
                return _read(module, attr + "_orig"), _read(module, attr + "_mask")
            if hook is not None:
                return hook_weight(hook, module), None
        chain = parametrization(module, attr)
        if chain is not None:
            with evaluating(chain):  # see evaluating: no power iteration
                return getattr(module, attr), None
        return _read(module, attr), None

    @property
    def values(self) -> torch.Tensor:
        """The trainable tensor (see :meth:`tensors`)."""
        return self.tensors()[0]

    def effective(self) -> torch.Tensor:
        """The weight the forward pass uses: ``values * mask`` (differentiable)."""
        values, mask = self.tensors()
        return values if mask is None else values * mask


class Computed(NamedTuple):
    """How a target's weight is computed from other tensors (see :func:`computed_by`)."""

    by: str
    """What computes it, for messages."""
    originals: dict[str, torch.Tensor]
    """The tensors it is computed from (what the optimizer steps), by qualified name."""
    undo: str
    """How to stop computing it, for messages."""


def computed_by(target: Target) -> Computed | None:
    """How ``target`` is computed from other tensors, or None for a tensor of its own:
    a ``torch.nn.utils.parametrize`` chain (``parametrizations.weight_norm``,
    ``spectral_norm``, ``orthogonal``) or the deprecated ``torch.nn.utils.weight_norm`` /
    ``spectral_norm`` hooks.

    Such a weight is measured as the forward computes it, but a write into it (a mask, the
    proximal step, a Bregman optimizer's update) lands in a temporary and is lost.
    """
    module, attr = target.module, target.attr
    prefix = target.name[: -len(attr)]
    chain = parametrization(module, attr)
    if chain is not None:
        return Computed(
            f"a parametrization ({', '.join(type(step).__name__ for step in chain)})",
            {
                f"{prefix}parametrizations.{attr}.{name}": tensor
                for name, tensor in chain.named_parameters(recurse=False)
            },
            "the parametrization removed first "
            "(torch.nn.utils.parametrize.remove_parametrizations)",
        )
    hook = recomputing_hook(module, attr) if module._forward_pre_hooks else None
    if hook is None or isinstance(hook, prune.BasePruningMethod):
        return None
    kind = "weight_norm" if isinstance(hook, WeightNorm) else "spectral_norm"
    suffixes = ("_g", "_v") if kind == "weight_norm" else ("_orig",)
    return Computed(
        f"the deprecated torch.nn.utils.{kind}",
        {prefix + attr + suffix: _read(module, attr + suffix) for suffix in suffixes},
        f"torch.nn.utils.parametrizations.{kind} in its place, or "
        f"torch.nn.utils.remove_{kind} first",
    )


def check_writable(targets: Sequence[Target], write: str, also: str = "") -> None:
    """Raise ``ValueError`` for a target computed from other tensors (see
    :func:`computed_by`): ``write`` says what would be lost, ``also`` names a further
    allowed choice."""
    for target in targets:
        computed = computed_by(target)
        if computed is None:
            continue
        raise ValueError(
            f"parameters_to_prune: {target.name} is computed by {computed.by} from "
            f"{list(computed.originals)}, so {write} would land in a temporary and be lost; "
            f"allowed: {also}an original tensor whose zeros are the weight's zeros in "
            f"parameters_to_prune (torch.nn.utils.parametrizations.weight_norm: "
            f"(module.parametrizations.{target.attr}, 'original1'); spectral_norm: "
            f"'original'), or {computed.undo}"
        )


ATTENTION_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
"""``nn.MultiheadAttention``'s input projections (packed, or separate when ``kdim`` or
``vdim`` differ): the default set holds them, for they are three quarters of the attention
weights of ``nn.Transformer`` layers and not ``nn.Linear`` modules."""


def _discovered(module: nn.Module) -> tuple[str, ...]:
    """The attributes of ``module`` in the default set: ``weight`` of a Linear, ConvNd,
    Embedding or EmbeddingBag, the input projections of a MultiheadAttention (its output
    projection is a Linear of its own), the weight matrices of an RNN, LSTM or GRU
    (``weight_ih_l0``, ...; not the biases) and of their cells (``weight_ih``,
    ``weight_hh``)."""
    kind = _kind(type(module))  # type: ignore[arg-type]  # (a class is hashable)
    if kind == "weight":  # the common case, without building a tuple
        return _WEIGHT if _has_tensor(module, "weight") else ()
    if kind == "attention":
        names: Iterable[str] = ATTENTION_WEIGHTS
    elif kind == "rnn":
        assert isinstance(module, nn.RNNBase)
        names = [name for name in module._flat_weights_names if name.startswith("weight")]
    elif kind == "cell":
        names = ("weight_ih", "weight_hh")
    else:
        return ()
    return tuple(name for name in names if _has_tensor(module, name))


_WEIGHT = ("weight",)


@functools.lru_cache(maxsize=4096)
def _kind(cls: type) -> str:
    """What :func:`_discovered` looks for in a module of class ``cls``. (Cached: a class's
    bases never change, and discovery asks this of every module at every measurement.)"""
    if issubclass(cls, PRUNABLE_MODULES):
        return "weight"
    if issubclass(cls, nn.MultiheadAttention):
        return "attention"
    if issubclass(cls, nn.RNNBase):
        return "rnn"
    if issubclass(cls, nn.RNNCellBase):
        return "cell"
    return ""


def left_out(model: nn.Module, targets: Sequence[Target]) -> str | None:
    """A warning naming the weight matrices the default set leaves out, or None.

    Discovery knows module types (see :func:`_discovered`); a parameter named ``*weight``
    with ``ndim >= 2`` in a module of another type (Hugging Face GPT-2's ``Conv1D``,
    ``nn.Bilinear``, a custom layer) is neither measured nor regularized, and a sparsity
    reported over the rest would read as the model's. Called once, at construction, when
    ``parameters_to_prune`` is None. Best effort: sharded layouts that hide the shapes (a
    ZeRO-3 partition, an FSDP1 flat parameter) are not seen.
    """
    taken = {id(target.values) for target in targets}
    missed = []
    for name, module in unwrap(model).named_modules():
        for attr, tensor in module._parameters.items():
            if (
                attr.endswith("weight")
                and tensor is not None
                and tensor.ndim >= 2
                and id(tensor) not in taken
            ):
                prefix = clean_name(name)
                qualified = f"{prefix}.{attr}" if prefix else attr
                missed.append(f"{qualified} ({type(module).__name__})")
                taken.add(id(tensor))
    if not missed:
        return None
    shown = first_names(missed, 5)
    matrices = "matrix" if len(missed) == 1 else "matrices"
    return (
        f"parameters_to_prune=None: {len(missed)} weight {matrices} in module types the "
        f"default set does not know, neither measured nor regularized: {shown}; to include them, "
        f"pass parameters_to_prune=[(module, 'weight'), ...] with every tensor to prune"
    )


def shared_targets(targets: Sequence[Target], others: Sequence[Target]) -> list[str]:
    """Names of ``targets`` that ``others`` hold too: the same ``(module, attribute)``, or
    the same tensor under another name (tied weights)."""
    pairs = {(id(t.module), t.attr) for t in others}
    tensors = {id(t.values) for t in others}
    return [t.name for t in targets if (id(t.module), t.attr) in pairs or id(t.values) in tensors]


def validate_pairs(
    pairs: object, argname: str = "parameters_to_prune"
) -> list[tuple[nn.Module, str]]:
    """Check a user's ``(module, name)`` list at construction time; return it as a list.

    Raises ``TypeError`` for a malformed entry and ``ValueError`` for an attribute that does
    not exist, a duplicated pair, or an empty list, naming the entry and what is allowed.
    """
    if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Iterable):
        raise TypeError(
            f"{argname}={pairs!r}: expected a list of (module, name) tuples, "
            f"e.g. [(model.fc1, 'weight')], or None to discover the Linear, ConvNd, Embedding, "
            f"attention and RNN weights"
        )
    if isinstance(pairs, tuple) and len(pairs) == 2 and isinstance(pairs[0], nn.Module):
        raise TypeError(
            f"{argname}=({type(pairs[0]).__name__}, {pairs[1]!r}) is one (module, name) pair; "
            f"expected a list of pairs, e.g. [(module, {pairs[1]!r})]"
        )
    checked: list[tuple[nn.Module, str]] = []
    seen: set[tuple[int, str]] = set()
    for index, pair in enumerate(pairs):
        where = f"{argname}[{index}]"
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise TypeError(f"{where}={pair!r}: expected a (module, name) tuple")
        module, name = pair
        if not isinstance(module, nn.Module):
            raise TypeError(f"{where}: module={type(module).__name__}: expected a torch.nn.Module")
        if not isinstance(name, str):
            raise TypeError(f"{where}: name={name!r}: expected the attribute name as a str")
        if not _has_tensor(module, name):
            tensors = [n for n, _ in module.named_parameters(recurse=False)]
            raise ValueError(
                f"{where}: {type(module).__name__} has no tensor attribute {name!r}; "
                f"allowed: one of its parameters {tensors}"
            )
        if (id(module), name) in seen:
            raise ValueError(f"{where}: ({type(module).__name__}, {name!r}) is listed twice")
        seen.add((id(module), name))
        checked.append((module, name))
    if not checked:
        raise ValueError(f"{argname}=[]: expected at least one (module, name) pair, or None")
    return checked


def resolve(
    model: nn.Module,
    pairs: ParameterPairs | None = None,
    *,
    tree: Sequence[tuple[str, nn.Module]] | None = None,
) -> list[Target]:
    """Name every pair from its place in ``model`` and drop tied duplicates.

    ``pairs=None`` discovers the default set. A module that is not inside ``model`` is an
    error (its counts would silently be missing from the model's sparsity). Tensors shared
    by several modules (tied embeddings) are counted once, under their first name.
    ``tree`` is ``unwrap(model).named_modules()`` when the caller walked it already.
    """
    return [target for target, _ in resolve_values(model, pairs, tree=tree)]


def resolve_values(
    model: nn.Module,
    pairs: ParameterPairs | None = None,
    *,
    tree: Sequence[tuple[str, nn.Module]] | None = None,
) -> list[tuple[Target, torch.Tensor]]:
    """:func:`resolve`, each target with its values as read here: a caller that places
    the targets right away (:func:`~dist_bregman.measure_sparsity`, on every call) reads
    each tensor once instead of twice."""
    model = unwrap(model)
    if tree is None:
        tree = list(model.named_modules())
    named: list[tuple[str, nn.Module, str]] = []  # (module name, module, attribute)
    if pairs is None:
        # One walk of the tree both discovers and names (valid and distinct by construction).
        named = [(name, module, attr) for name, module in tree for attr in _discovered(module)]
        if not named:
            raise ValueError(
                f"parameters_to_prune=None found no Linear, ConvNd, Embedding, "
                f"MultiheadAttention or RNN weight in "
                f"{type(model).__name__}; pass a list of (module, name) tuples"
            )
    else:
        module_names = {id(m): n for n, m in tree}
        for index, (module, attr) in enumerate(validate_pairs(pairs)):
            name = module_names.get(id(module))
            if name is None:
                raise ValueError(
                    f"parameters_to_prune[{index}]: {type(module).__name__} (attribute "
                    f"{attr!r}) is not a submodule of the {type(model).__name__} being measured"
                )
            named.append((name, module, attr))
    resolved: list[tuple[Target, torch.Tensor]] = []
    seen_values: set[int] = set()
    for name, module, attr in named:
        prefix = clean_name(name)
        target = Target(f"{prefix}.{attr}" if prefix else attr, module, attr)
        values = target.tensors()[0]
        if type(values) is not nn.Parameter and is_lazy(values):  # (a call saved per tensor)
            raise ValueError(
                f"{target.name}: an uninitialized lazy parameter ({type(module).__name__} "
                f"learns its shape at its first call), so it has nothing to count or "
                f"regularize yet; allowed: a materialized weight: run one forward pass on a "
                f"sample batch first (in a LightningModule: in __init__, setup or configure_model)"
            )
        if not values.is_floating_point():
            raise TypeError(
                f"{target.name}: dtype {values.dtype}: expected a floating-point tensor"
            )
        if id(values) not in seen_values:
            seen_values.add(id(values))
            resolved.append((target, values))
    return resolved


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside DDP, DataParallel or a DeepSpeed engine (FSDP1 wrappers stay:
    their units are inside the model; their name segments are dropped by
    :func:`clean_name`). Anything else than a module is refused here, where every
    entry point that takes a model passes: a list of ``(module, name)`` pairs given as the
    model (the seed's ``parameters_to_prune`` is such a list) otherwise failed on a
    missing ``named_modules``."""
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model={reprlib.repr(model)}: expected the nn.Module (or its "
            f"DDP, FSDP or DeepSpeed wrapper); (module, name) pairs go in parameters_to_prune"
        )
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    while isinstance(model, wrappers) or _deepspeed_engine(model):
        inner = model.module
        assert isinstance(inner, nn.Module)
        model = inner
    return model


def _deepspeed_engine(model: nn.Module) -> bool:
    """Whether ``model`` is a DeepSpeed engine (its ``PipelineEngine`` too), without
    importing DeepSpeed: none exists before DeepSpeed's engine module is imported."""
    engine = sys.modules.get("deepspeed.runtime.engine")
    return engine is not None and isinstance(model, engine.DeepSpeedEngine)


def _read(module: nn.Module, name: str) -> torch.Tensor:
    """A registered parameter/buffer, else the plain attribute (FSDP1 without
    ``use_orig_params`` replaces parameters by plain tensor attributes)."""
    value: torch.Tensor | None = module._parameters.get(name)
    if value is None:
        value = module._buffers.get(name)
    if value is None:
        value = getattr(module, name)
    return value


WRAPPER_TOKENS = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"})
"""Module-name segments that wrappers insert (FSDP1, activation checkpointing,
torch.compile): dropped so names match the unwrapped model's."""


@functools.lru_cache(maxsize=65536)
def clean_name(name: str) -> str:
    """``"_fsdp_wrapped_module.0._fsdp_wrapped_module"`` -> ``"0"``. (Cached: every
    measurement by :func:`~dist_bregman.measure_sparsity` names all targets again.)"""
    return ".".join(part for part in name.split(".") if part not in WRAPPER_TOKENS)


def _has_tensor(module: nn.Module, name: str) -> bool:
    parameters = module._parameters
    if name in parameters:  # the common case, without __getattr__: a registered name is
        return parameters[name] is not None  # neither pruned nor parametrized (both move it)
    if pruning_method(module, name) is not None or parametrization(module, name) is not None:
        return True  # (a parametrized weight is not computed to find out)
    return isinstance(getattr(module, name, None), torch.Tensor)


def parametrization(module: nn.Module, name: str) -> parametrize.ParametrizationList | None:
    """The ``torch.nn.utils.parametrize`` chain that computes ``module.name``, or None.
    (Two dict lookups, not ``is_parametrized``: it runs for every target of every
    measurement.)"""
    chains = module._modules.get("parametrizations")
    chain = None if chains is None else chains._modules.get(name)
    return chain if isinstance(chain, parametrize.ParametrizationList) else None


@contextlib.contextmanager
def evaluating(chain: nn.Module) -> Iterator[None]:
    """``chain``'s modules in eval mode inside the block, as they were after it. A
    parametrized weight is read so: in training mode ``spectral_norm`` runs a power
    iteration at every read, and a measurement or an export would move its ``u``, ``v``
    buffers (on the counting rank only, under DDP)."""
    steps = [step for step in chain.modules() if step.training]
    for step in steps:
        step.training = False
    try:
        yield
    finally:
        for step in steps:
            step.training = True


def hook_weight(hook: WeightNorm | SpectralNorm, module: nn.Module) -> torch.Tensor:
    """The weight a deprecated weight_norm / spectral_norm hook computes from ``module``'s
    tensors now; spectral_norm without a power iteration (no side effect)."""
    if isinstance(hook, SpectralNorm):
        return hook.compute_weight(module, do_power_iteration=False)
    return hook.compute_weight(module)
