"""Logging the callbacks' numbers through Lightning without a host sync."""

from __future__ import annotations

import lightning.pytorch as pl
import torch


def log_on_host(
    pl_module: pl.LightningModule, name: str, value: float, prog_bar: bool = False
) -> None:
    """``pl_module.log(name, value)`` with ``value`` as a float64 CPU tensor.

    Lightning turns a Python number into ``torch.tensor(value, device=pl_module.device)``,
    and on a GPU that copy from pageable memory waits for the device's whole queue: a host
    sync per logged number (pytorch/pytorch#120996). A CPU tensor stays where it is.
    """
    logged = torch.tensor(value, dtype=torch.float64)
    pl_module.log(name, logged, prog_bar=prog_bar, batch_size=1)
