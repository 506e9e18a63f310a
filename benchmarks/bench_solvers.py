"""Solver speed and accuracy on a stored LeNet ×1 Jacobian of 2,000 binary-MNIST samples.

In one run, on J = 2,000 × 60,941 float32 read from the HDF5 store (built once, then reused):
- ``lstsq`` out of core in mixed precision (float32 Gram K̂ = J Jᵀ, float64 Cholesky of it, float64
  refinement) and in float64 (float64 Gram, eigendecomposition), median of ``--repeats`` runs each,
  against ``scipy.linalg.lstsq(J, r, lapack_driver="gelsd")`` on the same matrix held in memory
  (float64 LAPACK, since r is float64), with the relative differences of J u and of u, and the
  singular values lying between the two cut-offs, which explain a difference in u;
- the whole ``bin/solve --method lstsq`` command (start-up, store, solve, test evaluation, JSON),
  timed with subprocess: ``--precision mixed`` on the store (test accuracy by the network's jvp,
  which imports torch) and on a copy built with ``--test-jacobian`` (test accuracy from the stored
  J(x): NumPy only), ``--precision float64`` (median of ``--repeats``) and ``--driver gelsd``
  (once: it takes half a minute);
- ``ridge`` at one λ (mixed and float64), ``cg`` to 1e-6 relative residual, ``rsvd`` at k = 500,
  one ``sgd`` epoch (``--skip-others`` leaves these out).
Target (issue 10): the whole lstsq command ≥ 10× the gelsd command; ‖J u − J u_gelsd‖ ≤ 1e-8 ‖J u_gelsd‖.

``--precision-scan`` instead times mixed against float64 lstsq on the first n rows of J for
n = 250 … 2,000 (J held in memory): where ``precision="auto"`` switches (``MIXED_MIN_ORDER`` in
solvers/direct.py).

    .venv/bin/python benchmarks/bench_solvers.py [--store runs/bench-lenet1-mnist2000.h5] [--n 2000]
    .venv/bin/python benchmarks/bench_solvers.py --precision-scan
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import scipy
import scipy.linalg

from solvers import solve

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def build_if_missing(path: Path, n: int, binary: int, data_root: Path = SHARED_DATA,
                     test_jacobian: bool = False) -> None:
    if path.exists():
        return
    from jacobian_store.build import BuildSpec, build_store
    from jacobian_store.datasets import load_dataset

    if not (data_root / "MNIST" / "raw").is_dir():
        sys.exit(f"MNIST not found under {data_root}; pass --data-root, or --store with an existing store")
    dataset = load_dataset("mnist", data_root=data_root, n_train=n, n_test=500, binary=binary, seed=0)
    print(f"building {path} (LeNet ×1, {n} binary-MNIST samples, class {binary} vs rest"
          f"{', with the test Jacobian' if test_jacobian else ''}) ...", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    print(build_store(path, BuildSpec("lenet", 1.0, seed=0, test_jacobian=test_jacobian), dataset, progress=False),
          flush=True)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and of its finished children: less sensitive than
    wall time to other jobs on a shared machine (though not immune: BLAS threads spin-wait)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def median_runs(fns: dict, repeats: int) -> dict:
    """{name: (last result, median wall time, all wall times, median CPU time)} of ``repeats``
    rounds of calling every function once, interleaved, so that a change of load on a shared
    machine hits all of them."""
    outs = {name: (None, [], []) for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            cpu0 = cpu_seconds()
            out, seconds = timed(fn)
            _, walls, cpus = outs[name]
            outs[name] = (out, walls + [seconds], cpus + [cpu_seconds() - cpu0])
    return {name: (out, statistics.median(walls), walls, statistics.median(cpus))
            for name, (out, walls, cpus) in outs.items()}


def rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def solve_command(store: Path, extra: list[str], data_root: Path) -> list[str]:
    return [str(REPO / "bin" / "solve"), "--store", str(store), "--method", "lstsq", "--no-save", "--quiet",
            "--data-root", str(data_root), *extra]


def run_command(cmd: list[str]) -> dict:
    """Run the whole command; return its JSON record."""
    with tempfile.TemporaryDirectory() as tmp:
        record = Path(tmp) / "record.json"
        proc = subprocess.run(cmd + ["--json", str(record)], capture_output=True, text=True, cwd=REPO)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        return json.loads(record.read_text())


def lstsq_rows(J, r, J_mem, repeats: int) -> tuple[list[dict], np.ndarray]:
    """lstsq mixed and float64 (median of ``repeats``) against gelsd; returns the rows and u_gelsd."""
    results = median_runs({precision: (lambda precision=precision: solve(J, r, "lstsq", precision=precision))
                           for precision in ("mixed", "float64")}, repeats)
    for precision, (res, seconds, times, cpu) in results.items():
        print(f"lstsq {precision:8s} (out of core) median {seconds:6.2f} s of {', '.join(f'{t:.2f}' for t in times)}"
              f" (CPU {cpu:.2f} s)   {res.summary()}", flush=True)
    # float64 LAPACK (dgelsd: J is promoted to r's float64, an exact copy of the stored matrix)
    cpu0 = cpu_seconds()
    (u_ref, _, rank_ref, sv_ref), t_ref = timed(lambda: scipy.linalg.lstsq(J_mem, r, lapack_driver="gelsd"))
    cpu_ref = cpu_seconds() - cpu0
    print(f"scipy gelsd (J in memory)      {t_ref:6.2f} s (CPU {cpu_ref:.2f} s)   rank {rank_ref}", flush=True)
    ju_ref = J_mem @ u_ref
    rows = []
    for precision, (res, seconds, times, cpu) in results.items():
        ju = J_mem @ res.u  # float64 products (J promoted)
        sv, tau = res.extras["singular_values"], res.extras["cutoff"]
        between = int(((sv_ref <= tau) & (sv_ref > np.finfo(np.float64).eps * sv_ref[0])).sum())
        row = {"method": f"lstsq ({res.extras['precision']})", "precision": precision, "seconds": seconds,
               "runs": times, "cpu_seconds": cpu, "gelsd_seconds": t_ref, "gelsd_cpu_seconds": cpu_ref,
               "speedup": t_ref / seconds, "cpu_speedup": cpu_ref / cpu, "rel_diff_Ju": rel(ju, ju_ref),
               "rel_diff_u": rel(res.u, u_ref), "residual": rel(ju, r), "gelsd_residual": rel(ju_ref, r),
               "rank": res.extras["rank"], "gelsd_rank": int(rank_ref), "cutoff": tau, "sigma_max": float(sv[0]),
               "sigma_min": float(sv_ref[-1]), "between_cutoffs": between,
               "refinement_steps": res.extras.get("refinement_steps", 0),
               "refinement_contraction": res.extras.get("refinement_contraction"),
               "precision_fallback": res.extras.get("precision_fallback"),
               "sv_max_rel_diff": float(np.max(np.abs(sv - sv_ref) / sv_ref))}
        print(f"  {precision}: {row['speedup']:.1f}× gelsd (CPU time {row['cpu_speedup']:.1f}×); ‖Ju − Ju_gelsd‖/‖Ju_gelsd‖ = {row['rel_diff_Ju']:.2e}; "
              f"‖u − u_gelsd‖/‖u_gelsd‖ = {row['rel_diff_u']:.2e}; ‖Ju − r‖/‖r‖ {row['residual']:.2e} (gelsd "
              f"{row['gelsd_residual']:.2e}); σ_i vs gelsd's: max relative difference {row['sv_max_rel_diff']:.1e}; "
              f"rank {row['rank']} (gelsd {rank_ref}), {between} singular values between the cut-offs", flush=True)
        rows.append(row)
    mixed, f64 = rows
    print(f"  mixed / float64: {f64['seconds'] / mixed['seconds']:.2f}× faster (CPU time "
          f"{f64['cpu_seconds'] / mixed['cpu_seconds']:.2f}×); "
          f"{mixed['refinement_steps']} refinement steps, contraction {mixed['refinement_contraction']}", flush=True)
    return rows, u_ref


def command_rows(store: Path, store_with_test: Path, data_root: Path, repeats: int) -> list[dict]:
    """The whole ``bin/solve --method lstsq`` command: mixed precision with test accuracy by the
    network's jvp (the default store) and from a stored test Jacobian (``--test-jacobian``, no
    torch), float64 (median of ``repeats``, interleaved), and gelsd (once)."""
    commands = {"--precision mixed (test by jvp)": (store, ["--precision", "mixed"]),
                "--precision mixed (test from the stored J(x))": (store_with_test, ["--precision", "mixed"]),
                "--precision float64 (test by jvp)": (store, ["--precision", "float64"])}
    solve_times = {label: [] for label in commands}  # the solve's own time in each run's record

    def command(label, s, extra):
        record = run_command(solve_command(s, extra, data_root))
        solve_times[label].append(record["wall_time"])
        return record

    runs = median_runs({label: (lambda label=label, s=s, extra=extra: command(label, s, extra))
                        for label, (s, extra) in commands.items()}, repeats)
    gelsd_label = "--driver gelsd (test by jvp)"
    solve_times[gelsd_label] = []
    runs[gelsd_label] = median_runs({"gelsd": lambda: command(gelsd_label, store, ["--driver", "gelsd"])}, 1)["gelsd"]
    rows = []
    for label, (record, seconds, times, cpu) in runs.items():
        solve_seconds = statistics.median(solve_times[label])
        row = {"method": f"bin/solve --method lstsq {label}", "seconds": seconds, "runs": times, "cpu_seconds": cpu,
               "solve_seconds": solve_seconds, "outside_solve_seconds": seconds - solve_seconds,
               "precision": record["extras"].get("precision"), "test_acc": record.get("test_acc"),
               "train_acc": record.get("train_acc")}
        print(f"{row['method']:72s} median {seconds:6.2f} s of {', '.join(f'{t:.2f}' for t in times)}, "
              f"CPU {cpu:.2f} s (solve, median {solve_seconds:.2f} s; outside it {row['outside_solve_seconds']:.2f} s; "
              f"train acc {record.get('train_acc')}, test acc {record.get('test_acc')})", flush=True)
        rows.append(row)
    gelsd = rows[-1]
    for row in rows[:-1]:
        row["speedup_vs_gelsd_command"] = gelsd["seconds"] / row["seconds"]
        row["cpu_speedup_vs_gelsd_command"] = gelsd["cpu_seconds"] / row["cpu_seconds"]
        print(f"  {row['method']}: {row['speedup_vs_gelsd_command']:.1f}× the gelsd command "
              f"(CPU time {row['cpu_speedup_vs_gelsd_command']:.1f}×)", flush=True)
    return rows


def precision_scan(J, r, ns, repeats: int) -> None:
    """Mixed against float64 lstsq on the first n rows (J in memory): where auto should switch."""
    J_mem = J.to_dense()
    print("\nwall seconds, median (CPU seconds in parentheses)")
    print("| n (Gram order) | float64 s | mixed s | float64 / mixed | refinement steps | mixed ran as |")
    print("|---:|---:|---:|---:|---:|---|")
    for n in ns:
        Jn, rn = J_mem[:n], r[:n]
        runs = median_runs({precision: (lambda precision=precision: solve(Jn, rn, "lstsq", precision=precision))
                            for precision in ("float64", "mixed")}, repeats)
        (_, t64, _, c64), (mix, tmx, _, cmx) = runs["float64"], runs["mixed"]
        print(f"| {n:,} | {t64:.3f} ({c64:.3f}) | {tmx:.3f} ({cmx:.3f}) | {t64 / tmx:.2f} ({c64 / cmx:.2f}) | "
              f"{mix.extras.get('refinement_steps', 0)} | {mix.extras['precision']} |", flush=True)


def other_rows(J, r, sv_max: float, rank: int, cg_maxiter: int, u_lstsq) -> list[dict]:
    rows = []
    lam = 1e-6 * sv_max ** 2
    for precision in ("mixed", "float64"):
        res = solve(J, r, "ridge", lam=lam, precision=precision)
        print(f"ridge λ={lam:.3g} {precision:8s} {res.wall_time:8.2f} s   {res.summary()}", flush=True)
        rows.append({"method": f"ridge ({res.extras['precision']})", "seconds": res.wall_time, "lambda": lam,
                     "relative_residual": res.relative_residual, "refinement_steps": res.n_iter})
    with warnings.catch_warnings(record=True):
        res = solve(J, r, "cg", tol=1e-6, maxiter=cg_maxiter, normal_tol=0.0)
    per_iter = res.wall_time / max(res.n_iter, 1)
    print(f"cg to 1e-6            {res.wall_time:8.2f} s   {res.summary()}  ({per_iter:.2f} s/iteration)", flush=True)
    rows.append({"method": "cg", "seconds": res.wall_time, "iterations": res.n_iter, "converged": res.converged,
                 "seconds_per_iteration": per_iter, "relative_residual": res.relative_residual,
                 "rel_diff_u_vs_lstsq": rel(res.u, u_lstsq)})
    res = solve(J, r, "rsvd", rank=rank)
    print(f"rsvd k={rank}           {res.wall_time:8.2f} s   {res.summary()}", flush=True)
    rows.append({"method": "rsvd", "seconds": res.wall_time, "rank": rank, "relative_residual": res.relative_residual})
    lr = 0.5 * J.n_samples / sv_max ** 2  # half the stable step of plain GD on the L2 loss
    res = solve(J, r, "sgd", lr=lr, epochs=1, batch_size=32)
    print(f"sgd 1 epoch           {res.wall_time:8.2f} s   {res.summary()}", flush=True)
    rows.append({"method": "sgd", "seconds": res.wall_time, "epochs": 1, "lr": lr,
                 "relative_residual": res.relative_residual})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, default=REPO / "runs" / "bench-lenet1-mnist2000.h5")
    parser.add_argument("--n", type=int, default=2000, help="training samples when building the store")
    parser.add_argument("--binary", type=int, default=0, help="the positive class of binary MNIST")
    parser.add_argument("--data-root", type=Path, default=SHARED_DATA, help="MNIST for the build and the test accuracy")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each cheap timing (the median is reported)")
    parser.add_argument("--rank", type=int, default=500)
    parser.add_argument("--cg-maxiter", type=int, default=300,
                        help="cap on the CG run to 1e-6 (κ(J) ≈ 900 here: CGLS needs thousands of iterations, "
                             "two passes over J each)")
    parser.add_argument("--skip-command", action="store_true", help="do not time the bin/solve commands")
    parser.add_argument("--skip-others", action="store_true", help="only lstsq (no ridge, cg, rsvd, sgd)")
    parser.add_argument("--precision-scan", action="store_true", help="only mixed vs float64 against n")
    parser.add_argument("--scan-ns", type=int, nargs="+", default=[250, 500, 1000, 1500, 2000])
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)

    from jacobian_store.store import JacobianStore

    build_if_missing(args.store, args.n, args.binary, args.data_root)
    rows = []
    with JacobianStore.open(args.store) as store:
        J = store.train_J
        r = store.residual().astype(np.float64)  # f0 and y are stored in float32; r in float64 for LAPACK
        m, p = J.shape
        print(f"J: {m:,} × {p:,} {np.dtype(J.dtype).name} ({J.nbytes / 1e9:.2f} GB) from {args.store}; "
              f"threads: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, cpus={os.cpu_count()}, "
              f"load average {os.getloadavg()[0]:.1f}; numpy {np.__version__}, scipy {scipy.__version__}", flush=True)
        if args.precision_scan:
            precision_scan(J, r, [n for n in args.scan_ns if n <= m], args.repeats)
            return 0
        J_mem = J.to_dense()
        lstsq, u_ref = lstsq_rows(J, r, J_mem, args.repeats)
        rows += lstsq
        del J_mem
        if not args.skip_command:
            with_test = args.store.with_name(f"{args.store.stem}-test-jacobian{args.store.suffix}")
            build_if_missing(with_test, args.n, args.binary, args.data_root, test_jacobian=True)
            rows += command_rows(args.store, with_test, args.data_root, args.repeats)
        if not args.skip_others:
            rows += other_rows(J, r, lstsq[0]["sigma_max"], args.rank, args.cg_maxiter, u_ref)

    print("\n| what | wall time (s) | notes |\n|---|---:|---|")
    for row in rows:
        notes = {k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in row.items()
                 if k not in ("method", "seconds", "runs") and v is not None}
        print(f"| {row['method']} | {row['seconds']:.2f} | {', '.join(f'{k}={v}' for k, v in notes.items())} |")
    if args.json:
        args.json.write_text(json.dumps({"shape": [m, p], "rows": rows}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
