"""Direct methods through one float64 Gram matrix: minimum-norm least squares and ridge.

Both work in whichever form is smaller (``form="auto"``):

- dual, when n·L ≤ p: K = J Jᵀ (n·L × n·L), accumulated block pair by block pair; u = Jᵀ α;
- primal, when n·L > p: JᵀJ (p × p), accumulated in one pass; u solves the normal equations.

**lstsq** returns the minimum-norm minimizer of ‖J u − r‖₂ through the eigendecomposition
K = V diag(w) Vᵀ with a cut-off τ on the singular values σ_i = √w_i, so rank deficiency gives the
pseudo-inverse, not garbage:

    keep i  ⇔  σ_i > τ
    dual:   α = V_k diag(1/w_k) V_kᵀ r,   u = Jᵀ α,   J u = V_k V_kᵀ r
    primal: u = V_k diag(1/w_k) V_kᵀ Jᵀ r

    τ = solvers.rank.rank_cutoff(σ, shape, route="gram", j_dtype=J's dtype, rcond=rcond)
      = rcond·σ_max when ``rcond`` is given, else max(√(max(n·L, p)·ε₆₄)·σ_max, ε_J·‖J‖_F)

(the float64 Gram route's rounding and the storage rounding of J; derived in ``solvers/rank.py``,
the one rule every reported rank uses). For a 2,000 × 61,706 float32 J the first term,
≈ 3.7e-6·σ_max, dominates; LAPACK ``gelsd`` on J itself keeps down to ε₆₄·σ_max. The two answers
differ only by the components of u along directions with σ between the two cut-offs: invisible in
J u (those directions carry σ_i·|u_i| ≤ τ·|u_i|) but possibly large in u (|u_i| = |r_i|/σ_i).
``driver="gelsd" | "gelsy" | "gelss"`` instead holds J in memory and calls ``scipy.linalg.lstsq``
(float64 LAPACK, ``cond=rcond``), for checking.

**ridge** returns argmin ‖J u − r‖² + λ‖u‖²:

    dual:   α = (K + λI)⁻¹ r,   u = Jᵀ α,   J u = K α
    primal: u = (JᵀJ + λI)⁻¹ Jᵀ r

by Cholesky (one λ on the CPU), falling back to the eigendecomposition when Cholesky finds the
shifted matrix not positive definite (λ at rounding level of w_max). ``ridge_path`` factors once
(eigendecomposition) and serves every λ: α(λ) = V diag(1/(w + λ)) Vᵀ r, with w clipped at 0.
λ = 0 is the pseudo-inverse above.
"""
from __future__ import annotations

import numpy as np
import scipy.linalg

from jacobian_store.device import module_for_device, scalar, to_numpy
from .rank import rank_cutoff
from .result import SolveResult, finish

FORMS = ("auto", "dual", "primal")
DRIVERS = ("gelsd", "gelsy", "gelss")


def _gram_cutoff(w, dtype, rcond, shape) -> float:
    """τ for the eigenvalues w of the float64 Gram matrix of a J of ``dtype`` (solvers/rank.py)."""
    return rank_cutoff(np.sqrt(np.clip(to_numpy(w), 0.0, None)), shape, route="gram", accumulation=np.float64,
                       j_dtype=dtype, rcond=rcond)


def resolve_form(form: str, shape) -> str:
    """"auto" → the smaller Gram matrix: dual (J Jᵀ) when n·L ≤ p, else primal (JᵀJ)."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {', '.join(FORMS)}; got {form!r}")
    if form == "auto":
        return "dual" if shape[0] <= shape[1] else "primal"
    return form


def gram_for_form(op, form: str, *, device: str, panel_bytes=None, progress=False):
    if form == "dual":
        return op.gram(device=device, panel_bytes=panel_bytes, progress=progress)
    return op.normal_matrix(device=device, progress=progress)


def eigh_descending(A, xp):
    """Eigenvalues (descending) and eigenvectors of the symmetric A; A is overwritten on the CPU."""
    if xp is np:
        # divide and conquer: the fastest LAPACK driver when all eigenvectors are wanted
        # (2,000 × 2,000 here: 5.1 s against 5.9 s for the default "evr")
        w, V = scipy.linalg.eigh(A, overwrite_a=True, check_finite=False, driver="evd")
    else:
        w, V = xp.linalg.eigh(A)
    return w[::-1], V[:, ::-1]


def _spectrum_extras(w, keep, rcond, cutoff) -> dict:
    w_host = to_numpy(w)
    return {
        "singular_values": np.sqrt(np.clip(w_host, 0.0, None)),
        "rank": int(scalar(keep.sum())),
        "rcond": "auto" if rcond is None else rcond,
        "cutoff": cutoff,
        "n_negative_eigenvalues": int((w_host < 0).sum()),
    }


def _pinv_coefficients(w, c, cutoff, xp):
    """c_i / w_i on the kept eigenvalues (√w_i > cutoff), 0 elsewhere; and the kept mask."""
    keep = w > max(cutoff, 0.0) ** 2
    if cutoff <= 0:
        keep &= w > 0
    coef = xp.where(keep, c / xp.where(keep, w, 1.0), 0.0)
    return coef, keep


def _solve_lstsq(op, r, *, form="auto", driver=None, rcond=None, panel_bytes=None, device="cpu",
                 progress=False) -> SolveResult:
    if driver is not None:
        return _solve_lstsq_lapack(op, r, driver=driver, rcond=rcond)
    xp = module_for_device(device)
    form = resolve_form(form, op.shape)
    A = gram_for_form(op, form, device=device, panel_bytes=panel_bytes, progress=progress)
    w, V = eigh_descending(A, xp)
    del A
    cutoff = _gram_cutoff(w, op.dtype, rcond, op.shape)
    if form == "dual":
        coef, keep = _pinv_coefficients(w, V.T @ r, cutoff, xp)
        u = op.rmatvec(V @ coef)
    else:
        coef, keep = _pinv_coefficients(w, V.T @ op.rmatvec(r), cutoff, xp)
        u = V @ coef
    # J u by one more pass (not V_k V_kᵀ r): the residual reported is that of the u returned
    return finish(op, r, u, None, method="lstsq", form=form, converged=True,
                  stop_reason="direct solve", n_iter=0, extras=_spectrum_extras(w, keep, rcond, cutoff))


def _solve_lstsq_lapack(op, r, *, driver, rcond) -> SolveResult:
    if driver not in DRIVERS:
        raise ValueError(f"driver must be one of {', '.join(DRIVERS)} or None (the Gram-matrix path); got {driver!r}")
    J = op.to_dense()
    r_host = to_numpy(r)
    # float64 LAPACK whatever J's dtype: scipy promotes a float32 J to r's float64
    u, _, rank, sv = scipy.linalg.lstsq(J, r_host, cond=rcond, lapack_driver=driver, check_finite=False)
    fitted = J @ u
    extras = {"rank": int(rank), "rcond": rcond if rcond is not None else "LAPACK default (ε of float64)"}
    if sv is not None:
        extras["singular_values"] = sv
    return finish(op, r_host, u, fitted, method="lstsq", form=driver, converged=True,
                  stop_reason="direct solve (LAPACK)", n_iter=0, extras=extras)


def _solve_ridge(op, r, *, lam, form="auto", factorization="auto", panel_bytes=None, device="cpu",
                 progress=False) -> SolveResult:
    xp = module_for_device(device)
    form = resolve_form(form, op.shape)
    lam = float(lam)
    if factorization not in ("auto", "cholesky", "eigh"):
        raise ValueError(f"factorization must be 'auto', 'cholesky' or 'eigh'; got {factorization!r}")
    # auto: Cholesky for one λ > 0 on the CPU (≈ 1/10 the cost of an eigendecomposition);
    # λ = 0 needs the pseudo-inverse, and CuPy's Cholesky does not report failure, so eigh there.
    if factorization == "auto":
        factorization = "cholesky" if (lam > 0 and xp is np) else "eigh"
    if factorization == "cholesky" and xp is not np:
        raise ValueError("factorization='cholesky' runs on the CPU only; use factorization='eigh' or device='cpu'")
    A = gram_for_form(op, form, device=device, panel_bytes=panel_bytes, progress=progress)
    b = r if form == "dual" else op.rmatvec(r)
    extras = {"lambda": lam, "factorization": factorization}
    coef = None
    if factorization == "cholesky":
        A[np.diag_indices_from(A)] += lam
        try:
            coef = scipy.linalg.cho_solve(scipy.linalg.cho_factor(A, check_finite=False), b, check_finite=False)
        except np.linalg.LinAlgError as err:
            # K + λI is not numerically positive definite: λ is at rounding level. Fall back to the
            # eigendecomposition, where negative rounding eigenvalues are clipped to 0.
            extras["factorization"] = f"eigh (cholesky failed: {err})"
        A[np.diag_indices_from(A)] -= lam
    if coef is None:
        w, V = eigh_descending(A, xp)
        if lam > 0:
            coef = V @ ((V.T @ b) / (xp.clip(w, 0.0, None) + lam))
        else:
            cutoff = _gram_cutoff(w, op.dtype, None, op.shape)
            c, _ = _pinv_coefficients(w, V.T @ b, cutoff, xp)
            coef = V @ c
            extras["cutoff"] = cutoff
        extras["singular_values"] = np.sqrt(np.clip(to_numpy(w), 0.0, None))
    del A
    u = op.rmatvec(coef) if form == "dual" else coef
    return finish(op, r, u, None, method="ridge", form=form, converged=True, stop_reason="direct solve",
                  n_iter=0, extras=extras)


def ridge_path(op, r, lambdas, *, form="auto", panel_bytes=None, device="cpu", progress=False):
    """Ridge solutions for every λ in ``lambdas`` from one eigendecomposition (and one more pass
    over J for all the u's or all the J u's together). Returns a list of SolveResult."""
    xp = module_for_device(device)
    form = resolve_form(form, op.shape)
    lambdas = [float(lam) for lam in lambdas]
    A = gram_for_form(op, form, device=device, panel_bytes=panel_bytes, progress=progress)
    w, V = eigh_descending(A, xp)
    del A
    b = r if form == "dual" else op.rmatvec(r)
    c = V.T @ b
    w_clip = xp.clip(w, 0.0, None)
    cutoff = _gram_cutoff(w, op.dtype, None, op.shape)
    coefs = []
    for lam in lambdas:
        coefs.append(_pinv_coefficients(w, c, cutoff, xp)[0] if lam == 0 else c / (w_clip + lam))
    C = xp.stack(coefs, axis=1)  # eigen-coefficients, one column per λ
    U = op.rmatmat(V @ C) if form == "dual" else V @ C  # u(λ) = Jᵀ α(λ): every λ in one pass
    F = op.matmat(U)                                     # J u(λ): every λ in one more pass
    sv = np.sqrt(to_numpy(w_clip))
    return [finish(op, r, U[:, j], F[:, j], method="ridge", form=form, converged=True,
                   stop_reason="direct solve (shared eigendecomposition)", n_iter=0,
                   extras={"lambda": lam, "factorization": "eigh", "singular_values": sv})
            for j, lam in enumerate(lambdas)]
