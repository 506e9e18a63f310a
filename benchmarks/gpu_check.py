"""Check and time lincnn's GPU paths against the CPU on one machine with a CUDA GPU.

Builds the same LeNet store (binary MNIST, or digits when no data root is found) on the GPU and on
the CPU, compares sampled rows, then solves with lstsq, ridge and cg on the GPU (CuPy) and on the
CPU (NumPy) and compares the fitted outputs J u. Prints rows/s and GB/s of each build and the
solve times; exits non-zero when a comparison fails its tolerance.

    benchmarks/gpu_check.sh                       # the wrapper: sets up .venv with the gpu extra
    .venv/bin/python benchmarks/gpu_check.py --width 5 --n-train 1000 --out runs/gpu-check
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from jacobian_store.build import BuildSpec, build_store
from jacobian_store.store import JacobianStore
from solvers import solve
from jacobian_store.datasets import load_dataset

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
# float32 J from two devices: cuDNN and cuBLAS sum in other orders than the CPU (TF32 is off),
# so entries agree to a few float32 ulps of the row's largest entry.
JACOBIAN_RTOL = 1e-4
# Fitted outputs from float64 solves on the two devices of (nearly) the same J.
FIT_RTOL = 1e-3


def timed(fn):
    started = time.perf_counter()
    value = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return value, time.perf_counter() - started


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=float, default=5)
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--data-root", type=Path, default=SHARED_DATA)
    parser.add_argument("--out", type=Path, default=Path("runs/gpu-check"))
    parser.add_argument("--cg-iterations", type=int, default=200)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU visible to torch; nothing to check", file=sys.stderr)
        return 2
    print(f"GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}")
    have_mnist = (args.data_root / "MNIST" / "raw").is_dir()
    dataset = load_dataset("mnist" if have_mnist else "digits", data_root=args.data_root if have_mnist else None,
                           n_train=args.n_train, n_test=1000, binary=0)
    args.out.mkdir(parents=True, exist_ok=True)
    spec = BuildSpec("lenet", args.width)
    stores = {}
    for device in ("cuda", "cpu"):
        path = args.out / f"lenet-w{args.width:g}-{device}.h5"
        report, seconds = timed(lambda: build_store(path, spec, dataset, device=device, overwrite=True, progress=False))
        print(f"build {device:4}: J {report.shape[0]:,} × {report.shape[1]:,}, {seconds:6.1f} s, "
              f"{report.rows_per_second:8,.0f} rows/s, {report.megabytes_per_second / 1e3:6.2f} GB/s")
        stores[device] = JacobianStore.open(path)
    failures = []
    rows = np.random.default_rng(0).choice(stores["cpu"].train_J.shape[0], size=min(64, args.n_train), replace=False)
    a, b = stores["cuda"].train_J.take_rows(rows), stores["cpu"].train_J.take_rows(rows)
    difference = float(np.abs(a - b).max() / np.abs(b).max())
    print(f"J rows, GPU against CPU: max |ΔJ| / max |J| = {difference:.2e} (tolerance {JACOBIAN_RTOL:g})")
    if difference > JACOBIAN_RTOL:
        failures.append("Jacobian rows")

    J = stores["cpu"].train_J
    r = stores["cpu"].residual()
    methods = [("lstsq", {}), ("ridge", {"lam": 1e-3}), ("cg", {"maxiter": args.cg_iterations, "tol": 1e-6})]
    for method, options in methods:
        fits = {}
        for device in ("cuda", "cpu"):
            result, seconds = timed(lambda: solve(stores[device].train_J, r, method=method, device=device, **options))
            fits[device] = J.matvec(np.asarray(result.u))
            print(f"{method:5} on {device:4}: {seconds:7.2f} s, {result.n_iter} iterations, "
                  f"‖Ju − r‖/‖r‖ = {result.relative_residual:.2e}")
        gap = float(np.linalg.norm(fits["cuda"] - fits["cpu"]) / np.linalg.norm(fits["cpu"]))
        print(f"{method:5}: ‖J u_gpu − J u_cpu‖ / ‖J u_cpu‖ = {gap:.2e} (tolerance {FIT_RTOL:g})")
        if gap > FIT_RTOL:
            failures.append(method)
    for store in stores.values():
        store.close()
    if failures:
        print(f"gpu_check: FAILED: {', '.join(failures)}", file=sys.stderr)
        return 1
    print("gpu_check: all GPU paths agree with the CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
