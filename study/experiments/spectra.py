"""Summary figures of a Jacobian's singular values, as the spectrum units record them.

The definitions are ``study.spectrum``'s (effective rank over the σ above the numerical-rank
cut-off, Roy and Vetterli; numerical rank with numpy's ``matrix_rank`` rule at float32 precision;
condition number over the kept σ), plus the stable rank ‖J‖_F² / ‖J‖_2² = Σσ²/σ_1².
"""
from __future__ import annotations

import numpy as np


def spectrum_metrics(singular_values, shape: tuple[int, int]) -> dict:
    """The summaries of ``study.spectrum`` for the singular values of a J of ``shape`` (n·L, p)."""
    from study.spectrum import spectrum_from_singular_values

    report = spectrum_from_singular_values(singular_values, n_rows=shape[0], n_parameters=shape[1])
    s = report.singular_values
    return {"effective_rank": report.effective_rank, "effective_rank_unfiltered": report.effective_rank_unfiltered,
            "numerical_rank": report.numerical_rank, "cutoff": report.cutoff, "cutoff_rule": report.cutoff_rule,
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
