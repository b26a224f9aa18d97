"""Lightning's DeepSpeed strategy, also on CPU; the ranks the ``deepspeed`` launcher gives.

Lightning's ``DeepSpeedStrategy`` refuses anything but CUDA. DeepSpeed itself runs ZeRO
stages 1-3 on CPU with gloo; three things stand in the way, and this subclass changes only
those, and only off CUDA (on GPUs it is exactly Lightning's strategy, so one config serves
both):

* ``setup_environment`` raises for a non-CUDA accelerator: use DDP's set-up instead;
* ``setup_distributed`` validates CUDA device indices: skip that on CPU;
* engines are built with ``device_rank=root_device.index``, which is ``None`` on CPU and
  makes DeepSpeed fail: use the local rank.

It also unlinks the ``/dev/shm`` files DeepSpeed's CPU backend leaves behind
(:func:`~dist_bregman.comm.release_deepspeed_shm`).

    trainer = Trainer(accelerator="cpu", devices=2,
                      strategy=DeepSpeedStrategy(stage=3, config=...))

For tests and for users without GPUs; it is not a performance path.

:class:`DeepSpeedLauncherEnvironment` reads the ranks the ``deepspeed`` launcher set, so a
job it starts on several nodes forms one world (``dist-bregman`` picks it by itself).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from lightning.fabric.plugins.environments import ClusterEnvironment
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.accelerators.cuda import CUDAAccelerator
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies import DeepSpeedStrategy as LightningDeepSpeedStrategy
from typing_extensions import override

from dist_bregman import comm


def check_cpu_precision(config: dict[str, Any] | None, precision: str) -> None:
    """DeepSpeed's CPU accelerator has no fp16 ("Type fp16 is not supported on your
    device", deep inside engine set-up): refuse it up front, naming the setting."""
    fp16 = (config or {}).get("fp16", {})
    if isinstance(fp16, dict) and fp16.get("enabled") in (True, "true", "auto"):
        raise ValueError(
            f"DeepSpeed config fp16.enabled={fp16.get('enabled')!r} on CPU: DeepSpeed's CPU "
            f"accelerator has no fp16; allowed: bf16.enabled=true, or fp32 (no fp16 section)"
        )
    if precision.startswith("16"):
        raise ValueError(
            f"Trainer precision={precision!r} with DeepSpeed on CPU: DeepSpeed's CPU "
            f"accelerator has no fp16; allowed: 'bf16-mixed', 'bf16-true' or '32-true'"
        )


class DeepSpeedStrategy(LightningDeepSpeedStrategy):
    """Lightning's ``DeepSpeedStrategy`` that also runs on CPU (see the module docstring)."""

    strategy_name = "deepspeed_cpu_capable"

    @property
    def _on_cuda(self) -> bool:
        return isinstance(self.accelerator, CUDAAccelerator)

    @override
    def setup_environment(self) -> None:
        if self._on_cuda:
            super().setup_environment()
        else:
            DDPStrategy.setup_environment(self)

    @override
    def setup_distributed(self) -> None:
        if self._on_cuda:
            super().setup_distributed()
            return
        check_cpu_precision(self.config, str(self.precision_plugin.precision))
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()
        comm.release_deepspeed_shm()  # its /dev/shm files outlived every CPU job

    @override
    def _setup_model_and_optimizer(self, *args: Any, **kwargs: Any) -> Any:
        with self._device_rank():
            return super()._setup_model_and_optimizer(*args, **kwargs)

    @override
    def init_deepspeed(self) -> None:
        with self._device_rank():
            super().init_deepspeed()

    @contextlib.contextmanager
    def _device_rank(self) -> Iterator[None]:
        """While Lightning builds an engine off CUDA, give DeepSpeed the local rank where
        Lightning passes ``root_device.index`` (None for a CPU device)."""
        if self._on_cuda:
            yield
            return
        import deepspeed

        original = deepspeed.initialize
        local_rank = self.local_rank

        def initialize(*args: Any, **kwargs: Any) -> Any:
            namespace = kwargs.get("args")
            if namespace is not None and getattr(namespace, "device_rank", None) is None:
                namespace.device_rank = local_rank
            return original(*args, **kwargs)

        deepspeed.initialize = initialize
        try:
            yield
        finally:
            deepspeed.initialize = original


class DeepSpeedLauncherEnvironment(ClusterEnvironment):
    """The ranks the ``deepspeed`` launcher gave this process.

    The launcher sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
    ``MASTER_PORT``, and the node's rank as ``CROSS_RANK``. Lightning recognises none of
    its launchers there and reads a node rank only from ``NODE_RANK`` or ``GROUP_RANK``, so
    on several nodes every node took itself for node 0: two processes of global rank 0,
    one failing with EADDRINUSE while the other waited. Pass it to the Trainer
    (``plugins=[DeepSpeedLauncherEnvironment()]``) when the launcher starts your script;
    ``dist-bregman`` adds it by itself (:meth:`detect`).
    """

    @property
    def creates_processes_externally(self) -> bool:
        return True

    @property
    def main_address(self) -> str:
        return os.environ["MASTER_ADDR"]

    @property
    def main_port(self) -> int:
        return int(os.environ["MASTER_PORT"])

    @staticmethod
    def detect() -> bool:
        """Started by the ``deepspeed`` launcher (it alone sets ``CROSS_RANK`` beside the
        ranks)."""
        keys = ("CROSS_RANK", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
        return all(key in os.environ for key in keys)

    def world_size(self) -> int:
        return int(os.environ["WORLD_SIZE"])

    def set_world_size(self, size: int) -> None:
        """The launcher decided it (Lightning's value is checked in :meth:`validate_settings`)."""

    def global_rank(self) -> int:
        return int(os.environ["RANK"])

    def set_global_rank(self, rank: int) -> None:
        """The launcher decided it."""

    def local_rank(self) -> int:
        return int(os.environ["LOCAL_RANK"])

    def node_rank(self) -> int:
        return int(os.environ["CROSS_RANK"])

    def validate_settings(self, num_devices: int, num_nodes: int) -> None:
        # Lightning shards the data by devices * num_nodes: it must be the launcher's world.
        if num_devices * num_nodes != self.world_size():
            raise ValueError(
                f"Trainer devices={num_devices} x num_nodes={num_nodes} = "
                f"{num_devices * num_nodes} processes, but the deepspeed launcher started "
                f"WORLD_SIZE={self.world_size()}; allowed: devices = processes per node "
                f"(the launcher's --num_gpus) and num_nodes = the hosts it runs on "
                f"(launch/deepspeed.sh passes both)"
            )
