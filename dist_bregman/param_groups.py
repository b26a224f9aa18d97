"""Param groups for the Bregman optimizers, built from what the pruner measures.

LinBreg/AdaBreg/ProxSGD given plain parameters regularize tensors with ``ndim >= 2``. That
guess fails when a wrapper flattens parameters (FSDP1 hands the optimizer 1-D views); this
builds the groups from the measured weights themselves, under any wrapper:

    optimizer = LinBreg(regularized_groups(fsdp_model, reg="l1"), lr=0.1)
"""

from __future__ import annotations

from typing import Any

from torch import nn

from dist_bregman.regularizers import resolve as resolve_regularizer
from dist_bregman.shards import locate
from dist_bregman.shards.fsdp import FlatPlacement
from dist_bregman.targets import ParameterPairs


def regularized_groups(
    model: nn.Module,
    reg: object = "l1",
    parameters_to_prune: ParameterPairs | None = None,
) -> list[dict[str, Any]]:
    """``[{"params": measured weights, "reg": reg}, {"params": the rest, "reg": None}]``.

    ``model`` is the model as the optimizer will see it (wrapped by FSDP1/FSDP2 already;
    for DeepSpeed, the module before ``deepspeed.initialize``). Extra keys (``lr``,
    ``lambda``, ``lambda_scale``...) can be added to the returned dicts; for a strength per
    layer, split the first dict's ``params`` into several groups.
    """
    resolve_regularizer(reg)
    placements = locate(model, parameters_to_prune)
    weights, seen = [], set()
    for placement in placements:
        if isinstance(placement, FlatPlacement) and not placement.use_orig_params:
            raise ValueError(
                f"{placement.target.name} lives in an FSDP1 flat parameter "
                f"(use_orig_params=False) shared with biases; allowed: use_orig_params=True"
            )
        tensor, _ = placement.holder()
        if id(tensor) not in seen:
            seen.add(id(tensor))
            weights.append(tensor)
    others = [p for p in model.parameters() if id(p) not in seen]
    groups = [{"params": weights, "reg": reg}]
    if others:
        groups.append({"params": others, "reg": None})
    return groups
