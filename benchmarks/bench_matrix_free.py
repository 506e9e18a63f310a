"""Seconds per CG iteration: stored J against matrix-free (jvp/vjp), LeNet at several widths.

One CGLS iteration is one product J·d and one product Jᵀ·ρ (plus vector updates, negligible), so
it is timed as one ``matvec`` plus one ``rmatvec`` (median of ``--repeat`` pairs, after one warm-up
pair) of

- the stored J: a Jacobian store (float32 HDF5) streamed chunk by chunk, and the same J held in
  memory in float64 (what ``solve`` does for cg when that copy fits its memory limit);
- the matrix-free J: ``jacobian_store.matrix_free.NetworkJacobian`` (batched jvp and vjp).

Building J is timed too (the stored route pays it once). Each width runs on its own number of
samples (``--samples W:N``) so that the slow cases fit the time at hand; per-iteration figures
for the full ``--n-train`` are extrapolated linearly in n (both routes cost O(n) per iteration:
a pass over n·L rows, or n samples through the network), and are marked so. The forward FLOPs
per sample (convolutions and linear layers, counted by hooks) are printed to extrapolate to
other machines: a matrix-free CG iteration costs about 6 forward passes (jvp ≈ 3, vjp ≈ 3).

    python benchmarks/bench_matrix_free.py --data-root ../shared/data --widths 1 5 20 \\
        --samples 1:10000 5:1000 20:64 --stored-max-gb 3
    python benchmarks/bench_matrix_free.py --quick      # digits, a few seconds

Measured on the development machine (CPU only, 2 cores shared with other jobs, load ≈ 8; binary
MNIST; seconds per iteration at n = 10,000, extrapolated from n = 2,000 / 200 / 16):

    LeNet   p            matrix-free   stored J (HDF5)   stored J held in float64   J at n=10,000
    ×1      60,941       11.6 s        17.3 s            1.4 s                      2.4 GB
    ×5      1,514,301    138 s         488 s             32 s (needs 121 GB RAM)    61 GB
    ×20     24,201,201   2,276 s       —                 —                          968 GB

i.e. 4–7 GFLOP/s under the 6-forward-passes model. On a GPU the matrix-free figures scale with
its FLOP rate; see the README for the extrapolation to 60,000 samples.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jacobian_store.architectures import create_model  # noqa: E402
from jacobian_store.build import BuildSpec, build_store  # noqa: E402
from jacobian_store.datasets import load_dataset  # noqa: E402
from jacobian_store.matrix_free import NetworkJacobian  # noqa: E402
from jacobian_store.operators import ArrayRowOperator  # noqa: E402
from jacobian_store.sizes import available_memory  # noqa: E402
from jacobian_store.store import JacobianStore  # noqa: E402


def forward_flops(model, x1) -> int:
    """Multiply-adds × 2 of one sample's forward pass through the convolutions and linear layers."""
    flops = []

    def hook(module, _inputs, out):
        if isinstance(module, torch.nn.Conv2d):
            flops.append(2 * module.weight.numel() * out.shape[-1] * out.shape[-2])
        elif isinstance(module, torch.nn.Linear):
            flops.append(2 * module.weight.numel())

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    with torch.no_grad():
        model(x1)
    for h in handles:
        h.remove()
    return sum(flops)


def time_iteration(op, repeat: int) -> float:
    """Median seconds of one matvec + one rmatvec (one CGLS iteration), after one warm-up pair."""
    rng = np.random.default_rng(0)
    u, v = rng.standard_normal(op.shape[1]), rng.standard_normal(op.shape[0])
    times = []
    for i in range(repeat + 1):
        t0 = time.perf_counter()
        op.matvec(u)
        op.rmatvec(v)
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_width(width, n, n_train, dataset_args, args, workdir) -> dict:
    data = load_dataset(**dataset_args, n_train=n, n_test=1)
    model = create_model("lenet", width, in_channels=data.in_channels, n_outputs=data.n_outputs,
                         image_size=data.image_size, seed=0)
    p = sum(q.numel() for q in model.parameters())
    m = n * data.n_outputs
    row = {"width": width, "n": n, "p": p, "J_gb_full": n_train * data.n_outputs * p * 4 / 1e9,
           "fwd_mflop": forward_flops(model, data.train.x[:1]) / 1e6}
    scale = n_train / n  # per-iteration cost is linear in n
    op = NetworkJacobian(model, data.train.x, device=args.device, batch_size=args.batch_size)
    row["free_s"] = time_iteration(op, args.repeat)
    row["free_full_s"] = row["free_s"] * scale
    row["batch"] = op.batch_size
    row["gflops"] = 6 * row["fwd_mflop"] * 1e6 * n / row["free_s"] / 1e9
    if m * p * 4 <= args.stored_max_gb * 1e9:
        path = Path(workdir) / f"lenet-w{width}.h5"
        t0 = time.perf_counter()
        build_store(path, BuildSpec("lenet", width, seed=0), data, device=args.device, overwrite=True, progress=False)
        row["build_s"] = time.perf_counter() - t0
        with JacobianStore.open(path) as store:
            J = store.train_J
            row["stored_s"] = time_iteration(J, args.repeat)
            free = available_memory("cpu")
            if free is not None and 8 * m * p <= 0.5 * free:
                row["held_s"] = time_iteration(ArrayRowOperator(J.to_dense().astype(np.float64), J.n_outputs),
                                               args.repeat)
        path.unlink()
        for key in ("stored_s", "held_s", "build_s"):
            if key in row:
                row[key.replace("_s", "_full_s")] = row[key] * scale
    return row


def print_table(rows, n_train) -> None:
    def fmt(x):
        return "—" if x is None else (f"{x:.3g}" if x < 1000 else f"{x:,.0f}")

    print(f"\nSeconds per CG iteration (one J·v + one Jᵀ·w); 'at n={n_train:,}' extrapolated linearly from "
          f"n measured\n")
    at = f"at n={n_train:,}"
    print("| LeNet | p | n measured | fwd MFLOP/sample | matrix-free s/it | stored HDF5 s/it | stored held f64 s/it "
          f"| build s | matrix-free s/it {at} | stored HDF5 s/it {at} | J GB (float32) {at} | matrix-free GFLOP/s |")
    print("|---:" * 12 + "|")
    for r in rows:
        print(f"| ×{r['width']:g} | {r['p']:,} | {r['n']:,} | {r['fwd_mflop']:.3g} | {fmt(r['free_s'])} | "
              f"{fmt(r.get('stored_s'))} | {fmt(r.get('held_s'))} | {fmt(r.get('build_s'))} | "
              f"{fmt(r['free_full_s'])} | {fmt(r.get('stored_full_s'))} | {r['J_gb_full']:.3g} | {r['gflops']:.3g} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=float, nargs="+", default=[1, 5, 20])
    parser.add_argument("--samples", nargs="*", default=[], metavar="W:N",
                        help="samples measured at width W (default: --n-train)")
    parser.add_argument("--n-train", type=int, default=10_000, help="the n the table extrapolates to (default 10,000)")
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--binary", type=int, default=0)
    parser.add_argument("--data-root", type=Path)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, help="samples per jvp/vjp (default: from the memory budget)")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--stored-max-gb", type=float, default=3.0, help="build a store only when J is at most this")
    parser.add_argument("--quick", action="store_true", help="digits, 200 samples, widths 0.25 and 1")
    args = parser.parse_args(argv)
    if args.quick:
        args.dataset, args.widths, args.n_train, args.samples, args.data_root = "digits", [0.25, 1], 200, [], None
    samples = {float(w): int(n) for w, n in (s.split(":") for s in args.samples)}
    dataset_args = {"name": args.dataset, "binary": args.binary, "data_root": args.data_root}
    print(f"device {args.device}, torch threads {torch.get_num_threads()}, {args.dataset} binary={args.binary}")
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for width in args.widths:
            rows.append(bench_width(width, samples.get(width, args.n_train), args.n_train, dataset_args, args, workdir))
            r = rows[-1]
            print(f"×{width:g}: n={r['n']}, matrix-free {r['free_s']:.3g} s/it (batch {r['batch']}), stored "
                  f"{r.get('stored_s', 'not built')}, held {r.get('held_s', '—')}, build {r.get('build_s', '—')}",
                  flush=True)
    print_table(rows, args.n_train)
    return 0


if __name__ == "__main__":
    sys.exit(main())
