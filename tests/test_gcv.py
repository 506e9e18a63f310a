"""GCV and the Gram-only fits of solvers/gcv.py against brute-force formulas and solvers.solve."""
from __future__ import annotations

import numpy as np
import pytest

from solvers import solve, solve_path
from solvers.gcv import gcv, gram_path


def problem(m, p, rank=None, seed=0):
    rng = np.random.default_rng(seed)
    J = rng.standard_normal((m, p))
    if rank is not None:  # rank-deficient: J = A B with inner dimension `rank`
        J = rng.standard_normal((m, rank)) @ rng.standard_normal((rank, p)) / np.sqrt(rank)
    return J, rng.standard_normal(m)


def brute_gcv(J, r, lam):
    K = J @ J.T
    m = K.shape[0]
    I_minus_H = np.eye(m) - K @ np.linalg.inv(K + lam * np.eye(m))
    return m * np.sum((I_minus_H @ r) ** 2) / np.trace(I_minus_H) ** 2


@pytest.mark.parametrize("m, p, rank", [(30, 50, None), (30, 50, 12), (60, 20, None)])  # dual, deficient, primal
def test_gcv_from_the_ridge_path_matches_the_hat_matrix(m, p, rank):
    J, r = problem(m, p, rank)
    lambdas = [1e-3, 1e-1, 1.0, 10.0, 1e3]
    path = solve_path(J, r, "ridge", lambdas, device="cpu")
    sigma = path[0].extras["singular_values"]
    w = sigma[sigma > 1e-8 * sigma[0]] ** 2
    got = gcv(w, m, [res.residual_norm for res in path], lambdas)
    want = [brute_gcv(J, r, lam) for lam in lambdas]
    # both in float64 from an eigendecomposition / an inverse of a matrix with condition ≤ 1e6: 1e-8 relative
    np.testing.assert_allclose(got, want, rtol=1e-8)


def test_gcv_in_the_eigenbasis_of_K():
    # (I − H_λ) r has coefficients λ/(w_i + λ)·c_i in K's eigenbasis; tr(I − H_λ) = Σ λ/(w_i + λ)
    J, r = problem(25, 40, 10)
    w, V = np.linalg.eigh(J @ J.T)
    w = np.clip(w, 0, None)
    c = V.T @ r
    for lam in (1e-2, 1.0, 30.0):
        eigen = 25 * np.sum((lam / (w + lam) * c) ** 2) / np.sum(lam / (w + lam)) ** 2
        assert np.isclose(eigen, brute_gcv(J, r, lam), rtol=1e-8)


def test_gcv_is_infinite_at_interpolation_and_checks_its_input():
    assert gcv([4.0, 1.0], 2, [0.0], [0.0])[0] == np.inf  # λ = 0, full row rank: tr(I − H) = 0
    assert np.isfinite(gcv([4.0, 1.0], 3, [0.5], [0.0])[0])  # one row more than the rank
    with pytest.raises(ValueError, match="one residual norm per λ"):
        gcv([1.0], 2, [1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="λ must be ≥ 0"):
        gcv([1.0], 2, [1.0], [-1.0])


@pytest.mark.parametrize("rank", [None, 12])
def test_gram_path_matches_lstsq_and_ridge_on_J(rank):
    J, r = problem(30, 50, rank)
    lambdas = [0.0, 0.1, 10.0]
    path = gram_path(J @ J.T, r, lambdas, n_parameters=50, dtype=np.float64)
    lstsq = solve(J, r, "lstsq", device="cpu")
    assert path.rank == lstsq.extras["rank"] and np.isclose(path.cutoff, lstsq.extras["cutoff"])
    for fit in path.fits:
        ref = lstsq if fit.lam == 0 else solve(J, r, "ridge", lam=fit.lam, device="cpu")
        # u = Jᵀ α; agreement to rounding of two float64 factorizations of a matrix with condition ≤ 1e4
        np.testing.assert_allclose(J.T @ fit.alpha, ref.u, rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(fit.fitted, J @ ref.u, rtol=1e-7, atol=1e-9)
        assert np.isclose(fit.u_norm, ref.u_norm, rtol=1e-7)
        assert np.isclose(fit.residual_norm, ref.residual_norm, rtol=1e-6, atol=1e-9)
    assert path.gcv[0] == np.inf if rank is None else np.isfinite(path.gcv[0])
    assert np.isclose(path.gcv[1], brute_gcv(J, r, 0.1), rtol=1e-7)


def test_gram_path_refuses_bad_input():
    with pytest.raises(ValueError, match="square"):
        gram_path(np.ones((2, 3)), np.ones(2), [0.0], n_parameters=3)
    with pytest.raises(ValueError, match="finite"):
        gram_path(np.full((2, 2), np.nan), np.ones(2), [0.0], n_parameters=3)
