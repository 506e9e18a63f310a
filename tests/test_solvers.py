"""Solvers: known answers, out-of-core = in-memory, paths, invariances, the SGD convention, bad input.

Known-answer problems are built from a chosen SVD, J = U diag(σ) Vᵀ, so the minimum-norm solution
V diag(1/σ) Uᵀ r and the ridge solution are known; references are scipy's LAPACK solvers on the
float64 matrix.
"""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import scipy.linalg
import torch

from conftest import DEVICES
from solvers import (METHOD_OPTIONS, ArrayRowOperator, ConvergenceWarning, MemoryLimitError, RowBlockOperator,
                     SolveResult, as_row_operator, solve, solve_path)
from solvers.minibatches import minibatches, step_learning_rate

# ---- tolerance table -------------------------------------------------------------------------
# Relative error ‖u − u_ref‖ / ‖u_ref‖ allowed, per method and storage dtype of J. Every method
# computes in float64 whatever J's dtype (float32 entries are exact in float64 and products are
# accumulated in float64), and the reference runs on J.astype(float64), the same matrix; so the
# float32 rows equal the float64 rows. The test problems have condition number κ(J) ≤ 1e2.
TOL = {
    # Gram route squares the condition number: error ≈ κ² · m · ε₆₄ ≈ 1e4 · 1e2 · 2e-16 ≈ 2e-10.
    ("lstsq", "float64"): 1e-9, ("lstsq", "float32"): 1e-9,
    # Cholesky/eigh of K + λI with λ ≥ 0.1·σ_min²: better conditioned than lstsq.
    ("ridge", "float64"): 1e-9, ("ridge", "float32"): 1e-9,
    # Randomized SVD at full rank is an exact SVD of Qᵀ J (Q spans range(J)): QR + SVD rounding, κ·ε.
    ("rsvd", "float64"): 1e-10, ("rsvd", "float32"): 1e-10,
    # CGLS stopped at ‖ρ‖ ≤ 1e-12‖r‖ or ‖Jᵀρ‖ ≤ 1e-12‖J‖‖ρ‖: u error ≤ κ² · 1e-12 = 1e-8, plus
    # the loss of orthogonality of the recurrences (the tests give it up to 3·min(m, p) steps).
    ("cg", "float64"): 1e-7, ("cg", "float32"): 1e-7,
    # Full-batch momentum SGD converges linearly to the ridge point with λ = n·wd; after the
    # epochs given, the contraction leaves < 1e-8 (checked, not a rounding bound).
    ("sgd", "float64"): 1e-7, ("sgd", "float32"): 1e-7,
}
DTYPES = ["float64", "float32"]
SHAPES = {"wide": (24, 40), "long": (40, 24)}


def rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / max(np.linalg.norm(b), 1e-300))


def known_problem(kind: str, rank_deficient: bool, dtype: str = "float64", seed: int = 0):
    """J (m × p) from a chosen SVD, singular values spread over [1, 100], and r.

    Rank-deficient: 5 rows (wide) or 5 columns (long) are exact copies of others times −2 or ½,
    so the rank is min(m, p) − 5 exactly in every dtype (no rounding noise fills the null space).
    """
    m, p = SHAPES[kind]
    rng = np.random.default_rng(seed)
    drop = 5 if rank_deficient else 0
    mb, pb = (m - drop, p) if kind == "wide" else (m, p - drop)
    k = min(mb, pb)
    U, _ = np.linalg.qr(rng.standard_normal((mb, k)))
    V, _ = np.linalg.qr(rng.standard_normal((pb, k)))
    J = ((U * np.geomspace(100.0, 1.0, k)) @ V.T).astype(dtype)
    if kind == "wide":
        J = np.vstack([J, -2 * J[:drop]])
    else:
        J = np.hstack([J, 0.5 * J[:, :drop]])
    r = rng.standard_normal(m)
    return J, r


def min_norm(J, r):
    return scipy.linalg.lstsq(J.astype(np.float64), r, lapack_driver="gelsd")[0]


def ridge_reference(J, r, lam):
    """The augmented system [J; √λ I] u ≈ [r; 0], solved by scipy's lstsq."""
    p = J.shape[1]
    A = np.vstack([J.astype(np.float64), np.sqrt(lam) * np.eye(p)])
    return scipy.linalg.lstsq(A, np.concatenate([r, np.zeros(p)]))[0]


class H5Rows(RowBlockOperator):
    """The protocol at its smallest: only ``row_blocks`` and ``take_rows``, over an h5py dataset."""

    def __init__(self, dataset, n_outputs=1):
        self.ds, self.shape, self.dtype, self.n_outputs = dataset, dataset.shape, dataset.dtype, n_outputs
        self.blocks_read = 0

    def row_blocks(self):
        step = self.ds.chunks[0]
        for start in range(0, self.shape[0], step):
            self.blocks_read += 1
            yield start, self.ds[start:start + step]

    def take_rows(self, rows):
        unique, inverse = np.unique(np.asarray(rows), return_inverse=True)  # h5py wants increasing rows
        return self.ds[unique][inverse]


@pytest.fixture
def h5_operator(tmp_path):
    """Write J to an HDF5 file chunked by ``chunk_rows`` rows; yields a factory of H5Rows."""
    files = []

    def make(J, chunk_rows=7, n_outputs=1):
        f = h5py.File(tmp_path / f"J{len(files)}.h5", "w")
        files.append(f)
        ds = f.create_dataset("J", data=J, chunks=(min(chunk_rows, J.shape[0]), J.shape[1]))
        return H5Rows(ds, n_outputs)

    yield make
    for f in files:
        f.close()


# ---- the operator protocol ---------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_operator_products_match_dense(h5_operator, dtype):
    rng = np.random.default_rng(1)
    J = rng.standard_normal((31, 17)).astype(dtype)
    J64 = J.astype(np.float64)
    u, v = rng.standard_normal(17), rng.standard_normal(31)
    U, V = rng.standard_normal((17, 3)), rng.standard_normal((31, 3))
    for op in (h5_operator(J, chunk_rows=5), ArrayRowOperator(J, block_rows=4), as_row_operator(J)):
        np.testing.assert_allclose(op.matvec(u), J64 @ u, rtol=1e-12)
        np.testing.assert_allclose(op.rmatvec(v), J64.T @ v, rtol=1e-12)
        np.testing.assert_allclose(op.matmat(U), J64 @ U, rtol=1e-12)
        np.testing.assert_allclose(op.rmatmat(V), J64.T @ V, rtol=1e-12)
        np.testing.assert_allclose(op.normal_matrix(), J64.T @ J64, rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(op.to_dense(), J)
        np.testing.assert_allclose(op.as_linear_operator() @ u, J64 @ u, rtol=1e-12)
        rows = np.array([30, 2, 2, 11])
        np.testing.assert_array_equal(op.take_rows(rows), J[rows])
        assert op.gram().dtype == np.float64


@pytest.mark.parametrize("panel_rows", [1, 3, 5, 8, 31, 100])
def test_gram_panels_cover_every_block_pair(h5_operator, panel_rows):
    """Panels that start mid-block, span blocks, or hold all of J give the same K, in float64."""
    rng = np.random.default_rng(2)
    J = rng.standard_normal((31, 17)).astype(np.float32)
    op = h5_operator(J, chunk_rows=5)
    K = op.gram(panel_bytes=panel_rows * 17 * 8)
    J64 = J.astype(np.float64)
    np.testing.assert_allclose(K, J64 @ J64.T, rtol=1e-13, atol=1e-12)
    np.testing.assert_array_equal(K, K.T)


def test_gram_reads_from_panel_start_when_operator_can_seek():
    op = ArrayRowOperator(np.ones((20, 3)), block_rows=4)
    assert [s for s, _ in op.row_blocks_from(9)] == [8, 12, 16]


def test_check_finite_names_first_bad_row(h5_operator):
    J = np.ones((12, 5), np.float32)
    J[9, 3] = np.inf
    J[10, 0] = np.nan
    with pytest.raises(ValueError, match=r"row 9 \(sample 4, output 1\), column 3"):
        h5_operator(J, chunk_rows=4, n_outputs=2).check_finite()
    J[9, :3] = -np.inf  # +Inf and −Inf in one row sum to NaN: still found, at its first column
    with pytest.raises(ValueError, match=r"non-finite value \(-inf\) in row 9 .*column 0"):
        ArrayRowOperator(J, n_outputs=2).check_finite()


def test_check_finite_accepts_finite_rows_whose_sum_overflows():
    """The check sums rows in J's dtype; a finite row beyond float32's range overflows that sum to
    Inf, which must not be taken for an Inf entry."""
    J = np.ones((6, 4), np.float32)
    J[2] = np.finfo(np.float32).max
    J[3, 1:] = [np.finfo(np.float32).max, -np.finfo(np.float32).max, np.finfo(np.float32).max]
    assert not np.isfinite(J @ np.ones(4, np.float32))[2]
    ArrayRowOperator(J).check_finite()
    J[3, 0] = np.nan
    with pytest.raises(ValueError, match=r"row 3 \(sample 3, output 0\), column 0"):
        ArrayRowOperator(J).check_finite()


def test_as_row_operator_rejects_what_it_cannot_use():
    with pytest.raises(TypeError, match="RowBlockOperator"):
        as_row_operator([[1.0, 2.0]])
    with pytest.raises(ValueError, match="not a multiple of n_outputs=4"):
        ArrayRowOperator(np.ones((6, 2)), n_outputs=4)
    op = ArrayRowOperator(np.ones((6, 2)), n_outputs=3)
    with pytest.raises(ValueError, match="disagrees"):
        as_row_operator(op, n_outputs=2)
    with pytest.raises(ValueError, match="expected shape"):
        op.matvec(np.ones(3))


# ---- known answers -----------------------------------------------------------------------------

CASES = [(kind, deficient, dtype) for kind in SHAPES for deficient in (False, True) for dtype in DTYPES]
CASE_IDS = [f"{k}-{'deficient' if d else 'full'}-{t}" for k, d, t in CASES]


@pytest.mark.parametrize("kind,deficient,dtype", CASES, ids=CASE_IDS)
def test_lstsq_is_minimum_norm_least_squares(kind, deficient, dtype):
    J, r = known_problem(kind, deficient, dtype)
    ref = min_norm(J, r)
    for form in ("auto", "dual", "primal"):
        res = solve(J, r, "lstsq", form=form)
        assert rel(res.u, ref) < TOL[("lstsq", dtype)], form
        assert res.extras["rank"] == min(J.shape) - 5 * deficient
    for driver in ("gelsd", "gelsy"):
        res = solve(J, r, "lstsq", driver=driver)
        assert res.form == driver and rel(res.u, ref) < TOL[("lstsq", dtype)]
    assert res.converged and res.stop_reason.startswith("direct")


@pytest.mark.parametrize("kind,deficient,dtype", CASES, ids=CASE_IDS)
def test_ridge_equals_augmented_system(kind, deficient, dtype):
    J, r = known_problem(kind, deficient, dtype)
    for lam in (0.1, 3.0, 1e3):
        ref = ridge_reference(J, r, lam)
        for form in ("dual", "primal"):
            for factorization in ("cholesky", "eigh"):
                res = solve(J, r, "ridge", lam=lam, form=form, factorization=factorization)
                assert rel(res.u, ref) < TOL[("ridge", dtype)], (lam, form, factorization)
                assert res.extras["lambda"] == lam
    assert rel(solve(J, r, "ridge", lam=0.0).u, min_norm(J, r)) < TOL[("lstsq", dtype)]


@pytest.mark.parametrize("kind,deficient,dtype", CASES, ids=CASE_IDS)
def test_rsvd_at_full_rank_is_lstsq_and_its_singular_values_are_svds(kind, deficient, dtype):
    J, r = known_problem(kind, deficient, dtype)
    k = min(J.shape)
    res = solve(J, r, "rsvd", rank=k, seed=3)
    assert rel(res.u, min_norm(J, r)) < TOL[("rsvd", dtype)]
    sv = scipy.linalg.svd(J.astype(np.float64), compute_uv=False)
    np.testing.assert_allclose(res.extras["singular_values"], sv, rtol=1e-12, atol=1e-12 * sv[0])
    assert res.extras["effective_rank"] == k - 5 * deficient


def test_rsvd_at_rank_k_is_the_truncated_svd_solution():
    J, r = known_problem("wide", False)
    U, s, Vt = scipy.linalg.svd(J, full_matrices=False)
    for k in (3, 10):
        ref = Vt[:k].T @ ((U[:, :k].T @ r) / s[:k])
        # σ_{k+11}/σ_k ≈ 0.1 on this spectrum: q power iterations leave ≈ 0.1^(2q+1) = 1e-13 at q = 6
        assert rel(solve(J, r, "rsvd", rank=k, power_iter=6).u, ref) < 1e-9


def test_default_cutoff_drops_the_storage_rounding_of_a_float32_J():
    """A rank-deficient J rounded to float32 gains singular values ≈ ε₃₂·σ_max in its null space.
    LAPACK's default cut-off (ε₆₄·σ_max) inverts them (‖u‖ explodes); the default τ ≥ ε_J·‖J‖_F
    drops them, giving gelsd's answer with a cut-off above the noise."""
    rng = np.random.default_rng(5)
    U, _ = np.linalg.qr(rng.standard_normal((24, 24)))
    V, _ = np.linalg.qr(rng.standard_normal((40, 24)))
    sigma = np.geomspace(100.0, 1.0, 24)
    sigma[-5:] = 0.0
    J = ((U * sigma) @ V.T).astype(np.float32)
    r = rng.standard_normal(24)
    noisy = min_norm(J, r)
    clean = scipy.linalg.lstsq(J.astype(np.float64), r, cond=1e-4)[0]
    assert np.linalg.norm(noisy) > 1e3 * np.linalg.norm(clean)
    for method, opts in [("lstsq", {}), ("lstsq", {"form": "primal"}), ("rsvd", {"rank": 24})]:
        res = solve(J, r, method, **opts)
        assert rel(res.u, clean) < 1e-9, method
        assert res.extras.get("rank", 19) == 19 or res.extras["effective_rank"] == 19


@pytest.mark.parametrize("kind,deficient,dtype", CASES, ids=CASE_IDS)
def test_cg_converges_to_lstsq(kind, deficient, dtype):
    J, r = known_problem(kind, deficient, dtype)
    res = solve(J, r, "cg", tol=1e-12, normal_tol=1e-12, maxiter=3 * min(J.shape))
    assert res.converged, res.stop_reason
    assert rel(res.u, min_norm(J, r)) < TOL[("cg", dtype)]
    # the residual the recurrence carries is the true one
    assert abs(res.residual_norm - np.linalg.norm(J.astype(np.float64) @ res.u - r)) < 1e-10 * np.linalg.norm(r)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sgd_full_batch_reaches_ridge_with_lambda_n_wd(dtype):
    """The stationary point of SGD with weight decay wd on n samples is ridge with λ = n·wd."""
    J, r = known_problem("wide", True, dtype)
    n = J.shape[0]
    wd = 10.0 / n
    # curvatures of the batch loss: σ²/n + wd ∈ [0.42, 417]; lr·417 = 2.1 < 2(1 + μ) keeps the
    # heavy ball stable and the slowest mode contracts by ≈ 1 − lr·0.42/(1 − μ) = 0.98 per step
    res = solve(J, r, "sgd", lr=5e-3, weight_decay=wd, epochs=2000, batch_size=n)
    assert res.extras["equivalent_ridge_lambda"] == pytest.approx(10.0)
    assert rel(res.u, ridge_reference(J, r, n * wd)) < TOL[("sgd", dtype)]


def test_sgd_minibatches_with_decaying_step_approach_ridge():
    J, r = known_problem("long", False)
    n, wd = J.shape[0], 1.0
    ref = ridge_reference(J, r, n * wd)
    path = solve_path(J, r, "sgd", [100, 300, 600, 1200], lr=1e-3, weight_decay=wd, batch_size=8, lr_step=300)
    errors = [rel(res.u, ref) for res in path]
    # stochastic: each decay of the step (×0.1 every 300 epochs) shrinks the gradient-noise
    # jitter around the ridge point; measured 0.16, 0.13, 0.013, 0.009
    assert errors == sorted(errors, reverse=True) and errors[-1] < 2e-2
    assert path[-1].extras["loss_curve"][-1] < path[-1].extras["loss_curve"][0]


def test_sgd_matches_torch_sgd_batch_for_batch():
    """Same batches (solvers.minibatches), same update as torch.optim.SGD(momentum, weight_decay)."""
    rng = np.random.default_rng(4)
    L, n, p = 3, 10, 7
    J = rng.standard_normal((n * L, p))
    r = rng.standard_normal(n * L)
    opts = dict(lr=0.02, weight_decay=0.01, batch_size=4, lr_step=2, seed=11)
    res = solve(J, r, "sgd", epochs=5, n_outputs=L, **opts)

    u = torch.zeros(p, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.SGD([u], lr=opts["lr"], momentum=0.9, weight_decay=opts["weight_decay"])
    Jt, rt = torch.from_numpy(J).reshape(n, L, p), torch.from_numpy(r).reshape(n, L)
    for epoch in range(5):
        for group in optimizer.param_groups:
            group["lr"] = step_learning_rate(opts["lr"], epoch, opts["lr_step"])
        for batch in minibatches(n, opts["batch_size"], opts["seed"], epoch):
            b = torch.from_numpy(batch)
            loss = 0.5 * ((Jt[b] @ u - rt[b]) ** 2).sum() / len(batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    np.testing.assert_allclose(res.u, u.detach().numpy(), rtol=1e-12, atol=1e-14)
    assert res.n_iter == 5 * 3


# ---- out of core = in memory -------------------------------------------------------------------

OOC = [("lstsq", {}), ("lstsq", {"form": "primal"}), ("ridge", {"lam": 0.7}), ("ridge", {"lam": 0.7, "form": "primal"}),
       ("cg", {"maxiter": 15, "tol": 0.0}), ("rsvd", {"rank": 9}), ("sgd", {"lr": 1e-4, "epochs": 3, "batch_size": 4})]


@pytest.mark.filterwarnings("ignore::solvers.cg.ConvergenceWarning")  # cg stopped at maxiter on purpose
@pytest.mark.parametrize("method,options", OOC, ids=[f"{m}-{i}" for i, (m, _) in enumerate(OOC)])
def test_out_of_core_equals_in_memory(h5_operator, method, options):
    J, r = known_problem("wide", True, "float32")
    J = np.concatenate([J, J[:6] * 0.5])  # 30 rows, 3 samples of L = 2 more
    r = np.concatenate([r, r[:6]])
    mem = solve(J, r, method, n_outputs=2, **options)
    # A tight memory limit keeps the multi-pass methods streaming from the file, and a Gram panel
    # of 5 rows the direct ones (their Gram takes several passes); a generous limit lets them hold
    # J in memory once: float64 for the multi-pass methods, the stored float32 for the direct ones
    # in the dual form, whose one-pass panel holds all of J anyway. All must give the in-memory answer.
    from solvers.api import _check_plan, _validate_options

    op = h5_operator(J, chunk_rows=4, n_outputs=2)
    dual = method in ("lstsq", "ridge") and "form" not in options
    panel = {"panel_bytes": 5 * J.shape[1] * 8} if dual else {}
    needed = _check_plan(op, method, _validate_options(op, method, {**options, **panel}), "cpu", None)
    streamed = solve(op, r, method, memory_limit=needed + 8 * J.size - 1, **options, **panel)
    held = solve(h5_operator(J, chunk_rows=4, n_outputs=2), r, method, memory_limit="1G", **options)
    assert not streamed.extras.get("J_held_in_memory")
    assert held.extras.get("J_held_in_memory") == (method in ("cg", "rsvd", "sgd") or dual)
    for ooc in (streamed, held):
        assert rel(ooc.u, mem.u) < 1e-11
        assert ooc.n_iter == mem.n_iter and ooc.form == mem.form


def test_store_operator_is_a_row_block_operator(tmp_path):
    """The store's HDF5RowOperator (seeking, grouped chunk reads) gives what the minimal one gives."""
    from jacobian_store.store import HDF5RowOperator

    J, r = known_problem("long", False, "float32")
    with h5py.File(tmp_path / "s.h5", "w") as f:
        ds = f.create_dataset("J", data=J, chunks=(3, J.shape[1]))
        op = HDF5RowOperator(ds, n_outputs=1, block_bytes=3 * J.shape[1] * 4)
        assert rel(solve(op, r, "lstsq", form="dual", panel_bytes=8 * J.shape[1] * 8).u, min_norm(J, r)) < 1e-9
        assert rel(solve(op, r, "cg", tol=1e-12, maxiter=200).u, min_norm(J, r)) < 1e-7


# ---- paths ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(SHAPES))
def test_ridge_path_matches_single_solves(kind):
    J, r = known_problem(kind, True)
    lambdas = [0.0, 0.01, 1.0, 100.0]
    path = solve_path(J, r, "ridge", lambdas)
    for lam, res in zip(lambdas, path):
        ref = min_norm(J, r) if lam == 0 else ridge_reference(J, r, lam)
        assert rel(res.u, ref) < 1e-9 and res.options["lam"] == lam
        assert res.residual_norm == pytest.approx(np.linalg.norm(J @ res.u - r), rel=1e-8)
    norms = [res.u_norm for res in path]
    assert norms == sorted(norms, reverse=True)  # ‖u(λ)‖ decreases with λ


@pytest.mark.filterwarnings("ignore::solvers.cg.ConvergenceWarning")  # cg stopped at maxiter on purpose
def test_rsvd_cg_and_sgd_paths_match_single_runs():
    J, r = known_problem("wide", False)
    ranks = [2, 8, 24]
    U, s, Vt = scipy.linalg.svd(J, full_matrices=False)
    for k, res in zip(ranks, solve_path(J, r, "rsvd", ranks, power_iter=6)):
        assert rel(res.u, Vt[:k].T @ ((U[:, :k].T @ r) / s[:k])) < 1e-9
        assert res.extras["rank"] == k
    iters = [1, 4, 9]
    for k, res in zip(iters, solve_path(J, r, "cg", iters)):
        single = solve(J, r, "cg", maxiter=k, tol=0.0, normal_tol=0.0)
        assert rel(res.u, single.u) < 1e-13 and res.n_iter == k
    epochs = [1, 3]
    for e, res in zip(epochs, solve_path(J, r, "sgd", epochs, lr=1e-4, batch_size=5)):
        assert rel(res.u, solve(J, r, "sgd", lr=1e-4, batch_size=5, epochs=e).u) < 1e-14


def test_path_refuses_a_single_knob_and_lstsq():
    J, r = known_problem("wide", False)
    with pytest.raises(ValueError, match="no path for method 'lstsq'"):
        solve_path(J, r, "lstsq", [1])
    with pytest.raises(TypeError, match="knob"):
        solve_path(J, r, "ridge", [1.0], lam=2.0)
    with pytest.raises(ValueError, match="≥ 0"):
        solve_path(J, r, "ridge", [1.0, -1.0])


# ---- invariances -----------------------------------------------------------------------------------

def test_stacking_J_twice_with_doubled_lambda_is_the_same_ridge():
    J, r = known_problem("long", False)
    once = solve(J, r, "ridge", lam=0.3).u
    twice = solve(np.vstack([J, J]), np.concatenate([r, r]), "ridge", lam=0.6).u
    assert rel(twice, once) < 1e-10


@pytest.mark.parametrize("method,options", [("lstsq", {}), ("ridge", {"lam": 0.2}), ("cg", {"tol": 1e-12, "maxiter": 200}),
                                            ("rsvd", {"rank": 7})])
def test_scaling_r_scales_u_and_inputs_are_not_mutated(method, options):
    J, r = known_problem("wide", True)
    J0, r0 = J.copy(), r.copy()
    a = solve(J, r, method, **options).u
    b = solve(J, -3.0 * r, method, **options).u
    assert rel(b, -3.0 * a) < 1e-9
    np.testing.assert_array_equal(J, J0)
    np.testing.assert_array_equal(r, r0)


def test_cg_warm_start_agrees_with_cold_and_is_not_mutated():
    J, r = known_problem("long", False)
    # CGLS loses orthogonality: on this κ = 100 problem it needs ≈ 55 steps, not 24 (hence maxiter)
    cold = solve(J, r, "cg", tol=1e-12, maxiter=200)
    with pytest.warns(ConvergenceWarning):
        x0 = solve(J, r, "cg", maxiter=5, tol=0.0).u
    x0_copy = x0.copy()
    warm = solve(J, r, "cg", tol=1e-12, x0=x0, maxiter=200)
    np.testing.assert_array_equal(x0, x0_copy)
    assert rel(warm.u, cold.u) < 1e-8 and warm.extras["warm_start"]
    # The warm start is used: CGLS starts from ρ₀ = r − J x0, not from r. (Fewer iterations than
    # the cold start is not guaranteed: restarted CGLS loses the Krylov history of the first run.)
    start = np.linalg.norm(r - J @ x0)
    assert warm.extras["residual_history"][0] == pytest.approx(start, rel=1e-12)
    assert start < np.linalg.norm(r)  # 5 CGLS steps reduce ‖r − J u‖ (CGLS residuals decrease monotonically)
    exact = solve(J, r, "cg", x0=min_norm(J, r), tol=1e-6)
    assert exact.n_iter <= 1


def test_cg_warns_naming_the_knobs_when_stopped_by_maxiter():
    J, r = known_problem("wide", False)
    with pytest.warns(ConvergenceWarning, match=r"Try increasing maxiter or tol\. Currently: maxiter=3"):
        res = solve(J, r, "cg", maxiter=3)
    assert not res.converged and res.n_iter == 3 and "maxiter=3" in res.stop_reason


# ---- results that tell the truth: stop codes, converged, divergence is an error ---------------------

def test_stop_codes_say_which_rule_held():
    from solvers.result import STOP_REASONS

    J, r = known_problem("wide", True)
    for method, options in (("lstsq", {}), ("ridge", {"lam": 0.1})):
        res = solve(J, r, method, **options)
        assert (res.stop_code, res.converged, res.n_iter) == (0, True, 0)
    res = solve(J, r, "rsvd", rank=7, power_iter=3)
    # a direct solve on the sketch: no iterations; the products with J are counted separately
    assert (res.stop_code, res.converged, res.n_iter) == (0, True, 0) and res.extras["passes"] == 2 + 2 * 3 + 1
    consistent = J @ min_norm(J, r)  # r ∈ range(J): the residual tolerance can hold
    res = solve(J, consistent, "cg", tol=1e-8, maxiter=500)
    assert (res.stop_code, res.converged) == (1, True) and res.relative_residual <= 1e-8
    res = solve(J, r, "cg", tol=0.0, normal_tol=1e-9, maxiter=500)  # rank-deficient: only test 2 can hold
    assert (res.stop_code, res.converged) == (2, True)
    with pytest.warns(ConvergenceWarning):
        res = solve(J, r, "cg", maxiter=2)
    assert (res.stop_code, res.converged) == (3, False)
    res = solve(J, r, "sgd", lr=1e-4, epochs=2)
    assert (res.stop_code, res.converged) == (5, True) and res.residual_norm <= np.linalg.norm(r)
    assert set(STOP_REASONS) == {-1, 0, 1, 2, 3, 4, 5}
    assert json.loads(json.dumps(res.to_dict()))["stop_code"] == 5


def test_cg_path_reports_the_knob_and_where_the_run_stopped():
    J, r = known_problem("long", False)
    consistent = J @ min_norm(J, r)
    path = solve_path(J, consistent, "cg", [1, 3, 1000], tol=1e-10)
    assert [res.stop_code for res in path[:2]] == [4, 4] and [res.n_iter for res in path[:2]] == [1, 3]
    last = path[2]  # the run stopped by its tolerance long before 1000 iterations
    assert last.stop_code == 1 and last.n_iter < 1000 and "run ended at iteration" in last.stop_reason
    assert last.relative_residual <= 1e-10


def test_sgd_with_too_large_a_step_raises_instead_of_returning():
    from solvers import SolverDivergedError

    J, r = known_problem("wide", False)
    # σ_max² = 1e4: with lr 10 each full-batch step multiplies the error by ~1e3, Inf/NaN by epoch 200
    with pytest.raises(SolverDivergedError, match=r"sgd diverged in epoch \d+ .*non-finite.*lower lr \(currently 10"):
        solve(J, r, "sgd", lr=10.0, epochs=200)
    # lr 1e-2 (full batch, no momentum): the top direction grows 3.2× a step, finite but the loss rises
    with pytest.raises(SolverDivergedError, match=r"above its initial .*lower lr \(currently 0.01\)"):
        solve(J, r, "sgd", lr=1e-2, epochs=5, batch_size=24, momentum=0.0)
    with pytest.raises(SolverDivergedError):
        solve_path(J, r, "sgd", [1, 5], lr=1e-2, batch_size=24, momentum=0.0)
    assert issubclass(SolverDivergedError, ValueError)  # the CLI's "error:" path, nothing saved


def test_a_non_finite_product_is_an_error_not_a_result():
    from solvers import SolverDivergedError

    J, r = known_problem("wide", False)
    bad = J.copy()
    bad[3, 4] = np.nan
    for method, options in (("cg", {}), ("rsvd", {"rank": 5})):
        with pytest.raises(SolverDivergedError, match="non-finite"):
            solve(bad, r, method, check_finite=False, **options)


# ---- result, auto, device ------------------------------------------------------------------------

def test_result_records_everything_and_serializes_without_big_arrays():
    J, r = known_problem("wide", False)
    res = solve(J, r, "auto")
    assert res.method == "lstsq" and res.requested_method == "auto"
    d = json.loads(json.dumps(res.to_dict()))
    assert d["method"] == "lstsq" and d["options"]["form"] == "auto" and "u" not in d
    assert len(d["extras"]["singular_values"]) == 24
    assert isinstance(res, SolveResult) and res.summary().startswith("lstsq[dual")
    res = solve(J, r, "sgd", lr=1e-3, epochs=2)
    assert json.loads(json.dumps(res.to_dict()))["extras"]["loss_curve"]
    assert res.wall_time > 0 and res.u_norm == pytest.approx(np.linalg.norm(res.u))


def test_auto_falls_back_to_cg_when_the_gram_matrix_does_not_fit():
    J, r = known_problem("wide", False)
    res = solve(J, r, "auto", memory_limit=14_000)  # cg needs ≈ 11 kB, lstsq ≈ 18 kB
    assert res.method == "cg" and res.requested_method == "auto"


@pytest.mark.parametrize("device", DEVICES)
def test_device_runs_the_same_code(device):
    if device == "cuda":
        pytest.importorskip("cupy")
    J, r = known_problem("wide", True, "float32")
    ref = min_norm(J, r)
    for method, opts in [("lstsq", {}), ("ridge", {"lam": 0.0}), ("cg", {"tol": 1e-12, "maxiter": 200}),
                         ("rsvd", {"rank": 24})]:
        res = solve(J, r, method, device=device, **opts)
        assert res.device == device and isinstance(res.u, np.ndarray)
        assert rel(res.u, ref) < TOL[(method, "float32")], method
    if device == "cuda":  # a J that lives on the GPU keeps u there
        import cupy

        res = solve(cupy.asarray(J), r, "cg", tol=1e-12, maxiter=200)
        assert isinstance(res.u, cupy.ndarray) and rel(res.u.get(), ref) < TOL[("cg", "float32")]


# ---- bad input --------------------------------------------------------------------------------------

def test_bad_input_gets_a_clear_error():
    J, r = known_problem("wide", False)
    with pytest.raises(ValueError, match=r"r must have length n·L = 24"):
        solve(J, r[:-1])
    with pytest.raises(ValueError, match="unknown method 'svd'"):
        solve(J, r, "svd")
    with pytest.raises(TypeError, match=r"unknown option 'rnak' for method 'rsvd'; valid options: rank"):
        solve(J, r, "rsvd", rnak=3)
    with pytest.raises(TypeError, match="needs lam"):
        solve(J, r, "ridge")
    with pytest.raises(ValueError, match="must be ≥ 0"):
        solve(J, r, "ridge", lam=-1.0)
    with pytest.raises(ValueError, match=r"rank k=25 exceeds the rank bound min\(n·L, p\) = min\(24, 40\) = 24"):
        solve(J, r, "rsvd", rank=25)
    with pytest.raises(ValueError, match="lr must be a positive number"):
        solve(J, r, "sgd", lr=0)
    with pytest.raises(ValueError, match="momentum must be in"):
        solve(J, r, "sgd", lr=0.1, momentum=1.0)
    with pytest.raises(ValueError, match="driver must be one of"):
        solve(J, r, "lstsq", driver="gesv")
    with pytest.raises(ValueError, match="device must be"):
        solve(J, r, device="tpu")


def test_non_finite_input_is_named():
    J, r = known_problem("wide", False)
    bad_r = r.copy()
    bad_r[5] = np.nan
    with pytest.raises(ValueError, match=r"non-finite value \(nan\) at row 5"):
        solve(J, bad_r)
    bad_J = J.copy()
    bad_J[7, 2] = -np.inf
    with pytest.raises(ValueError, match=r"row 7 \(sample 7, output 0\), column 2"):
        solve(bad_J, r, "cg")


def test_memory_limit_refuses_up_front_with_the_figure():
    J, r = known_problem("wide", False)
    # small sizes in KiB, not "0.0 MiB"
    with pytest.raises(MemoryLimitError, match=r"lstsq \(dual form\) would hold about 18.0 KiB .* limit is 10.0 KiB.*K = J Jᵀ"):
        solve(J, r, "lstsq", memory_limit="10K")
    with pytest.raises(ValueError, match="cannot read a size"):
        solve(J, r, memory_limit="lots")


def test_every_method_documents_its_options():
    import solvers.api as api

    assert set(METHOD_OPTIONS) == {"lstsq", "ridge", "cg", "rsvd", "sgd"}
    for method in METHOD_OPTIONS:
        assert method in api.__doc__
