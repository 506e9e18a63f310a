"""study.spectrum: effective rank, numerical rank, condition number; the bin/spectrum CLI."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from jacobian_store.architectures import create_model
from solvers.rank import rank_cutoff
from study.spectrum import (condition_number, effective_rank, main, numerical_rank, singular_values_from_eigenvalues,
                            singular_values_from_gram, spectrum_from_gram, spectrum_from_singular_values,
                            spectrum_of_model)

from conftest import known_svd_matrix

EPS32, EPS64 = float(np.finfo(np.float32).eps), float(np.finfo(np.float64).eps)


# ------------------------------------------------------------------------- effective rank

@pytest.mark.parametrize("n", [1, 2, 7, 100])
def test_effective_rank_of_identity_is_n(n):
    assert effective_rank(np.ones(n)) == pytest.approx(n, rel=1e-12)
    assert effective_rank(3.7 * np.ones(n)) == pytest.approx(n, rel=1e-12)  # scale-free


def test_effective_rank_of_rank_one_is_one():
    assert effective_rank([5.0, 0.0, 0.0, 0.0]) == 1.0  # 0·log 0 = 0, no NaN


def test_effective_rank_of_k_equal_values_padded_with_zeros():
    assert effective_rank(np.r_[np.full(4, 2.0), np.zeros(96)]) == pytest.approx(4.0, rel=1e-12)


@pytest.mark.parametrize("r,N", [(0.5, 10), (0.8, 50), (0.99, 300)])
def test_effective_rank_of_geometric_spectrum(r, N):
    # σ_i = r^i, i = 0..N−1. With S = Σ r^i = (1 − r^N)/(1 − r), p_i = r^i / S and
    # H = −Σ p_i (i log r − log S) = log S − μ log r, where μ = Σ i p_i is the mean index:
    # Σ i r^i = r (1 − N r^(N−1) + (N−1) r^N)/(1 − r)², so μ = r/(1 − r) − N r^N/(1 − r^N).
    # Hence erank = exp(H) = S · r^(−μ).
    S = (1 - r**N) / (1 - r)
    mu = r / (1 - r) - N * r**N / (1 - r**N)
    expected = S * r ** (-mu)
    assert effective_rank(r ** np.arange(N)) == pytest.approx(expected, rel=1e-12)
    # Large N: the closed form tends to (1/(1 − r))·r^(−r/(1 − r)); N = 300, r = 0.5 reaches it.
    if r == 0.5:
        assert effective_rank(r ** np.arange(300)) == pytest.approx(2 * 0.5 ** -1, rel=1e-12)


def test_effective_rank_edge_cases():
    assert effective_rank(np.zeros(5)) == 0.0
    assert effective_rank([]) == 0.0
    with pytest.raises(ValueError, match="non-negative"):
        effective_rank([1.0, -0.1])
    with pytest.raises(ValueError, match="finite"):
        effective_rank([1.0, np.nan])


# -------------------------------------------------------------- rank, cutoff, condition

def test_numerical_rank_and_condition_number():
    sigma = np.array([10.0, 4.0, 1.0, 1e-9, 0.0])
    assert numerical_rank(sigma, cutoff=1e-6) == 3
    assert condition_number(sigma, cutoff=1e-6) == pytest.approx(10.0)
    assert math.isnan(condition_number(np.zeros(3)))


def test_default_cutoff_is_the_rank_rule_of_the_solvers():
    sigma = np.array([10.0, 4.0, 1.0, 1e-9, 0.0])
    report = spectrum_from_singular_values(sigma, n_rows=5, n_parameters=200)
    # max(√(200·ε₆₄)·σ_1, ε₃₂·‖σ‖₂): the storage term wins for so small a J
    assert report.cutoff == pytest.approx(max(math.sqrt(200 * EPS64) * 10.0, EPS32 * math.sqrt(117.0)), rel=1e-12)
    assert report.cutoff == rank_cutoff(sigma, (5, 200))
    assert report.numerical_rank == 3 and report.eps == EPS32
    # a float64 J has only the Gram route's rounding
    assert spectrum_from_singular_values(sigma, 5, 200, j_dtype=torch.float64).cutoff == pytest.approx(
        math.sqrt(200 * EPS64) * 10.0, rel=1e-12)
    # numpy's matrix_rank tolerance, σ_1·max(m, p)·ε_J
    assert spectrum_from_singular_values(sigma, 5, 200, cutoff="matrix_rank").cutoff == pytest.approx(
        10.0 * 200 * EPS32, rel=1e-12)
    assert spectrum_from_singular_values(sigma, 5, cutoff="matrix_rank").cutoff == pytest.approx(10.0 * 5 * EPS32)


def test_matrix_rank_rule_is_available_but_not_the_default():
    # A wide J (p = 6e6, like LeNet×10): numpy's rule puts the cutoff at 0.72·σ_max and keeps only
    # the outliers; the Gram-resolution default keeps the whole bulk.
    sigma = np.r_[np.full(10, 100.0), np.linspace(30.0, 0.6, 990)]
    wide = spectrum_from_singular_values(sigma, n_rows=1000, n_parameters=6_000_000, cutoff="matrix_rank")
    assert wide.numerical_rank == 10 and wide.cutoff == pytest.approx(100.0 * 6e6 * EPS32)
    default = spectrum_from_singular_values(sigma, n_rows=1000, n_parameters=6_000_000)
    assert default.numerical_rank == 1000 and default.cutoff_rule.startswith("max(sqrt(max(m,p)*eps_acc)")


def test_spectrum_from_gram_recovers_known_singular_values():
    sigma = np.r_[np.geomspace(50.0, 0.5, 12), np.zeros(8)]  # J 20 × 40 of rank 12
    J = known_svd_matrix(sigma[:12], 20, 40)
    report = spectrum_from_gram(J @ J.T, n_parameters=40)
    np.testing.assert_allclose(report.singular_values[:12], sigma[:12], rtol=1e-10)
    assert report.numerical_rank == 12
    assert report.cutoff == pytest.approx(rank_cutoff(sigma, (20, 40)), rel=1e-8)
    assert report.condition_number == pytest.approx(100.0, rel=1e-10)
    assert report.effective_rank == pytest.approx(effective_rank(sigma), rel=1e-9)
    assert report.sigma_min == pytest.approx(0.5, rel=1e-10)
    d = report.to_dict()
    json.dumps(d)
    assert "singular_values" not in d and d["n_singular_values"] == 20
    assert len(report.to_dict(include_singular_values=True)["singular_values"]) == 20


def test_fewer_parameters_than_rows_keeps_min_m_p_values_and_user_cutoff():
    J = known_svd_matrix(np.array([3.0, 2.0, 1.0]), 10, 3)
    report = spectrum_from_gram(J @ J.T, n_parameters=3, cutoff=1.5)
    assert report.singular_values.shape == (3,)
    assert report.numerical_rank == 2 and report.cutoff_rule == "user"
    assert report.condition_number == pytest.approx(1.5)
    with pytest.raises(ValueError, match="cutoff must be a non-negative number, 'gram'"):
        spectrum_from_gram(J @ J.T, cutoff=-1.0)
    with pytest.raises(ValueError, match="cutoff must be"):
        spectrum_from_gram(J @ J.T, cutoff="numpy")


def test_noise_floor_does_not_count():
    # 5 true singular values and 995 at the rounding level of a K accumulated in float32
    # (√ε₃₂·σ_1 ≈ 3.5e-4): the cutoff for that route, √(5000·ε₃₂)·σ_1 = 0.024, drops them; the
    # unfiltered effective rank shows how much they would have added.
    sigma = np.r_[np.ones(5), np.full(995, 3e-4)]
    report = spectrum_from_singular_values(sigma, n_rows=1000, n_parameters=5000, accumulation="float32")
    assert report.numerical_rank == 5
    assert report.effective_rank == pytest.approx(5.0)
    assert report.effective_rank_unfiltered > 5.5


def test_negative_eigenvalues_clip_to_zero():
    np.testing.assert_array_equal(singular_values_from_eigenvalues([-1e-12, 4.0, 0.0]), [2.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="square"):
        singular_values_from_gram(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="empty"):
        singular_values_from_gram(np.zeros((0, 0)))


def test_spectrum_of_model_matches_svd_of_jacobian():
    from jacobian_store.functional import initial_parameters, jacobian_rows

    model = create_model("lenet", width=0.25, n_outputs=3, seed=2)
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    report = spectrum_of_model(model, x, progress=False)
    J = jacobian_rows(model, initial_parameters(model), x).double().numpy()
    sigma = np.linalg.svd(J, compute_uv=False)
    np.testing.assert_allclose(report.singular_values, sigma, rtol=1e-5)
    assert report.n_rows == 12 and report.n_parameters == J.shape[1]
    assert report.metadata["gram"]["method"] == "structured"


# ------------------------------------------------------------------------------------- CLI

def test_cli_end_to_end(tmp_path):
    records = main(["--dataset", "digits", "--n-samples", "20", "--width", "0.5", "0.25", "--out", str(tmp_path),
                    "--quiet"])
    assert [r["width"] for r in records] == [0.5, 0.25]
    for stem in ("lenet_w0p5", "lenet_w0p25"):
        record = json.loads((tmp_path / f"{stem}.json").read_text())
        sigma = np.load(tmp_path / record["singular_values_file"])
        assert record["n_samples"] == 20 and record["dataset"]["name"] == "digits"
        assert sigma.shape == (200,) and np.all(np.diff(sigma) <= 0)
        assert record["spectrum"]["effective_rank"] == pytest.approx(
            effective_rank(sigma[sigma > record["spectrum"]["cutoff"]]))
        assert (tmp_path / f"{stem}_singular_values.png").stat().st_size > 0
    assert (tmp_path / "lenet_erank_vs_width.png").stat().st_size > 0
    table = (tmp_path / "lenet_spectrum.md").read_text()
    assert "| 0.5 | 200 |" in table and "| 0.25 | 200 |" in table


def test_cli_rejects_bad_options(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--width", "0", "--out", str(tmp_path)])
    assert "--width values must be positive" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--n-samples", "20", "--n-train", "30", "--out", str(tmp_path)])
    assert "disagree" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--cutoff", "tiny", "--out", str(tmp_path)])
    assert "expected a number, 'gram' or 'matrix_rank'" in capsys.readouterr().err
