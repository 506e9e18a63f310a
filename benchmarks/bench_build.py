"""Jacobian store build speed: lincnn's chunked vmap(jacrev) build against two references.

For LeNet ×1, ×2, ×5 on MNIST (10 outputs), in one run:
- store:  ``build_store`` into a fresh HDF5 file (rows/s, MB/s, including the HDF5 writes);
- loop:   the obvious implementation, one backward pass per sample and output (L per sample),
          rows computed in memory only (no writes), timed on a subset of the samples;
- raw:    h5py writing the same number of bytes with the same chunk shape, no computation:
          the write bandwidth ceiling of this machine.
Targets (issue 2): store ≥ 3× loop at every width; store ≥ ½ raw bandwidth at ×1.

    .venv/bin/python benchmarks/bench_build.py [--gigabytes 1] [--widths 1 2 5] [--dir /tmp]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from jacobian_store.architectures import create_model
from jacobian_store.build import BuildSpec, build_store, choose_chunking, default_memory_budget
from study.data import load_dataset

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def loop_rows_per_second(model, x: torch.Tensor) -> float:
    """Rows/s of the per-output backward loop: L backward passes for each sample."""
    params = list(model.parameters())
    started = time.perf_counter()
    rows = 0
    for xi in x:
        out = model(xi.unsqueeze(0))[0]
        for l in range(out.shape[0]):
            grads = torch.autograd.grad(out[l], params, retain_graph=l + 1 < out.shape[0])
            torch.cat([g.reshape(-1) for g in grads])
            rows += 1
    return rows / (time.perf_counter() - started)


def raw_write_megabytes_per_second(path: Path, n_rows: int, n_params: int, chunk_rows: int) -> float:
    """MB/s of h5py writing n_rows × n_params float32 in blocks of chunk_rows rows."""
    block = np.random.default_rng(0).standard_normal((chunk_rows, n_params), dtype=np.float32)
    started = time.perf_counter()
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("J", shape=(n_rows, n_params), dtype=np.float32, chunks=(min(chunk_rows, n_rows), n_params))
        for start in range(0, n_rows, chunk_rows):
            stop = min(start + chunk_rows, n_rows)
            ds[start:stop] = block[:stop - start]
        f.flush()
    seconds = time.perf_counter() - started
    path.unlink()
    return n_rows * n_params * 4 / seconds / 1e6


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=float, nargs="+", default=[1, 2, 5])
    parser.add_argument("--gigabytes", type=float, default=1.0, help="size of each store built (default 1 GB)")
    parser.add_argument("--loop-samples", type=int, default=20, help="samples timed for the backward loop")
    parser.add_argument("--dir", type=Path, default=None, help="where the stores are written (default a temp dir)")
    args = parser.parse_args(argv)
    use_mnist = (SHARED_DATA / "MNIST" / "raw").is_dir()
    dataset_name = "mnist" if use_mnist else "digits"
    print(f"data: {dataset_name}{' from ' + str(SHARED_DATA) if use_mnist else ' (../shared/data absent)'}; "
          f"torch threads: {torch.get_num_threads()}")
    header = (f"{'width':>5} {'p':>10} {'rows':>6} {'store rows/s':>12} {'store MB/s':>10} {'loop rows/s':>11} "
              f"{'raw MB/s':>9} {'× loop':>7} {'of raw':>7}")
    print(header)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for width in args.widths:
            model = create_model("lenet", width)
            n_params = sum(p.numel() for p in model.parameters())
            n_samples = max(8, int(args.gigabytes * 1e9 / (10 * n_params * 4)))
            dataset = load_dataset(dataset_name, data_root=SHARED_DATA if use_mnist else None,
                                   n_train=n_samples, n_test=10)
            n_samples = dataset.train.x.shape[0]
            report = build_store(Path(tmp) / f"w{width:g}.h5", BuildSpec("lenet", width), dataset, progress=False)
            (Path(tmp) / f"w{width:g}.h5").unlink()
            loop = loop_rows_per_second(model, dataset.train.x[:args.loop_samples])
            _, chunk_rows, _ = choose_chunking(10, n_params, 4, default_memory_budget(torch.device("cpu")), None)
            raw = raw_write_megabytes_per_second(Path(tmp) / "raw.h5", n_samples * 10, n_params, chunk_rows)
            print(f"{width:>5g} {n_params:>10,} {n_samples * 10:>6} {report.rows_per_second:>12,.0f} "
                  f"{report.megabytes_per_second:>10,.0f} {loop:>11,.0f} {raw:>9,.0f} "
                  f"{report.rows_per_second / loop:>6.1f}× {report.megabytes_per_second / raw:>6.0%}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
