"""Mixed precision for lstsq and ridge: float32 Gram, float64 refinement, float64 fallback.

Known-answer problems J = U diag(σ) Vᵀ with σ log-spaced from 1 down to 1/κ (κ = 1e2, 1e5, 1e8),
wide (dual form) and tall (primal form), full rank or with 5 zero singular values; the minimum-norm
answer is V_k diag(1/σ_k) U_kᵀ r over the singular values the float64 route keeps. Mixed precision
must either converge to that answer (the tolerances below) or say that it could not and return the
float64 route's answer instead (solvers/direct.py, "Precision").
"""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

import solvers.direct as direct
from solvers import solve, solve_path
from solvers.direct import resolve_precision

SHAPES = {"wide": (60, 100), "tall": (100, 60)}
CONDITIONS = [1e2, 1e5, 1e8]

# ‖u − u*‖/‖u*‖ allowed for a converged mixed answer, by κ(J). Mixed stops at a backward error of
# √N·ε₆₄ (N = 100), so its forward error is that times κ(A) = κ(J)²: 1e-14·1e4 = 1e-10 at κ = 1e2
# (measured ≤ 5e-12). At κ = 1e5 and 1e8 float32 cannot resolve K, so mixed falls back there
# (asserted below); no tolerance is needed for a converged answer.
TOL_U = {1e2: 1e-9}
# ‖J u − J u*‖/‖J u*‖: the contract for well-conditioned problems.
TOL_JU = 1e-8


def rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(b))


def svd_problem(kind: str, cond: float, deficient: int = 0, consistent: bool = False, seed: int = 0):
    """J = U diag(σ) Vᵀ in float64 with σ from 1 to 1/cond (the last ``deficient`` set to 0), and r;
    ``consistent``: r in range(J), so the rank-deficient system has an exact solution."""
    m, p = SHAPES[kind]
    rng = np.random.default_rng(seed)
    k = min(m, p)
    U, _ = np.linalg.qr(rng.standard_normal((m, k)))
    V, _ = np.linalg.qr(rng.standard_normal((p, k)))
    s = np.geomspace(1.0, 1.0 / cond, k)
    if deficient:
        s[-deficient:] = 0.0
    J = (U * s) @ V.T
    r = U[:, s > 0] @ rng.standard_normal(int((s > 0).sum())) if consistent else rng.standard_normal(m)
    return J, r, (U, s, V)


def min_norm_answer(svd, r, cutoff):
    U, s, V = svd
    keep = s > cutoff
    return V[:, keep] @ ((U[:, keep].T @ r) / s[keep])


CASES = [(kind, cond, deficient, consistent) for kind in SHAPES for cond in CONDITIONS
         for deficient, consistent in [(0, False), (5, False), (5, True)]]


@pytest.mark.parametrize("kind,cond,deficient,consistent", CASES,
                         ids=[f"{k}-{c:.0e}-{'rank' + str(d) if d else 'full'}{'-consistent' if q else ''}"
                              for k, c, d, q in CASES])
def test_mixed_lstsq_converges_to_the_float64_answer_or_says_it_fell_back(kind, cond, deficient, consistent):
    J, r, svd = svd_problem(kind, cond, deficient, consistent)
    f64 = solve(J, r, "lstsq", precision="float64")
    mixed = solve(J, r, "lstsq", precision="mixed")
    assert mixed.options["precision"] == "mixed" and f64.extras["precision"] == "float64"
    assert mixed.converged
    if mixed.extras["precision"] == "mixed":
        e = mixed.extras
        assert e["refinement_residual"] <= e["residual_floor"] and mixed.n_iter == e["refinement_steps"] >= 1
        assert e["refinement_contraction"] <= direct.REFINEMENT_MAX_CONTRACTION
        assert "float64 refinement" in mixed.stop_reason and "precision_fallback" not in e
        ref = min_norm_answer(svd, r, f64.extras["cutoff"])
        assert rel(J @ mixed.u, J @ ref) < TOL_JU
        assert rel(mixed.u, ref) < TOL_U[cond]
        # minimum norm: u lies in range(Jᵀ), i.e. has no part along V's complement
        U, s, V = svd
        V_kept = V[:, s > 0]
        assert np.linalg.norm(mixed.u - V_kept @ (V_kept.T @ mixed.u)) < 1e-10 * np.linalg.norm(mixed.u)
    else:
        assert mixed.extras["precision_fallback"]
        assert "fell back" in mixed.stop_reason
        np.testing.assert_allclose(mixed.u, f64.u, rtol=1e-12, atol=0)
    # which way it goes, where the answer is known: κ = 1e2 full rank is well within float32's reach;
    # where the float64 route truncates (rank-deficient, or κ = 1e8 > 1/τ), mixed cannot show the same
    # truncation and must fall back; κ = 1e5 (κ(K) = 1e10) is beyond float32's resolution.
    expected = "mixed" if (cond == 1e2 and not deficient) else "float64"
    assert mixed.extras["precision"] == expected, mixed.extras.get("precision_fallback")


@pytest.mark.parametrize("kind", SHAPES)
def test_a_cut_off_that_truncates_makes_mixed_fall_back(kind):
    """rcond = 0.05 drops the σ_i < 0.05 of a κ = 1e2 J: the float32 Gram resolves them and refines
    to the untruncated answer, so only test (i) (ŵ_min > 2τ²) stops it from returning that."""
    J, r, svd = svd_problem(kind, 1e2)
    res = solve(J, r, "lstsq", precision="mixed", rcond=0.05)
    assert res.extras["precision"] == "float64" and "2τ²" in res.extras["precision_fallback"]
    assert res.extras["rank"] < min(J.shape)
    assert rel(res.u, min_norm_answer(svd, r, 0.05)) < TOL_U[1e2]
    kept_all = solve(J, r, "lstsq", precision="mixed", rcond=1e-3)  # below σ_min = 1e-2: nothing dropped
    assert kept_all.extras["precision"] == "mixed" and rel(kept_all.u, min_norm_answer(svd, r, 0.0)) < TOL_U[1e2]


def test_each_fallback_says_why():
    J, r, _ = svd_problem("wide", 1e2, deficient=5)
    assert "is not above 2τ²" in solve(J, r, "lstsq", precision="mixed").extras["precision_fallback"]
    res = solve(J, r, "ridge", lam=1e-8, precision="mixed")  # five eigenvalues of A at λ, far below ‖E‖₂
    assert res.extras["precision"] == "float64"
    assert "reduced ‖b − A x‖ by a factor" in res.extras["precision_fallback"]
    assert res.extras["mixed_refinement_contraction"] > direct.REFINEMENT_MAX_CONTRACTION
    J, r, _ = svd_problem("wide", 1e5)  # σ_min² + λ = 1e-8 is at the float32 Gram's rounding
    res = solve(J, r, "ridge", lam=1e-8, precision="mixed")
    assert "float32 Gram + λI is not numerically positive definite" in res.extras["precision_fallback"]


@pytest.mark.parametrize("kind", SHAPES)
@pytest.mark.parametrize("cond", CONDITIONS)
@pytest.mark.parametrize("lam", [1e-4, 1e-8])
def test_mixed_ridge_converges_to_the_closed_form_or_says_it_fell_back(kind, cond, lam):
    J, r, (U, s, V) = svd_problem(kind, cond, deficient=5)
    ref = V @ ((U.T @ r) * s / (s ** 2 + lam))
    mixed = solve(J, r, "ridge", lam=lam, precision="mixed")
    f64 = solve(J, r, "ridge", lam=lam, precision="float64")
    if mixed.extras["precision"] == "mixed":
        # A = K + λI has κ(A) ≤ 1/λ = 1e4 here: backward error √N·ε₆₄ gives ≤ 1e-10 (measured ≤ 3e-11)
        assert rel(mixed.u, ref) < 1e-9 and rel(J @ mixed.u, J @ ref) < TOL_JU
        assert mixed.extras["refinement_residual"] <= mixed.extras["residual_floor"]
    else:
        assert mixed.extras["precision_fallback"]
        np.testing.assert_allclose(mixed.u, f64.u, rtol=1e-12, atol=0)
    # λ = 1e-4 lifts every eigenvalue of K well above the float32 Gram's rounding (≈ 1e-8 here);
    # λ = 1e-8 leaves the zero singular values at λ, below it: Cholesky or the contraction fails.
    assert mixed.extras["precision"] == ("mixed" if lam == 1e-4 else "float64")


@pytest.mark.parametrize("kind", SHAPES)
def test_float32_J_singular_values_have_their_stated_accuracy(kind):
    """A float32 J as stored: σ̂_i = √ŵ_i from the float32 Gram is within a relative ½ρ̂ of σ_i
    (module docstring); ρ̂ is the power method's estimate of ρ(G), so allow ρ̂."""
    J, r, _ = svd_problem(kind, 1e2)
    J32 = J.astype(np.float32)
    sv = np.linalg.svd(J32.astype(np.float64), compute_uv=False)
    res = solve(J32, r, "lstsq", precision="mixed")
    assert res.extras["precision"] == "mixed" and res.extras["J_held_float32"]
    rho = res.extras["refinement_contraction"]
    assert 0 < rho < 1e-2  # measured 1.5e-4: float32 rounding of K over σ_min² = 1e-4
    assert np.max(np.abs(res.extras["singular_values"] - sv) / sv) <= rho
    assert res.extras["rank"] == min(J.shape)
    ref = solve(J32, r, "lstsq", precision="float64")
    assert rel(J32.astype(np.float64) @ res.u, J32.astype(np.float64) @ ref.u) < TOL_JU
    assert rel(res.u, ref.u) < TOL_U[1e2]


def test_out_of_core_mixed_streams_or_holds_J_and_gives_the_in_memory_answer(tmp_path):
    """From HDF5: J held once in float32 (the planned Gram panel fits it) or streamed (it does not)."""
    from jacobian_store.store import HDF5RowOperator

    J, r, _ = svd_problem("wide", 1e2)
    J32 = J.astype(np.float32)
    mem = solve(J32, r, "lstsq", precision="mixed")
    with h5py.File(tmp_path / "J.h5", "w") as f:
        f.create_dataset("J", data=J32, chunks=(7, J32.shape[1]))
    with h5py.File(tmp_path / "J.h5", "r") as f:
        held = solve(HDF5RowOperator(f["J"], 1), r, "lstsq", precision="mixed")
        streamed = solve(HDF5RowOperator(f["J"], 1), r, "lstsq", precision="mixed", panel_bytes=10 * 100 * 4)
    assert held.extras["J_held_float32"] and not streamed.extras["J_held_float32"]
    for res in (held, streamed):
        assert res.extras["precision"] == "mixed"
        # the streamed float32 Gram sums in another order than J @ Jᵀ: its rounding differs, and
        # both refine to the backward-error floor (≈ 1e-13 relative here)
        assert rel(res.u, mem.u) < 1e-10


def test_auto_takes_mixed_from_the_gram_order_on_and_records_both(monkeypatch):
    J, r, _ = svd_problem("wide", 1e2)
    res = solve(J, r, "lstsq")  # Gram order 60 < MIXED_MIN_ORDER
    assert res.options["precision"] == "auto" and res.extras["precision"] == "float64"
    monkeypatch.setattr(direct, "MIXED_MIN_ORDER", 60)
    for method, opts in [("lstsq", {}), ("ridge", {"lam": 1e-3})]:
        res = solve(J, r, method, **opts)
        assert res.options["precision"] == "auto" and res.extras["precision"] == "mixed", method
        record = json.loads(json.dumps(res.to_dict()))
        assert record["options"]["precision"] == "auto" and record["extras"]["precision"] == "mixed"
        assert len(record["extras"]["refinement_residuals"]) == res.n_iter
    assert resolve_precision("auto", (5000, 9000), "cpu") == "mixed"
    # LAPACK on J, the GPU and an explicit eigendecomposition all stay in float64
    assert resolve_precision("auto", (5000, 9000), "cpu", driver="gelsd") == "float64"
    assert resolve_precision("auto", (5000, 9000), "cuda") == "float64"
    assert resolve_precision("auto", (5000, 9000), "cpu", factorization="eigh") == "float64"
    res = solve(J, r, "lstsq", driver="gelsd")
    assert res.extras["precision"] == "float64"


def test_bad_precision_values_are_refused_with_a_clear_error():
    J, r, _ = svd_problem("wide", 1e2)
    for method, opts in [("lstsq", {}), ("ridge", {"lam": 1.0})]:
        with pytest.raises(ValueError, match=rf"{method}: precision must be one of 'auto', 'float64', 'mixed'.*got 'half'"):
            solve(J, r, method, precision="half", **opts)
    with pytest.raises(TypeError, match="unknown option 'precision' for method 'cg'"):
        solve(J, r, "cg", precision="mixed")
    with pytest.raises(ValueError, match="precision='mixed' is the Gram-matrix route; driver='gelsd'"):
        solve(J, r, "lstsq", precision="mixed", driver="gelsd")
    with pytest.raises(ValueError, match="factorization='eigh' asks for the float64 eigendecomposition"):
        solve(J, r, "ridge", lam=1.0, precision="mixed", factorization="eigh")
    with pytest.raises(ValueError, match="precision='mixed' refines one λ at a time"):
        solve_path(J, r, "ridge", [1e-3, 1.0], precision="mixed")
    with pytest.raises(ValueError, match="precision='mixed' runs on the CPU only"):
        resolve_precision("mixed", J.shape, "cuda")
    # a path in float64 accepts the option and records it
    path = solve_path(J, r, "ridge", [1e-3, 1.0], precision="float64")
    assert all(res.extras["precision"] == "float64" and res.options["precision"] == "float64" for res in path)


def test_bin_solve_takes_precision_and_records_it(tmp_path, capsys):
    from jacobian_store.build import BuildSpec, build_store
    from study.solve import main
    from jacobian_store.datasets import load_dataset

    store = tmp_path / "tiny.h5"
    build_store(store, BuildSpec("lenet", 0.25, seed=0), load_dataset("digits", n_train=20, n_test=10, seed=0),
                progress=False)
    record_path = tmp_path / "rec.json"
    assert main(["--store", str(store), "--method", "lstsq", "--precision", "mixed", "--no-test", "--no-save",
                 "--quiet", "--json", str(record_path)]) == 0
    record = json.loads(record_path.read_text())
    assert record["options"]["precision"] == "mixed" and record["extras"]["precision"] in ("mixed", "float64")
    assert record["extras"]["precision"] == "mixed" or record["extras"]["precision_fallback"]
    assert "lstsq[dual] converged" in capsys.readouterr().out
