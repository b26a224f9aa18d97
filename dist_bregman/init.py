"""Sparse initialisation for Bregman training (Bungert et al., 2022, inverse scale space).

LinBreg and AdaBreg grow a network from few weights: a weight turns on only once its
accumulated gradient evidence exceeds lambda. Starting sparse is what makes that cheap and
what keeps the support small. Pure torch; call it before wrapping or sharding the model.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dist_bregman.config import check_number
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
    Linear, ConvNd and Embedding weight).
    """
    check_number("rate", rate, low=0.0, high=1.0)
    if rate == 0.0:
        raise ValueError("rate=0.0: expected a number in (0, 1] (rate 0 leaves no weight)")
    check_number("bias_scale", bias_scale, low=0.0)
    for target in resolve(model, parameters_to_prune):
        weight = target.values
        shape = (weight.shape[0],) + (1,) * (weight.ndim - 1) if rows else weight.shape
        keep = torch.rand(shape, generator=generator, device="cpu").lt(rate).to(weight.device)
        weight.mul_(keep.to(weight.dtype)).div_(math.sqrt(rate))
        bias = getattr(target.module, "bias", None)
        if isinstance(bias, torch.Tensor) and weight.ndim >= 2:
            fan_in = weight[0].numel()
            values = torch.rand(bias.shape, generator=generator) * (bias_scale / math.sqrt(fan_in))
            bias.copy_(values)
