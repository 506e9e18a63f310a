"""Fixtures shared by the whole suite."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

# Two cores are shared by the suite and whatever else runs; more threads only add contention.
torch.set_num_threads(min(2, os.cpu_count() or 1))

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Tests that take a device run on the CPU always and on CUDA where a GPU exists.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


@pytest.fixture(scope="session")
def shared_data_root() -> Path:
    """``../shared/data`` (real MNIST and CIFAR-10, read-only); tests using it skip where it is absent."""
    if not (SHARED_DATA / "MNIST" / "raw").is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA


# A Jacobian chunk is a float32 computation through BLAS, whose summation order depends on the
# thread count and the alignment of buffers; so two builds of one spec on different processes
# agree to float32 rounding of that computation, not bit for bit. An entry J_ij = Σ_k Δ_ik a_kj
# (a conv weight sums over up to a few hundred positions) carries rounding of at most
# n_terms·ε₃₂·Σ|Δ_ik a_kj|; measured differences stay below 0.4·ε₃₂·max|J| (4e-8 absolute),
# so 16·ε₃₂·max|J| bounds them with margin, while any wrong row, sample or chunk differs by O(max|J|).
FLOAT32_BUILD_ATOL = 16 * float(np.finfo(np.float32).eps)


def assert_equal_to_float32_rounding(a, b, name: str = "") -> None:
    """``a`` and ``b`` are the same float32 computation run twice: equal up to its rounding."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and a.dtype == b.dtype, name
    scale = float(np.abs(b).max()) if b.size else 0.0
    np.testing.assert_allclose(a, b, rtol=0, atol=FLOAT32_BUILD_ATOL * scale, err_msg=name)


def known_svd_matrix(sigma, m, p, seed=0):
    """An m × p matrix with singular values ``sigma`` and seeded random singular vectors."""
    rng = np.random.default_rng(seed)
    U, _ = np.linalg.qr(rng.standard_normal((m, len(sigma))))
    V, _ = np.linalg.qr(rng.standard_normal((p, len(sigma))))
    return (U * sigma) @ V.T
