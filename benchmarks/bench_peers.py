"""lincnn next to the tools a user would otherwise pick; one run prints one table.

**Gram matrix** K = J Jᵀ of LeNet ×1 and ×5 at initialization on N = 600 MNIST samples with
L = 10 outputs (K is N·L × N·L = 6,000 × 6,000):

- lincnn: ``jacobian_store.gram.gram_matrix`` (structured: linear layers through their outer-product
  structure, never forming their Jacobian; convolutions by im2col; float32 products summed in float64);
- torch.func *Jacobian contraction* and *NTK-vector products*, the two recipes of PyTorch's tutorial
  "Neural Tangent Kernels" (``empirical_ntk_jacobian_contraction``: ``vmap(jacrev)`` per sample, then
  ``einsum('Naf,Mbf->NMab')`` per parameter tensor; ``empirical_ntk_ntk_vps``: for each output of x1
  a ``vjp``, pushed through a ``jvp`` at x2, ``vmap``-ed over the pairs), reproduced below as written
  there, float32. The Jacobian recipe computes J(x) once when x1 is x2 (the tutorial calls jacrev on
  both arguments); the NTK-vector-product recipe runs on blocks of b samples per argument, since its
  nested vmap materializes the vjps as tangents for every pair, b²·L·p floats: b is the largest
  with b²·L·p·4 bytes ≤ ``--vps-gb`` (2 GB: b = 28 at ×1, 5 at ×5; b = 20 took 19 GB at ×5).

Each case runs in its own process. Time: the call alone (model, data and imports excluded). Peak
memory: the rise of the resident set across the call (``VmHWM`` reset through
``/proc/self/clear_refs``, as in ``bench_gram.py``), K included (288 MB at N = 600).
Accuracy: ‖K − K_ref‖_F / ‖K_ref‖_F with K_ref the Jacobian-contraction recipe on a float64 copy of
the network. The recipes hold J (or its vjps) for every sample they are given and cost O(N²) in
products or passes, so K_ref and the Jacobian recipe run on the first n_J ≤ N samples (n_J: the
largest float32 J within ``--max-jacobian-gb``, at most ``--max-peer-samples``), the NTK-vector
products on the first min(n_J, ``--max-vps-samples``); their time on N is the measured time ×
(N/n)², marked "~", and their error is taken on the samples they ran. lincnn runs on all N; its
error is that of its leading n_J·L block (the K of the first n_J samples).

**Minimum-norm least squares** on the 2,000 × 60,941 LeNet ×1 binary-MNIST store (built by
``bench_solvers.build_if_missing``; r = y − f(w0, X) in float64): lincnn ``lstsq`` (mixed and float64
precision, out of core from the store), lincnn ``cg`` (CGLS), ``scipy.linalg.lstsq`` with
``gelsd`` (the reference) and ``gelsy``, ``scipy.sparse.linalg.lsqr`` and ``lsmr``, the iterative
ones run to ‖J u − r‖ ≤ ``--tol``·‖r‖ from u₀ = 0 (so they also reach the minimum-norm u). Time
and ‖J u − J u_gelsd‖/‖J u_gelsd‖ (and ‖u − u_gelsd‖/‖u_gelsd‖). scipy gets J in memory in float64
(the copy a user would make; gelsd/gelsy would make it themselves).

    .venv/bin/python benchmarks/bench_peers.py            # the full table (tens of minutes on 2 cores)
    .venv/bin/python benchmarks/bench_peers.py --quick    # a small version in under a minute
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

from bench_gram import _proc_status, _reset_peak_rss  # noqa: E402
from bench_solvers import SHARED_DATA, build_if_missing  # noqa: E402

GRAM_METHODS = ("lincnn structured", "torch.func jacobian contraction", "torch.func ntk-vector products")


# ---- the torch.func recipes of PyTorch's "Neural Tangent Kernels" tutorial ----------------------

def tutorial_fnet_single(model):
    """``fnet_single(params, x)``: the network on one sample, as the tutorial defines it."""
    from torch.func import functional_call

    def fnet_single(params, x):
        return functional_call(model, params, (x.unsqueeze(0),)).squeeze(0)

    return fnet_single


def empirical_ntk_jacobian_contraction(fnet_single, params, x1, x2):
    from torch.func import jacrev, vmap
    import torch

    jac1 = vmap(jacrev(fnet_single), (None, 0))(params, x1)
    jac1 = [j.flatten(2) for j in jac1.values()]
    if x2 is x1:  # K(X, X): one Jacobian (the tutorial computes jac2 the same way)
        jac2 = jac1
    else:
        jac2 = vmap(jacrev(fnet_single), (None, 0))(params, x2)
        jac2 = [j.flatten(2) for j in jac2.values()]
    result = torch.stack([torch.einsum("Naf,Mbf->NMab", j1, j2) for j1, j2 in zip(jac1, jac2)])
    return result.sum(0)


def empirical_ntk_ntk_vps(func, params, x1, x2):
    from torch.func import jvp, vjp, vmap
    import torch

    def get_ntk(x1, x2):
        def func_x1(params):
            return func(params, x1)

        def func_x2(params):
            return func(params, x2)

        output, vjp_fn = vjp(func_x1, params)

        def get_ntk_slice(vec):
            # This computes ``vec @ J(x2).T`` ...
            vjps = vjp_fn(vec)
            # ... and this computes ``J(X1) @ vjps``
            _, jvps = jvp(func_x2, (params,), vjps)
            return jvps

        basis = torch.eye(output.numel(), dtype=output.dtype, device=output.device).view(output.numel(), -1)
        return vmap(get_ntk_slice)(basis)

    return vmap(vmap(get_ntk, (None, 0)), (0, None))(x1, x2)


def _as_matrix(blocks):
    """(N, M, L, L) indexed [i, j, a, b] → K (N·L × M·L), rows and columns sample-major."""
    n, m, L, _ = blocks.shape
    return blocks.permute(0, 2, 1, 3).reshape(n * L, m * L)


def gram_by_recipe(method: str, model, x, vps_gb: float):
    params = {k: v.detach() for k, v in model.named_parameters()}
    fnet_single = tutorial_fnet_single(model)
    if method == "jacobian":
        return _as_matrix(empirical_ntk_jacobian_contraction(fnet_single, params, x, x)).double().numpy()
    n = x.shape[0]
    L = model(x[:1]).shape[1]
    p = sum(v.numel() for v in params.values())
    vps_block = max(1, int(math.sqrt(vps_gb * 1e9 / (L * p * 4))))  # b²·L·p float32 tangents per call
    K = np.empty((n * L, n * L))
    for i in range(0, n, vps_block):  # block pairs j ≥ i; K is symmetric
        for j in range(i, n, vps_block):
            block = _as_matrix(empirical_ntk_ntk_vps(fnet_single, params, x[i:i + vps_block], x[j:j + vps_block]))
            rows, cols = slice(i * L, i * L + block.shape[0]), slice(j * L, j * L + block.shape[1])
            K[rows, cols] = block.double().numpy()
            K[cols, rows] = K[rows, cols].T
    return K


# ---- one Gram case per process -----------------------------------------------------------------

def run_gram_case(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from jacobian_store.architectures import create_model
    from jacobian_store.gram import gram_matrix
    from jacobian_store.datasets import load_dataset

    ds = load_dataset("mnist", data_root=args.data_root, n_train=args.n_total, n_test=1)
    x = ds.train.x[:args.n].contiguous()
    model = create_model("lenet", width=args.width, in_channels=ds.in_channels, n_outputs=ds.n_outputs,
                         image_size=ds.image_size, seed=0)
    if args.method == "reference":
        model, x = model.double(), x.double()
    gc.collect()
    peak_reset = _reset_peak_rss()
    import resource

    rss0 = _proc_status("VmRSS") if peak_reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if args.method == "structured":
        K = gram_matrix(model, x, method="structured", progress=False)
    else:
        K = gram_by_recipe("jacobian" if args.method in ("jacobian", "reference") else "vps", model, x, args.vps_gb)
    seconds = time.perf_counter() - t0
    rss1 = _proc_status("VmHWM") if peak_reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    np.save(args.save, K)
    print("RESULT " + json.dumps({"seconds": seconds, "peak_mb": (rss1 - rss0) / 1024,
                                  "memory_probe": "VmHWM" if peak_reset else "ru_maxrss"}), flush=True)


def spawn_gram(method: str, width: float, n: int, save: Path, opts) -> dict:
    cmd = [sys.executable, __file__, "--child", method, "--width", str(width), "--n", str(n),
           "--n-total", str(opts.samples), "--save", str(save), "--threads", str(opts.threads),
           "--data-root", str(opts.data_root), "--vps-gb", str(opts.vps_gb)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"{method} ×{width:g} on {n} samples failed:\n{proc.stderr[-3000:]}")


def gram_rows(opts) -> list[dict]:
    from jacobian_store.architectures import create_model, n_parameters

    rows = []
    L = 10
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for width in opts.widths:
            p = n_parameters(create_model("lenet", width=width, in_channels=1, n_outputs=L, image_size=28))
            n_jac = min(opts.samples, opts.max_peer_samples, int(opts.max_jacobian_gb * 1e9 // (L * p * 4)))
            n_vps = min(n_jac, opts.max_vps_samples)
            task = f"K = J Jᵀ, LeNet ×{width:g} (p = {p:,}), {opts.samples} samples × {L} outputs"
            print(f"{task}: K_ref and the Jacobian recipe on {n_jac} samples, the NTK-vps recipe on {n_vps}",
                  flush=True)
            ref = spawn_gram("reference", width, n_jac, tmp / "ref.npy", opts)
            K_ref = np.load(tmp / "ref.npy")
            # the samples are a prefix of the N, so K on n samples is the leading n·L block of K on N
            ours = spawn_gram("structured", width, opts.samples, tmp / "ours.npy", opts)
            results = {GRAM_METHODS[0]: (ours, _leading_rel(np.load(tmp / "ours.npy"), K_ref, L), opts.samples)}
            for label, method, n in zip(GRAM_METHODS[1:], ("jacobian", "vps"), (n_jac, n_vps)):
                out = spawn_gram(method, width, n, tmp / "peer.npy", opts)
                results[label] = (out, _leading_rel(np.load(tmp / "peer.npy"), K_ref, L), n)
            for label, (out, (err, err_n), n) in results.items():
                scale = (opts.samples / n) ** 2
                row = {"part": "gram", "task": task, "tool": label, "n": opts.samples, "seconds": out["seconds"] * scale,
                       "extrapolated": n < opts.samples, "peak_mb": out["peak_mb"], "error": err, "error_on_n": err_n,
                       "vs_lincnn": out["seconds"] * scale / ours["seconds"]}
                if n < opts.samples:
                    row["note"] = (f"measured {out['seconds']:.1f} s on {n} samples, × (N/n)² = {scale:.0f}; "
                                   f"peak memory on {n} samples")
                rows.append(row)
                print(f"  {label:34s} {'~' if n < opts.samples else ' '}{row['seconds']:9.1f} s  "
                      f"{row['peak_mb']:8.0f} MB  ‖K − K_ref‖/‖K_ref‖ = {err:.1e} (on {err_n})", flush=True)
            print(f"  (K_ref: float64 Jacobian contraction on {n_jac} samples, {ref['seconds']:.1f} s)", flush=True)
    return rows


def _leading_rel(K, K_ref, L: int):
    """‖K − K_ref‖/‖K_ref‖ on the samples both hold (the leading block of the larger), and their number."""
    n = min(K.shape[0], K_ref.shape[0])
    return rel_fro(K[:n, :n], K_ref[:n, :n]), n // L


def rel_fro(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ---- minimum-norm least squares on the stored J -------------------------------------------------

def solver_rows(opts) -> list[dict]:
    import scipy.linalg
    import scipy.sparse.linalg

    from jacobian_store.store import JacobianStore
    from solvers import solve

    build_if_missing(opts.store, 2000, 0, opts.data_root)
    rows = []
    with JacobianStore.open(opts.store) as store:
        J_op = store.train_J
        r = store.residual().astype(np.float64)
        J32 = J_op.to_dense()
        J64 = J32.astype(np.float64)
        cg_op = J_op  # from the store, cg holds J in memory in float64 itself (solvers/api.py)
        if opts.rows:  # --quick: the first rows only, J in memory (cg given the float64 copy it would hold)
            J32, J64, r = np.ascontiguousarray(J32[:opts.rows]), np.ascontiguousarray(J64[:opts.rows]), r[:opts.rows]
            J_op, cg_op = J32, J64
        m, p = J32.shape
        task = f"minimum-norm u, LeNet ×1 binary-MNIST store, J {m:,} × {p:,} float32"
        print(f"{task}; iterative methods to ‖Ju − r‖ ≤ {opts.tol:g}‖r‖", flush=True)
        results = {}

        def run(label, fn):
            gc.collect()
            t0 = time.perf_counter()
            u, note = fn()
            results[label] = (u, time.perf_counter() - t0, note)
            print(f"  {label:34s} {results[label][1]:8.2f} s  {note}", flush=True)

        def lincnn(method, **kw):
            def fn():
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    res = solve(cg_op if method == "cg" else J_op, r, method, **kw)
                steps = f"{res.n_iter} {'refinement steps' if method == 'lstsq' else 'iterations'}; " if res.n_iter else ""
                return res.u, f"{steps}{res.stop_reason}"
            return fn

        run("lincnn lstsq (mixed)", lincnn("lstsq", precision="mixed"))
        run("lincnn lstsq (float64)", lincnn("lstsq", precision="float64"))
        run("lincnn cg (CGLS)", lincnn("cg", tol=opts.tol, normal_tol=0.0, maxiter=opts.maxiter))
        for driver in ("gelsd", "gelsy"):
            run(f"scipy.linalg.lstsq {driver}",
                lambda driver=driver: (scipy.linalg.lstsq(J32, r, lapack_driver=driver, check_finite=False)[0],
                                       "float64 LAPACK on J in memory"))
        for name in ("lsqr", "lsmr"):
            solver = getattr(scipy.sparse.linalg, name)

            def fn(solver=solver):
                out = solver(J64, r, atol=0.0, btol=opts.tol, maxiter=opts.maxiter) if solver.__name__ == "lsmr" \
                    else solver(J64, r, atol=0.0, btol=opts.tol, iter_lim=opts.maxiter)
                return out[0], f"{out[2]} iterations, istop {out[1]}"
            run(f"scipy.sparse.linalg.{name}", fn)
        u_ref = results["scipy.linalg.lstsq gelsd"][0]
        ju_ref = J64 @ u_ref
        ours = results["lincnn lstsq (mixed)"][1]
        for label, (u, seconds, note) in results.items():
            rows.append({"part": "lstsq", "task": task, "tool": label, "n": m, "seconds": seconds,
                         "error": rel_fro(J64 @ u, ju_ref), "u_error": rel_fro(u, u_ref), "vs_lincnn": seconds / ours,
                         "note": note})
    return rows


def print_table(rows) -> None:
    print("\n| task | tool | time (s) | × lincnn's time | peak memory (MB) | error | note |")
    print("|---|---|---:|---:|---:|---|---|")
    for row in rows:
        if row["part"] == "gram":
            error = f"‖K − K_ref‖/‖K_ref‖ = {row['error']:.1e} (on {row['error_on_n']})"
            seconds = f"{'~' if row['extrapolated'] else ''}{row['seconds']:.1f}"
            memory = f"{row['peak_mb']:.0f}"
        else:
            error = f"‖Ju − Ju_gelsd‖/‖Ju_gelsd‖ = {row['error']:.1e}, ‖u − u_gelsd‖/‖u_gelsd‖ = {row['u_error']:.1e}"
            seconds, memory = f"{row['seconds']:.2f}", "—"
        print(f"| {row['task']} | {row['tool']} | {seconds} | {row['vs_lincnn']:.2f} | {memory} | {error} | "
              f"{row.get('note', '')} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="small version: 6 samples for K, the first 100 rows of the store, tol 1e-8")
    parser.add_argument("--widths", type=float, nargs="+", default=[1.0, 5.0])
    parser.add_argument("--samples", type=int, default=600, help="N, samples for K")
    parser.add_argument("--max-jacobian-gb", type=float, default=2.0,
                        help="largest float32 J the torch.func recipes (and K_ref, twice that in float64) may hold")
    parser.add_argument("--max-peer-samples", type=int, default=200,
                        help="at most this many samples for the Jacobian recipe and K_ref")
    parser.add_argument("--max-vps-samples", type=int, default=60,
                        help="at most this many samples for the NTK-vector-product recipe (N²·L jvp's of one sample)")
    parser.add_argument("--vps-gb", type=float, default=2.0,
                        help="memory for the tangents of one NTK-vector-product call (sets its block of samples)")
    parser.add_argument("--store", type=Path, default=REPO / "runs" / "bench-lenet1-mnist2000.h5")
    parser.add_argument("--rows", type=int, default=None, help="use only the first rows of the store's J")
    parser.add_argument("--tol", type=float, default=1e-10, help="relative residual of the iterative methods")
    parser.add_argument("--maxiter", type=int, default=5000, help="iteration cap of the iterative methods")
    parser.add_argument("--data-root", type=Path, default=SHARED_DATA)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--skip-gram", action="store_true")
    parser.add_argument("--skip-lstsq", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--child", choices=("structured", "jacobian", "vps", "reference"), help=argparse.SUPPRESS)
    parser.add_argument("--width", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--n-total", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--save", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        args.method = args.child
        run_gram_case(args)
        return 0
    if args.quick:
        args.samples, args.rows, args.tol = 6, args.rows or 100, 1e-8
    if not (args.data_root / "MNIST" / "raw").is_dir():
        sys.exit(f"MNIST not found under {args.data_root}; pass --data-root")
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus; {args.threads} threads", flush=True)
    rows = []
    if not args.skip_gram:
        rows += gram_rows(args)
    if not args.skip_lstsq:
        rows += solver_rows(args)
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
