"""scikit-learn's digits (1,797 8x8 images, shipped inside the package: no download) as
train/val/test tensors. Without Lightning: the raw torchrun and DeepSpeed loops use it
(:mod:`dist_bregman.data` wraps it as a LightningDataModule)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import TensorDataset


@dataclass(frozen=True, slots=True)
class Splits:
    """Standardised features (statistics from the training split only) and labels."""

    train: TensorDataset
    val: TensorDataset
    test: TensorDataset


def digits_splits(
    val_fraction: float = 0.15, test_fraction: float = 0.15, seed: int = 0, images: bool = False
) -> Splits:
    """Stratified train/val/test splits; ``images=True`` shapes inputs as ``(1, 8, 8)``."""
    x, y = load_digits(return_X_y=True)
    x_rest, x_test, y_rest, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    x_train, x_val, y_train, y_val = train_test_split(
        x_rest,
        y_rest,
        test_size=val_fraction / (1.0 - test_fraction),
        random_state=seed,
        stratify=y_rest,
    )
    mean, std = x_train.mean(axis=0), x_train.std(axis=0) + 1e-6

    def dataset(features: np.ndarray, labels: np.ndarray) -> TensorDataset:
        inputs = torch.as_tensor((features - mean) / std, dtype=torch.float32)
        if images:
            inputs = inputs.view(-1, 1, 8, 8)
        return TensorDataset(inputs, torch.as_tensor(labels, dtype=torch.long))

    return Splits(dataset(x_train, y_train), dataset(x_val, y_val), dataset(x_test, y_test))
