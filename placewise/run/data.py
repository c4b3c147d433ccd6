"""Data for data-parallel training: scikit-learn's bundled digits (real, no download) and synthetic data
(which data each model trains on: `placewise.run.tasks`).

Every worker draws its minibatches from its own deterministic stream: the batch a worker uses at its
local step `k` depends only on (seed, worker, k). That is what lets a run resumed from a checkpoint
repeat, step for step, the losses of a run that was never interrupted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from placewise.errors import PlacewiseError


@dataclass(frozen=True)
class Dataset:
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def features(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max())) + 1

    @property
    def train_size(self) -> int:
        return int(self.x_train.shape[0])


def digits(test_fraction: float = 0.25, seed: int = 0) -> Dataset:
    """The 8x8 digits (1797 images, 10 classes) bundled with scikit-learn, split stratified."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    data = load_digits()
    # Pixels are 0..16; scaling to 0..1 keeps a plain MLP well conditioned without fitted statistics.
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    train_idx, test_idx = train_test_split(range(len(y)), test_size=test_fraction, random_state=seed,
                                           stratify=data.target)
    return Dataset("digits", x[train_idx], y[train_idx], x[test_idx], y[test_idx])


def synthetic(samples: int = 8192, features: int = 64, classes: int = 10, seed: int = 0) -> Dataset:
    """Gaussian inputs labelled by a random linear teacher: learnable, any size, for speed tests."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, features, generator=g)
    teacher = torch.randn(features, classes, generator=g)
    y = (x @ teacher).argmax(dim=1)
    split = samples * 3 // 4
    return Dataset("synthetic", x[:split], y[:split], x[split:], y[split:])


class BatchStream:
    """Worker `worker`'s minibatches: a fresh permutation of the training set per epoch, seeded by
    (seed, worker, epoch); the last incomplete batch of an epoch is dropped so every batch is full."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int, worker: int) -> None:
        if not 0 < batch_size <= x.shape[0]:
            raise PlacewiseError(f"batch size {batch_size} does not fit a training set of {x.shape[0]} samples; "
                                 f"use 1..{x.shape[0]}")
        self.x, self.y, self.batch_size = x, y, batch_size
        self.seed, self.worker = seed, worker
        self.batches_per_epoch = x.shape[0] // batch_size
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.int64)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, i = divmod(step, self.batches_per_epoch)
        if epoch != self._epoch:
            # Distinct, reproducible seeds per (seed, worker, epoch) without hashing strings.
            g = torch.Generator().manual_seed(((self.seed * 1_000_003) + self.worker) * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.x.shape[0], generator=g)
        idx = self._perm[i * self.batch_size:(i + 1) * self.batch_size]
        return self.x[idx], self.y[idx]
