"""The prediction rule and accuracy shared by every model in the study.

A prediction is the class whose target vector is closest to the output: the argmax of the
outputs for one-hot targets (ties go to the lowest class), and ``output > 0.5`` for binary tasks,
which have one output with target 1 for the chosen class and 0 otherwise.
"""
from __future__ import annotations

import numpy as np

from jacobian_store.device import is_torch_tensor


def predict_classes(outputs, binary: bool):
    """Predicted labels of ``outputs`` (n, L), numpy or torch, returned in the same kind of array.

    binary (L = 1): 1 where the output exceeds 0.5, else 0. Otherwise: the argmax over L.
    """
    if outputs.ndim != 2:
        raise ValueError(f"outputs must have shape (n, L), got {tuple(outputs.shape)}")
    if not binary:
        return outputs.argmax(1)
    if outputs.shape[1] != 1:
        raise ValueError(f"binary outputs must have shape (n, 1), got {tuple(outputs.shape)}")
    above = outputs[:, 0] > 0.5
    return above.long() if is_torch_tensor(above) else above.astype(np.int64)


def accuracy(outputs, targets) -> float:
    """Fraction of samples whose predicted class is the class of their target, in [0, 1].

    ``outputs`` and ``targets`` are (n, L) numpy arrays or torch tensors (any device, any mix).
    Binary when L = 1: ``(outputs[:, 0] > 0.5) == (targets[:, 0] > 0.5)``; otherwise
    ``argmax(outputs) == argmax(targets)``.
    """
    outputs, targets = _as_numpy(outputs), _as_numpy(targets)
    if outputs.shape != targets.shape or outputs.ndim != 2:
        raise ValueError(f"outputs and targets must both have shape (n, L), got {outputs.shape} and {targets.shape}")
    if len(outputs) == 0:
        raise ValueError("accuracy of no samples is undefined")
    binary = targets.shape[1] == 1
    return float(np.mean(predict_classes(outputs, binary) == predict_classes(targets, binary)))


def _as_numpy(array) -> np.ndarray:
    if is_torch_tensor(array):
        return array.detach().cpu().numpy()
    return np.asarray(array)
