"""Sizes in bytes, read and written one way everywhere, and the one probe of free memory.

Units follow dd(1) and the SI/IEC prefixes, case-insensitively:

    KB, MB, GB, TB       = 10³, 10⁶, 10⁹, 10¹²  bytes   (SI)
    KiB, MiB, GiB, TiB   = 2¹⁰, 2²⁰, 2³⁰, 2⁴⁰   bytes   (IEC)
    K, M, G, T           = 2¹⁰, 2²⁰, 2³⁰, 2⁴⁰   bytes   (shorthand, as ``free -g`` and dd read them)
    B or no unit         = bytes

so ``"2GB"`` is 2,000,000,000 bytes and ``"2G"`` = ``"2GiB"`` = 2,147,483,648 bytes in every
option that takes a size (``--memory-limit``, ``--memory-budget``, ``memory_limit=``).
"""
from __future__ import annotations

import math
import os
import re

_UNITS = {"": 1, "B": 1,
          "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
          "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")
GiB = 2**30


def parse_bytes(text) -> int:
    """``"512MiB"``, ``"2GB"``, ``"16G"``, ``"1e9"`` or a number → bytes (see the module docstring)."""
    if isinstance(text, bool):
        raise ValueError(f"cannot read a size from {text!r}; write e.g. 16GiB, 2GB or a number of bytes")
    if isinstance(text, (int, float)):
        value, scale = float(text), 1
    else:
        match = _SIZE.match(str(text))
        unit = match.group(2).upper() if match else None
        if unit not in _UNITS:
            raise ValueError(f"cannot read a size from {text!r}; write e.g. 16GiB, 2GB, 512M or a number of bytes "
                             f"(units: {', '.join(u for u in _UNITS if u)})")
        value, scale = float(match.group(1)), _UNITS[unit]
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"a size must be a finite, non-negative number of bytes; got {text!r}")
    return int(value * scale)


def format_bytes(n: float) -> str:
    """Bytes for people: GiB from 0.1 GiB on, then MiB, then KiB, then bytes."""
    n = float(n)
    for unit, scale in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= 0.1 * scale:
            return f"{n / scale:.{1 if unit != 'GiB' else 2}f} {unit}"
    return f"{int(n)} B"


def available_memory(device=None) -> int | None:
    """Free memory in bytes where ``device`` computes, or None when it cannot be read.

    CPU: MemAvailable of /proc/meminfo (free pages plus reclaimable cache), else sysconf. CUDA:
    the driver's free memory plus what torch's caching allocator holds unused (free to torch and,
    once ``torch.cuda.empty_cache`` runs, to CuPy in the same process).
    """
    kind = getattr(device, "type", None) or str(device or "cpu").split(":")[0]
    if kind == "cuda":
        import torch

        index = getattr(device, "index", None)
        index = torch.cuda.current_device() if index is None else index
        free, _ = torch.cuda.mem_get_info(index)
        cached = torch.cuda.memory_reserved(index) - torch.cuda.memory_allocated(index)
        return int(free + cached)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None
