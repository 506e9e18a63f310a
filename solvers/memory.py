"""What each method holds in memory, and the up-front refusal when that would not fit.

Figures are for J of shape (n·L, p) = (m, p); 8 bytes per float64. Every method also holds one
row block of J (one HDF5 chunk), its float64 working copy (at most ``SLICE_BYTES``) and a few
vectors of length m and p (a J known only by its products holds instead its own workspace, e.g.
a network's activations for one batch); on top of that:

    lstsq, ridge   dual (m ≤ p):    K = J Jᵀ and its eigenvectors, 2·8·m², plus a panel of rows of J
                   primal (m > p):  JᵀJ and its eigenvectors, 2·8·p²
    lstsq --driver gelsd|gelsy:     J in memory plus LAPACK's float64 copy (for checking only)
    cg                              7 vectors: 8·(4p + 3m)
    rsvd (rank k)                   ℓ = k + oversample columns: 2·8·p·ℓ + 3·8·m·ℓ
    sgd                             one mini-batch of rows (batch·L × p) and u, momentum, gradient
    paths                           one u (p) and one J u (m) per knob value
"""
from __future__ import annotations

import numpy as np

from jacobian_store.operators import SLICE_BYTES
from jacobian_store.sizes import GiB, available_memory, format_bytes
# Fraction of the free memory a run may plan to use by default (the rest is headroom for Python,
# HDF5's chunk cache, LAPACK workspace and temporaries).
DEFAULT_FRACTION = 0.8
# The largest Gram panel worth holding: beyond this, fewer passes over J stop paying off.
MAX_PANEL_BYTES = 4 * GiB


class MemoryLimitError(ValueError):
    """The chosen method would need more memory than the limit allows."""


def default_memory_limit(device: str = "cpu") -> int | None:
    free = available_memory(device)
    return None if free is None else int(DEFAULT_FRACTION * free)


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
    if hasattr(op, "row_blocks"):
        rows = min(block_rows_of(op), m)
        plan = [(f"one row block of J ({rows} rows, {np.dtype(op.dtype).name})", rows * p * item),
                ("its float64 working copy", min(rows * p * 8, SLICE_BYTES) if item != 8 else 0)]
    else:  # J known only by its products (matrix-free): no rows, the operator's own workspace
        plan = [(f"{type(op).__name__}'s workspace for one product", int(getattr(op, "workspace_bytes", 0)))]
    plan.append(("vectors r, J u, u", 8 * (3 * m + 2 * p)))
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
                 ("J Ω, Q, U (n·L × ℓ, float64)", 3 * 8 * m * ell)]
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
        from jacobian_store.operators import PANEL_BYTES

        return min(whole, PANEL_BYTES)
    room = (limit - fixed) // 2  # leave half of what is left as headroom for temporaries
    return int(max(p * 8, min(whole, MAX_PANEL_BYTES, room)))


def check_memory(plan, limit: int | None, *, method: str, form: str | None, device: str) -> int:
    """Total of ``plan``; raise MemoryLimitError with the breakdown when it exceeds ``limit``."""
    total = sum(b for _, b in plan)
    if limit is not None and total > limit:
        detail = "; ".join(f"{what}: {format_bytes(b)}" for what, b in plan if b)
        where = "GPU memory" if device == "cuda" else "memory"
        hint = {"lstsq": "use method 'cg' or 'rsvd' (they hold only vectors / ℓ columns), or fewer samples",
                "ridge": "use method 'cg' (early stopping) or 'rsvd', or fewer samples",
                "rsvd": "lower the rank",
                "sgd": "lower the batch size",
                "cg": "use a smaller problem"}.get(method, "")
        raise MemoryLimitError(
            f"{method}{f' ({form} form)' if form else ''} would hold about {format_bytes(total)} of {where} "
            f"but the limit is {format_bytes(limit)} ({detail}). To proceed: {hint}; or raise the limit "
            f"(memory_limit= / --memory-limit) if more is really free.")
    return total
