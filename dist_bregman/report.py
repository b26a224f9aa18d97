"""The main job's report folder: summary.json and a plot of sparsity and lambda per step."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def read_series(metrics_csv: Path, *columns: str) -> dict[str, list[tuple[int, float]]]:
    """``column -> [(step, value), ...]`` from a Lightning ``CSVLogger`` metrics file."""
    series: dict[str, list[tuple[int, float]]] = {c: [] for c in columns}
    with metrics_csv.open(newline="") as handle:
        for row in csv.DictReader(handle):
            for column in columns:
                text = row.get(column, "")
                if text not in ("", None):
                    series[column].append((int(row["step"]), float(text)))
    return series


def plot_sparsity_lambda(metrics_csv: Path, target: float, out_png: Path) -> Path:
    """Sparsity (%, left axis, with the target) and lambda (right axis) against step."""
    series = read_series(metrics_csv, "bregman/sparsity", "bregman/lambda", "bregman/node_sparsity")
    fig, left = plt.subplots(figsize=(7, 4), dpi=120)
    right = left.twinx()
    if series["bregman/sparsity"]:
        steps, values = zip(*series["bregman/sparsity"], strict=True)
        left.plot(steps, [100 * v for v in values], color="tab:blue", label="sparsity")
    if series["bregman/node_sparsity"]:
        steps, values = zip(*series["bregman/node_sparsity"], strict=True)
        left.plot(steps, [100 * v for v in values], color="tab:green", label="zero rows")
    left.axhline(100 * target, color="tab:blue", linestyle=":", label="target")
    if series["bregman/lambda"]:
        steps, values = zip(*series["bregman/lambda"], strict=True)
        right.plot(steps, values, color="tab:red", label="lambda")
        if min(values) > 0:
            right.set_yscale("log")  # lambda often spans decades
    left.set_xlabel("optimizer step")
    left.set_ylabel("sparsity (%)", color="tab:blue")
    left.set_ylim(0, 100)
    right.set_ylabel("lambda", color="tab:red")
    left.set_title("BregmanPruner: sparsity and lambda")
    handles = left.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    left.legend(handles=handles, loc="center right")
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png


def write_summary(folder: Path, summary: dict[str, float | int | str | None]) -> Path:
    """``summary.json`` with finite numbers (NaN would not round-trip as JSON)."""
    clean = {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v)
        for k, v in summary.items()
    }
    path = folder / "summary.json"
    path.write_text(json.dumps(clean, indent=2) + "\n")
    return path
