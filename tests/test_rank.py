"""solvers.rank: the one rank cut-off, on known spectra, and bin/spectrum = bin/solve --method lstsq."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.linalg
import torch

from solvers import solve
from solvers.rank import describe_rank_cutoff, rank_cutoff

from conftest import known_svd_matrix

EPS32, EPS64 = float(np.finfo(np.float32).eps), float(np.finfo(np.float64).eps)


# ------------------------------------------------------------------------------ the formula

def test_gram_route_floor_is_the_square_root_of_the_accumulation_rounding():
    sigma = np.r_[100.0, np.full(9, 1e-3)]
    # √(N·ε₆₄)·σ_1 with N = max(m, p) = 10⁶ dominates ε₃₂·‖σ‖₂ ≈ 1.2e-5
    assert rank_cutoff(sigma, (10, 10**6)) == pytest.approx(math.sqrt(1e6 * EPS64) * 100.0, rel=1e-12)
    assert rank_cutoff(sigma, (10**6, 10)) == rank_cutoff(sigma, (10, 10**6))  # primal form: same N
    assert rank_cutoff(sigma, (10, 10**6), accumulation=np.float32) == pytest.approx(
        math.sqrt(1e6 * EPS32) * 100.0, rel=1e-12)
    assert rank_cutoff(sigma, (10, None)) == pytest.approx(max(math.sqrt(10 * EPS64) * 100.0,
                                                               EPS32 * np.linalg.norm(sigma)), rel=1e-12)


def test_storage_term_dominates_small_float32_problems_and_vanishes_for_float64():
    sigma = np.ones(16)  # ‖σ‖₂ = 4
    assert rank_cutoff(sigma, (16, 16)) == pytest.approx(4 * EPS32, rel=1e-12)
    assert rank_cutoff(sigma, (16, 16), j_dtype=torch.float64) == pytest.approx(math.sqrt(16 * EPS64), rel=1e-12)
    assert rank_cutoff(sigma, (16, 16), j_dtype="float64") == rank_cutoff(sigma, (16, 16), j_dtype=np.float64)


def test_svd_route_in_float32_is_numpys_matrix_rank():
    A = known_svd_matrix(np.r_[np.geomspace(10.0, 1.0, 6), 1e-6, 1e-7], 30, 50, seed=1).astype(np.float32)
    s = scipy.linalg.svd(A, compute_uv=False)
    tau = rank_cutoff(s, A.shape, route="svd", accumulation=np.float32, j_dtype=np.float32)
    assert tau == pytest.approx(s.max() * 50 * EPS32, rel=1e-6)  # numpy.linalg.matrix_rank's tolerance
    assert int((s > tau).sum()) == np.linalg.matrix_rank(A) == 6


def test_rcond_overrides_and_bad_input_is_refused():
    assert rank_cutoff([4.0, 1.0], (2, 2), rcond=0.5) == 2.0
    assert rank_cutoff([], (0, 3)) == 0.0
    with pytest.raises(ValueError, match="route must be one of 'gram', 'svd'"):
        rank_cutoff([1.0], (1, 1), route="lapack")
    with pytest.raises(ValueError, match="finite"):
        rank_cutoff([np.nan], (1, 1))
    assert describe_rank_cutoff().startswith("max(sqrt(max(m,p)*eps_acc)*sigma_max, eps_J*|J|_F)")
    assert "float32" in describe_rank_cutoff(route="svd", accumulation="float32")


def test_each_route_drops_its_own_rounding_and_keeps_the_signal():
    """A float32 J of rank 12 with σ from 50 down to 1: through a float64 Gram matrix the 8 null
    directions come back at the storage rounding of J (≲ ε₃₂·‖J‖_F); through a float32 Gram matrix
    at about √ε₃₂·σ_1. Each route's τ sits between the signal and its own rounding, and the
    float64 τ would count the float32 route's rounding as rank. (The float32 route's worst-case τ,
    √(400·ε₃₂)·σ_1 = 0.35, is why every route accumulates in float64.)"""
    sigma = np.geomspace(50.0, 1.0, 12)
    J = known_svd_matrix(sigma, 20, 400, seed=3).astype(np.float32)
    K64 = J.astype(np.float64) @ J.T.astype(np.float64)
    K32 = (J @ J.T).astype(np.float64)
    s64 = np.sqrt(np.clip(scipy.linalg.eigvalsh(K64), 0, None))[::-1]
    s32 = np.sqrt(np.clip(scipy.linalg.eigvalsh(K32), 0, None))[::-1]
    tau64 = rank_cutoff(s64, J.shape)
    tau32 = rank_cutoff(s32, J.shape, accumulation="float32")
    assert s64[11] > tau64 > s64[12] and int((s64 > tau64).sum()) == 12
    assert s32[11] > tau32 > s32[12] and int((s32 > tau32).sum()) == 12
    assert int((s32 > tau64).sum()) > 12


def test_lstsq_and_rsvd_report_the_rank_of_the_rule():
    sigma = np.r_[np.geomspace(10.0, 0.1, 15), np.zeros(5)]
    J = known_svd_matrix(sigma, 20, 60, seed=4).astype(np.float32)
    r = np.random.default_rng(0).standard_normal(20)
    lstsq = solve(J, r, "lstsq")
    assert lstsq.extras["rank"] == 15
    assert lstsq.extras["cutoff"] == pytest.approx(rank_cutoff(lstsq.extras["singular_values"], J.shape), rel=1e-12)
    rsvd = solve(J, r, "rsvd", rank=20, power_iter=4)
    assert rsvd.extras["effective_rank"] == 15
    assert rsvd.extras["cutoff"] == rank_cutoff(rsvd.extras["singular_values"], J.shape, route="svd")


# ------------------------------------------------------------- bin/spectrum = bin/solve lstsq

@pytest.mark.parametrize("data,width,expected", [
    # 10-class digits, 20 samples: J 200 × 4,157 of full rank (σ_min 4e-3, τ 6e-6)
    (["--n-train", "20"], "0.25", 200),
    # binary digits, 600 samples, LeNet×0.1 (p = 803): dead units leave J of rank 482, with a gap
    # 5e-5 > τ ≈ 1.2e-5 > 2.3e-7 around the cut-off
    (["--binary", "0", "--n-train", "600"], "0.1", 482),
], ids=["full-rank", "rank-deficient"])
def test_spectrum_and_lstsq_report_the_same_rank(tmp_path, data, width, expected):
    from jacobian_store.build import main as build_main
    from study.solve import main as solve_main
    from study.spectrum import main as spectrum_main

    common = ["--arch", "lenet", "--width", width, "--dataset", "digits", "--n-test", "1", *data]
    store = tmp_path / "J.h5"
    assert build_main([*common, "--out", str(store), "--device", "cpu", "--quiet"]) == 0
    (record,) = spectrum_main([*common, "--out", str(tmp_path / "spectrum"), "--device", "cpu", "--quiet"])
    assert solve_main(["--store", str(store), "--method", "lstsq", "--no-save", "--no-test", "--device", "cpu",
                       "--json", str(tmp_path / "lstsq.json"), "--quiet"]) == 0
    lstsq = json.loads((tmp_path / "lstsq.json").read_text())
    assert record["spectrum"]["numerical_rank"] == lstsq["extras"]["rank"] == expected
    # the same τ, up to the float32 rounding of two computations of J
    assert record["spectrum"]["cutoff"] == pytest.approx(lstsq["extras"]["cutoff"], rel=1e-5)
