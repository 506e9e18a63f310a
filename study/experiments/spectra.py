"""Summary figures of a Jacobian's singular values, as the spectrum units record them.

Effective rank (Roy and Vetterli, over the σ above the cut-off), numerical rank and condition
number (over the kept σ) are computed by ``study.spectrum`` with the one rank cut-off of
``solvers/rank.py`` (route "gram", K accumulated in float64, float32 J)

    τ = max( √(max(n·L, p)·ε₆₄)·σ_1 ,  ε₃₂·‖J‖_F ),

the same τ as ``bin/spectrum`` and the lstsq solver, so the rank reported is the rank the exact
solver sees. The stable rank ‖J‖_F² / ‖J‖_2² = Σσ²/σ_1² needs no cut-off.
"""
from __future__ import annotations

import numpy as np


def spectrum_metrics(singular_values, shape: tuple[int, int]) -> dict:
    """The summaries of ``study.spectrum`` for the singular values of a J of ``shape`` (n·L, p)."""
    from solvers.rank import describe_rank_cutoff
    from study.spectrum import spectrum_from_singular_values

    report = spectrum_from_singular_values(singular_values, n_rows=shape[0], n_parameters=shape[1],
                                           cutoff=singular_value_cutoff(singular_values, shape))
    s = report.singular_values
    return {"effective_rank": report.effective_rank, "effective_rank_unfiltered": report.effective_rank_unfiltered,
            "numerical_rank": report.numerical_rank, "cutoff": report.cutoff,
            "cutoff_rule": describe_rank_cutoff(),
            "condition_number": report.condition_number,
            "stable_rank": float((s ** 2).sum() / report.sigma_max ** 2) if report.sigma_max > 0 else 0.0,
            "sigma_max": report.sigma_max, "sigma_min": report.sigma_min, "n_singular_values": int(s.size)}


def singular_value_cutoff(singular_values, shape: tuple[int, int], j_dtype=np.float32) -> float:
    """τ of ``solvers.rank.rank_cutoff`` for σ computed through a float64 Gram matrix of a J of ``j_dtype``."""
    from solvers.rank import rank_cutoff

    return rank_cutoff(singular_values, shape, route="gram", accumulation=np.float64, j_dtype=j_dtype)
