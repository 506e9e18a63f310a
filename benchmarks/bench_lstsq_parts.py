"""Where the time of mixed-precision ``lstsq`` goes: its parts, each timed alone on this machine.

On the stored LeNet ×1 Jacobian of ``benchmarks/bench_solvers.py`` (2,000 × 60,941 float32; built on
first use) and on random symmetric positive definite matrices of the Gram orders n of the scaling
table, it prints:

- reading J from HDF5 into a new array (``HDF5RowOperator.to_dense``), first and second time in
  this process: the first pays the page faults of fresh memory;
- the finiteness check on J held in memory: an ``isfinite`` mask against the product with a vector
  of ones that ``RowBlockOperator.check_finite`` uses;
- the float32 Gram K̂ = J Jᵀ three ways: numpy's ``J @ J.T`` (what ``solvers.direct`` calls), GEMM
  against a transposed copy, and scipy's BLAS ``ssyrk``;
- at n = 2,000, 4,000 and 8,000: the float64 eigenvalues (``scipy.linalg.eigh(eigvals_only=True,
  driver="evd")``, the rank test and reported spectrum of mixed precision) against a Cholesky
  factorization, the cheaper test that would prove full rank without the spectrum.

Each figure is the best of ``--repeats`` runs (the first read excepted, which happens once).

    .venv/bin/python benchmarks/bench_lstsq_parts.py [--store runs/bench-lenet1-mnist2000.h5] [--orders 2000 4000 8000]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import scipy.linalg
import scipy.linalg.blas

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from bench_solvers import SHARED_DATA, build_if_missing  # noqa: E402


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, default=REPO / "runs" / "bench-lenet1-mnist2000.h5")
    parser.add_argument("--orders", type=int, nargs="+", default=[2000, 4000, 8000])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)

    from jacobian_store.operators import ArrayRowOperator
    from jacobian_store.store import JacobianStore

    build_if_missing(args.store, 2000, 0, SHARED_DATA)
    print(f"cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}")
    with JacobianStore.open(args.store) as store:
        op = store.train_J
        started = time.perf_counter()
        J = op.to_dense()
        first = time.perf_counter() - started
        second = best_of(op.to_dense, args.repeats)
    print(f"read J ({J.nbytes / 1e9:.2f} GB) from HDF5: first {first:.2f} s, again {second:.2f} s")
    mask = best_of(lambda: np.isfinite(J).all(), args.repeats)
    ones = best_of(lambda: ArrayRowOperator(J).check_finite(), args.repeats)
    print(f"finiteness of the held J: isfinite mask {mask:.3f} s, check_finite (product with ones) {ones:.3f} s")
    JT = np.ascontiguousarray(J.T)
    products = {"J @ J.T (numpy)": lambda: J @ J.T, "GEMM, J @ transposed copy": lambda: J @ JT,
                "scipy ssyrk": lambda: scipy.linalg.blas.ssyrk(1.0, J)}
    for name, fn in products.items():
        print(f"float32 Gram, {name}: {best_of(fn, args.repeats):.2f} s")
    del JT
    for n in args.orders:
        A = np.random.default_rng(0).standard_normal((n, n))
        A = A @ A.T
        eig = best_of(lambda: scipy.linalg.eigh(A, eigvals_only=True, driver="evd", check_finite=False), args.repeats)
        chol = best_of(lambda: scipy.linalg.cho_factor(A, check_finite=False), args.repeats)
        print(f"n = {n:,}: float64 eigenvalues {eig:.2f} s, Cholesky {chol:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
