"""Scaling on this machine: build and whole ``bin/solve --method lstsq`` time against n and the width.

Binary MNIST (digit 0 against the rest, one output, so J is n × p), LeNet at each width: build the
store, then time the whole command a user runs (start-up, store, solve, test accuracy on 2,000
test images by the network's jvp, JSON record), with subprocess:

- ``bin/solve --method lstsq`` (precision "auto": mixed on the CPU, a float32 Gram refined in
  float64; the solve's own time is read back from the record);
- ``bin/solve --method lstsq --driver gelsd`` (scipy's float64 LAPACK on J held in memory) for the
  widths of ``--gelsd-widths``, and the ratio of the two commands: issue 10's target is ≥ 10× at
  n = 2,000 and the same or better at 4,000 and 8,000;

then delete the store. Prints a Markdown table; from it a user extrapolates a full run: the build
grows like n·p, the Gram like n²·p and the eigendecomposition like n³.

    .venv/bin/python benchmarks/bench_scaling.py [--widths 1 2] [--ns 1000 2000 4000 8000]
                                                  [--gelsd-widths 1] [--max-gigabytes 4] [--dir /tmp]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from jacobian_store.architectures import parameter_count
from jacobian_store.build import BuildSpec, build_store
from jacobian_store.datasets import load_dataset

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def whole_command(store: Path, extra: list[str]) -> tuple[float, dict]:
    """(wall seconds, JSON record) of ``bin/solve --store STORE --method lstsq EXTRA``."""
    with tempfile.TemporaryDirectory() as tmp:
        record = Path(tmp) / "record.json"
        cmd = [str(REPO / "bin" / "solve"), "--store", str(store), "--method", "lstsq", "--no-save", "--quiet",
               "--data-root", str(SHARED_DATA), "--json", str(record), *extra]
        started = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
        return seconds, json.loads(record.read_text())


def ran_in(record: dict) -> str:
    """The precision the solve ran in, and why mixed precision fell back when it did."""
    extras = record["extras"]
    fallback = extras.get("precision_fallback")
    return f"{extras.get('precision')} (mixed fell back: {fallback})" if fallback else str(extras.get("precision"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=float, nargs="+", default=[1, 2])
    parser.add_argument("--ns", type=int, nargs="+", default=[1000, 2000, 4000, 8000])
    parser.add_argument("--gelsd-widths", type=float, nargs="*", default=[1],
                        help="widths whose stores are also solved by the gelsd command (it takes minutes at n = 8,000)")
    parser.add_argument("--max-gigabytes", type=float, default=4.0, help="skip stores larger than this")
    parser.add_argument("--dir", type=Path, default=None, help="where stores are written (default a temp dir)")
    args = parser.parse_args(argv)
    if not (SHARED_DATA / "MNIST" / "raw").is_dir():
        print(f"bench_scaling: needs MNIST in {SHARED_DATA}", file=sys.stderr)
        return 2
    print(f"cpus: {os.cpu_count()}, load average at the start {os.getloadavg()[0]:.1f}\n")
    print("| width | p | n | J (GB) | build (s) | rows/s | lstsq command (s) | its solve (s) | gelsd command (s) | "
          "gelsd / lstsq | lstsq ran in | ‖Ju − r‖/‖r‖ | train acc | test acc |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for width in args.widths:
            p = parameter_count("lenet", width, n_outputs=1)
            for n in args.ns:
                gigabytes = n * p * 4 / 1e9
                if gigabytes > args.max_gigabytes:
                    print(f"| {width:g} | {p:,} | {n:,} | {gigabytes:.2f} | skipped (> --max-gigabytes) |"
                          + " |" * 9)
                    continue
                dataset = load_dataset("mnist", data_root=SHARED_DATA, n_train=n, n_test=2000, binary=0)
                path = Path(tmp) / f"w{width:g}-n{n}.h5"
                report = build_store(path, BuildSpec("lenet", width), dataset, progress=False)
                seconds, record = whole_command(path, [])
                gelsd = ""
                if width in args.gelsd_widths:
                    gelsd_seconds, _ = whole_command(path, ["--driver", "gelsd"])
                    gelsd = f"{gelsd_seconds:.1f} | {gelsd_seconds / seconds:.1f}×"
                else:
                    gelsd = "| "
                print(f"| {width:g} | {p:,} | {n:,} | {gigabytes:.2f} | {report.seconds:.1f} | "
                      f"{report.rows_per_second:,.0f} | {seconds:.1f} | {record['wall_time']:.1f} | {gelsd} | "
                      f"{ran_in(record)} | {record['relative_residual']:.1e} | {record['train_acc']:.3f} | {record['test_acc']:.3f} |",
                      flush=True)
                path.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
