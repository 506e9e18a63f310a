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

**Precision** (``precision="auto" | "float64" | "mixed"``, for lstsq and ridge; ``result.options``
records what was asked, ``result.extras["precision"]`` what ran). "float64" is the route above.
"mixed" forms the Gram matrix in float32, Â = fl₃₂(J Jᵀ) (dual) or fl₃₂(JᵀJ) (primal), at half
the cost (float32 products run at twice the float64 rate), factors M = Â + λI by a float64
Cholesky of the float32 Gram, and refines in float64 against the system M stands for:

    dual:   A = J Jᵀ + λI,  x = α,  b = r,     A x = J(Jᵀα) + λα,   u = Jᵀα
    primal: A = JᵀJ + λI,   x = u,  b = Jᵀr,   A x = Jᵀ(J u) + λu

    x₀ = M⁻¹ b,   s_k = b − A x_k   (float64 products with the stored J),   x_{k+1} = x_k + M⁻¹ s_k

stopping at the first k with ‖s_k‖ ≤ ε₆₄·β_k (the backward error of float64 working precision) or
with ‖s_k‖ > ½‖s_{k−1}‖ (s₋₁ = b: refinement has stopped contracting), which counts as converged when

    ‖s_k‖ ≤ φ_k = √N·ε₆₄·β_k,    β_k = β + (‖J‖_F² + λ)‖x_k‖,    β = ‖r‖ (dual), ‖J‖_F‖r‖ (primal),

N = max(n·L, p): a normwise backward error of √N·ε₆₄ (‖A‖₂ ≤ ‖J‖_F² + λ). φ_k is the rounding of
evaluating s_k in float64 at all (a float64 dot product of length N errs by about √N·ε₆₄ times the
sum of its terms' sizes; forming u = Jᵀα, J u and Jᵀr adds errors of these sizes), so it is the
float64 route's own standard: its answer's residual is bounded the same way, and below φ_k no float64
evaluation tells the two answers apart. This is LAPACK's refinement: the stopping test of xGERFS
(backward error ≤ ε, or no longer halved) and the acceptance bound of DSPOSV (float32 Cholesky,
float64 refinement, ‖b − A x‖ ≤ √n·ε·‖A‖‖x‖), with the residual computed from J.

The residual contracts by the spectral radius ρ of G = I − A M⁻¹ per step, ρ ≈ ‖E‖₂/ŵ_min with
E = Â − A the float32 Gram's rounding. On the 2,000 × 60,941 LeNet store ‖E‖₂ = 4.2e-9·w_max and
w_min = 1.3e-6·w_max: ρ ≈ 3e-4, and three steps take ‖s‖/‖r‖ from 4e-5 to 3e-12 (a float32
Cholesky of Â contracts by 5e-3 only and needs a step more; a float64 Cholesky of a 2,000 × 2,000
matrix costs 2% of the Gram). Mixed stops and falls back to float64, saying why in
``extras["precision_fallback"]``, when Â + λI is not positive definite, when refinement stops
contracting (or runs out of steps) above φ_k, or when the contraction seen would need more than
``REFINEMENT_MAX_STEPS`` steps to reach φ_k (then the float64 route is faster): float32 does not
resolve A's small eigenvalues.

**The cut-off in mixed precision** (λ = 0). The answer must be the float64 route's pseudo-inverse
solution, which keeps σ_i > τ. The float32 Gram resolves eigenvalues only down to ‖E‖₂ (Weyl:
|ŵ_i − w_i| ≤ ‖E‖₂), while τ² ≈ 1.4e-11·w_max for a 2,000 × 61k J, far below: an eigenvalue of Â
near ‖E‖₂ cannot tell a direction the float64 route keeps (w_i > τ²) from one it drops, and its
eigenvector is not resolved either (Davis–Kahan: angle ≲ ‖E‖₂/gap). So mixed never truncates. It
solves only problems where it can show that the float64 route does not truncate either, and then
both return u = Jᵀ A⁻¹ r (dual; the minimum-norm solution, u ∈ range(Jᵀ) by construction) or
u = A⁻¹ Jᵀ r (primal):

    (i)  ŵ_min > 2τ², with ŵ the eigenvalues of Â (a float64 eigensolver on the float32 Gram) and
         τ the float64 rule evaluated on ŵ;
    (ii) the refinement contracts by ρ̂ ≤ ½ per step. G is similar to I − M^{-½} A M^{-½}, so
         ρ(G) ≤ ½ means ½M ⪯ A ⪯ (3/2)M, hence w_i ≥ ½ŵ_i for every i (Courant–Fischer), and
         w_min ≥ ½ŵ_min > τ²: the float64 route keeps every direction.

ρ̂ is read off the residual ratios ‖s_{k+1}‖/‖s_k‖ (the power method's estimate of ρ(G)). A
direction along which r has no component never shows in them, but α has no component there either,
so keeping or dropping it changes u at rounding level only. A rank-deficient or too ill-conditioned
J (κ(J)² ≳ ‖A‖/‖E‖) fails (i) or (ii) and is solved in float64: a decision, recorded. An explicit
``rcond`` takes part through τ in (i) the same way.

**Singular values.** float64: σ_i² to within the route's floor, ≈ max(n·L, p)·ε₆₄·w_max. mixed:
σ̂_i = √ŵ_i with |ŵ_i − w_i| ≤ ‖E‖₂, and by (ii) w_i ∈ [(1 − ρ̂)ŵ_i, (1 + ρ̂)ŵ_i], so each σ_i to a
relative ½ρ̂ (``extras["refinement_contraction"]``: 2.9e-4 on the store above, where σ̂ agrees
with gelsd's σ to 4.2e-5): the top of the spectrum to float32 rounding, the bottom to about
½‖E‖₂/ŵ_i. Ask for precision="float64" when the smallest singular values are needed to float64
accuracy.

**"auto"** resolves to mixed on the CPU when the Gram matrix's order n = min(n·L, p) is at least
``MIXED_MIN_ORDER``; below it, and on the GPU, float64 (see ``resolve_precision``).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import scipy.linalg

from jacobian_store.device import is_cupy_array, module_for_device, scalar, to_numpy
from jacobian_store.operators import ArrayRowOperator

from .rank import rank_cutoff
from .result import SolveResult, finish

EPS64 = float(np.finfo(np.float64).eps)
FORMS = ("auto", "dual", "primal")
DRIVERS = ("gelsd", "gelsy", "gelss")
PRECISIONS = ("auto", "float64", "mixed")
# "auto" takes mixed precision from this Gram order n = min(n·L, p) on (see resolve_precision).
MIXED_MIN_ORDER = 64
# Refinement steps before falling back to float64: each costs two passes over J; ten steps at
# n = 2,000 (20 passes, ≈ 1.6 s of one thread on the store's J held in float32) cost about half
# of what the float32 Gram saves there (≈ 3.5 s), so a slower refinement is no longer worth it.
REFINEMENT_MAX_STEPS = 10
# The largest contraction per step that test (ii) of the module docstring accepts.
REFINEMENT_MAX_CONTRACTION = 0.5
# Rows of a float32 J held in memory are cast to float64 in blocks of about this size, small
# enough to stay in cache between the cast and the product: a float64 pass over the 2,000 × 60,941
# J took 0.08 s (one thread) in 2 MB blocks, 0.20 s in the 64 MB slices of operators.SLICE_BYTES.
HELD_BLOCK_BYTES = 2 * 2**20


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


def gram_for_form(op, form: str, *, device: str, panel_bytes=None, progress=False, dtype=np.float64):
    if form == "dual":
        return op.gram(dtype, device=device, panel_bytes=panel_bytes, progress=progress)
    return op.normal_matrix(dtype, device=device, progress=progress)


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


def _solve_lstsq(op, r, *, form="auto", driver=None, rcond=None, panel_bytes=None, precision="auto", device="cpu",
                 progress=False) -> SolveResult:
    precision = resolve_precision(precision, op.shape, device, driver=driver)
    if driver is not None:
        return _solve_lstsq_lapack(op, r, driver=driver, rcond=rcond)
    xp = module_for_device(device)
    form = resolve_form(form, op.shape)
    fallback = {}
    if precision == "mixed":
        refined = _solve_mixed(op, r, form, lam=0.0, rcond=rcond, panel_bytes=panel_bytes, progress=progress)
        if refined.u is not None:
            return finish(op, r, refined.u, refined.fitted, method="lstsq", form=form, converged=True,
                          stop_reason=refined.stop_reason, n_iter=refined.steps, extras=refined.extras)
        fallback = refined.fallback_extras()
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
                  stop_reason=_float64_stop_reason(fallback), n_iter=0,
                  extras={**_spectrum_extras(w, keep, rcond, cutoff), "precision": "float64", **fallback})


def _solve_lstsq_lapack(op, r, *, driver, rcond) -> SolveResult:
    if driver not in DRIVERS:
        raise ValueError(f"driver must be one of {', '.join(DRIVERS)} or None (the Gram-matrix path); got {driver!r}")
    J = op.to_dense()
    r_host = to_numpy(r)
    # float64 LAPACK whatever J's dtype: scipy promotes a float32 J to r's float64
    u, _, rank, sv = scipy.linalg.lstsq(J, r_host, cond=rcond, lapack_driver=driver, check_finite=False)
    fitted = J @ u
    extras = {"rank": int(rank), "rcond": rcond if rcond is not None else "LAPACK default (ε of float64)",
              "precision": "float64"}
    if sv is not None:
        extras["singular_values"] = sv
    return finish(op, r_host, u, fitted, method="lstsq", form=driver, converged=True,
                  stop_reason="direct solve (LAPACK)", n_iter=0, extras=extras)


def _solve_ridge(op, r, *, lam, form="auto", factorization="auto", panel_bytes=None, precision="auto", device="cpu",
                 progress=False) -> SolveResult:
    xp = module_for_device(device)
    form = resolve_form(form, op.shape)
    lam = float(lam)
    if factorization not in ("auto", "cholesky", "eigh"):
        raise ValueError(f"factorization must be 'auto', 'cholesky' or 'eigh'; got {factorization!r}")
    precision = resolve_precision(precision, op.shape, device, factorization=factorization)
    fallback = {}
    if precision == "mixed":
        refined = _solve_mixed(op, r, form, lam=lam, rcond=None, panel_bytes=panel_bytes, progress=progress)
        if refined.u is not None:
            return finish(op, r, refined.u, refined.fitted, method="ridge", form=form, converged=True,
                          stop_reason=refined.stop_reason, n_iter=refined.steps,
                          extras={"lambda": lam, "factorization": "cholesky", **refined.extras})
        fallback = refined.fallback_extras()
    # auto: Cholesky for one λ > 0 on the CPU (≈ 1/10 the cost of an eigendecomposition);
    # λ = 0 needs the pseudo-inverse, and CuPy's Cholesky does not report failure, so eigh there.
    if factorization == "auto":
        factorization = "cholesky" if (lam > 0 and xp is np) else "eigh"
    if factorization == "cholesky" and xp is not np:
        raise ValueError("factorization='cholesky' runs on the CPU only; use factorization='eigh' or device='cpu'")
    A = gram_for_form(op, form, device=device, panel_bytes=panel_bytes, progress=progress)
    b = r if form == "dual" else op.rmatvec(r)
    extras = {"lambda": lam, "factorization": factorization, "precision": "float64", **fallback}
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
    return finish(op, r, u, None, method="ridge", form=form, converged=True, stop_reason=_float64_stop_reason(fallback),
                  n_iter=0, extras=extras)


def ridge_path(op, r, lambdas, *, form="auto", panel_bytes=None, precision="auto", device="cpu", progress=False):
    """Ridge solutions for every λ in ``lambdas`` from one eigendecomposition (and one more pass
    over J for all the u's or all the J u's together). Returns a list of SolveResult.

    Always float64: one float64 eigendecomposition serves every λ, where mixed precision would
    refine each λ on its own (two passes over J per step); ``precision="mixed"`` is refused."""
    if precision == "mixed":
        raise ValueError("the ridge path serves every λ from one float64 eigendecomposition; precision='mixed' "
                         "refines one λ at a time: drop precision= or solve each λ with solve(..., 'ridge')")
    resolve_precision(precision, op.shape, device)  # validates the value
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
                   extras={"lambda": lam, "factorization": "eigh", "singular_values": sv, "precision": "float64"})
            for j, lam in enumerate(lambdas)]


# ---- mixed precision: float32 Gram, float64 refinement (module docstring) ------------------------

def resolve_precision(precision: str, shape, device: str, *, driver=None, factorization: str = "auto") -> str:
    """"auto" → "mixed" or "float64" (module docstring); check that an explicit choice can run."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(map(repr, PRECISIONS))}; got {precision!r}")
    if precision == "mixed":
        if driver is not None:
            raise ValueError(f"precision='mixed' is the Gram-matrix route; driver={driver!r} solves J with float64 "
                             f"LAPACK instead: drop driver= or precision=")
        if device != "cpu":
            raise ValueError("precision='mixed' runs on the CPU only (its fallback needs a Cholesky that reports "
                             "failure, which CuPy's does not): use precision='float64' or device='cpu'")
        if factorization == "eigh":
            raise ValueError("precision='mixed' refines with a Cholesky factor of the float32 Gram; "
                             "factorization='eigh' asks for the float64 eigendecomposition: drop one of them")
        return "mixed"
    if precision == "float64" or driver is not None or device != "cpu" or factorization == "eigh":
        return "float64"
    # auto. The float32 Gram halves the cost of the n²·N/2 Gram flops; refinement adds 2·steps
    # passes over J (≈ 3 steps, each pass 2·n·N flops bound by memory traffic) and an eigvalsh in
    # place of the eigh. Measured (one thread, the store's first n rows held in memory), mixed was
    # faster at every order tried: 0.037 s vs 0.041 s at n = 64, 1.26 s vs 2.37 s at n = 1,000,
    # 4.76 s vs 9.74 s at n = 2,000 (OPENBLAS_NUM_THREADS=1 benchmarks/bench_solvers.py
    # --precision-scan --scan-ns 64 256 1000 2000). Below n = 64 both take milliseconds and float64
    # gives the exact spectrum. A J that float32 cannot resolve costs the mixed attempt (its float32
    # Gram and eigvalsh, about half the float64 solve) before the fallback.
    return "mixed" if min(shape) >= MIXED_MIN_ORDER else "float64"


@dataclasses.dataclass
class _Refined:
    """What the mixed route reached: u (None when it fell back, ``reason`` saying why) and its figures."""

    u: object
    fitted: object
    steps: int
    extras: dict
    reason: str | None = None

    @property
    def stop_reason(self) -> str:
        e = self.extras
        return (f"direct solve (float32 Gram, float64 refinement: ‖b − A x‖ = {e['refinement_residual']:.2e}, "
                f"φ = {e['residual_floor']:.2e}, after {self.steps} step{'s' if self.steps > 1 else ''})")

    def fallback_extras(self) -> dict:
        """Extras of the float64 solve that replaced this attempt: why, and what refinement saw."""
        seen = {k: v for k, v in self.extras.items() if k.startswith("refinement_") or k == "residual_floor"}
        return {"precision_fallback": self.reason, **{f"mixed_{k}": v for k, v in seen.items()}}


def _float64_stop_reason(fallback: dict) -> str:
    return "direct solve (float64 after mixed precision fell back)" if fallback else "direct solve"


def _solve_mixed(op, r, form, *, lam, rcond, panel_bytes, progress) -> _Refined:
    """Float32 Gram, float64 Cholesky of it as M, float64 iterative refinement (module docstring)."""
    m, p = op.shape
    work = _held_float32(op)
    A = _float32_gram(work, form, panel_bytes, progress).astype(np.float64)
    fro = float(np.sqrt(max(np.trace(A), 0.0)))  # ‖J‖_F, an upper bound on ‖J‖₂
    extras = {"precision": "mixed", "J_held_float32": work is not op}
    if lam == 0:  # the cut-off test (i): the float64 route must keep every direction
        w = scipy.linalg.eigh(A, eigvals_only=True, driver="evd", check_finite=False)[::-1]
        cutoff = _gram_cutoff(w, op.dtype, rcond, op.shape)
        extras.update(_spectrum_extras(w, w > cutoff ** 2, rcond, cutoff))
        if not w[-1] > 2 * cutoff ** 2:
            return _Refined(None, None, 0, extras, reason=(
                f"the float32 Gram's smallest eigenvalue ŵ_min = {w[-1]:.3g} is not above 2τ² = {2 * cutoff ** 2:.3g} "
                f"(τ = {cutoff:.3g}): float32 cannot show that the float64 cut-off keeps every direction "
                f"(rank-deficient or ill-conditioned J)"))
    A[np.diag_indices_from(A)] += lam
    try:
        factor = scipy.linalg.cho_factor(A, overwrite_a=True, check_finite=False)
    except np.linalg.LinAlgError as err:
        return _Refined(None, None, 0, extras, reason=f"the float32 Gram{' + λI' if lam else ''} is not numerically "
                                                      f"positive definite ({err})")
    del A
    dual = form == "dual"
    b = r if dual else work.rmatvec(r)
    b_norm = float(np.linalg.norm(b))
    x = scipy.linalg.cho_solve(factor, b, check_finite=False)
    root_n_eps = np.sqrt(max(m, p)) * EPS64
    r_norm = float(np.linalg.norm(r))
    history, contraction, previous = [], 0.0, b_norm
    for step in range(1, REFINEMENT_MAX_STEPS + 1):
        u = work.rmatvec(x) if dual else x
        fitted = work.matvec(u)
        # s = b − A x with every product of J in float64
        s = (r - fitted if dual else work.rmatvec(r - fitted)) - lam * x
        s_norm = float(np.linalg.norm(s))
        beta = (r_norm if dual else fro * r_norm) + (fro ** 2 + lam) * float(np.linalg.norm(x))
        floor = root_n_eps * beta  # φ_k: the acceptance bound; EPS64·β_k: working precision
        ratio = s_norm / previous if previous > 0 else 0.0
        history.append(s_norm / b_norm if b_norm > 0 else 0.0)
        extras.update(refinement_steps=step, refinement_residuals=list(history), refinement_residual=s_norm,
                      residual_floor=floor, refinement_contraction=max(contraction, ratio))
        if s_norm <= EPS64 * beta:
            return _Refined(u, fitted, step, extras)
        if ratio > REFINEMENT_MAX_CONTRACTION or step == REFINEMENT_MAX_STEPS:
            if s_norm <= floor:  # no longer contracting, at the rounding of evaluating s: converged
                extras["refinement_contraction"] = contraction
                return _Refined(u, fitted, step, extras)
            why = (f"step {step} reduced ‖b − A x‖ by a factor {ratio:.2g} only (more than "
                   f"{REFINEMENT_MAX_CONTRACTION:g})" if ratio > REFINEMENT_MAX_CONTRACTION else
                   f"REFINEMENT_MAX_STEPS = {REFINEMENT_MAX_STEPS} steps were taken")
            return _Refined(None, None, step, extras, reason=(
                f"refinement {why} at ‖b − A x‖ = {s_norm:.2e} > φ = {floor:.2e}: float32 does not resolve the "
                f"smallest eigenvalues of A"))
        contraction = max(contraction, ratio)
        needed = np.log(floor / s_norm) / np.log(ratio) if s_norm > floor else 0.0
        if step + needed > REFINEMENT_MAX_STEPS:
            return _Refined(None, None, step, extras, reason=(
                f"at the contraction seen ({ratio:.2g} per step) refinement would need about {step + needed:.0f} "
                f"steps to reach φ, more than REFINEMENT_MAX_STEPS = {REFINEMENT_MAX_STEPS}"))
        previous = s_norm
        x = x + scipy.linalg.cho_solve(factor, s, check_finite=False)
    raise AssertionError("unreachable: the step budget is checked inside the loop")


def _held_float32(op):
    """The operator the mixed route reads: a float32 J already in host memory (an array, or a stored
    J that ``solvers.api._held_in_memory`` read once because the planned Gram panel holds all of it),
    cut into row blocks whose float64 working copy stays in cache, since each refinement pass casts
    J block by block; anything else (a streamed store, a Dask cluster, CuPy) as it is."""
    if not (isinstance(op, ArrayRowOperator) and op.J.dtype == np.float32 and not is_cupy_array(op.J)):
        return op
    return ArrayRowOperator(op.J, op.n_outputs, block_rows=max(1, HELD_BLOCK_BYTES // (8 * op.shape[1])))


def _float32_gram(work, form, panel_bytes, progress):
    """Â = fl₃₂(J Jᵀ) (dual) or fl₃₂(JᵀJ) (primal); a float32 J in memory is multiplied by itself at
    once, anything else streams (a float64 J rounded to float32 block by block: Â only preconditions)."""
    if isinstance(work, ArrayRowOperator) and work.J.dtype == np.float32:
        J = work.J
        return J @ J.T if form == "dual" else J.T @ J
    return gram_for_form(work, form, device="cpu", panel_bytes=panel_bytes, progress=progress, dtype=np.float32)

