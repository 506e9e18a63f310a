"""Summary figures of a Jacobian's singular values, as the spectrum units record them.

Effective rank (Roy and Vetterli, over the σ above the cut-off), numerical rank and condition
number (over the kept σ) are computed by ``study.spectrum``, but with the cut-off of the lstsq
solver (``singular_value_cutoff``, ``solvers/direct.py``'s rule)

    τ = max( √(max(n·L, p)·ε₆₄)·σ_1 ,  ε₃₂·‖J‖_F ),

so the rank reported is the rank the exact solver sees. ``study.spectrum``'s default
τ = σ_1·max(n·L, p)·ε₃₂ grows with the parameter count p: it is 0.46·σ_1 for LeNet ×8
(p = 3.9 M) and exceeds σ_1 beyond p ≈ 8.4 M, so against width it would measure the cut-off, not J.
The stable rank ‖J‖_F² / ‖J‖_2² = Σσ²/σ_1² needs no cut-off.
"""
from __future__ import annotations

import numpy as np


def spectrum_metrics(singular_values, shape: tuple[int, int]) -> dict:
    """The summaries of ``study.spectrum`` for the singular values of a J of ``shape`` (n·L, p)."""
    from study.spectrum import spectrum_from_singular_values

    report = spectrum_from_singular_values(singular_values, n_rows=shape[0], n_parameters=shape[1],
                                           cutoff=singular_value_cutoff(singular_values, shape))
    s = report.singular_values
    return {"effective_rank": report.effective_rank, "effective_rank_unfiltered": report.effective_rank_unfiltered,
            "numerical_rank": report.numerical_rank, "cutoff": report.cutoff,
            "cutoff_rule": "max(sqrt(max(m, p)·eps64)·sigma_max, eps32·||J||_F) (the lstsq cut-off)",
            "condition_number": report.condition_number,
            "stable_rank": float((s ** 2).sum() / report.sigma_max ** 2) if report.sigma_max > 0 else 0.0,
            "sigma_max": report.sigma_max, "sigma_min": report.sigma_min, "n_singular_values": int(s.size)}


def singular_value_cutoff(singular_values, shape: tuple[int, int], j_dtype=np.float32) -> float:
    """τ = max(√(max(n·L, p)·ε₆₄)·σ_1, ε_J·‖J‖_F), the rule of ``solvers/direct.py`` (restated here so
    a record's rank does not move when the solvers' private helpers do)."""
    s = np.asarray(singular_values, dtype=np.float64)
    if not s.size:
        return 0.0
    floor = np.sqrt(max(shape) * np.finfo(np.float64).eps) * float(s.max())
    return float(max(floor, np.finfo(j_dtype).eps * np.sqrt((s ** 2).sum())))
