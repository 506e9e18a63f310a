"""Solver speed and accuracy on a stored LeNet ×1 Jacobian of 2,000 binary-MNIST samples.

In one run, on J = 2,000 × 61,706 float32 read from the HDF5 store (built once, then reused):
- ``lstsq`` (out of core: float64 Gram K = J Jᵀ, eigendecomposition, u = Jᵀ α) against
  ``scipy.linalg.lstsq(J, r, lapack_driver="gelsd")`` on the same matrix held in memory (float64
  LAPACK, since r is float64), with the relative differences of the fitted outputs J u and of u,
  and the singular values lying between the two cut-offs, which explain the difference in u;
- ``ridge`` at one λ, ``cg`` to 1e-6 relative residual, ``rsvd`` at k = 500, one ``sgd`` epoch.
Target (issue 3): lstsq ≥ 10× faster than gelsd, ‖J u − J u_gelsd‖ / ‖J u_gelsd‖ ≤ 1e-4.

    .venv/bin/python benchmarks/bench_solvers.py [--store runs/bench-lenet1-mnist2000.h5] [--n 2000]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import scipy
import scipy.linalg

from solvers import solve

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def build_if_missing(path: Path, n: int, binary: int) -> None:
    if path.exists():
        return
    from jacobian_store.build import BuildSpec, build_store
    from jacobian_store.datasets import load_dataset

    use_mnist = (SHARED_DATA / "MNIST" / "raw").is_dir()
    if not use_mnist:
        sys.exit(f"MNIST not found under {SHARED_DATA}; pass --store with an existing store")
    dataset = load_dataset("mnist", data_root=SHARED_DATA, n_train=n, n_test=500, binary=binary, seed=0)
    print(f"building {path} (LeNet ×1, {n} binary-MNIST samples, class {binary} vs rest) ...", flush=True)
    print(build_store(path, BuildSpec("lenet", 1.0, seed=0), dataset, progress=False), flush=True)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, default=REPO / "runs" / "bench-lenet1-mnist2000.h5")
    parser.add_argument("--n", type=int, default=2000, help="training samples when building the store")
    parser.add_argument("--binary", type=int, default=0, help="the positive class of binary MNIST")
    parser.add_argument("--rank", type=int, default=500)
    parser.add_argument("--cg-maxiter", type=int, default=300,
                        help="cap on the CG run to 1e-6 (κ(J) ≈ 900 here: CGLS needs thousands of iterations, "
                             "two passes over J each)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)

    from jacobian_store.store import JacobianStore

    build_if_missing(args.store, args.n, args.binary)
    rows = []
    with JacobianStore.open(args.store) as store:
        J = store.train_J
        r = store.residual().astype(np.float64)  # f0 and y are stored in float32; r in float64 for LAPACK
        m, p = J.shape
        print(f"J: {m:,} × {p:,} {np.dtype(J.dtype).name} ({J.nbytes / 1e9:.2f} GB) from {args.store}; "
              f"threads: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, cpus={os.cpu_count()}; "
              f"numpy {np.__version__}, scipy {scipy.__version__}", flush=True)

        ours = solve(J, r, "lstsq")
        print(f"lstsq (out of core)   {ours.wall_time:8.2f} s   {ours.summary()}", flush=True)

        J_mem, t_read = timed(J.to_dense)
        # float64 LAPACK (dgelsd: J is promoted to r's float64, an exact copy of the stored matrix)
        (u_ref, _, rank_ref, sv_ref), t_ref = timed(lambda: scipy.linalg.lstsq(J_mem, r, lapack_driver="gelsd"))
        print(f"scipy gelsd (in mem.)  {t_ref:8.2f} s   (+{t_read:.2f} s to read J into memory); rank {rank_ref}",
              flush=True)
        ju_ours = J_mem @ ours.u  # float64 products (J promoted)
        ju_ref = J_mem @ u_ref
        res_ours, res_ref = rel(ju_ours, r), rel(ju_ref, r)
        sv = ours.extras["singular_values"]
        tau = ours.extras["cutoff"]
        between = int(((sv_ref <= tau) & (sv_ref > np.finfo(np.float64).eps * sv_ref[0])).sum())
        speedup = t_ref / ours.wall_time
        d_ju, d_u = rel(ju_ours, ju_ref), rel(ours.u, u_ref)
        print(f"  speed-up {speedup:.1f}×;  ‖Ju − Ju_gelsd‖/‖Ju_gelsd‖ = {d_ju:.2e};  ‖u − u_gelsd‖/‖u_gelsd‖ = "
              f"{d_u:.2e};  ‖Ju − r‖/‖r‖: ours {res_ours:.2e}, gelsd {res_ref:.2e}", flush=True)
        print(f"  cut-offs: ours τ = {tau:.3e} (σ_max {sv[0]:.3e}, τ/σ_max {tau / sv[0]:.2e}), rank {ours.extras['rank']}; "
              f"gelsd ε·σ_max = {np.finfo(np.float64).eps * sv_ref[0]:.2e}, rank {rank_ref}; singular values "
              f"between the two: {between}; σ_min = {sv_ref[-1]:.3e}", flush=True)
        rows.append({"method": "lstsq", "seconds": ours.wall_time, "gelsd_seconds": t_ref, "speedup": speedup,
                     "rel_diff_Ju": d_ju, "rel_diff_u": d_u, "residual": res_ours, "gelsd_residual": res_ref, "rank": ours.extras["rank"], "gelsd_rank": int(rank_ref),
                     "cutoff": tau, "sigma_max": float(sv[0]), "sigma_min": float(sv_ref[-1]),
                     "between_cutoffs": between, "relative_residual": ours.relative_residual})
        del J_mem

        lam = 1e-6 * float(sv[0]) ** 2
        res = solve(J, r, "ridge", lam=lam)
        print(f"ridge λ={lam:.3g}       {res.wall_time:8.2f} s   {res.summary()}", flush=True)
        rows.append({"method": "ridge", "seconds": res.wall_time, "lambda": lam, "relative_residual": res.relative_residual})

        with warnings.catch_warnings(record=True):
            res = solve(J, r, "cg", tol=1e-6, maxiter=args.cg_maxiter, normal_tol=0.0)
        per_iter = res.wall_time / max(res.n_iter, 1)
        print(f"cg to 1e-6            {res.wall_time:8.2f} s   {res.summary()}  ({per_iter:.2f} s/iteration)",
              flush=True)
        rows.append({"method": "cg", "seconds": res.wall_time, "iterations": res.n_iter, "converged": res.converged,
                     "seconds_per_iteration": per_iter, "relative_residual": res.relative_residual,
                     "rel_diff_u_vs_lstsq": rel(res.u, ours.u)})

        res = solve(J, r, "rsvd", rank=args.rank)
        print(f"rsvd k={args.rank}           {res.wall_time:8.2f} s   {res.summary()}", flush=True)
        rows.append({"method": "rsvd", "seconds": res.wall_time, "rank": args.rank,
                     "relative_residual": res.relative_residual})

        lr = 0.5 * J.n_samples / float(sv[0]) ** 2  # half the stable step of plain GD on the L2 loss
        res = solve(J, r, "sgd", lr=lr, epochs=1, batch_size=32)
        print(f"sgd 1 epoch           {res.wall_time:8.2f} s   {res.summary()}", flush=True)
        rows.append({"method": "sgd", "seconds": res.wall_time, "epochs": 1, "lr": lr,
                     "relative_residual": res.relative_residual})

    print("\n| method | wall time (s) | notes |\n|---|---:|---|")
    for row in rows:
        notes = {k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in row.items() if k not in ("method", "seconds")}
        print(f"| {row['method']} | {row['seconds']:.2f} | {', '.join(f'{k}={v}' for k, v in notes.items())} |")
    if args.json:
        args.json.write_text(json.dumps({"shape": [m, p], "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
