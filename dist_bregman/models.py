"""Models for the digits job, written the way the seed's users write theirs."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.modules.conv import _ConvNd

from dist_bregman.callbacks.bregman import BregmanPruner
from dist_bregman.config import check_choice
from dist_bregman.init import sparse_init_
from dist_bregman.optim import AdaBreg, LinBreg, ProxSGD

OPTIMIZERS = ("sgd", "adam", "linbreg", "adabreg", "proxsgd")
WEIGHTED = (nn.Linear, _ConvNd)
"""The layers whose weights are regularized and sharded one by one: Linear and any
convolution (a subclass built on these models, the benchmarks' 1-D one, needs no
override)."""


@dataclass(kw_only=True, slots=True)
class OptimizerSettings:
    """The optimizer of the digits models, as plain settings (LightningCLI-friendly)."""

    name: str = "sgd"
    """One of ``OPTIMIZERS``; the last three are :mod:`dist_bregman.optim`'s."""
    lr: float = 0.05
    momentum: float = 0.9
    """SGD/LinBreg/ProxSGD momentum (ignored by Adam and AdaBreg)."""
    weight_decay: float = 0.0
    """SGD and Adam only."""
    lr_schedule: str = "constant"
    """``"constant"`` or ``"cosine"`` (decay to 0 over the run)."""
    reg: str | None = "l1"
    """Regularizer of the Bregman optimizers' weight groups."""
    lambda_: float = 1e-3
    """Their starting lambda (a BregmanPruner overrides it with its own)."""
    delta: float = 1.0
    """LinBreg/AdaBreg delta."""

    def __post_init__(self) -> None:
        check_choice("optimizer", self.name, OPTIMIZERS)
        check_choice("lr_schedule", self.lr_schedule, ("constant", "cosine"))

    def build(self, params: Iterable[dict[str, Any]]) -> torch.optim.Optimizer:
        """The optimizer over param groups that carry their own ``reg`` (SGD and Adam
        ignore that key)."""
        if self.name == "sgd":
            return torch.optim.SGD(
                params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
            )
        if self.name == "adam":
            return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        if self.name == "linbreg":
            return LinBreg(
                params,
                lr=self.lr,
                reg=self.reg,
                lambda_=self.lambda_,
                delta=self.delta,
                momentum=self.momentum,
            )
        if self.name == "adabreg":
            return AdaBreg(params, lr=self.lr, reg=self.reg, lambda_=self.lambda_, delta=self.delta)
        return ProxSGD(
            params, lr=self.lr, reg=self.reg, lambda_=self.lambda_, momentum=self.momentum
        )


class DigitsClassifier(pl.LightningModule):
    """Shared steps: cross-entropy, the seed's regularization hook, accuracy logging."""

    net: nn.Module

    def __init__(self, optim: OptimizerSettings) -> None:
        super().__init__()
        self.optim = optim
        self.bregman_pruner: BregmanPruner | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def configure_model(self) -> None:
        """Under Lightning's ``ModelParallelStrategy``: tensor parallelism over its
        ``tensor_parallel`` mesh where that has several ranks (:func:`tensor_parallel_plan`),
        then FSDP2 (``fully_shard``) over the data-parallel mesh, one unit per layer. Other
        strategies leave the model alone."""
        mesh = self.device_mesh
        if mesh is None:
            return
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if isinstance(self.net, FSDPModule):
            return  # Lightning calls this hook again for test/validate: shard once

        if mesh["tensor_parallel"].size() > 1:
            from torch.distributed.tensor.parallel import parallelize_module

            parallelize_module(self.net, mesh["tensor_parallel"], tensor_parallel_plan(self.net))
        data_parallel = mesh["data_parallel"]
        for layer in self.net.children():
            if isinstance(layer, WEIGHTED):
                fully_shard(layer, mesh=data_parallel)
        fully_shard(self.net, mesh=data_parallel)

    def on_fit_start(self) -> None:
        # The seed's models hold the pruner as an attribute; find it among the callbacks.
        pruners = [c for c in self.trainer.callbacks if isinstance(c, BregmanPruner)]  # type: ignore[attr-defined]
        self.bregman_pruner = pruners[0] if pruners else None

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        # The seed's integration, unchanged (see README: "The loss term and the proximal step").
        if self.bregman_pruner is not None:
            reg_loss = self.bregman_pruner.get_regularization_loss(self)
            loss = loss + reg_loss
        return loss

    def _evaluate(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> None:
        x, y = batch
        logits = self(x)
        self.log(f"{stage}/loss", F.cross_entropy(logits, y), sync_dist=True)
        accuracy = (logits.argmax(dim=1) == y).float().mean()
        self.log(f"{stage}/acc", accuracy, prog_bar=True, sync_dist=True)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def param_groups(self) -> list[dict[str, Any]]:
        """Weights get ``reg``, biases none. Under a group regularizer the output layer's
        rows are the classes, which must never be removed: it gets plain L1 instead."""
        weights = [m.weight for m in self.net.modules() if isinstance(m, WEIGHTED)]
        others = [p for p in self.parameters() if all(p is not w for w in weights)]
        reg = self.optim.reg
        grouped = reg is not None and reg.startswith("group")
        groups: list[dict[str, Any]] = [
            {"params": weights[:-1], "reg": reg},
            {"params": weights[-1:], "reg": "l1" if grouped else reg},
            {"params": others, "reg": None},
        ]
        return [group for group in groups if group["params"]]

    def configure_optimizers(self) -> Any:
        optimizer = self.optim.build(self.param_groups())
        if self.optim.lr_schedule == "constant":
            return optimizer
        # Cosine decay to 0 over the run: the proximal threshold lr * lambda decays with it,
        # so the sparsity pattern settles instead of flickering at the end.
        steps = int(self.trainer.estimated_stepping_batches)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1))
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


class DigitsMLP(DigitsClassifier):
    """``64 -> hidden... -> 10`` with ReLU.

    ``sparse_init`` (a keep rate) starts from the paper's sparse initialisation
    (``sparse_init_rows`` keeps whole neurons), as LinBreg and AdaBreg want.
    """

    def __init__(
        self,
        hidden: tuple[int, ...] = (256, 128),
        lr: float = 0.05,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        optimizer: str = "sgd",
        lr_schedule: str = "constant",
        reg: str | None = "l1",
        lambda_: float = 1e-3,
        delta: float = 1.0,
        sparse_init: float | None = None,
        sparse_init_rows: bool = False,
        seed: int = 0,
    ) -> None:
        settings = OptimizerSettings(
            name=optimizer,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            lr_schedule=lr_schedule,
            reg=reg,
            lambda_=lambda_,
            delta=delta,
        )
        super().__init__(settings)
        self.save_hyperparameters()
        generator = torch.Generator().manual_seed(seed)
        sizes = [64, *hidden]
        layers: list[nn.Module] = []
        for n_in, n_out in pairwise(sizes):
            layers += [_seeded_linear(n_in, n_out, generator), nn.ReLU()]
        layers.append(_seeded_linear(sizes[-1], 10, generator))
        self.net = nn.Sequential(*layers)
        if sparse_init is not None:
            body, head = nn.Sequential(*list(self.net)[:-1]), nn.Sequential(self.net[-1])
            sparse_init_(body, sparse_init, rows=sparse_init_rows, generator=generator)
            sparse_init_(head, sparse_init, generator=generator)  # never whole classes


def tensor_parallel_plan(net: nn.Module) -> dict[str, Any]:
    """Megatron's MLP split for ``net``'s hidden Linear children, in pairs: the first
    column-wise (its output features sharded), the second row-wise (its input features
    sharded; one all-reduce makes its output whole). The output layer stays whole on every
    tensor-parallel rank (FSDP2 shards it over the data-parallel mesh only), and so does
    an unpaired hidden layer (the CNN's one). The column-wise output stays a DTensor into
    the row-wise layer: made local, uneven shards would be read back wrongly."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    hidden = [name for name, child in net.named_children() if isinstance(child, nn.Linear)][:-1]
    plan: dict[str, Any] = {}
    for first, second in zip(hidden[0::2], hidden[1::2], strict=False):
        plan[first] = ColwiseParallel(use_local_output=False)
        plan[second] = RowwiseParallel()
    return plan


def _seeded_linear(n_in: int, n_out: int, generator: torch.Generator) -> nn.Linear:
    """PyTorch's default Linear initialisation, drawn from ``generator`` (reproducible
    whatever else consumed the global RNG before the model was built)."""
    layer = nn.Linear(n_in, n_out)
    bound = 1.0 / math.sqrt(n_in)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(layer.weight.shape, generator=generator) * 2 * bound - bound)
        layer.bias.copy_(torch.rand(layer.bias.shape, generator=generator) * 2 * bound - bound)
    return layer


class DigitsCNN(DigitsClassifier):
    """A small CNN on the ``(1, 8, 8)`` digits images (``DigitsDataModule(images=True)``):
    two 3x3 convolutions (``channels``), 2x2 max-pool, a hidden Linear, the classes."""

    def __init__(
        self,
        channels: tuple[int, int] = (16, 32),
        hidden: int = 64,
        lr: float = 0.05,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        optimizer: str = "sgd",
        lr_schedule: str = "constant",
        reg: str | None = "l1",
        lambda_: float = 1e-3,
        delta: float = 1.0,
        sparse_init: float | None = None,
        seed: int = 0,
    ) -> None:
        settings = OptimizerSettings(
            name=optimizer,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            lr_schedule=lr_schedule,
            reg=reg,
            lambda_=lambda_,
            delta=delta,
        )
        super().__init__(settings)
        self.save_hyperparameters()
        torch.manual_seed(seed)
        first, second = channels
        self.net = nn.Sequential(
            nn.Conv2d(1, first, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(first, second, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(second * 16, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 10),
        )
        if sparse_init is not None:
            generator = torch.Generator().manual_seed(seed)
            sparse_init_(self.net, sparse_init, generator=generator)
