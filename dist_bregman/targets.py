"""Which tensors are measured and regularized, and how to read them truthfully.

A target is a ``(module, name)`` pair, as in ``torch.nn.utils.prune``. Reading it is where
the seed's bug lived: once ``torch.nn.utils.prune`` has touched a module, ``module.weight``
is a plain attribute recomputed only in the forward pre-hook (stale after every optimizer
step), the trainable tensor is ``weight_orig`` and the mask is the buffer ``weight_mask``.
The effective weight is ``weight_orig * weight_mask``. :meth:`Target.tensors` returns that
pair (or the plain parameter and no mask) and nothing else in the project reads a target.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils import parametrize, prune

PRUNABLE_MODULES: tuple[type[nn.Module], ...] = (nn.Linear, _ConvNd, nn.Embedding)
"""Module types whose ``weight`` is discovered when no explicit list is given."""

ParameterPairs = Sequence[tuple[nn.Module, str]]
"""The ``parameters_to_prune`` format shared with ``torch.nn.utils.prune`` and Lightning."""


def pruning_method(module: nn.Module, name: str) -> prune.BasePruningMethod | None:
    """The ``torch.nn.utils.prune`` method (or container) attached to ``module.name``."""
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, prune.BasePruningMethod) and hook._tensor_name == name:
            return hook
    return None


class Target(NamedTuple):
    """One measured tensor: ``module.<attr>``, known in reports as ``name``. (A named
    tuple: :func:`~dist_bregman.measure_sparsity` builds one per tensor per call, and a
    frozen dataclass costs several times more to create.)"""

    name: str
    """Qualified name, e.g. ``"encoder.fc1.weight"``; the key of per-parameter reports."""
    module: nn.Module
    attr: str

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(values, mask)``: the trainable tensor and the prune mask, or ``None``.

        ``values`` is the object the optimizer holds (``weight_orig`` under pruning; the
        same ``Parameter`` object before, during and after ``prune.remove``), so it is also
        what the proximal step must change.
        """
        module, attr = self.module, self.attr
        if module._forward_pre_hooks and pruning_method(module, attr) is not None:
            return _read(module, attr + "_orig"), _read(module, attr + "_mask")
        return _read(module, attr), None

    @property
    def values(self) -> torch.Tensor:
        """The trainable tensor (see :meth:`tensors`)."""
        return self.tensors()[0]

    def effective(self) -> torch.Tensor:
        """The weight the forward pass uses: ``values * mask`` (differentiable)."""
        values, mask = self.tensors()
        return values if mask is None else values * mask


def parametrization(target: Target) -> nn.ModuleList | None:
    """The chain of ``torch.nn.utils.parametrize`` steps (``weight_norm``,
    ``spectral_norm``, ``orthogonal``) that computes ``target`` from the chain's own
    parameters (its *originals*), or None for a tensor of its own.

    Such a weight is measured as the forward computes it, but a write into it (a mask, the
    proximal step, a Bregman optimizer's update) lands in a temporary and is lost.
    """
    if not parametrize.is_parametrized(target.module, target.attr):
        return None
    chains = target.module.parametrizations
    assert isinstance(chains, nn.ModuleDict)
    chain = chains[target.attr]
    assert isinstance(chain, nn.ModuleList)
    return chain


def check_writable(targets: Sequence[Target], write: str, also: str = "") -> None:
    """Raise ``ValueError`` for a target a parametrization computes (see
    :func:`parametrization`): ``write`` says what would be lost, ``also`` names a further
    allowed choice."""
    for target in targets:
        chain = parametrization(target)
        if chain is None:
            continue
        prefix = f"{target.name[: -len(target.attr)]}parametrizations.{target.attr}."
        originals = [prefix + name for name, _ in chain.named_parameters(recurse=False)]
        kinds = ", ".join(type(step).__name__ for step in chain)
        raise ValueError(
            f"parameters_to_prune: {target.name} is computed by a parametrization ({kinds}) "
            f"from {originals}, so {write} would land in a temporary and be lost; allowed: "
            f"{also}an original tensor whose zeros are the weight's zeros in "
            f"parameters_to_prune (weight_norm: (module.parametrizations.{target.attr}, "
            f"'original1'); spectral_norm: 'original'), or the parametrization removed first "
            f"(torch.nn.utils.parametrize.remove_parametrizations)"
        )


def discover(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """The default set: ``weight`` of every Linear, ConvNd and Embedding module."""
    return [(module, "weight") for module in model.modules() if _prunable(module)]


def _prunable(module: nn.Module) -> bool:
    """In the default set: a Linear, ConvNd or Embedding that holds a ``weight``."""
    return isinstance(module, PRUNABLE_MODULES) and _has_tensor(module, "weight")


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
            f"e.g. [(model.fc1, 'weight')], or None to discover Linear/Conv/Embedding weights"
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
        named = [(name, module, "weight") for name, module in tree if _prunable(module)]
        if not named:
            raise ValueError(
                f"parameters_to_prune=None found no Linear, ConvNd or Embedding weight in "
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
    :func:`clean_name`)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) or (
        type(model).__name__ == "DeepSpeedEngine"
    ):
        inner = model.module
        assert isinstance(inner, nn.Module)
        model = inner
    return model


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
    if module._parameters.get(name) is not None:  # the common case, without __getattr__
        return True
    if pruning_method(module, name) is not None:
        return True
    return isinstance(getattr(module, name, None), torch.Tensor)
