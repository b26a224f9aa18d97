"""Rank-zero logging in the seed's format, through Python ``logging``.

Only rank 0 emits (one line per event for the whole job, not one per GPU): global rank 0,
or the first rank of the group a controller measures (one line per pipeline stage). The
logger is ``logging.getLogger("dist_bregman")``; if the application configured no handler
anywhere, a stderr handler with the seed's ``[%(asctime)s] %(message)s`` form is added the
first time something is logged, so the lines appear without any set-up, and an application
that configures logging itself keeps full control.
"""

from __future__ import annotations

import logging

from dist_bregman import comm
from dist_bregman.control import LambdaDecision
from dist_bregman.sparsity import SparsityReport

LOGGER_NAME = "dist_bregman"
FORMAT = "[%(asctime)s] %(message)s"
logger = logging.getLogger(LOGGER_NAME)


def _ensure_visible() -> None:
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(FORMAT))
        logger.addHandler(handler)


def info0(message: str, group: comm.ProcessGroup = None) -> None:
    """Log ``message`` at INFO on rank 0 of ``group`` only (default: global rank 0; a
    controller of one pipeline stage logs from its own group's first rank)."""
    if comm.get_rank(group) == 0:
        _ensure_visible()
        logger.info(message)


def warn0(message: str, group: comm.ProcessGroup = None) -> None:
    """Log ``message`` at WARNING on rank 0 of ``group`` only (see :func:`info0`)."""
    if comm.get_rank(group) == 0:
        _ensure_visible()
        logger.warning(message)


def percent(fraction: float) -> str:
    return f"{100.0 * fraction:.3f}%"


def epoch_line(epoch: int, sparsity: float) -> str:
    """``Epoch 0: Sparsity of pruned modules = 12.543%``"""
    return f"Epoch {epoch}: Sparsity of pruned modules = {percent(sparsity)}"


def decision_line(decision: LambdaDecision) -> str:
    """``Sparsity 12.543% vs target 80.0% → Lambda ↗ 1.00000000 → 1.00067457``"""
    return (
        f"Sparsity {percent(decision.sparsity)} vs target {100.0 * decision.target:.1f}% "
        f"→ Lambda {decision.arrow} {decision.old:.8f} → {decision.new:.8f}"
    )


def step_line(step: int, sparsity: float, lam: float) -> str:
    """``Step 100: Sparsity=12.543%, lambda=1.0007``"""
    return f"Step {step}: Sparsity={percent(sparsity)}, lambda={lam:.4f}"


def structure_line(report: SparsityReport) -> str:
    """``Node sparsity 25.000% (32/128 rows), kernel sparsity 3.125% (2/64 kernels)``"""
    rows = f"({report.zero_rows}/{report.rows} rows)"
    line = f"Node sparsity {percent(report.zero_rows / report.rows)} {rows}"
    if report.kernels:
        line += (
            f", kernel sparsity {percent(report.zero_kernels / report.kernels)} "
            f"({report.zero_kernels}/{report.kernels} kernels)"
        )
    return line


def parameter_lines(report: SparsityReport) -> list[str]:
    """One line per measured tensor (verbose=2)."""
    lines = []
    for name, (nonzero, total) in report.per_parameter.items():
        sparsity = 1.0 - nonzero / total if total else float("nan")
        lines.append(f"  {name}: {percent(sparsity)} zero ({total - nonzero}/{total})")
    return lines
