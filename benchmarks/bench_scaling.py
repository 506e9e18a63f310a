"""Scaling on this machine: build and lstsq time against the number of samples n and the width k.

Binary MNIST (digit 0 against the rest, one output, so J is n × p), LeNet at each width: build the
store, solve it with ``lstsq`` (K = J Jᵀ accumulated in float64, then its eigendecomposition),
delete the store. Prints a Markdown table; from it a user extrapolates a full run: the build
grows like n·p, the Gram like n²·p and the eigendecomposition like n³.

    .venv/bin/python benchmarks/bench_scaling.py [--widths 1 2] [--ns 1000 2000 4000 8000]
                                                  [--max-gigabytes 4] [--dir /tmp]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from jacobian_store.architectures import create_model, n_parameters
from jacobian_store.build import BuildSpec, build_store
from jacobian_store.functional import linearized_outputs
from jacobian_store.store import JacobianStore
from solvers import solve
from jacobian_store.datasets import load_dataset
from study.metrics import accuracy

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=float, nargs="+", default=[1, 2])
    parser.add_argument("--ns", type=int, nargs="+", default=[1000, 2000, 4000, 8000])
    parser.add_argument("--max-gigabytes", type=float, default=4.0, help="skip stores larger than this")
    parser.add_argument("--dir", type=Path, default=None, help="where stores are written (default a temp dir)")
    args = parser.parse_args(argv)
    if not (SHARED_DATA / "MNIST" / "raw").is_dir():
        print(f"bench_scaling: needs MNIST in {SHARED_DATA}", file=sys.stderr)
        return 2
    print(f"torch threads: {torch.get_num_threads()}\n")
    print("| width | p | n | J (GB) | build (s) | rows/s | lstsq (s) | ‖Ju − r‖/‖r‖ | train acc | test acc |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for width in args.widths:
            p = n_parameters(create_model("lenet", width, n_outputs=1))
            for n in args.ns:
                gigabytes = n * p * 4 / 1e9
                if gigabytes > args.max_gigabytes:
                    print(f"| {width:g} | {p:,} | {n:,} | {gigabytes:.2f} | skipped (> --max-gigabytes) | | | | | |")
                    continue
                dataset = load_dataset("mnist", data_root=SHARED_DATA, n_train=n, n_test=2000, binary=0)
                path = Path(tmp) / f"w{width:g}-n{n}.h5"
                report = build_store(path, BuildSpec("lenet", width), dataset, progress=False)
                with JacobianStore.open(path) as store:
                    started = time.perf_counter()
                    result = solve(store.train_J, store.residual(), method="lstsq")
                    seconds = time.perf_counter() - started
                    train_acc = accuracy(store.f0() + np.asarray(result.fitted).reshape(n, 1), store.targets())
                    _, test_outputs = linearized_outputs(store.model(), torch.from_numpy(result.u), dataset.test.x)
                    test_acc = accuracy(test_outputs, dataset.test.targets)
                print(f"| {width:g} | {p:,} | {n:,} | {gigabytes:.2f} | {report.seconds:.1f} | "
                      f"{report.rows_per_second:,.0f} | {seconds:.1f} | {result.relative_residual:.1e} | "
                      f"{train_acc:.3f} | {test_acc:.3f} |", flush=True)
                path.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
