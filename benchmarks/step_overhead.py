"""Training-step overhead of the pruner and of the Bregman optimizers.

    python benchmarks/step_overhead.py --quick     # seconds: CI smoke
    python benchmarks/step_overhead.py             # ~2.6 M-parameter MLP, 100-step blocks
    python benchmarks/step_overhead.py --out benchmarks/results
    python benchmarks/step_overhead.py --device cuda --width 4096 --batch 512   # a GPU

Every variant trains its own copy of the same model (same initial weights, same batches)
in a raw loop, one block of steps per round, in a random order each round; reported: the
median over rounds of (block time / the reference's block time in the same round). A block
is ``update_frequency`` steps long, so every block of a measuring variant pays exactly one
measurement + lambda update (one all-reduce and one broadcast when distributed) and the
median cannot hide it.

Variants (``BregmanPruner`` calls exactly these controller methods from its hooks):

* ``SGD momentum``: the reference; no callback.
* ``SGD momentum, a second copy``: the reference again, on its own copy of the model. Its
  ratio is this run's resolution: two identical variants differing by a few percent (other
  addresses, other cache and page placement, a noisy neighbour) bound what the other rows
  can show.
* ``+ pruner, uf=100, no prox``: ``observe_loss`` every step, measure + lambda every 100.
* ``+ pruner, uf=1, no prox``: the same, measuring every step (the worst setting).
* ``+ pruner, uf=100, prox``: plus the proximal step after every ``optimizer.step()``, as in
  ``mode="prox"``, the default.
* ``+ pruner, uf=100, prox, loss term``: plus the seed's pattern, the regularization loss
  (``get_regularization_loss``) added to the loss at every step. In ``mode="prox"`` it is a
  reported value (no gradient reaches the weights), but computing it reads every measured
  weight once per step: this row prices that read.
* ``+ pruner, uf=100, loss mode``: ``mode="loss"``, where that term is the mechanism (its
  gradient, ``lambda * sign(w)``, is the L1 subgradient; no proximal step).
* ``LinBreg (momentum)`` and ``AdaBreg``, driven by the pruner at uf=100, against SGD
  momentum and Adam respectively.

On CPU each row with a pruner also reports the time spent inside its calls
(``follow_groups`` + ``observe_loss`` + ``update_if_due``, measurement and lambda update
included, and ``regularization_loss`` where the row adds it) as a share of that row's own
step time: a direct reading of what the callback costs, which the ratio to another model
copy can only bound to within the control row's noise. (The proximal step and the Bregman
optimizers' work happen inside ``optimizer.step()``: they show in the ratio only. On CUDA
the calls would also wait for the step's queued kernels at each measurement, so the share
is not reported there.)
"""

from __future__ import annotations

import argparse
import copy
import itertools
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from common import machine, medians, mlp, ratios, time_interleaved, write
from torch import nn
from torch.nn import functional as F

from dist_bregman import BregmanConfig, SparsityController
from dist_bregman.config import Mode
from dist_bregman.optim import AdaBreg, LinBreg

REFERENCE = "SGD momentum"
CONTROL = "SGD momentum, a second copy"


class Variant:
    """One model copy, its optimizer and (optionally) a controller, stepping in blocks."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: Callable[[nn.Module], torch.optim.Optimizer],
        batches: list[tuple[torch.Tensor, torch.Tensor]],
        update_frequency: int | None = None,
        prox: bool = False,
        loss_term: bool = False,
        mode: Mode = "prox",
    ) -> None:
        self.model = copy.deepcopy(model)
        self.optimizer = optimizer(self.model)
        self.batches = itertools.cycle(batches)
        self.step = 0
        self.in_pruner = 0.0
        """Seconds inside the controller's calls (zeroed after the warm-up, see ``run``)."""
        self.loss_term = loss_term
        self.controller: SparsityController | None = None
        if update_frequency is not None:
            config = BregmanConfig(
                target_sparsity=0.9,
                initial_lambda=1e-4,
                lambda_update_rate=1e-3,
                update_frequency=update_frequency,
                mode=mode,
            )
            self.controller = SparsityController(self.model, config)
            driven = isinstance(self.optimizer, LinBreg | AdaBreg)
            if prox or driven or mode == "loss":
                self.controller.attach(self.optimizer)

    @contextmanager
    def _in_pruner(self) -> Iterator[None]:
        """Add the block's time to :attr:`in_pruner`."""
        start = time.perf_counter()
        yield
        self.in_pruner += time.perf_counter() - start

    def run(self, steps: int) -> None:
        for _ in range(steps):
            x, y = next(self.batches)
            loss = F.cross_entropy(self.model(x), y)
            if self.controller is not None and self.loss_term:  # the seed's training_step
                with self._in_pruner():
                    loss = loss + self.controller.regularization_loss()
            loss.backward()
            if self.controller is not None:  # before each step, as BregmanPruner does
                with self._in_pruner():
                    self.controller.follow_groups()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            if self.controller is not None:
                with self._in_pruner():
                    self.controller.observe_loss(loss)
                    self.controller.update_if_due(self.step)


def _zero_in_pruner(variants: Iterable[Variant]) -> None:
    """Count only the timed rounds' time inside the pruner (not the warm-up's)."""
    for variant in variants:
        variant.in_pruner = 0.0


def run(
    width: int, depth: int, batch: int, block: int, repeats: int, device: str = "cpu"
) -> dict[str, object]:
    model = mlp(width, depth).to(device)
    generator = torch.Generator().manual_seed(1)
    batches = [
        (
            torch.randn(batch, 256, generator=generator).to(device),
            torch.randint(0, 10, (batch,), generator=generator).to(device),
        )
        for _ in range(16)
    ]

    def sgd(m: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)

    def adam(m: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.Adam(m.parameters(), lr=1e-3)

    def linbreg(m: nn.Module) -> torch.optim.Optimizer:
        return LinBreg(m.parameters(), lr=0.01, momentum=0.9, lambda_=1e-4)

    def adabreg(m: nn.Module) -> torch.optim.Optimizer:
        return AdaBreg(m.parameters(), lr=1e-3, lambda_=1e-4)

    variants = {
        REFERENCE: Variant(model, sgd, batches),
        CONTROL: Variant(model, sgd, batches),
        f"+ pruner, uf={block}, no prox": Variant(model, sgd, batches, block),
        "+ pruner, uf=1, no prox": Variant(model, sgd, batches, 1),
        f"+ pruner, uf={block}, prox": Variant(model, sgd, batches, block, prox=True),
        f"+ pruner, uf={block}, prox, loss term": Variant(
            model, sgd, batches, block, prox=True, loss_term=True
        ),
        f"+ pruner, uf={block}, loss mode": Variant(
            model, sgd, batches, block, loss_term=True, mode="loss"
        ),
        f"LinBreg (momentum) + pruner, uf={block}": Variant(model, linbreg, batches, block),
        "Adam": Variant(model, adam, batches),
        f"AdaBreg + pruner, uf={block}": Variant(model, adabreg, batches, block),
    }
    against = {name: REFERENCE for name in variants}
    against[f"AdaBreg + pruner, uf={block}"] = "Adam"
    times = time_interleaved(
        {name: (lambda v=v: v.run(block)) for name, v in variants.items()},
        repeats,
        device=device,
        before_timing=lambda: _zero_in_pruner(variants.values()),
    )
    by_reference = {ref: ratios(times, ref) for ref in set(against.values())}
    in_pruner = {}
    if torch.device(device).type == "cpu":
        in_pruner = {
            name: v.in_pruner / sum(times[name])
            for name, v in variants.items()
            if v.controller is not None
        }
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "batch": batch,
        "device": device,
        "block_steps": block,
        "rounds": repeats,
        "steps_per_second": {k: block / v for k, v in medians(times).items()},
        "against": against,
        "ratio": {name: by_reference[ref][name] for name, ref in against.items()},
        "in_pruner_share": in_pruner,
    }


def markdown(result: dict[str, object], device: str = "cpu") -> str:
    steps = result["steps_per_second"]
    ratio = result["ratio"]
    against = result["against"]
    share = result["in_pruner_share"]
    assert isinstance(steps, dict) and isinstance(ratio, dict) and isinstance(against, dict)
    assert isinstance(share, dict)
    lines = [
        f"Training-step overhead, {result['parameters']:,}-parameter MLP, batch "
        f"{result['batch']}, {result['rounds']} interleaved rounds of {result['block_steps']} "
        f"steps, on {machine(device)}",
        "",
        "| variant | steps/s | compared with | time ratio | overhead | in pruner calls |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for name, value in steps.items():
        inside = f"{100 * share[name]:.2f}%" if name in share else ""
        lines.append(
            f"| {name} | {value:.1f} | {against[name]} | {ratio[name]:.3f} "
            f"| {100 * (ratio[name] - 1):+.1f}% | {inside} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 2 rounds of 5 steps")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=3, help="hidden layers")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--out", type=Path, default=None, help="folder for JSON + Markdown")
    args = parser.parse_args()
    if args.quick:
        result = run(width=64, depth=2, batch=16, block=5, repeats=2, device=args.device)
    else:
        result = run(
            args.width, args.depth, args.batch, block=100, repeats=args.repeats, device=args.device
        )
    name = "step_overhead" + ("" if args.device == "cpu" else "_cuda")
    write(args.out, name, result, markdown(result, args.device))


if __name__ == "__main__":
    main()
