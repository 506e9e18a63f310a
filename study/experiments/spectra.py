"""Summary figures of a Jacobian's singular values σ_1 ≥ σ_2 ≥ … ≥ 0, as the spectrum units record them.

- ``effective_rank``: exp of the Shannon entropy of p_i = σ_i / Σ_j σ_j (Roy and Vetterli, 2007):
  between 1 (one direction) and the number of non-zero σ (all equal).
- ``numerical_rank``: #{i : σ_i > τ} with the cut-off of ``solvers``' Gram-matrix lstsq,
  τ = max(√(max(n·L, p) · ε₆₄) · σ_1, ε_J · ‖J‖_F): the rounding floor of a float64 Gram matrix
  and of J's own float32 entries (‖J‖_F = √Σσ²). So it is the rank the ``lstsq`` solver sees.
- ``condition_number``: σ_1 / σ_r over the r = numerical_rank kept singular values.
- ``stable_rank``: ‖J‖_F² / ‖J‖_2² = Σ σ_i² / σ_1².
"""
from __future__ import annotations

import numpy as np


def effective_rank(singular_values) -> float:
    s = np.asarray(singular_values, dtype=np.float64)
    s = s[s > 0]
    if s.size == 0:
        return 0.0
    p = s / s.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def spectrum_metrics(singular_values, shape: tuple[int, int]) -> dict:
    """The figures above, for the singular values (descending) of a J of ``shape`` (n·L, p)."""
    s = np.sort(np.asarray(singular_values, dtype=np.float64))[::-1]
    s_max = float(s[0]) if s.size else 0.0
    cutoff = singular_value_cutoff(s, shape)
    rank = int((s > cutoff).sum()) if s_max > 0 else 0
    return {"effective_rank": effective_rank(s), "numerical_rank": rank, "cutoff": cutoff,
            "condition_number": s_max / float(s[rank - 1]) if rank else float("inf"),
            "stable_rank": float((s ** 2).sum() / s_max ** 2) if s_max > 0 else 0.0,
            "sigma_max": s_max, "sigma_min": float(s[-1]) if s.size else 0.0,
            "n_singular_values": int(s.size)}


def singular_value_cutoff(singular_values, shape: tuple[int, int], j_dtype=np.float32) -> float:
    """τ = max(√(max(n·L, p)·ε₆₄)·σ_1, ε_J·‖J‖_F), the rule of ``solvers/direct.py`` (restated here so
    a record's rank does not move when the solvers' private helpers do)."""
    s = np.asarray(singular_values, dtype=np.float64)
    if not s.size:
        return 0.0
    floor = np.sqrt(max(shape) * np.finfo(np.float64).eps) * float(s.max())
    return float(max(floor, np.finfo(j_dtype).eps * np.sqrt((s ** 2).sum())))
