"""Truncated SVD regularization through a randomized SVD of J (Halko, Martinsson & Tropp 2011).

Range finder with oversampling and subspace (power) iterations, Algorithms 4.4 and 5.1 of HMT:

    Ω ~ N(0, 1)^{p × ℓ}, ℓ = min(k + oversample, n·L, p), drawn from numpy.random.default_rng(seed)
    Q = orth(J Ω);  repeat power_iter times: Q = orth(J orth(Jᵀ Q))
    Bᵀ = Jᵀ Q  (p × ℓ);  Bᵀ = W Σ Zᵀ  (thin SVD)  ⇒  J ≈ Q B = (Q Z) Σ Wᵀ
    U_k = (Q Z)[:, :k],  V_k = W[:, :k],  Σ_k

and the rank-k truncated solution (the rank k is the regularizer)

    u = V_k Σ_k⁻¹ U_kᵀ r,   over the σ_i > τ among the first k,

with the one rank cut-off (``solvers/rank.py``, route "svd"): τ = rcond·σ_1 when ``rcond`` is
given, else τ = max(max(n·L, p)·ε₆₄·σ_1, ε_J·‖σ‖₂) (the float64 SVD of Jᵀ Q, and the storage
rounding of J, ‖σ‖₂ ≤ ‖J‖_F standing in for the Frobenius norm), so
asking for more directions than J has gives the pseudo-inverse rather than a division by noise.
Cost: 2 + 2·power_iter passes over J, plus one more for J u (``extras["passes"]``; each pass
is a product with ℓ columns, which a matrix-free J computes column by column). Memory: Ω, J Ω and Bᵀ, i.e.
about (2p + 2n·L)·ℓ float64 numbers, besides one row block. At k = min(n·L, p) the range finder
spans all of range(J) and u is the minimum-norm least-squares solution. ``rsvd_path`` serves every
rank from one decomposition at the largest.

The randomized SVD needs only ``shape``, ``dtype``, ``matmat`` and ``rmatmat`` of J, so a
``scipy.sparse.linalg.LinearOperator`` or the network's jvp/vjp serve as well as stored rows.
Stop code 0 (a direct solve, ``solvers.result``): there is no iteration to converge, so
``n_iter`` is 0 and "converged" says the solve was done; the sketch's accuracy is set by
``oversample`` and ``power_iter``.
"""
from __future__ import annotations

import numpy as np

from jacobian_store.device import module_for_device, scalar, to_numpy
from .rank import rank_cutoff
from .result import DIRECT, SolverDivergedError, finish


def _orth(Y, xp):
    """An orthonormal basis of range(Y) (thin QR)."""
    Q, _ = xp.linalg.qr(Y)
    return Q


def randomized_svd(op, rank: int, *, oversample: int = 10, power_iter: int = 2, seed: int = 0,
                   device: str = "cpu"):
    """(U_k, σ_k, V_k) of J at rank ``rank``; J ≈ U_k diag(σ_k) V_kᵀ. See the module docstring."""
    xp = module_for_device(device)
    m, p = op.shape
    ell = min(rank + oversample, m, p)
    # Ω is drawn on the host, so a seed gives the same test matrix on every device
    omega = xp.asarray(np.random.default_rng(seed).standard_normal((p, ell)))
    Q = _orth(op.matmat(omega), xp)
    del omega
    for _ in range(power_iter):
        Q = _orth(op.matmat(_orth(op.rmatmat(Q), xp)), xp)
    Bt = op.rmatmat(Q)
    if not bool(xp.isfinite(Bt).all()):  # LAPACK's SVD would only say it "did not converge"
        raise SolverDivergedError("rsvd: J's products returned non-finite values (NaN/Inf) in the range finder; "
                                  "run with check_finite=True (--check-finite) to find the row, or rebuild J")
    W, sigma, Zt = xp.linalg.svd(Bt, full_matrices=False)
    del Bt
    U = Q @ Zt.T
    return U[:, :rank], sigma[:rank], W[:, :rank]


def _cutoff(sigma, op, rcond) -> float:
    # Ω, Q and Bᵀ are float64, so the products with J accumulate in float64 whatever J's dtype
    return rank_cutoff(to_numpy(sigma), op.shape, route="svd", accumulation=np.float64, j_dtype=op.dtype, rcond=rcond)


def _truncated_coefficients(U, sigma, r, cutoff, xp):
    """Σ⁻¹ Uᵀ r on the kept singular values (σ_i > cutoff), 0 elsewhere; and the kept count."""
    keep = (sigma > cutoff) & (sigma > 0)
    return xp.where(keep, (U.T @ r) / xp.where(keep, sigma, 1.0), 0.0), int(scalar(keep.sum()))


def _solve_rsvd(op, r, *, rank, oversample=10, power_iter=2, seed=0, rcond=None, device="cpu",
                progress=False):
    xp = module_for_device(device)
    U, sigma, V = randomized_svd(op, rank, oversample=oversample, power_iter=power_iter, seed=seed, device=device)
    cutoff = _cutoff(sigma, op, rcond)
    coef, kept = _truncated_coefficients(U, sigma, xp.asarray(r), cutoff, xp)
    u = V @ coef
    extras = {"rank": rank, "effective_rank": kept, "singular_values": to_numpy(sigma),
              "rcond": "auto" if rcond is None else rcond, "cutoff": cutoff,
              "oversample": oversample, "power_iter": power_iter, "seed": seed, "passes": _passes(power_iter)}
    return finish(op, r, u, None, method="rsvd", form="randomized", stop_code=DIRECT,
                  stop_reason="direct solve on the randomized SVD", n_iter=0, extras=extras)


def _passes(power_iter: int) -> int:
    """Products with J or Jᵀ: J Ω, 2 per power iteration, Jᵀ Q, and J u."""
    return 2 + 2 * power_iter + 1


def rsvd_path(op, r, ranks, *, oversample=10, power_iter=2, seed=0, rcond=None, device="cpu", progress=False):
    """Truncated-SVD solutions at every rank in ``ranks`` from one randomized SVD at the largest."""
    xp = module_for_device(device)
    ranks = [int(k) for k in ranks]
    U, sigma, V = randomized_svd(op, max(ranks), oversample=oversample, power_iter=power_iter, seed=seed,
                                 device=device)
    cutoff = _cutoff(sigma, op, rcond)
    coef, _ = _truncated_coefficients(U, sigma, xp.asarray(r), cutoff, xp)
    sols = xp.stack([V[:, :k] @ coef[:k] for k in ranks], axis=1)
    F = op.matmat(sols)  # J u for every rank in one pass
    sv = to_numpy(sigma)
    return [finish(op, r, sols[:, j], F[:, j], method="rsvd", form="randomized", stop_code=DIRECT,
                   stop_reason="direct solve (shared randomized SVD)", n_iter=0,
                   extras={"rank": k, "effective_rank": int((sv[:k] > cutoff).sum()), "cutoff": cutoff,
                           "singular_values": sv[:k], "passes": _passes(power_iter)})
            for j, k in enumerate(ranks)]
