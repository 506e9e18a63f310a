"""Conjugate gradients on the normal equations JᵀJ u = Jᵀ r, in CGLS form.

CGLS (Hestenes–Stiefel; Björck, *Numerical Methods for Least Squares Problems*, §7.4) never forms
JᵀJ: each iteration costs one product J p and one product Jᵀ s, i.e. two passes over the stored
rows, and it carries the residual ρ_k = r − J u_k itself, so ‖J u − r‖ is monitored exactly (up to
rounding) at no extra cost. From u₀ = 0 (or a warm start u₀):

    ρ₀ = r − J u₀,  s₀ = Jᵀ ρ₀,  d₀ = s₀,  γ₀ = ‖s₀‖²
    q_k = J d_k,  a_k = γ_k / ‖q_k‖²
    u_{k+1} = u_k + a_k d_k,  ρ_{k+1} = ρ_k − a_k q_k          # these satisfy ρ = r − J u
    s_{k+1} = Jᵀ ρ_{k+1},  γ_{k+1} = ‖s_{k+1}‖²,  d_{k+1} = s_{k+1} + (γ_{k+1}/γ_k) d_k

Stopping rule, checked after every iteration k = 1, 2, …, ``maxiter`` (stop codes of
``solvers.result``):

    ‖ρ_k‖ ≤ tol · ‖r‖                            → 1 residual tolerance        (consistent systems)
    ‖Jᵀ ρ_k‖ ≤ normal_tol · ‖J‖ · ‖ρ_k‖           → 2 least-squares optimality  (LSQR's test 2:
                                                     ρ is orthogonal to range(J) up to normal_tol)
    k = maxiter                                   → 3 iteration limit: not converged (a warning
                                                     names the knobs)
    a non-finite ρ, Jᵀρ or u                      → SolverDivergedError (no result)

‖J‖ is the running lower bound max_k ‖q_k‖ / ‖d_k‖ ≤ σ_max(J), so the second test is, if anything,
stricter than with the true norm. From u₀ = 0 every iterate lies in range(Jᵀ), so CGLS converges
to the minimum-norm least-squares solution; stopping it early is the regularizer (the iterates
follow the Krylov filter of the spectrum, large singular values first). The iterate count is the
knob; ``cg_path`` records u at requested iteration counts from one run.

CGLS needs only ``shape``, ``matvec`` and ``rmatvec`` (``matmat`` for a path's J u), so J may be
stored rows, an array, a ``scipy.sparse.linalg.LinearOperator`` or the network itself
(``jacobian_store.matrix_free.NetworkJacobian``: jvp and vjp). The array module follows the data:
with a CuPy right-hand side (``device="cuda"``) every vector lives on the GPU.
"""
from __future__ import annotations

import warnings

import numpy as np

from jacobian_store.device import module_for_device, scalar
from jacobian_store.progress import progress_bar
from .result import (ITERATION_LIMIT, KNOB_REACHED, LSQ_OPTIMALITY, RESIDUAL_TOLERANCE, STOP_REASONS,
                     SolverDivergedError, finish)


class ConvergenceWarning(UserWarning):
    """An iterative solver stopped at its iteration limit."""


def cgls(op, r, *, x0=None, maxiter=None, tol=1e-6, normal_tol=1e-10, device="cpu", record_at=(),
         progress=False):
    """Run CGLS; return (u, ρ, info dict, {iteration: u snapshot}). See the module docstring."""
    xp = module_for_device(device)
    m, p = op.shape
    maxiter = 2 * min(m, p) if maxiter is None else int(maxiter)  # LSQR's default limit
    record_at = sorted(set(int(k) for k in record_at))
    b = xp.asarray(r, dtype=np.float64)
    b_norm = scalar(xp.linalg.norm(b))
    if x0 is None:
        u = xp.zeros(p, dtype=np.float64)
        rho = b.copy()
    else:
        u = xp.array(x0, dtype=np.float64)  # a copy: the caller's warm start is not mutated
        rho = b - op.matvec(u)
    s = op.rmatvec(rho)
    d = s.copy()
    gamma = scalar(s @ s)
    j_norm = 0.0
    rho_norm = scalar(xp.linalg.norm(rho))
    history = [rho_norm]
    snapshots = {0: u.copy()} if 0 in record_at else {}
    code, k = ITERATION_LIMIT, 0
    if rho_norm <= tol * b_norm:
        code = RESIDUAL_TOLERANCE
        maxiter = 0  # nothing to do: u₀ already fits
    _check_finite_iterate(rho_norm, gamma, 0, maxiter, tol)
    bar = progress_bar(total=maxiter, desc="CGLS", unit="it", enabled=progress)
    while k < maxiter:
        q = op.matvec(d)
        q_norm2 = scalar(q @ q)
        if q_norm2 == 0.0:  # d ∈ null(J) only when s = Jᵀρ = 0: u is already optimal
            code = LSQ_OPTIMALITY
            break
        j_norm = max(j_norm, np.sqrt(q_norm2) / scalar(xp.linalg.norm(d)))
        a = gamma / q_norm2
        u += a * d
        rho -= a * q
        s = op.rmatvec(rho)
        gamma_new = scalar(s @ s)
        k += 1
        rho_norm = scalar(xp.linalg.norm(rho))
        _check_finite_iterate(rho_norm, gamma_new, k, maxiter, tol)
        history.append(rho_norm)
        bar.update(1)
        if k in record_at:
            snapshots[k] = u.copy()
        if rho_norm <= tol * b_norm:
            code = RESIDUAL_TOLERANCE
            break
        if np.sqrt(gamma_new) <= normal_tol * j_norm * rho_norm:
            code = LSQ_OPTIMALITY
            break
        d = s + (gamma_new / gamma) * d
        gamma = gamma_new
    bar.close()
    for kk in record_at:  # stopped early: later requested counts equal the final iterate
        if kk not in snapshots and kk >= k:
            snapshots[kk] = u.copy()
    stop = STOP_REASONS[code] + (f" (maxiter={maxiter})" if code == ITERATION_LIMIT else "")
    info = {"converged": code != ITERATION_LIMIT, "stop_code": code, "stop_reason": stop, "n_iter": k,
            "residual_history": history,
            "normal_residual_norm": float(np.sqrt(gamma_new if k else gamma)), "j_norm_estimate": j_norm,
            "tol": tol, "normal_tol": normal_tol, "maxiter": maxiter}
    return u, rho, info, snapshots


def _check_finite_iterate(rho_norm, gamma, k, maxiter, tol):
    """Raise when CGLS met a non-finite value: from finite J and r it cannot (ρ only shrinks), so
    J's products themselves returned NaN/Inf."""
    if not (np.isfinite(rho_norm) and np.isfinite(gamma)):
        raise SolverDivergedError(
            f"cg diverged at iteration {k}: ‖r − J u‖ = {rho_norm}, ‖Jᵀ(r − J u)‖² = {gamma} (non-finite). CGLS "
            f"cannot diverge on finite J and r, so J's products returned NaN/Inf: run with check_finite=True "
            f"(--check-finite) to find the row, or rebuild J; maxiter={maxiter}, tol={tol} are not the cause")


def _solve_cg(op, r, *, maxiter=None, tol=1e-6, normal_tol=1e-10, x0=None, device="cpu", progress=False):
    xp = module_for_device(device)
    u, rho, info, _ = cgls(op, r, x0=x0, maxiter=maxiter, tol=tol, normal_tol=normal_tol, device=device,
                           progress=progress)
    if not info["converged"]:
        warnings.warn(f"cg stopped without converging: {info['stop_reason']}; relative residual "
                      f"{info['residual_history'][-1] / max(scalar(xp.linalg.norm(xp.asarray(r))), 1e-300):.3e}. "
                      f"Try increasing maxiter or tol. Currently: maxiter={info['maxiter']}, tol={tol}, "
                      f"normal_tol={normal_tol}", ConvergenceWarning, stacklevel=3)
    fitted = xp.asarray(r, dtype=np.float64) - rho  # ρ = r − J u, carried by the recurrence
    extras = {k: info[k] for k in ("residual_history", "normal_residual_norm", "j_norm_estimate", "tol", "normal_tol")}
    extras["warm_start"] = x0 is not None
    return finish(op, r, u, fitted, method="cg", form="cgls", stop_code=info["stop_code"],
                  stop_reason=info["stop_reason"], n_iter=info["n_iter"], extras=extras)


def cg_path(op, r, iterations, *, tol=0.0, normal_tol=0.0, x0=None, device="cpu", progress=False):
    """CGLS iterates at each requested iteration count, from one run (tolerances off by default,
    so every count is reached unless the normal equations are solved exactly)."""
    iterations = [int(k) for k in iterations]
    u, _, info, snaps = cgls(op, r, x0=x0, maxiter=max(iterations), tol=tol, normal_tol=normal_tol,
                             device=device, record_at=iterations, progress=progress)
    U = [snaps[k] for k in iterations]
    xp = module_for_device(device)
    F = op.matmat(xp.stack(U, axis=1))  # J u for every recorded iterate in one pass
    out = []
    for j, k in enumerate(iterations):
        # a count the run reached is the knob's value (code 4); a later one equals the final iterate,
        # which stopped by its own rule (1 or 2: the tolerances held there)
        reached = min(k, info["n_iter"])
        if reached == k:
            code, why = KNOB_REACHED, f"requested iteration count reached ({k})"
        else:
            code, why = info["stop_code"], f"run ended at iteration {info['n_iter']}: {info['stop_reason']}"
        out.append(finish(op, r, U[j], F[:, j], method="cg", form="cgls", stop_code=code, stop_reason=why,
                          n_iter=reached, extras={"iterations": k}))
    return out
