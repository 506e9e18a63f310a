"""The one device object: where a computation runs, resolved once from ``auto | cpu | cuda | cuda:N``.

A :class:`Device` carries the torch device, the array module of the solvers (NumPy on the CPU,
CuPy on a GPU) and ``exact_float32()``, the context every float32 computation enters (build,
Gram, spectrum, training, solvers): TF32 off for matmul and cuDNN, since TF32 rounds products to
10 mantissa bits (errors near 1e-3) where lincnn promises float32 (1e-7). CuPy is imported
lazily and only for a GPU, so the CPU path never needs it. The array-module helpers follow
``cupy.get_array_module``: the module belongs to the data.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import numpy as np
import torch

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


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


@dataclass(frozen=True)
class Device:
    """A resolved device: ``torch`` (e.g. ``torch.device("cuda", 1)``) and what follows from it."""

    torch: torch.device

    @property
    def type(self) -> str:
        return self.torch.type

    @property
    def index(self) -> int | None:
        return self.torch.index

    @property
    def is_cuda(self) -> bool:
        return self.torch.type == "cuda"

    @property
    def array_module(self):
        """NumPy on the CPU, CuPy on a GPU (an error naming the install when CuPy is missing)."""
        if not self.is_cuda:
            return np
        if _cupy() is None:
            raise ValueError(f"arrays on {self} need CuPy (pip install 'lincnn[gpu]'); or use device 'cpu'")
        return _cupy()

    def __str__(self) -> str:
        return str(self.torch)

    @contextlib.contextmanager
    def exact_float32(self):
        """Run inside with TF32 off (matmul and cuDNN) and, on a GPU, this GPU current for torch
        and CuPy; the previous settings come back on exit."""
        saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        try:
            with contextlib.ExitStack() as stack:
                if self.is_cuda:
                    stack.enter_context(torch.cuda.device(self.torch))
                    if _cupy() is not None:
                        stack.enter_context(_cupy().cuda.Device(self.torch.index or 0))
                yield self
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def resolve_device(device="auto", *, arrays: bool = False) -> Device:
    """``"auto" | "cpu" | "cuda" | "cuda:N"`` (or a torch.device or Device) → :class:`Device`.

    ``"auto"`` is the GPU when torch sees one, else the CPU; with ``arrays=True`` (the solvers,
    which compute with CuPy on a GPU) a GPU is chosen only when CuPy is usable too. ``"cuda"``
    means the current GPU, resolved to its index so that every later step uses the same one.
    """
    if isinstance(device, Device):
        return device
    text = str(device).strip().lower()
    if text == "auto":
        usable = torch.cuda.is_available() and (not arrays or cupy_available())
        return Device(torch.device("cuda", torch.cuda.current_device()) if usable else torch.device("cpu"))
    try:
        target = torch.device(text)
    except (RuntimeError, ValueError):
        raise ValueError(f"device must be {DEVICE_CHOICES}; got {device!r}") from None
    if target.type == "cpu":
        return Device(torch.device("cpu"))
    if target.type != "cuda":
        raise ValueError(f"device must be {DEVICE_CHOICES}; got {device!r}")
    if not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but no CUDA GPU is visible; use 'cpu' or 'auto'")
    index = torch.cuda.current_device() if target.index is None else target.index
    if index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: there are only {torch.cuda.device_count()} GPUs (cuda:0 to "
                         f"cuda:{torch.cuda.device_count() - 1})")
    if arrays and not cupy_available():
        raise ValueError(f"device {device!r} for the solvers needs CuPy and a GPU (pip install 'lincnn[gpu]'); "
                         f"use 'cpu' or 'auto'")
    return Device(torch.device("cuda", index))


# ---- the array module follows the data ----------------------------------------------------------

def is_cupy_array(x) -> bool:
    return type(x).__module__.split(".")[0] == "cupy"


def array_module(*arrays):
    """``numpy``, or ``cupy`` when any argument is a CuPy array (``cupy.get_array_module`` semantics)."""
    if any(is_cupy_array(a) for a in arrays):
        import cupy
        return cupy
    return np


def module_for_device(device):
    """The array module of ``device`` ("cpu", "cuda", "cuda:N" or a Device)."""
    kind = device.type if isinstance(device, Device) else str(device).split(":")[0]
    return _cupy() if kind == "cuda" else np


def to_numpy(x):
    """A NumPy copy of ``x`` when it lives on the GPU, else ``x`` itself (as an ndarray)."""
    if is_cupy_array(x):
        return x.get()
    return np.asarray(x)


def scalar(x) -> float:
    """A Python float from a NumPy or CuPy 0-d result (one device sync for CuPy)."""
    return float(x.item() if hasattr(x, "item") else x)
