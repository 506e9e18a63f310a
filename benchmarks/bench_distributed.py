"""The Dask operator against the in-memory HDF5 operator on one stored Jacobian.

On the store's J (default: the LeNet ×1, 2,000 binary-MNIST samples store of bench_solvers.py,
2,000 × 61,706 float32), with a Dask cluster (``--scheduler local``: one single-threaded worker
process per core), times J u, Jᵀ v, K = J Jᵀ and ``solve`` with lstsq and rsvd, each both ways,
and reports the largest difference of each result relative to its largest entry.

    .venv/bin/python benchmarks/bench_distributed.py [--store runs/bench-lenet1-mnist2000.h5]
        [--scheduler local|ADDRESS] [--n-workers N] [--block-mb 128] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from jacobian_store.store import JacobianStore
from solvers import solve
from solvers.distributed import DEFAULT_BLOCK_BYTES, connect, dask_operator_from_store

REPO = Path(__file__).resolve().parents[1]


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, default=REPO / "runs" / "bench-lenet1-mnist2000.h5")
    parser.add_argument("--scheduler", default="local", help="'local' (a LocalCluster) or a scheduler address")
    parser.add_argument("--n-workers", type=int, help="local workers (default: one per core)")
    parser.add_argument("--block-mb", type=float, default=DEFAULT_BLOCK_BYTES / 2**20,
                        help="target MiB of stored J per Dask block (default %(default)g)")
    parser.add_argument("--rank", type=int, default=100, help="rsvd rank (default 100)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)

    client, started = timed(lambda: connect(args.scheduler, n_workers=args.n_workers))
    rows = []
    try:
        with JacobianStore.open(args.store) as store:
            J, r = store.train_J, store.residual()
            op = dask_operator_from_store(store, client, block_bytes=int(args.block_mb * 2**20))
            print(f"{op}; cluster up in {started:.1f} s: {len(client.scheduler_info()['workers'])} workers, "
                  f"{os.cpu_count()} cores here", flush=True)
            rng = np.random.default_rng(0)
            u, v = rng.standard_normal(J.shape[1]), rng.standard_normal(J.shape[0])
            op.matvec(u)  # warm-up: workers import solvers and open the store
            cases = [("J u", lambda A: A.matvec(u)), ("Jᵀ v", lambda A: A.rmatvec(v)), ("K = J Jᵀ", lambda A: A.gram()),
                     ("solve lstsq", lambda A: solve(A, r, "lstsq", check_finite=False).u),
                     (f"solve rsvd k={args.rank}", lambda A: solve(A, r, "rsvd", rank=args.rank, check_finite=False).u)]
            for name, fn in cases:
                want, t_mem = timed(lambda: fn(J))
                got, t_dask = timed(lambda: fn(op))
                diff = float(np.abs(got - want).max() / np.abs(want).max())
                rows.append({"what": name, "in_memory_s": t_mem, "dask_s": t_dask, "max_rel_diff": diff})
                print(f"{name:<18} in-memory {t_mem:8.2f} s   dask {t_dask:8.2f} s   max|Δ|/max|ref| {diff:.1e}",
                      flush=True)
    finally:
        client.close()
    if args.json:
        args.json.write_text(json.dumps({"store": str(args.store), "scheduler": args.scheduler,
                                         "cluster_start_s": started, "results": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
