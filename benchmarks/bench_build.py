"""Jacobian store build speed: lincnn's chunked vmap(jacrev) build against two references.

For LeNet ×1, ×2, ×5 on MNIST (10 outputs), in one run:
- store:   ``build_store`` into a fresh HDF5 file (rows/s, MB/s, including the HDF5 writes);
- loop:    the obvious build, one backward pass per sample and output (L per sample), each row
           written to HDF5 as it is made, timed on a subset of the samples;
- raw:     h5py writing the same number of bytes with the same chunk shape, no computation:
           the write bandwidth ceiling of this machine;
- compute: rows/s of the store's layer-by-layer rows, of vmap(jacrev) of the whole network and of
           the loop, with no writes at all, to show which side (computation or I/O) bounds each width.
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
from jacobian_store.functional import initial_parameters, jacobian_rows
from jacobian_store.layer_jacobians import layer_plan, structured_jacobian_rows
from jacobian_store.datasets import load_dataset

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def loop_rows_per_second(model, x: torch.Tensor, path: Path | None) -> float:
    """Rows/s of the obvious build: L backward passes per sample, each row written as it is made.

    With ``path`` None the rows are only computed (the compute side of the comparison).
    """
    params = list(model.parameters())
    n_params = sum(p.numel() for p in params)
    n_outputs = model(x[:1]).shape[1]
    file = h5py.File(path, "w") if path is not None else None
    # h5py's default, contiguous storage: a row write goes straight to its place in the file.
    rows_out = None if file is None else file.create_dataset("J", shape=(x.shape[0] * n_outputs, n_params),
                                                             dtype=np.float32)
    started = time.perf_counter()
    row = 0
    for xi in x:
        out = model(xi.unsqueeze(0))[0]
        for l in range(n_outputs):
            grads = torch.autograd.grad(out[l], params, retain_graph=l + 1 < n_outputs)
            flat = torch.cat([g.reshape(-1) for g in grads])
            if rows_out is not None:
                rows_out[row] = flat.numpy()
            row += 1
    if file is not None:
        file.close()
        path.unlink()
    return row / (time.perf_counter() - started)


def chunked_rows_per_second(rows_of, x: torch.Tensor, chunk_samples: int) -> float:
    """Rows/s of computing J chunk by chunk with ``rows_of(x_chunk)``, no writes (the compute side)."""
    started = time.perf_counter()
    rows = 0
    for start in range(0, x.shape[0], chunk_samples):
        rows += rows_of(x[start:start + chunk_samples]).shape[0]
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
    print("rows/s of J; 'store' and 'loop' include writing the rows to HDF5; the last three columns compute "
          "only:\n  layers = the store's layer-by-layer rows, vmap = vmap(jacrev) of the whole network, loop = "
          "L backward passes per sample\n")
    header = (f"{'width':>5} {'p':>10} {'rows':>6} {'store':>7} {'MB/s':>6} {'loop':>6} {'raw MB/s':>8} "
              f"{'× loop':>7} {'of raw':>6} {'layers':>7} {'vmap':>6} {'loop':>6}")
    print(header)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for width in args.widths:
            model = create_model("lenet", width)
            n_params = sum(p.numel() for p in model.parameters())
            n_samples = max(8, int(args.gigabytes * 1e9 / (10 * n_params * 4)))
            dataset = load_dataset(dataset_name, data_root=SHARED_DATA if use_mnist else None,
                                   n_train=n_samples, n_test=10)
            n_samples = dataset.train.x.shape[0]
            # First calls pay one-off set-up (vmap's tracing takes about a second): a real build pays
            # it once per run, so it is paid here before the clock starts, for every method.
            structured_jacobian_rows(model, initial_parameters(model), dataset.train.x[:2])
            jacobian_rows(model, initial_parameters(model), dataset.train.x[:2])
            loop_rows_per_second(model, dataset.train.x[:1], None)
            report = build_store(Path(tmp) / f"w{width:g}.h5", BuildSpec("lenet", width), dataset, progress=False)
            (Path(tmp) / f"w{width:g}.h5").unlink()
            x_loop = dataset.train.x[:args.loop_samples]
            loop = loop_rows_per_second(model, x_loop, Path(tmp) / "loop.h5")
            chunk_samples, chunk_rows, _ = choose_chunking(10, n_params, 4, default_memory_budget(torch.device("cpu")),
                                                           None)
            raw = raw_write_megabytes_per_second(Path(tmp) / "raw.h5", n_samples * 10, n_params, chunk_rows)
            x_chunks = dataset.train.x[:max(args.loop_samples, chunk_samples)]
            params, plan = initial_parameters(model), layer_plan(model, x_chunks[:1])
            compute_layers = chunked_rows_per_second(lambda xb: structured_jacobian_rows(model, params, xb, plan),
                                                     x_chunks, chunk_samples)
            compute_vmap = chunked_rows_per_second(lambda xb: jacobian_rows(model, params, xb), x_chunks,
                                                   chunk_samples)
            compute_loop = loop_rows_per_second(model, x_loop, None)
            print(f"{width:>5g} {n_params:>10,} {n_samples * 10:>6} {report.rows_per_second:>7,.0f} "
                  f"{report.megabytes_per_second:>6,.0f} {loop:>6,.0f} {raw:>8,.0f} "
                  f"{report.rows_per_second / loop:>6.1f}× {report.megabytes_per_second / raw:>6.0%} "
                  f"{compute_layers:>7,.0f} {compute_vmap:>6,.0f} {compute_loop:>6,.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
