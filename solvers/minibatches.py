"""The mini-batch order and learning-rate schedule shared by every SGD in lincnn.

The ``sgd`` solver on a stored Jacobian, the standard network and the matrix-free linearized
network all draw their batches here, so the three can be compared batch for batch: epoch e of a
run with seed s visits the samples in the order of one permutation drawn from
``numpy.random.default_rng([s, e])``, cut into consecutive batches (the last one may be short).
"""
from __future__ import annotations

from typing import Iterator

import numpy as np


def epoch_permutation(n_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The order in which epoch ``epoch`` of a run seeded with ``seed`` visits the samples."""
    if n_samples <= 0:
        raise ValueError(f"n_samples must be positive, got {n_samples}")
    return np.random.default_rng([seed, epoch]).permutation(n_samples)


def minibatches(n_samples: int, batch_size: int, seed: int, epoch: int) -> Iterator[np.ndarray]:
    """Sample indices of each mini-batch of one epoch, in visiting order."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    order = epoch_permutation(n_samples, seed, epoch)
    for start in range(0, n_samples, batch_size):
        yield order[start:start + batch_size]


def step_learning_rate(lr: float, epoch: int, step_epochs: int | None, gamma: float = 0.1) -> float:
    """Step decay: ``lr · gamma^⌊epoch / step_epochs⌋``; ``step_epochs`` None or 0 keeps ``lr``."""
    if not step_epochs:
        return lr
    return lr * gamma ** (epoch // step_epochs)
