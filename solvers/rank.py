"""The one numerical-rank cut-off: which singular values of J count as zero.

Every rank the toolkit reports comes from :func:`rank_cutoff`: ``lstsq`` and ``ridge`` at λ = 0
(``solvers/direct.py``), ``rsvd`` (``solvers/rsvd.py``), ``bin/spectrum`` (``study/spectrum.py``)
and the experiments' spectrum units (``study/experiments/spectra.py``). Its inputs say how the
singular values were computed, so two routes to the same J give the same rank.

Setting: J is m × p (m = n·L), stored in a dtype with machine epsilon ε_J (1.2e-7 for float32),
with singular values σ_1 ≥ σ_2 ≥ … ≥ 0. A computed σ̂ is the exact singular value of a nearby
matrix; by Weyl's inequality, |σ̂_i − σ_i| ≤ ‖δJ‖₂ for J + δJ, and |λ̂_i − λ_i| ≤ ‖δK‖₂ for the
eigenvalues λ_i = σ_i² of K + δK. A σ̂ below the size of the perturbation cannot be told from 0.

- **Storage of J.** Rounding J's entries to its dtype gives |E_ij| ≤ ½ε_J|J_ij|, so
  ‖E‖₂ ≤ ‖E‖_F ≤ ½ε_J‖J‖_F: σ ≤ ε_J·‖J‖_F is indistinguishable from 0 (the factor 2 is margin).
- **Route "gram"**: σ_i = √λ_i(K) with K = J Jᵀ (dual) or JᵀJ (primal) accumulated with unit
  roundoff ε_acc, then a symmetric eigensolver. Each entry of K is a dot product of length p (dual)
  or m (primal), rounded by at most about N·ε_acc relative to |J_i|·|J_j| (Higham, Thm 3.5), and
  the eigensolver is backward stable with an error of order m·ε_acc·‖K‖₂; together
  ‖δK‖₂ ≲ N·ε_acc·σ_1² with N = max(m, p). So λ̂ ≤ N·ε_acc·σ_1² is rounding, i.e.

      τ_route = √(N·ε_acc)·σ_1          (float64: 3.6e-6·σ_1 at N = 60,000)

  The square root is the price of squaring J: K's rounding is read in σ², not σ.
- **Route "svd"**: σ from a backward-stable SVD of J, or of Jᵀ Q in the randomized SVD, in
  precision ε_acc: ‖δJ‖₂ ≲ N·ε_acc·σ_1, so τ_route = N·ε_acc·σ_1 (numpy's ``matrix_rank``
  tolerance when ε_acc = ε_J).

    τ = rcond·σ_1                                   when ``rcond`` is given, else
    τ = max( τ_route ,  ε_J·‖J‖_F ),                ‖J‖_F = (Σ σ_i²)^½

and rank = #{i : σ_i > τ}. ‖J‖_F comes from the singular values (= √trace K on the Gram route),
so a spectrum read back from .npy gets the same τ; from the top-k values of a randomized SVD,
‖σ‖₂ ≤ ‖J‖_F stands in for it.

Why every route accumulates in float64: with ε_acc = ε₃₂ the worst-case bound √(N·ε₃₂)·σ_1 is
0.085·σ_1 at N = 60,000 and 0.85·σ_1 for LeNet×10 (p = 6.1 M), which would measure the bound,
not J. So the Gram matrices of the solvers (``RowBlockOperator.gram``/``normal_matrix``) and of
the spectrum (``jacobian_store.gram``, products of the float32 per-layer pieces taken in float64)
are accumulated in float64, and ``bin/spectrum`` and ``bin/solve --method lstsq`` apply the same
τ to the same J: their ranks agree except for a σ within rounding of τ. Defaults: route "gram",
float64 accumulation, float32 J.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["ROUTES", "rank_cutoff", "describe_rank_cutoff", "machine_epsilon"]

ROUTES = ("gram", "svd")


def machine_epsilon(dtype) -> float:
    """Machine epsilon of a numpy or torch floating dtype or its name (float64's for anything else)."""
    dt = _dtype(dtype)
    return float(np.finfo(dt).eps) if dt.kind == "f" else float(np.finfo(np.float64).eps)


def _dtype(dtype) -> np.dtype:
    """numpy dtype from a numpy/torch dtype or its name ("float32", torch.float32, np.float32)."""
    try:
        return np.dtype(dtype)
    except TypeError:  # a torch dtype
        return np.dtype(str(dtype).replace("torch.", ""))


def rank_cutoff(singular_values, shape, *, route: str = "gram", accumulation="float64", j_dtype="float32",
                rcond: float | None = None) -> float:
    """τ: singular values σ ≤ τ of J count as zero (module docstring).

    singular_values: σ of J in any order (only σ_1 and ‖σ‖₂ are used; empty gives 0).
    shape: (m, p) of J; p may be None when unknown (N = m then).
    route: "gram" (σ = √λ of J Jᵀ or JᵀJ) or "svd" (σ of J or of a sketch of it).
    accumulation: dtype the products were accumulated in; j_dtype: dtype J is stored in.
    rcond: when given, τ = rcond·σ_1 and nothing else.
    """
    if route not in ROUTES:
        raise ValueError(f"route must be one of {', '.join(map(repr, ROUTES))}; got {route!r}")
    s = np.abs(np.asarray(singular_values, dtype=np.float64).ravel())
    if not s.size:
        return 0.0
    if not np.all(np.isfinite(s)):
        raise ValueError("singular values must be finite to choose a rank cut-off")
    sigma_max = float(s.max())
    if rcond is not None:
        return float(rcond) * sigma_max
    n = max(int(d) for d in shape if d is not None)
    eps_acc = machine_epsilon(accumulation)
    route_floor = (math.sqrt(n * eps_acc) if route == "gram" else n * eps_acc) * sigma_max
    return max(route_floor, machine_epsilon(j_dtype) * float(np.linalg.norm(s)))


def describe_rank_cutoff(*, route: str = "gram", accumulation="float64", j_dtype="float32",
                         rcond: float | None = None) -> str:
    """The formula :func:`rank_cutoff` applies, for records and tables."""
    if rcond is not None:
        return f"rcond*sigma_max (rcond={rcond:g})"
    floor = "sqrt(max(m,p)*eps_acc)*sigma_max" if route == "gram" else "max(m,p)*eps_acc*sigma_max"
    return (f"max({floor}, eps_J*|J|_F) (route {route}, eps_acc of {_dtype(accumulation).name}, "
            f"eps_J of {_dtype(j_dtype).name})")

