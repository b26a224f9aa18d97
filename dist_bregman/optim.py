"""LinBreg, AdaBreg and ProxSGD: Bregman iterations as PyTorch optimizers. Pure torch.

From Bungert, Roith, Tenbrinck and Burger, "A Bregman Learning Framework for Sparse Neural
Networks", JMLR 23 (2022). With ``J = lambda * J1`` (J1 from :mod:`.regularizers`):

* LinBreg: ``v <- v - lr*g`` (momentum: ``m <- b*m + (1-b)*lr*g; v <- v - m``), then
  ``theta = prox_{delta*J}(delta*v) = delta * prox_{lambda*J1}(v)``.
* AdaBreg: the same with bias-corrected Adam moments driving ``v``.
* ProxSGD: ``theta <- prox_{lr*J}(theta - lr*g)``.

``v`` starts at ``theta0/delta + dJ(theta0)``, so training starts exactly at ``theta0``. A
weight is nonzero only while its accumulated gradient evidence ``|v|`` exceeds lambda:
starting sparse, the network grows the weights it needs (inverse scale space).

Param-group keys: ``reg`` (``"l1"``, ``"group_l1"``, ``"group_l1_kernels"``, ``None`` or a
Regularizer), ``lambda``, ``delta``, ``lambda_scale``; the constructor keywords give the
defaults. ``lambda_scale`` (default 1) is the group's share of a lambda set from outside:
``set_lambda(x)`` gives the group ``x * lambda_scale``, so a pruner driving one lambda to a
global target keeps the ratios between layers (a group given ``lambda_scale`` but no
``lambda`` starts at ``lambda_ * lambda_scale``). A group given without ``reg`` is split:
tensors with ``ndim >= 2`` (weights) get the default, the rest (biases, norm scales) get
``None``. Parameters are written in place (``copy_``); ``v`` and the moments are fp32 for
bf16/fp16 parameters. Each rank updates its local elements only (a DTensor's local shard),
so the optimizers run unchanged on replicas, on FSDP shards and as DeepSpeed client
optimizers over fp32 partitions (elementwise J; group J needs whole rows). State tensors
are laid out as their parameter: a DTensor parameter's ``v`` and moments are DTensors of
its placements, so a distributed checkpoint saves and loads every rank's part (resuming
needs the same sharding only for plain shards). The scalar state (``lambda``, AdaBreg's
``step``) is numbers while training and 0-d CPU tensors in a state dict.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from typing import Any, overload

import torch
from torch.optim import Optimizer

from dist_bregman.config import check_number
from dist_bregman.regularizers import L1, Regularizer, multi_tensor, resolve
from dist_bregman.shards.dtensor import local_tensor, shaped_like

Params = Iterable[torch.Tensor] | Iterable[dict[str, Any]]


class BregmanOptimizer(Optimizer):
    """An optimizer whose regularization strength ``lambda`` can be driven from outside.

    :class:`~dist_bregman.BregmanPruner` writes its rank-0-decided lambda through
    :meth:`set_lambda` into every group whose ``reg`` is not None.
    """

    def __init__(self, params: Params, defaults: dict[str, Any]) -> None:
        _check_settings(defaults, "")
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # Checked once, as given; a split group adds only the default reg (checked with the
        # defaults) or None.
        _check_settings(param_group, "param group ")
        if "lambda_scale" in param_group and "lambda" not in param_group:
            scaled = self.defaults["lambda"] * lambda_scale(param_group)
            param_group = {**param_group, "lambda": scaled}
        if "reg" in param_group:
            super().add_param_group(param_group)
            return
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        weights = [p for p in params if p.ndim >= 2]
        others = [p for p in params if p.ndim < 2]
        for chosen, reg in ((weights, self.defaults["reg"]), (others, None)):
            if chosen:
                super().add_param_group({**param_group, "params": chosen, "reg": reg})

    @overload
    def step(self, closure: None = None) -> None: ...

    @overload
    def step(self, closure: Callable[[], float]) -> float: ...

    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One update of every parameter that has a gradient; ``closure`` re-evaluates the
        loss (with gradients enabled) first and its value is returned."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            for group in self.param_groups:
                params = [p for p in group["params"] if p.grad is not None]
                if params:
                    self._update(group, params)
        return loss

    def _update(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """As torch's, with the scalar state (:data:`SCALAR_STATE`) as 0-d CPU tensors."""
        saved = super().state_dict()
        saved["state"] = {
            index: {key: _saved(key, value) for key, value in state.items()}
            for index, state in saved["state"].items()
        }
        return saved

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch's, but the fp32 state of bf16/fp16 parameters stays fp32: torch casts
        every floating state tensor to its parameter's dtype, and a resumed run then went on
        with a bf16 ``v``, in which steps smaller than its rounding are lost. The scalar
        state comes back as numbers (saved as tensors, or as numbers before they were)."""
        state_dict = {
            **state_dict,
            "state": {
                index: {
                    key: _number(value) if key in SCALAR_STATE else value
                    for key, value in s.items()
                }
                for index, s in state_dict["state"].items()
            },
        }
        super().load_state_dict(state_dict)
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for index, p in zip(saved_ids, params, strict=True):
            state = self.state[p]
            for key, value in state_dict["state"].get(index, {}).items():
                wanted = isinstance(value, torch.Tensor) and value.dtype == _state_dtype(p)
                if wanted and state[key].dtype != value.dtype:
                    state[key] = value.to(device=p.device, copy=True)

    def _state_tensor(
        self, p: torch.Tensor, key: str, first: Callable[[], torch.Tensor]
    ) -> torch.Tensor:
        """This rank's part of ``state[key]`` of ``p``, made by ``first()`` (this rank's
        part) on first use and kept laid out as ``p`` is
        (:func:`.shards.dtensor.shaped_like`)."""
        state = self.state[p]
        if key not in state:
            state[key] = shaped_like(p, first())
        return local_tensor(state[key])

    def restart(self) -> None:
        """Forget all state (``v``, moments, step counts): the next step starts from the
        parameters as they are then, as a freshly built optimizer would. For weights changed
        from outside between steps, such as a magnitude cut: kept state would undo it."""
        self.state.clear()

    def regularized_params(self) -> list[torch.Tensor]:
        """Parameters in groups whose ``reg`` is not None."""
        return [p for g in self.param_groups if g["reg"] is not None for p in g["params"]]

    def set_lambda(self, value: float) -> None:
        """Set ``lambda`` of every regularized group to ``value`` times the group's
        :func:`lambda_scale` (the iterations keep their state consistent with the change)."""
        check_number("lambda", value, low=0.0)
        for group in self.param_groups:
            if group["reg"] is not None:
                group["lambda"] = float(value) * lambda_scale(group)


class _DualBregman(BregmanOptimizer):
    """LinBreg and AdaBreg: the dual variable ``v`` and the primal map ``theta(v)``."""

    def _dual(self, p: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
        """``v`` for ``p``, consistent with the group's current lambda.

        First use: ``v = theta/delta + lambda * dJ1(theta)``, so training starts exactly at
        ``theta``. A lambda change between two positive values keeps ``v``: the iteration
        goes on with the new threshold, ``theta = prox(delta * v)``. A rise shrinks every
        active weight by ``delta`` times the rise and zeroes the ones it passes; a fall
        lets in the inactive weights whose evidence ``|v|`` is past the new threshold. So
        the pruner's lambda moves the support both ways, as the proximal step's does.
        Restarting from theta at every change instead (``theta`` fixed, ``v`` rebuilt
        around it) made a rise unable to remove an active weight: on digits at 90% LinBreg
        reached 75-77% by the freeze with lambda at its cap, and scored 0.41 points lower
        on the CNN (20 seeds, validation; ``benchmarks/quality_trials.md``).

        A change to or from 0 (the shrinkage turned off at the freeze, or on after a
        warm-up) restarts from the current theta by the first-use rule: keeping ``v``
        there would move every active weight by lambda at once. The check runs here, at
        the tensor's next step, so it also reaches tensors a wrapper only shows the
        optimizer during ``step()`` (DeepSpeed ZeRO-3).
        """
        state = self.state[p]
        lam, delta = group["lambda"], group["delta"]
        reg = resolve(group["reg"])
        if "v" not in state:
            theta = local_tensor(p).detach().to(_state_dtype(p))
            v = theta / delta
            if reg is not None and lam > 0:
                v.add_(reg.subgradient(theta), alpha=lam)
            state["lambda"] = lam
            return self._state_tensor(p, "v", lambda: v)
        v = local_tensor(state["v"])
        old = _number(state.get("lambda", lam))
        if old != lam and reg is not None and (old == 0 or lam == 0):
            if old > 0:
                reg.prox_(v, old)  # v is now theta / delta
            v.add_(reg.subgradient(v), alpha=lam)
        state["lambda"] = lam
        return v

    def _write_primal(
        self,
        params: list[torch.Tensor],
        duals: list[torch.Tensor],
        group: dict[str, Any],
        foreach: bool,
    ) -> None:
        """``theta = prox_{delta*lambda*J1}(delta * v)``, written into the parameters."""
        reg: Regularizer | None = resolve(group["reg"])
        delta, lam = group["delta"], group["lambda"]
        targets = [local_tensor(p) for p in params]
        if isinstance(reg, L1) and delta == 1.0 and lam > 0:
            # theta = shrink(v) straight into the parameter: one pass that reads v and
            # writes theta, where scale + prox + copy take 11. Small accelerator tensors stay
            # in the multi-tensor kernels below (there, launches cost more than bytes).
            rest_targets, rest_duals = [], []
            for t, v in zip(targets, duals, strict=True):
                if multi_tensor(t) or not reg.prox_into_(t, v, lam):
                    rest_targets.append(t)
                    rest_duals.append(v)
            targets, duals = rest_targets, rest_duals
            if not targets:
                return
        if foreach:
            primal = torch._foreach_mul(duals, delta)
            if reg is not None and lam > 0:
                reg.prox_all_(primal, delta * lam)
            torch._foreach_copy_(targets, primal)
            return
        for target, v in zip(targets, duals, strict=True):
            primal = v * delta
            if reg is not None and lam > 0:
                reg.prox_(primal, delta * lam)
            target.copy_(primal)


class LinBreg(_DualBregman):
    """Linearized Bregman iterations, optionally with momentum on ``v``."""

    def __init__(
        self,
        params: Params,
        lr: float = 1e-3,
        *,
        reg: object = "l1",
        lambda_: float = 1e-3,
        delta: float = 1.0,
        momentum: float = 0.0,
        foreach: bool | None = None,
    ) -> None:
        defaults = {
            "lr": lr,
            "reg": reg,
            "lambda": lambda_,
            "delta": delta,
            "momentum": momentum,
            "foreach": foreach,
        }
        super().__init__(params, defaults)

    def _update(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        foreach = _use_foreach(group["foreach"], params)
        duals = [self._dual(p, group) for p in params]
        grads = [local_tensor(_grad(p)).to(v.dtype) for p, v in zip(params, duals, strict=True)]
        lr, beta = group["lr"], group["momentum"]
        if beta > 0:
            bufs = [
                self._state_tensor(p, "momentum", partial(torch.zeros_like, v))
                for p, v in zip(params, duals, strict=True)
            ]
            _scale_add_(bufs, beta, grads, (1 - beta) * lr, foreach)
            _scale_add_(duals, 1.0, bufs, -1.0, foreach)
        else:
            _scale_add_(duals, 1.0, grads, -lr, foreach)
        self._write_primal(params, duals, group, foreach)


class AdaBreg(_DualBregman):
    """Bregman iterations driven by bias-corrected Adam moments (AdaBreg).

    A sparse gradient (``nn.Embedding(sparse=True)``) is made dense first: the moments are
    dense and decay in every row at every step, so the update is the one a dense gradient
    gives (``torch.optim.Adam`` refuses sparse gradients instead).
    """

    def __init__(
        self,
        params: Params,
        lr: float = 1e-3,
        *,
        reg: object = "l1",
        lambda_: float = 1e-3,
        delta: float = 1.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        foreach: bool | None = None,
    ) -> None:
        for index, beta in enumerate(betas):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"betas[{index}]={beta!r}: expected a number in [0, 1)")
        check_number("eps", eps, low=0.0)
        defaults = {
            "lr": lr,
            "reg": reg,
            "lambda": lambda_,
            "delta": delta,
            "betas": betas,
            "eps": eps,
            "foreach": foreach,
        }
        super().__init__(params, defaults)

    def _update(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        foreach = _use_foreach(group["foreach"], params)
        (beta1, beta2), eps, lr = group["betas"], group["eps"], group["lr"]
        duals, firsts, seconds, grads, roots, steps = [], [], [], [], [], []
        for p in params:
            v = self._dual(p, group)
            state = self.state[p]
            state["step"] = _number(state.get("step", 0)) + 1
            duals.append(v)
            firsts.append(self._state_tensor(p, "exp_avg", partial(torch.zeros_like, v)))
            seconds.append(self._state_tensor(p, "exp_avg_sq", partial(torch.zeros_like, v)))
            grads.append(_dense(local_tensor(_grad(p))).to(v.dtype))
            roots.append(math.sqrt(1 - beta2 ** state["step"]))
            steps.append(-lr / (1 - beta1 ** state["step"]))
        # m <- b1 m + (1 - b1) g;  s <- b2 s + (1 - b2) g^2;
        # v <- v - lr / (1 - b1^t) * m / (sqrt(s / (1 - b2^t)) + eps)
        _scale_add_(firsts, beta1, grads, 1 - beta1, foreach)
        if foreach:
            torch._foreach_mul_(seconds, beta2)
            torch._foreach_addcmul_(seconds, grads, grads, value=1 - beta2)
            denominators = torch._foreach_sqrt(seconds)
            torch._foreach_div_(denominators, roots)
            torch._foreach_add_(denominators, eps)
            torch._foreach_addcdiv_(duals, firsts, denominators, steps)
        else:
            for v, m, s, g, root, step in zip(
                duals, firsts, seconds, grads, roots, steps, strict=True
            ):
                s.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                v.addcdiv_(m, s.sqrt().div_(root).add_(eps), value=step)
        self._write_primal(params, duals, group, foreach)


class ProxSGD(BregmanOptimizer):
    """Proximal SGD: ``theta <- prox_{lr*lambda*J1}(theta - lr*d)``, ``d`` the gradient or
    its heavy-ball average (``momentum``, as in ``torch.optim.SGD``)."""

    def __init__(
        self,
        params: Params,
        lr: float = 1e-3,
        *,
        reg: object = "l1",
        lambda_: float = 1e-3,
        momentum: float = 0.0,
    ) -> None:
        defaults = {"lr": lr, "reg": reg, "lambda": lambda_, "momentum": momentum}
        super().__init__(params, defaults)

    def _update(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        reg = resolve(group["reg"])
        lr, beta, lam = group["lr"], group["momentum"], group["lambda"]
        for p in params:
            direction = local_tensor(_grad(p))
            if beta > 0:
                if "momentum" in self.state[p]:
                    direction = local_tensor(self.state[p]["momentum"]).mul_(beta).add_(direction)
                else:
                    direction = self._state_tensor(p, "momentum", direction.detach().clone)
            weights = local_tensor(p)
            weights.add_(direction, alpha=-lr)
            if reg is not None and lam > 0:
                reg.prox_(weights, lr * lam)


def lambda_scale(group: Mapping[str, Any]) -> float:
    """A param group's share of the lambda set from outside: its ``lambda_scale`` key, 1 when
    absent. Read by the Bregman optimizers' ``set_lambda`` and, for any other optimizer, by
    the pruner's proximal step (threshold ``lr * lambda * lambda_scale``) and loss term."""
    return float(group.get("lambda_scale", 1.0))


def _check_settings(settings: dict[str, Any], where: str) -> None:
    """Validate the keys present in ``settings`` (constructor defaults or one param group)."""
    for key, low in (("lr", 0.0), ("lambda", 0.0), ("eps", 0.0), ("lambda_scale", 0.0)):
        if key in settings:
            name = "lambda_" if key == "lambda" and not where else key
            check_number(f"{where}{name}", settings[key], low=low)
    if "delta" in settings:
        delta = check_number(f"{where}delta", settings["delta"], low=0.0)
        if delta <= 0.0:
            raise ValueError(f"{where}delta={delta!r}: expected a number > 0")
    if "momentum" in settings:
        momentum = check_number(f"{where}momentum", settings["momentum"], low=0.0)
        if momentum >= 1.0:
            raise ValueError(f"{where}momentum={momentum!r}: expected a number in [0, 1)")
    if "reg" in settings:
        resolve(settings["reg"])


SCALAR_STATE = ("lambda", "step")
"""Per-parameter state kept as Python numbers while training (read at every step, no
device sync) and saved as 0-d CPU tensors, as torch's optimizers save Adam's ``step``.
FSDP1's ``optim_state_dict_to_load`` from rank 0 only (``rank0_only=True``, Accelerate's
FSDP default) calls ``.cpu()`` on every state value, and resuming failed on the numbers:
"'float' object has no attribute 'cpu'"."""


def _saved(key: str, value: Any) -> Any:
    """``value`` as a checkpoint holds it: a number of :data:`SCALAR_STATE` as a 0-d CPU
    tensor (float64 or int64, exact), anything else as it is."""
    if key in SCALAR_STATE and isinstance(value, (int, float)):
        return torch.tensor(value, dtype=torch.int64 if isinstance(value, int) else torch.float64)
    return value


def _number(value: Any) -> Any:
    """A 0-d tensor's number, else ``value``: scalar state loaded by a wrapper that writes
    the state itself (torch's ``ZeroRedundancyOptimizer``) is still a tensor here."""
    return value.item() if isinstance(value, torch.Tensor) else value


def _grad(p: torch.Tensor) -> torch.Tensor:
    assert p.grad is not None  # _update only receives parameters that have one
    return p.grad


def _dense(grad: torch.Tensor) -> torch.Tensor:
    """A sparse gradient as a dense tensor (the elementwise moment updates need one)."""
    return grad if grad.layout == torch.strided else grad.to_dense()


def _state_dtype(p: torch.Tensor) -> torch.dtype:
    """fp32 state for low-precision parameters; the parameter's own dtype otherwise."""
    return torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype


def _use_foreach(requested: bool | None, params: list[torch.Tensor]) -> bool:
    """Multi-tensor kernels pay off on accelerators; on CPU the loop is as fast."""
    if requested is not None:
        return requested
    return all(p.is_cuda for p in params)


def _scale_add_(
    targets: list[torch.Tensor],
    scale: float,
    others: list[torch.Tensor],
    alpha: float,
    foreach: bool,
) -> None:
    """``t <- scale * t + alpha * o`` for every pair."""
    if foreach:
        if scale != 1.0:
            torch._foreach_mul_(targets, scale)
        torch._foreach_add_(targets, others, alpha=alpha)
        return
    for target, other in zip(targets, others, strict=True):
        if scale != 1.0:
            target.mul_(scale)
        target.add_(other, alpha=alpha)
