"""Ridge's λ by generalized cross-validation, and minimum-norm / ridge fits from a Gram matrix alone.

**GCV** (Golub, Heath and Wahba, 1979) picks λ without a validation split: with the hat matrix
H_λ = J(JᵀJ + λI)⁻¹Jᵀ = K(K + λI)⁻¹ (K = J Jᵀ, m = n·L rows),

    GCV(λ) = m ‖(I − H_λ) r‖² / tr(I − H_λ)².

In K's eigenbasis K = V diag(w) Vᵀ, with c = Vᵀ r, (I − H_λ) r has coefficients λ/(w_i + λ)·c_i and
tr(I − H_λ) = Σ_i λ/(w_i + λ) over all m eigenvalues (the zero ones count 1 each). The same two
quantities come without V: (I − H_λ) r = r − J u_λ is the ridge residual, and
tr(I − H_λ) = m − Σ_i w_i/(w_i + λ) needs only the non-zero eigenvalues, which K and JᵀJ share; so
:func:`gcv` serves the dual and the primal form of ``solvers.solve_path(..., "ridge", ...)``
alike, from the eigenvalues of its one shared eigendecomposition and the residual norms.

**Gram-only fits** (:func:`gram_path`): when only K is available (tier 2 of DESIGN.md: J never
stored), the dual coefficients α(λ) with u = Jᵀ α, from one eigendecomposition:

    λ = 0:  α = V_k diag(1/w_k) V_kᵀ r   (the pseudo-inverse with the lstsq cut-off of direct.py)
    λ > 0:  α = V diag(1/(w + λ)) Vᵀ r   (w clipped at 0)
    J u = K α = V diag(w) (coefficients of α),   ‖u‖² = αᵀ K α.

These are ``direct.py``'s dual formulas; predictions on new inputs need K(x, X) α.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .direct import _gram_cutoff, _pinv_coefficients, eigh_descending


def gcv(eigenvalues, n_rows: int, residual_norms, lambdas) -> np.ndarray:
    """GCV(λ) for each λ from the eigenvalues of K (or JᵀJ) and the ridge residual norms ‖r − J u_λ‖.

    Returns +inf where tr(I − H_λ) vanishes (λ = 0 with J of full row rank: the fit interpolates
    and GCV is undefined)."""
    w = np.clip(np.asarray(eigenvalues, dtype=np.float64), 0.0, None)
    lambdas = np.asarray(lambdas, dtype=np.float64)
    res = np.asarray(residual_norms, dtype=np.float64)
    if lambdas.shape != res.shape:
        raise ValueError(f"one residual norm per λ: got {res.size} norms for {lambdas.size} values of λ")
    if np.any(lambdas < 0):
        raise ValueError(f"λ must be ≥ 0, got {lambdas.min()}")
    out = np.full(lambdas.shape, np.inf)
    for j, lam in enumerate(lambdas):
        if lam > 0:
            trace = n_rows - float(np.sum(w / (w + lam)))
        else:
            trace = float(n_rows - np.count_nonzero(w > 0))
        if trace > 0:
            out[j] = n_rows * res[j] ** 2 / trace ** 2
    return out


@dataclass
class GramFit:
    """One fit from K alone: dual coefficients α (u = Jᵀ α), J u, and the numbers of a SolveResult."""

    lam: float
    alpha: np.ndarray
    fitted: np.ndarray
    u_norm: float
    residual_norm: float
    relative_residual: float


@dataclass
class GramPath:
    fits: list[GramFit]
    singular_values: np.ndarray  # √w, descending
    rank: int                    # kept by the lstsq cut-off
    cutoff: float
    gcv: np.ndarray              # GCV(λ) per fit


def gram_path(K, r, lambdas, *, n_parameters: int, dtype=np.float32, rcond: float | None = None) -> GramPath:
    """Minimum-norm (λ = 0) and ridge (λ > 0) fits of J u = r from K = J Jᵀ alone (module docstring).

    ``n_parameters``: p, for the cut-off's rounding floor √(max(m, p)·ε₆₄)·σ_max; ``dtype``: J's
    dtype, for its storage-rounding term ε_J‖J‖_F; ``rcond``: τ = rcond·σ_max instead.
    ``K`` is overwritten (the eigendecomposition works in place)."""
    K = np.asarray(K, dtype=np.float64)
    r = np.asarray(r, dtype=np.float64).reshape(-1)
    m = K.shape[0]
    if K.shape != (m, m) or r.shape != (m,):
        raise ValueError(f"K must be square and r of matching length; got K {K.shape}, r {r.shape}")
    if not (np.isfinite(K).all() and np.isfinite(r).all()):
        raise ValueError("K and r must be finite")
    lambdas = [float(lam) for lam in lambdas]
    if any(lam < 0 for lam in lambdas):
        raise ValueError(f"λ must be ≥ 0, got {min(lambdas)}")
    w, V = eigh_descending(K, np)
    cutoff = _gram_cutoff(w, dtype, rcond, (m, n_parameters))
    c = V.T @ r
    w_clip = np.clip(w, 0.0, None)
    r_norm = max(float(np.linalg.norm(r)), 1e-300)
    fits = []
    for lam in lambdas:
        coef = _pinv_coefficients(w, c, cutoff, np)[0] if lam == 0 else c / (w_clip + lam)
        fitted = V @ (w_clip * coef)
        residual = float(np.linalg.norm(fitted - r))
        fits.append(GramFit(lam=lam, alpha=V @ coef, fitted=fitted,
                            u_norm=float(np.sqrt(np.sum(w_clip * coef ** 2))),  # ‖u‖² = αᵀKα
                            residual_norm=residual, relative_residual=residual / r_norm))
    sigma = np.sqrt(w_clip)
    return GramPath(fits=fits, singular_values=sigma, rank=int(np.count_nonzero(sigma > cutoff)), cutoff=cutoff,
                    gcv=gcv(w_clip[sigma > cutoff], m, [f.residual_norm for f in fits], lambdas))
