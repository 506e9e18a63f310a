"""What each method holds in memory, and the up-front refusal when that would not fit.

Figures are for J of shape (n·L, p) = (m, p); 8 bytes per float64. Every method also holds one
row block of J (one HDF5 chunk), its float64 working copy (at most ``SLICE_BYTES``) and a few
vectors of length m and p; on top of that:

    lstsq, ridge   dual (m ≤ p):    K = J Jᵀ and its eigenvectors, 2·8·m², plus a panel of rows of J
                   primal (m > p):  JᵀJ and its eigenvectors, 2·8·p²
    lstsq --driver gelsd|gelsy:     J in memory plus LAPACK's float64 copy (for checking only)
    cg                              7 vectors: 8·(4p + 3m)
    rsvd (rank k)                   ℓ = k + oversample columns: 2·8·p·ℓ + 3·8·m·ℓ
    sgd                             one mini-batch of rows (batch·L × p) and u, momentum, gradient
    paths                           one u (p) and one J u (m) per knob value
"""
from __future__ import annotations

import os

import numpy as np

from .operators import SLICE_BYTES

GiB = 2 ** 30
# Fraction of the free memory a run may plan to use by default (the rest is headroom for Python,
# HDF5's chunk cache, LAPACK workspace and temporaries).
DEFAULT_FRACTION = 0.8
# The largest Gram panel worth holding: beyond this, fewer passes over J stop paying off.
MAX_PANEL_BYTES = 4 * GiB


class MemoryLimitError(ValueError):
    """The chosen method would need more memory than the limit allows."""


def available_memory(device: str = "cpu") -> int | None:
    """Free memory in bytes (MemAvailable on Linux; free GPU memory for ``"cuda"``), or None."""
    if device == "cuda":
        from ._xp import module_for_device

        free, _ = module_for_device("cuda").cuda.runtime.memGetInfo()
        return int(free)
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


def default_memory_limit(device: str = "cpu") -> int | None:
    free = available_memory(device)
    return None if free is None else int(DEFAULT_FRACTION * free)


def parse_bytes(text) -> int:
    """``"12G"``, ``"512M"``, ``"1.5GiB"`` or a plain number of bytes → bytes."""
    if isinstance(text, (int, float)):
        return int(text)
    s = str(text).strip().upper().replace("IB", "").replace("B", "")
    scale = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}
    try:
        if s and s[-1] in scale:
            return int(float(s[:-1]) * scale[s[-1]])
        return int(float(s))
    except ValueError:
        raise ValueError(f"cannot read a memory size from {text!r}; write e.g. 16G, 512M or a number of bytes") from None


def fmt_bytes(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= 0.1 * GiB else f"{n / 2 ** 20:.1f} MiB"


def block_rows_of(op) -> int:
    """Rows in one row block: the operator's ``block_rows``/``chunk_rows``, else read off the first block."""
    for name in ("block_rows", "chunk_rows"):
        rows = getattr(op, name, None)
        if rows:
            return int(rows)
    blocks = op.row_blocks()
    try:
        _, first = next(iter(blocks))
        return int(first.shape[0])
    finally:
        close = getattr(blocks, "close", None)
        if close:
            close()


def memory_plan(op, method: str, options: dict, *, form: str | None = None, n_knobs: int = 1,
                panel_bytes: int = 0) -> list[tuple[str, int]]:
    """(what, bytes) for everything ``method`` holds at its peak besides Python itself."""
    m, p = op.shape
    item = np.dtype(op.dtype).itemsize
    rows = min(block_rows_of(op), m)
    plan = [(f"one row block of J ({rows} rows, {np.dtype(op.dtype).name})", rows * p * item),
            ("its float64 working copy", min(rows * p * 8, SLICE_BYTES) if item != 8 else 0),
            ("vectors r, J u, u", 8 * (3 * m + 2 * p))]
    if method in ("lstsq", "ridge") and options.get("driver"):
        plan += [("J held in memory", m * p * item), ("LAPACK's float64 copy of J", m * p * 8)]
    elif method in ("lstsq", "ridge"):
        if form == "dual":
            plan += [(f"K = J Jᵀ ({m} × {m} float64)", 8 * m * m), ("its eigenvectors / Cholesky factor", 8 * m * m),
                     ("Gram panel of rows of J (float64)", panel_bytes)]
        else:
            plan += [(f"JᵀJ ({p} × {p} float64)", 8 * p * p), ("its eigenvectors / Cholesky factor", 8 * p * p)]
    elif method == "cg":
        plan += [("CGLS vectors u, d, s (p) and ρ, q (n·L)", 8 * (4 * p + 3 * m))]
    elif method == "rsvd":
        ell = min(int(options.get("rank") or 1) + int(options.get("oversample", 10)), m, p)
        plan += [(f"Ω and Jᵀ Q (p × ℓ, ℓ = {ell}, float64)", 2 * 8 * p * ell),
                 (f"J Ω, Q, U (n·L × ℓ, float64)", 3 * 8 * m * ell)]
    elif method == "sgd":
        b = int(options.get("batch_size", 32)) * op.n_outputs
        plan += [(f"mini-batch rows ({b} × p) and float64 copy", b * p * (item + 8)),
                 ("u, momentum buffer, gradient", 3 * 8 * p)]
    if n_knobs > 1:
        plan += [(f"{n_knobs} solutions u and fitted J u of the path", n_knobs * 8 * (m + p))]
    return plan


def choose_panel_bytes(op, limit: int | None, fixed: int) -> int:
    """Largest Gram panel that fits beside the ``fixed`` needs: fewer panels, fewer passes over J."""
    m, p = op.shape
    whole = m * p * 8
    if limit is None:
        from .operators import PANEL_BYTES

        return min(whole, PANEL_BYTES)
    room = (limit - fixed) // 2  # leave half of what is left as headroom for temporaries
    return int(max(p * 8, min(whole, MAX_PANEL_BYTES, room)))


def check_memory(plan, limit: int | None, *, method: str, form: str | None, device: str) -> int:
    """Total of ``plan``; raise MemoryLimitError with the breakdown when it exceeds ``limit``."""
    total = sum(b for _, b in plan)
    if limit is not None and total > limit:
        detail = "; ".join(f"{what}: {fmt_bytes(b)}" for what, b in plan if b)
        where = "GPU memory" if device == "cuda" else "memory"
        hint = {"lstsq": "use method 'cg' or 'rsvd' (they hold only vectors / ℓ columns), or fewer samples",
                "ridge": "use method 'cg' (early stopping) or 'rsvd', or fewer samples",
                "rsvd": "lower the rank",
                "sgd": "lower the batch size",
                "cg": "use a smaller problem"}.get(method, "")
        raise MemoryLimitError(
            f"{method}{f' ({form} form)' if form else ''} would hold about {fmt_bytes(total)} of {where} "
            f"but the limit is {fmt_bytes(limit)} ({detail}). To proceed: {hint}; or raise the limit "
            f"(memory_limit= / --memory-limit) if more is really free.")
    return total
