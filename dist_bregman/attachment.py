"""How the optimizers apply the regularizer for one controller.

* A :class:`~dist_bregman.optim.BregmanOptimizer` (LinBreg, AdaBreg, ProxSGD), directly,
  as a DeepSpeed client optimizer or as torch's ``ZeroRedundancyOptimizer``'s local one,
  regularizes inside its own step; it is *driven*: its regularized param groups receive
  lambda through ``set_lambda`` (and the groups a wrapper copies over them, too).
* Any other optimizer gets the proximal step after each ``step()``: threshold
  ``lr * lambda * lambda_scale`` (each param group's ``lr`` and ``lambda_scale``, the
  latter 1 unless set), applied to exactly the elements of the tensors it holds that
  belong to measured weights (see :mod:`dist_bregman.holders`).

A param group's ``lambda_scale`` (:func:`~dist_bregman.optim.lambda_scale`) is read where it
is used, at each step, so it is the one the optimizer's checkpoint restored.

Either way the zeros are made in the tensors the optimizer steps (fp32 masters, flat
shards, DTensor shards), so the next step cannot undo them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from dist_bregman.config import check_number
from dist_bregman.holders import Holding, Part, holding
from dist_bregman.optim import BregmanOptimizer, lambda_scale
from dist_bregman.regularizers import GroupL1, Regularizer
from dist_bregman.regularizers import resolve as resolve_regularizer
from dist_bregman.shards import Placement
from dist_bregman.shards.dtensor import local_tensor
from dist_bregman.shards.fsdp import FlatPlacement
from dist_bregman.targets import computed_by


class Attachment:
    """The optimizers one controller acts through (see the module docstring)."""

    def __init__(
        self,
        placements: Sequence[Placement],
        regularizer: Regularizer,
        mode: str,
        current_lambda: Callable[[], float],
    ) -> None:
        self.placements = placements
        self.regularizer = regularizer
        self.mode = mode
        self.current_lambda = current_lambda
        self.driven: list[tuple[BregmanOptimizer, torch.optim.Optimizer | None]] = []
        """Each driven optimizer, with the wrapper that mirrors its groups into it
        (:attr:`~dist_bregman.holders.Holding.mirror`)."""
        self.hooked: list[Holding] = []
        self.regularized: set[int] = set()
        """Indices of the placements whose elements some optimizer regularizes."""
        self.homes: dict[int, tuple[torch.optim.Optimizer, int]] = {}
        """Placement index -> the optimizer and param group index holding it, whose
        ``lambda_scale`` scales lambda for it."""
        self.uses_groups = False
        """Some regularizer in play removes whole groups (node/kernel sparsity is counted)."""
        self._handles: list[RemovableHandle] = []
        self._stepping: dict[int, int] = {}
        """``id`` of each attached optimizer -> ``id`` of the optimizer that steps for it
        (itself, a DeepSpeed wrapper's client, a ``ZeroRedundancyOptimizer``'s local one)."""
        self._skip_next: set[int] = set()
        """``id`` of stepping optimizers whose next proximal step is skipped (a dropped
        step, :meth:`skip_next_step`)."""

    def attach(self, optimizers: Sequence[Any]) -> None:
        """Hook or drive each optimizer; raise if a trainable target is held by none."""
        held: set[int] = set()
        for optimizer in optimizers:
            holds = holding(optimizer, self.placements)
            if not holds.held:
                continue
            held |= holds.held.keys()
            client = holds.optimizer
            self._stepping[id(optimizer)] = id(client)
            self._home(holds)
            if isinstance(client, BregmanOptimizer):
                self._drive(client, holds)
            elif self.mode == "prox":
                self._hook(client, holds)
            else:
                self.regularized |= holds.held.keys()
        if self.mode == "loss":
            computed = self._computed_held(optimizers)
            held |= computed
            self.regularized |= computed
        missing = [
            p.target.name for i, p in enumerate(self.placements) if p.trainable() and i not in held
        ]
        if missing:
            raise ValueError(
                f"parameters_to_prune: {missing} are trainable but no optimizer holds them; "
                f"allowed: parameters passed to the optimizer, or frozen (requires_grad=False). "
                f"Sharding (fully_shard, FSDP, Fabric's setup_module) replaces the "
                f"parameters: an optimizer built before it holds tensors the model no longer "
                f"has, so build the optimizer after"
            )

    def _computed_held(self, optimizers: Sequence[Any]) -> set[int]:
        """Indices of the targets computed from other tensors (weight_norm, spectral_norm;
        see :func:`~dist_bregman.targets.computed_by`) whose originals some optimizer
        holds: the loss penalty on the computed weight reaches them through autograd, so
        loss mode regularizes them (the controller has refused such targets in the modes
        that write into the weight). Records each one's param group in :attr:`homes`, from
        the group of its originals, which must agree on ``lambda_scale``."""
        stepped = {
            id(tensor): (optimizer, g)
            for optimizer in optimizers
            for g, group in enumerate(getattr(optimizer, "param_groups", ()))
            for tensor in group["params"]
        }
        found = set()
        for index, placement in enumerate(self.placements):
            computed = computed_by(placement.target)
            if computed is None:
                continue
            homes = [stepped[id(t)] for t in computed.originals.values() if id(t) in stepped]
            if not homes:
                continue
            found.add(index)
            self.homes[index] = homes[0]
            scales = {lambda_scale(o.param_groups[g]) for o, g in homes}
            if len(scales) > 1:
                raise ValueError(
                    f"{placement.target.name} is computed from tensors in param groups of "
                    f"lambda_scale {sorted(scales)}: its loss term has one strength; "
                    f"allowed: its originals ({', '.join(computed.originals)}) in groups of "
                    f"one lambda_scale"
                )
        return found

    def _home(self, holds: Holding) -> None:
        """Record which param group holds each placement, checking its ``lambda_scale``."""
        groups = holds.optimizer.param_groups
        for index, tensor in holds.held.items():
            g = holds.group_of[tensor]
            if "lambda_scale" in groups[g]:
                check_number(f"param group {g} lambda_scale", groups[g]["lambda_scale"], low=0)
            self.homes[index] = (holds.optimizer, g)

    def scales(self) -> list[float]:
        """Each placement's ``lambda_scale`` now: its param group's, 1 where none holds it."""
        result = [1.0] * len(self.placements)
        for index, (optimizer, g) in self.homes.items():
            result[index] = lambda_scale(optimizer.param_groups[g])
        return result

    def _drive(self, client: BregmanOptimizer, holds: Holding) -> None:
        if self.mode == "loss":
            raise ValueError(
                f"mode='loss' with {type(client).__name__}: the optimizer already applies the "
                f"regularizer, the loss term would apply it again; allowed: mode='prox'"
            )
        regs = [resolve_regularizer(group["reg"]) for group in client.param_groups]
        for index in holds.held:
            placement = self.placements[index]
            if isinstance(placement, FlatPlacement) and not placement.use_orig_params:
                raise ValueError(
                    f"{type(client).__name__} over FSDP1 flat parameters "
                    f"(use_orig_params=False): one flat tensor mixes {placement.target.name} "
                    f"with biases and norms, so its param group cannot regularize weights "
                    f"only; allowed: use_orig_params=True, FSDP2, or a plain optimizer (the "
                    f"proximal step knows the weight regions)"
                )
        for index, tensor in holds.held.items():
            reg = regs[holds.group_of[tensor]]
            if reg is None and isinstance(self.placements[index], FlatPlacement):
                raise ValueError(
                    f"{type(client).__name__} puts {self.placements[index].target.name} in a "
                    f"reg=None group: FSDP1 hands it 1-D views, and the default split "
                    f"regularizes only tensors with ndim >= 2; allowed: "
                    f"dist_bregman.regularized_groups(model) as the optimizer's param groups"
                )
            if reg is None:
                continue
            if isinstance(reg, GroupL1) and tensor not in holds.rows_whole:
                raise _split_rows(self.placements[index], reg)
            self.regularized.add(index)
            self.uses_groups |= isinstance(reg, GroupL1)
        self.driven.append((client, holds.mirror))
        _set_lambda(client, holds.mirror, self.current_lambda())

    def _hook(self, client: torch.optim.Optimizer, holds: Holding) -> None:
        if isinstance(self.regularizer, GroupL1):
            for index, tensor in holds.held.items():
                if tensor not in holds.rows_whole:
                    raise _split_rows(self.placements[index], self.regularizer)
            self.uses_groups = True
        self._handles.append(client.register_step_post_hook(partial(self._after_step, holds)))
        self.hooked.append(holds)
        self.regularized |= holds.held.keys()

    def skip_next_step(self, optimizer: Any) -> None:
        """No proximal step after the coming ``step()`` of ``optimizer`` (attached)."""
        self._skip_next.add(self._stepping.get(id(optimizer), id(optimizer)))

    def _after_step(self, holds: Holding, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        if id(optimizer) in self._skip_next:
            self._skip_next.discard(id(optimizer))
            return
        lam = self.current_lambda()
        if lam == 0.0:
            return
        with torch.no_grad():
            for group in optimizer.param_groups:
                pieces = list(_pieces(group["params"], holds))
                if pieces:
                    threshold = float(group["lr"]) * lam * lambda_scale(group)
                    self.regularizer.prox_all_(pieces, threshold)

    def shrinkage_counts(self, horizon: int) -> list[torch.Tensor]:
        """Per placement, ``[elements that horizon proximal steps alone would zero (no
        gradient pushing back), elements]`` that the hooks step here, flattened to 2 x n
        0-d int64 tensors (zeros where none are) for the measurement's all-reduce:
        :meth:`shrinkage_share` of the sums is the whole model's share. No host sync."""
        lam = self.current_lambda()
        within: list[torch.Tensor | int] = [0] * len(self.placements)  # 0-d once counted
        held = [0] * len(self.placements)
        with torch.no_grad():
            for holds in self.hooked:
                groups = holds.optimizer.param_groups  # a ZeRO-3 client's are empty now:
                for key, tensor in holds.tensors.items():  # read the held tensors themselves
                    group = groups[holds.group_of[key]]
                    threshold = horizon * float(group["lr"]) * lam * lambda_scale(group)
                    for part, piece in _parts(tensor, holds):
                        within[part.index] += self.regularizer.zeroed(piece, threshold)
                        held[part.index] += piece.numel()
        pairs = zip(within, held, strict=True)
        return [torch.as_tensor(count, dtype=torch.int64) for pair in pairs for count in pair]

    def shrinkage_share(self, summed: Sequence[int]) -> float:
        """The share of the hooked elements that :meth:`shrinkage_counts`, summed over the
        ranks, says would be zeroed. Each placement's ratio is its own (a replicated one
        is held, and counted, once per rank), weighted by its size in the model."""
        ratios = [
            (within / held, placement.global_numel)
            for placement, within, held in zip(
                self.placements, summed[0::2], summed[1::2], strict=True
            )
            if held
        ]
        total = sum(size for _, size in ratios)
        return sum(ratio * size for ratio, size in ratios) / total if total else 0.0

    def set_lambda(self, value: float) -> None:
        """Write lambda into every driven optimizer (hooks read it at each step)."""
        for optimizer, mirror in self.driven:
            _set_lambda(optimizer, mirror, value)

    def restart(self) -> None:
        """Make every driven optimizer forget its state (see ``BregmanOptimizer.restart``)."""
        for optimizer, _ in self.driven:
            optimizer.restart()

    def detach(self) -> None:
        """Remove the hooks and stop driving."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._stepping.clear()
        self.driven.clear()
        self.hooked.clear()
        self.regularized.clear()
        self.homes.clear()


def _set_lambda(
    optimizer: BregmanOptimizer, mirror: torch.optim.Optimizer | None, value: float
) -> None:
    """``optimizer.set_lambda(value)``, and each group's new lambda into the groups the
    wrapper ``mirror`` copies over the optimizer's at its next step (the same order; read
    now: a state dict loaded into the wrapper since :meth:`Attachment.attach` replaced
    them, and a lambda written into the old ones never reached the optimizer)."""
    optimizer.set_lambda(value)
    if mirror is not None:
        for mine, theirs in zip(optimizer.param_groups, mirror.param_groups, strict=True):
            if "lambda" in mine:
                theirs["lambda"] = mine["lambda"]


def _pieces(params: Sequence[torch.Tensor], holds: Holding) -> list[torch.Tensor]:
    """The measured elements of ``params``: local shards, sliced to their regions."""
    return [piece for p in params for _, piece in _parts(p, holds)]


def _parts(held: torch.Tensor, holds: Holding) -> Iterator[tuple[Part, torch.Tensor]]:
    """Each measured part of the held tensor ``held``, with its elements (the local shard,
    sliced to the part's region)."""
    parts = holds.parts.get(id(held))
    if not parts:  # (a bias in a weight's group: read nothing)
        return
    local = local_tensor(held)
    for part in parts:
        yield part, local if part.region is None else local[part.region]


def _split_rows(placement: Placement, reg: Regularizer) -> ValueError:
    return ValueError(
        f"{placement.target.name}: {reg.spec} needs whole rows on one rank, but "
        f"{placement.row_split}; allowed: reg='l1' here, or group sparsity under DDP or "
        f"FSDP2 (fully_shard, Shard(0)), and under tensor parallelism on column-wise layers"
    )
