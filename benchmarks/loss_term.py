"""The seed's loss term, against one plain read of the same bytes.

    python benchmarks/loss_term.py --quick                      # seconds: CI smoke
    python benchmarks/loss_term.py                              # 10 M and 50 M parameters
    python benchmarks/loss_term.py --sizes 10 50 200 --out benchmarks/results
    python benchmarks/loss_term.py --device cuda --sizes 10 50 200   # a GPU

The seed adds ``get_regularization_loss`` to the loss at every training step. In the
default ``mode="prox"`` that is a reported value (the proximal step applies the strength),
``lambda * sum |w|`` over every measured weight: a read of each weight per step, which
``step_overhead.py``'s loss-term row prices inside a training step. Here it is timed alone
on the models of ``measure_throughput.py`` (about 600 tensors, half of the elements zero),
candidates in interleaved rounds, medians:

* floor: one plain read of the same bytes, ``p.sum()`` per tensor;
* torch ops: ``p.abs().sum()`` per tensor, stacked and summed: how the value was computed
  before the C++ sum, and what it falls back to without a compiler (``abs`` writes a
  full-size temporary, and large fresh allocations are page-faulted in on every call);
* ``SparsityController.regularization_loss()``: what a training step calls (on CPU the
  C++ sum of ``|w|``, one pass for all tensors, in float64; on CUDA multi-tensor norms,
  a few launches where the torch ops take two per tensor).

In ``mode="loss"`` the term is the mechanism, and its gradient is written at every step
too: two more rows time the value and its backward pass together (each weight's ``grad``
reset first, so every call writes fresh gradients, as a training step with
``zero_grad()`` does), ``abs().sum()`` through autograd against the controller's term (the
C++ sum, and the gradient in one C++ pass on CPU). Their gradients are checked equal.

On CUDA (``--device cuda``) the device is drained before and after each timed call.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from common import write
from measure_throughput import against_floor, build_model, command_line, markdown

from dist_bregman import BregmanConfig, SparsityController, kernels

TORCH_OPS = "torch ops (abs().sum() per tensor)"
CALL = "SparsityController.regularization_loss() (prox)"
LOSS_TORCH_OPS = "loss mode: torch ops, value + backward()"
LOSS_CALL = "loss mode: regularization_loss(), value + backward()"


def run(million: float, repeats: int, device: str = "cpu") -> dict[str, object]:
    model = build_model(million).to(device)
    weights = [m.weight for m in model]
    if device == "cpu" and kernels.extension() is None:
        print("note: the C++ kernels are unavailable; the call times the torch fallback")
    controller = SparsityController(model, BregmanConfig(initial_lambda=1.0))
    expected = sum(float(w.detach().double().abs().sum()) for w in weights)
    value = float(controller.regularization_loss().detach())
    assert abs(value - expected) <= 1e-6 * expected, (value, expected)  # fast and right

    def abs_sums() -> torch.Tensor:
        return torch.stack([w.abs().sum() for w in weights]).sum()

    def torch_ops() -> torch.Tensor:
        with torch.no_grad():
            return abs_sums()

    loss_mode = SparsityController(model, BregmanConfig(initial_lambda=1.0, mode="loss"))

    def backward(term: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def call() -> None:
            for w in weights:
                w.grad = None
            term().backward()

        return call

    loss_torch_ops = backward(abs_sums)
    loss_call = backward(loss_mode.regularization_loss)
    loss_torch_ops()
    expected_grads = [w.grad for w in weights]
    loss_call()
    assert all(map(torch.equal, expected_grads, [w.grad for w in weights]))  # the same

    candidates = {
        TORCH_OPS: torch_ops,
        CALL: controller.regularization_loss,
        LOSS_TORCH_OPS: loss_torch_ops,
        LOSS_CALL: loss_call,
    }
    return against_floor(weights, candidates, repeats, device)


def main() -> None:
    args, sizes, repeats = command_line(__doc__, repeats=21)
    results = [run(size, repeats, args.device) for size in sizes]
    name = "loss_term" + ("" if args.device == "cpu" else "_cuda")
    table = markdown(
        results, args.device, what="The loss term (value; in loss mode, value and gradient)"
    )
    write(args.out, name, results, table)


if __name__ == "__main__":
    main()
