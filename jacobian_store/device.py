"""The one device object: where a computation runs, resolved once from ``auto | cpu | cuda | cuda:N``.

A :class:`Device` carries the device's type and index, the torch device (``.torch``), the array
module of the solvers (NumPy on the CPU, CuPy on a GPU) and ``exact_float32()``, the context every
float32 computation enters (build, Gram, spectrum, training, solvers): on a GPU, TF32 off for
matmul and cuDNN, since TF32 rounds products to 10 mantissa bits (errors near 1e-3) where lincnn
promises float32 (1e-7); the CPU has no TF32. torch is imported only where a torch device is
needed (a GPU, ``.torch``, resolving ``"auto"`` for torch): a solve on a stored J, which computes
with NumPy, does not pay torch's import (about 1.5 s, a third of a small store's whole
``bin/solve --method lstsq``). CuPy is imported lazily and only for a GPU, so the CPU path never
needs it. The array-module helpers follow ``cupy.get_array_module``: the module belongs to the data.
"""
from __future__ import annotations

import contextlib
import functools
import re
from dataclasses import dataclass

import numpy as np

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
_DEVICE_TEXT = re.compile(r"(cpu|cuda)(?::(\d+))?")


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
    """A resolved device: ``type`` ("cpu" or "cuda") and, for a GPU, its ``index``."""

    type: str
    index: int | None = None

    @property
    def torch(self):
        """The ``torch.device`` (imports torch)."""
        import torch

        return torch.device(self.type, self.index) if self.is_cuda else torch.device("cpu")

    @property
    def is_cuda(self) -> bool:
        return self.type == "cuda"

    @property
    def array_module(self):
        """NumPy on the CPU, CuPy on a GPU (an error naming the install when CuPy is missing)."""
        if not self.is_cuda:
            return np
        if _cupy() is None:
            raise ValueError(f"arrays on {self} need CuPy (pip install 'lincnn[gpu]'); or use device 'cpu'")
        return _cupy()

    def __str__(self) -> str:
        return f"cuda:{self.index}" if self.is_cuda else "cpu"

    @contextlib.contextmanager
    def exact_float32(self):
        """Run inside with, on a GPU, TF32 off (matmul and cuDNN) and this GPU current for torch and
        CuPy; the previous settings come back on exit. (On the CPU float32 is float32 already.)"""
        if not self.is_cuda:
            yield self
            return
        import torch

        saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        try:
            with contextlib.ExitStack() as stack:
                stack.enter_context(torch.cuda.device(self.torch))
                if _cupy() is not None:
                    stack.enter_context(_cupy().cuda.Device(self.index))
                yield self
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


CPU = Device("cpu")


def resolve_device(device="auto", *, arrays: bool = False) -> Device:
    """``"auto" | "cpu" | "cuda" | "cuda:N"`` (or a torch.device or Device) → :class:`Device`.

    ``"auto"`` is the GPU when torch sees one, else the CPU; with ``arrays=True`` (the solvers,
    which compute with CuPy on a GPU) a GPU is chosen only when CuPy is usable too, so without
    CuPy the answer is the CPU and torch is not imported. ``"cuda"`` means the current GPU,
    resolved to its index so that every later step uses the same one.
    """
    if isinstance(device, Device):
        return device
    text = str(device).strip().lower()
    if text == "cpu":
        return CPU
    if text == "auto":
        if arrays and not cupy_available():
            return CPU
        import torch

        return Device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else CPU
    parsed = _DEVICE_TEXT.fullmatch(text)
    if parsed is None:
        raise ValueError(f"device must be {DEVICE_CHOICES}; got {device!r}")
    if parsed.group(1) == "cpu":
        return CPU
    import torch

    if not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but no CUDA GPU is visible; use 'cpu' or 'auto'")
    index = torch.cuda.current_device() if parsed.group(2) is None else int(parsed.group(2))
    if index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: there are only {torch.cuda.device_count()} GPUs (cuda:0 to "
                         f"cuda:{torch.cuda.device_count() - 1})")
    if arrays and not cupy_available():
        raise ValueError(f"device {device!r} for the solvers needs CuPy and a GPU (pip install 'lincnn[gpu]'); "
                         f"use 'cpu' or 'auto'")
    return Device("cuda", index)


# ---- the array module follows the data ----------------------------------------------------------

def is_cupy_array(x) -> bool:
    return type(x).__module__.split(".")[0] == "cupy"


def is_torch_tensor(x) -> bool:
    """Whether ``x`` is a torch tensor, without importing torch (NumPy callers never need it)."""
    return type(x).__module__.split(".")[0] == "torch"


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
