"""Sparse starts for Bregman training (Bungert et al., 2022, inverse scale space).

LinBreg and AdaBreg grow a network from few weights: a weight turns on only once its
accumulated gradient evidence exceeds lambda. Starting sparse is what makes that cheap and
what keeps the support small. :func:`sparse_init_` draws the start at random (pure torch;
call it before wrapping or sharding the model); :func:`magnitude_init_` cuts it from a
briefly trained dense model.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dist_bregman import comm
from dist_bregman.config import check_number
from dist_bregman.pruning import MagnitudePruner
from dist_bregman.targets import ParameterPairs, resolve


@torch.no_grad()
def sparse_init_(
    model: nn.Module,
    rate: float,
    *,
    parameters_to_prune: ParameterPairs | None = None,
    rows: bool = False,
    bias_scale: float = 1.0,
    generator: torch.Generator | None = None,
) -> None:
    """Keep each weight with probability ``rate`` (``rows=True``: each row, i.e. neuron or
    filter), scale kept weights by ``1/sqrt(rate)`` so each layer's output variance is
    unchanged, and set the biases of those layers to small positive values drawn from
    ``U(0, bias_scale / sqrt(fan_in))`` so that sparse ReLU layers start alive.

    The weights are those ``BregmanPruner`` measures (``parameters_to_prune``, default: every
    Linear, ConvNd, Embedding, attention input projection and RNN weight). Draws are
    made on ``generator``'s device (CPU without one), so a seeded run keeps its pattern
    whatever device the model is on.
    """
    check_number("rate", rate, low=0.0, high=1.0)
    if rate == 0.0:
        raise ValueError("rate=0.0: expected a number in (0, 1] (rate 0 leaves no weight)")
    check_number("bias_scale", bias_scale, low=0.0)
    draws = generator.device if generator is not None else torch.device("cpu")
    for target in resolve(model, parameters_to_prune):
        weight = target.values
        shape = (weight.shape[0],) + (1,) * (weight.ndim - 1) if rows else weight.shape
        keep = torch.rand(shape, generator=generator, device=draws).lt(rate).to(weight.device)
        weight.mul_(keep.to(weight.dtype)).div_(math.sqrt(rate))
        bias = getattr(target.module, "bias", None)
        if isinstance(bias, torch.Tensor) and weight.ndim >= 2:
            fan_in = weight[0].numel()
            values = torch.rand(bias.shape, generator=generator, device=draws)
            bias.copy_(values.mul_(bias_scale / math.sqrt(fan_in)))


@torch.no_grad()
def magnitude_init_(
    model: nn.Module,
    rate: float,
    *,
    parameters_to_prune: ParameterPairs | None = None,
    group: comm.ProcessGroup = None,
) -> float:
    """Keep the ``rate`` share of the largest-magnitude weights over all of them, zero the
    rest: a sparse start for LinBreg/AdaBreg taken from a briefly trained dense model.

    The inverse scale space grows a support from where it starts, and from a random sparse
    start (:func:`sparse_init_`) it keeps weights chosen before any data was seen: on the
    digits CNN at 90% that start left LinBreg about 1.4 points behind magnitude pruning; one
    dense epoch and this cut brought it to about half a point, and with SGD's step size
    within a standard error (``benchmarks/quality_trials.md``). The cut is the exact global one of
    :class:`~dist_bregman.MagnitudePruner`, so ``model`` may be wrapped and sharded (a
    collective: every rank calls it). Call it before the Bregman optimizer's first step (its
    ``v`` starts from these weights) and, under DeepSpeed ZeRO, before the engine that will
    hold its fp32 master copies is built; inside a run, ``BregmanPruner(magnitude_start_at=
    ...)`` makes the same cut and restarts the optimizers. Returns the sparsity of the
    weights afterwards (at least ``1 - rate``: natural zeros count).
    """
    check_number("rate", rate, low=0.0, high=1.0)
    if rate == 0.0:
        raise ValueError("rate=0.0: expected a number in (0, 1] (rate 0 leaves no weight)")
    pruner = MagnitudePruner(model, parameters_to_prune=parameters_to_prune, group=group)
    return pruner.prune(1.0 - rate).report.sparsity
