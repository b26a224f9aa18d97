"""Write a sparse model for deployment, and say what the sparsity saves.

:func:`export_sparse` folds any ``torch.nn.utils.prune`` masks into plain weights (and
weight_norm / spectral_norm into the weights they compute), stores
every measured weight in CSR form (2-D: rows are dim 0, columns the rest flattened; int32
indices when they fit) and every other tensor dense, in a safetensors file (CSR parts as
``<name>::crow_indices`` / ``::col_indices`` / ``::values``, shapes in the metadata) or a
``torch.save`` file of plain tensors and lists (loadable with ``weights_only=True``).
:func:`load_sparse` returns the dense state dict. An unsharded model (one process, DDP,
ZeRO-1/2; any wrapper) is exported as it is; a sharded one (FSDP1/2, ZeRO-3) from the whole
weights :func:`gather_state_dict` collects on rank 0 (a collective).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from torch.nn.utils import parametrize, prune
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from dist_bregman import comm
from dist_bregman.shards import locate
from dist_bregman.shards.zero import is_zero3_param
from dist_bregman.targets import ParameterPairs, clean_name, evaluating, hook_weight, unwrap

FORMAT = "dist_bregman.sparse/v1"


@dataclass(frozen=True, slots=True)
class LayerBytes:
    """One measured weight: its size dense and as stored."""

    name: str
    shape: tuple[int, ...]
    nonzero: int
    dense_bytes: int
    sparse_bytes: int


def folded_state_dict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` (or ``state_dict``, the same model's) as a plain model's: prune
    masks folded in (``weight`` instead of ``weight_orig`` and ``weight_mask``), weights
    computed by weight_norm / spectral_norm (parametrizations or the deprecated hooks)
    stored as computed instead of their originals, keys without wrapper segments
    (:func:`~dist_bregman.targets.clean_name`) and without the ``module.`` of DDP,
    DataParallel or a DeepSpeed engine, as :func:`export_sparse` writes them: ``state_dict``
    is then the unwrapped model's. The model is left as it is."""
    return _fold(unwrap(model), state_dict)[0]


def _fold(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor] | None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """:func:`folded_state_dict`, and which original's key became which weight's (an
    original measured in place of its weight is exported as the weight)."""
    if state_dict is None:
        state_dict = model.state_dict()
    state = {clean_name(k): v.detach().clone() for k, v in state_dict.items()}
    pruned = set()
    for module_name, module in model.named_modules():
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, prune.BasePruningMethod):
                name = clean_name(module_name)
                pruned.add(f"{name}.{hook._tensor_name}" if name else hook._tensor_name)
    folded = {}
    for key, value in state.items():  # keep the order: the weight where weight_orig stood
        if key.endswith("_orig") and key[: -len("_orig")] in pruned:
            name = key[: -len("_orig")]
            folded[name] = value * state[name + "_mask"]
        elif not (key.endswith("_mask") and key[: -len("_mask")] in pruned):
            folded[key] = value
    return _fold_computed(model, folded)


def _fold_computed(
    model: nn.Module, state: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Each computed weight (see :func:`~dist_bregman.targets.computed_by`) evaluated from
    the originals in ``state``, in their place; its originals (and spectral_norm's u, v)
    dropped. Evaluated in eval mode: no power iteration moves the model's buffers."""
    computed: dict[str, tuple[torch.Tensor, list[str]]] = {}  # weight: (value, keys it replaces)
    with torch.no_grad():
        for module_name, module in model.named_modules():
            prefix = clean_name(module_name)
            prefix = f"{prefix}." if prefix else ""
            chains = module._modules.get("parametrizations")
            for attr, chain in chains.items() if isinstance(chains, nn.ModuleDict) else ():
                base = f"{prefix}parametrizations.{attr}."
                keys = [k for k in state if k.startswith(base)]
                assert isinstance(chain, parametrize.ParametrizationList)
                names = (
                    ["original"]
                    if chain.is_tensor
                    else [f"original{i}" for i in range(chain.ntensors)]
                )
                originals = [state[base + name] for name in names]
                computed[prefix + attr] = (_evaluate(chain, originals), keys)
            for hook in module._forward_pre_hooks.values():
                if isinstance(hook, (WeightNorm, SpectralNorm)):
                    name = prefix + hook.name
                    suffixes = (
                        ("_g", "_v") if isinstance(hook, WeightNorm) else ("_orig", "_u", "_v")
                    )
                    keys = [name + suffix for suffix in suffixes]
                    holder = nn.Module()  # the hook reads its tensors as attributes of a module
                    for suffix, key in zip(suffixes, keys, strict=True):
                        object.__setattr__(holder, hook.name + suffix, state[key])
                    computed[name] = (hook_weight(hook, holder), keys)
    if not computed:
        return state, {}
    first = {keys[0]: name for name, (_, keys) in computed.items()}
    replaced = {key: name for name, (_, keys) in computed.items() for key in keys}
    out = {}
    for key, value in state.items():  # the weight where its first original stood
        if key in first:
            out[first[key]] = computed[first[key]][0]
        elif key not in replaced:
            out[key] = value
    return out, replaced


def _evaluate(
    chain: parametrize.ParametrizationList, originals: list[torch.Tensor]
) -> torch.Tensor:
    """What ``ParametrizationList`` computes, from given originals (see
    :func:`~dist_bregman.targets.evaluating`)."""
    with evaluating(chain):
        value = chain[0](*originals)
        for step in list(chain)[1:]:
            value = step(value)
        return value


def gather_state_dict(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The whole state dict of a sharded model (FSDP1, FSDP2 with or without HSDP, ZeRO-3),
    on CPU on rank 0 and ``None`` on the other ranks, keyed as the unwrapped model: what
    :func:`export_sparse` takes as ``state_dict``. A collective: every rank calls it.

    FSDP1 and FSDP2 through ``torch.distributed.checkpoint``'s full state dict (from an
    accelerator offloaded to the CPU of rank 0 only); ZeRO-3 by gathering its partitions
    one module at a time (:func:`_gather_zero3`)."""
    inner = unwrap(model)
    params = list(inner.parameters())
    if any(is_zero3_param(p) for p in params):
        return _gather_zero3(inner)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # Offloaded, only rank 0 keeps the gathered tensors. Not for a model already on the CPU:
    # there is nothing to offload, and FSDP1's offload of CPU tensors crashed (SIGSEGV).
    offload = any(p.device.type != "cpu" for p in params)
    options = StateDictOptions(full_state_dict=True, cpu_offload=offload)
    state = get_model_state_dict(inner, options=options)
    if not comm.is_rank_zero():
        return None
    return {clean_name(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _gather_zero3(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """ZeRO-3's whole state dict on rank 0's CPU. Each module's own parameters are gathered
    (``deepspeed.zero.GatheredParameters``, a collective) and copied out before the next
    module's, so a rank holds one module's weights at a time, not the model's: the job
    that needed ZeRO-3 to fit would not fit them all at once."""
    import deepspeed

    state: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        own: dict[str, torch.Tensor] = {}
        params = list(module.parameters(recurse=False))
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            if comm.is_rank_zero():  # its own parameters and persistent buffers only
                module._save_to_state_dict(own, f"{name}." if name else "", keep_vars=False)
                state |= {clean_name(k): v.detach().cpu().clone() for k, v in own.items()}
    return state if comm.is_rank_zero() else None


def export_sparse(
    model: nn.Module,
    path: str | Path,
    *,
    parameters_to_prune: ParameterPairs | None = None,
    file_format: Literal["safetensors", "torch"] = "safetensors",
    state_dict: Mapping[str, torch.Tensor] | None = None,
) -> list[LayerBytes]:
    """Write ``model`` with its measured weights in CSR form; return (and write beside the
    file as ``<stem>.report.md`` / ``.json``) dense vs sparse bytes per layer.

    Keys are the unwrapped model's (no ``module.`` of DDP/DataParallel/DeepSpeed, no
    ``_orig_mod.`` of ``torch.compile``), so the file loads into a fresh, plain model, and
    the measured weights are found under the names :func:`~dist_bregman.measure_sparsity`
    reports them by. A sharded model (FSDP, ZeRO-3) needs its whole weights: pass
    ``state_dict=gather_state_dict(model)`` (called on every rank; export on rank 0).
    Without it a sharded model is refused: its own state dict holds shards, and the file
    would not be the model."""
    path = Path(path)
    placements = locate(model, parameters_to_prune)
    names = {p.target.name for p in placements}
    sharded = sorted(p.target.name for p in placements if p.sharded)
    state: dict[str, torch.Tensor] = {}
    if state_dict is None and sharded:  # shards cannot be folded (a DTensor times a mask)
        missing = sharded
    else:
        state, renamed = _fold(unwrap(model), state_dict)
        names = {renamed.get(name, name) for name in names}
        missing = sorted(names - state.keys())
    if missing:
        raise ValueError(
            f"export_sparse: {missing[:3]} are measured but not whole tensors in the model's "
            f"state_dict (sharded, or not registered as parameters/buffers); allowed: an "
            f"unsharded model, or a sharded one with state_dict=gather_state_dict(model)"
        )
    dense: dict[str, torch.Tensor] = {}
    sparse: dict[str, dict[str, torch.Tensor]] = {}
    shapes: dict[str, list[int]] = {}
    report = []
    for name, tensor in state.items():
        if name not in names:
            dense[name] = tensor.contiguous()
            continue
        parts = _csr(tensor)
        sparse[name], shapes[name] = parts, list(tensor.shape)
        stored = sum(p.numel() * p.element_size() for p in parts.values())
        dense_bytes = tensor.numel() * tensor.element_size()
        report.append(
            LayerBytes(name, tuple(tensor.shape), int(parts["values"].numel()), dense_bytes, stored)
        )
    if file_format == "safetensors":
        from safetensors.torch import save_file

        flat = dict(dense)
        for name, parts in sparse.items():
            flat |= {f"{name}::{part}": value for part, value in parts.items()}
        save_file(flat, str(path), metadata={"format": FORMAT, "shapes": json.dumps(shapes)})
    elif file_format == "torch":
        torch.save({"format": FORMAT, "dense": dense, "sparse": sparse, "shapes": shapes}, path)
    else:
        raise ValueError(f"file_format={file_format!r}: expected 'safetensors' or 'torch'")
    _write_report(path, report)
    return report


def load_sparse(path: str | Path) -> dict[str, torch.Tensor]:
    """The dense state dict of a file written by :func:`export_sparse`."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            shapes = json.loads(metadata.get("shapes", "{}"))
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        dense = {k: v for k, v in tensors.items() if "::" not in k}
        sparse = {name: {p: tensors[f"{name}::{p}"] for p in _PARTS} for name in shapes}
    else:
        saved = torch.load(path, weights_only=True)
        if saved.get("format") != FORMAT:
            raise ValueError(f"{path}: format={saved.get('format')!r}: expected {FORMAT!r}")
        dense, sparse, shapes = saved["dense"], saved["sparse"], saved["shapes"]
    for name, parts in sparse.items():
        dense[name] = _from_csr(parts, shapes[name])
    return dense


_PARTS = ("crow_indices", "col_indices", "values")


def _csr(tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """The compressed-sparse-row arrays of ``tensor`` seen as ``[rows, rest]``, built from
    ``nonzero()`` (row-major, so already in CSR order) rather than ``to_sparse_csr``, which
    torch marks beta and warns about on every call."""
    matrix = tensor.reshape(tensor.shape[0], -1) if tensor.ndim else tensor.reshape(1, 1)
    rows, cols = matrix.nonzero(as_tuple=True)
    index = torch.int32 if max(matrix.shape) < 2**31 and rows.numel() < 2**31 else torch.int64
    crow = torch.zeros(matrix.shape[0] + 1, dtype=torch.int64, device=matrix.device)
    torch.cumsum(torch.bincount(rows, minlength=matrix.shape[0]), 0, out=crow[1:])
    return {
        "crow_indices": crow.to(index),
        "col_indices": cols.to(index),
        "values": matrix[rows, cols].contiguous(),
    }


def _from_csr(parts: dict[str, torch.Tensor], shape: list[int]) -> torch.Tensor:
    """The dense tensor of :func:`_csr`'s arrays."""
    rows = shape[0] if shape else 1
    crow = parts["crow_indices"].long()
    values = parts["values"]
    matrix = values.new_zeros(rows, math.prod(shape) // max(rows, 1))
    row_of = torch.repeat_interleave(torch.arange(rows, device=crow.device), crow.diff())
    matrix[row_of, parts["col_indices"].long()] = values
    return matrix.reshape(shape)


def _write_report(path: Path, layers: list[LayerBytes]) -> None:
    dense = sum(layer.dense_bytes for layer in layers)
    stored = sum(layer.sparse_bytes for layer in layers)
    lines = [
        "| layer | shape | nonzero | dense bytes | sparse (CSR) bytes | ratio |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for layer in layers:
        ratio = layer.sparse_bytes / layer.dense_bytes if layer.dense_bytes else float("nan")
        lines.append(
            f"| {layer.name} | {'x'.join(map(str, layer.shape))} | {layer.nonzero:,} | "
            f"{layer.dense_bytes:,} | {layer.sparse_bytes:,} | {ratio:.3f} |"
        )
    lines.append(f"| total | | | {dense:,} | {stored:,} | {stored / dense if dense else 0:.3f} |")
    path.with_suffix(".report.md").write_text("\n".join(lines) + "\n")
    path.with_suffix(".report.json").write_text(
        json.dumps([asdict(layer) for layer in layers], indent=2)
    )
