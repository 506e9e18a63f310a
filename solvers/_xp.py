"""One code path for NumPy and CuPy: the array module belongs to the data.

CuPy is imported lazily and only when asked for, so the CPU path never needs it. ``array_module``
follows ``cupy.get_array_module``; ``resolve_device`` turns ``"auto" | "cpu" | "cuda"`` into the
device that will actually run and says why.
"""
from __future__ import annotations

import functools

import numpy as np


@functools.lru_cache(maxsize=1)
def _cupy():
    """The ``cupy`` module, or None when it is not installed or no GPU is usable."""
    try:
        import cupy
    except ImportError:
        return None
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None
    except Exception:  # CUDA driver missing or broken: behave as if there were no GPU
        return None
    return cupy


def cupy_available() -> bool:
    return _cupy() is not None


def is_cupy_array(x) -> bool:
    return type(x).__module__.split(".")[0] == "cupy"


def array_module(*arrays):
    """``numpy``, or ``cupy`` when any argument is a CuPy array (``cupy.get_array_module`` semantics)."""
    if any(is_cupy_array(a) for a in arrays):
        import cupy
        return cupy
    return np


def resolve_device(device: str) -> str:
    """``"auto"`` → ``"cuda"`` when CuPy and a GPU are usable, else ``"cpu"``; check explicit choices."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "auto":
        return "cuda" if cupy_available() else "cpu"
    if device == "cuda" and not cupy_available():
        raise ValueError("device='cuda' needs CuPy and a GPU (pip install 'lincnn[gpu]'); "
                         "use device='cpu' or device='auto'")
    return device


def module_for_device(device: str):
    return _cupy() if device == "cuda" else np


def to_numpy(x):
    """A NumPy copy of ``x`` when it lives on the GPU, else ``x`` itself (as an ndarray)."""
    if is_cupy_array(x):
        return x.get()
    return np.asarray(x)


def scalar(x) -> float:
    """A Python float from a NumPy or CuPy 0-d result (one device sync for CuPy)."""
    return float(x.item() if hasattr(x, "item") else x)
