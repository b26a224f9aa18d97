"""Small models in every pruning state, and an independent reference count."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.utils import prune


class ConvNet(nn.Module):
    """Conv, Linear and Embedding layers (the default discovery set) plus norm and bias."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 7)
        self.conv = nn.Conv2d(1, 5, 3)
        self.norm = nn.BatchNorm2d(5)
        self.fc1 = nn.Linear(5 * 6 * 6 + 7, 33)
        self.fc2 = nn.Linear(33, 10)

    def forward(self, image: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.norm(self.conv(image))).flatten(1)
        h = torch.cat([h, self.embed(token)], dim=1)
        return self.fc2(torch.relu(self.fc1(h)))


def sample_inputs(batch: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(batch, 1, 8, 8), torch.randint(0, 11, (batch,))


def mixed_state_model(seed: int = 0) -> ConvNet:
    """fc1 pruned twice (a PruningContainer), conv pruned once, embed with natural zeros,
    fc2 plain; then weight_orig changed so every ``module.weight`` attribute is stale."""
    torch.manual_seed(seed)
    model = ConvNet()
    prune.l1_unstructured(model.fc1, "weight", amount=0.5)
    prune.random_unstructured(model.fc1, "weight", amount=0.3)
    prune.ln_structured(model.conv, "weight", amount=0.4, n=2, dim=0)
    with torch.no_grad():
        model.embed.weight[torch.rand_like(model.embed.weight) < 0.25] = 0.0
        model.fc1.weight_orig[:, :20] = 0.0  # zeros the stale attribute does not show
        model.conv.weight_orig.mul_(2.0)
    return model


def reference_counts(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Counts by an independent route: the effective weight as torch's pruning hook itself
    computes it (``apply_mask``: ``weight_orig * weight_mask``), then ``!= 0`` elementwise."""
    counts = {}
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
            continue
        weight = module.weight
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, prune.BasePruningMethod) and hook._tensor_name == "weight":
                weight = hook.apply_mask(module)
        weight = weight.detach()
        counts[f"{name}.weight"] = (int((weight != 0).sum()), weight.numel())
    return counts


COMPUTED_WEIGHTS: dict[
    str, tuple[Callable[..., object], Callable[[nn.Module], torch.Tensor], str]
] = {
    # kind: (how the weight is computed, the original that carries its zeros, how the
    # library's messages name what computes it)
    "weight_norm": (
        nn.utils.parametrizations.weight_norm,
        lambda m: m.parametrizations.weight.original1,
        "a parametrization",
    ),
    "spectral_norm": (
        nn.utils.parametrizations.spectral_norm,
        lambda m: m.parametrizations.weight.original,
        "a parametrization",
    ),
    "legacy weight_norm": (
        nn.utils.weight_norm,
        lambda m: m.weight_v,
        "the deprecated torch.nn.utils.weight_norm",
    ),
    "legacy spectral_norm": (
        nn.utils.spectral_norm,
        lambda m: m.weight_orig,
        "the deprecated torch.nn.utils.spectral_norm",
    ),
}
"""The four ways torch computes ``module.weight`` from other tensors."""


def compute_weight(module: nn.Module, kind: str) -> None:
    """Make ``module.weight`` computed, the ``COMPUTED_WEIGHTS`` way ``kind``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the deprecated functions say so
        COMPUTED_WEIGHTS[kind][0](module)
