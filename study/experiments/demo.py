"""``bin/demo``: the binary-mnist comparison in miniature, on the bundled digits (no data files).

Digit 0 against the rest, LeNet at two widths: the standard network and its linearization at
initialization trained by the same SGD from the same w0, and the exact minimum-norm least-squares
fit of the linearization (J materialized into an HDF5 store, then ``solvers.solve(method="lstsq")``).
Prints the Markdown table and writes the figures; a few minutes on a laptop CPU. Rerunning resumes
(finished units are skipped), like every ``bin/study`` run.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from jacobian_store.datasets import DatasetError

from .config import ConfigError, resolve
from .report import write_report
from .runner import ExperimentError, Runner

DEMO = {
    "experiment": {"name": "demo", "kind": "compare",
                   "description": "Bundled digits, digit 0 against the rest: standard LeNet vs. linearized SGD vs. "
                                  "exact lstsq on the linearization, at two widths."},
    "dataset": {"name": "digits", "binary": 0, "n_train": 500, "n_test": 500},
    "grid": {"arch": "lenet", "widths": [1, 4], "seeds": [0], "models": ["standard", "linearized"],
             "solvers": ["lstsq"]},
    "train": {"epochs": 3, "lr": 0.1, "weight_decay": 5e-5, "batch_size": 32, "momentum": 0.9},
}

DEFAULTS_SHOWN = {"--widths": "1 4", "--seeds": "0", "--epochs": "3", "--n-train": "500"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bin/demo", description=__doc__.split("\n\n")[1].replace("\n", " "))
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="run directory (default: runs/demo)")
    parser.add_argument("--widths", type=float, nargs="+", default=DEMO["grid"]["widths"],
                        help="width factors (default: 1 4)")
    parser.add_argument("--seeds", type=int, nargs="+", default=DEMO["grid"]["seeds"], help="seeds (default: 0)")
    parser.add_argument("--epochs", type=int, default=DEMO["train"]["epochs"], help="SGD epochs (default: 3)")
    parser.add_argument("--n-train", type=int, default=DEMO["dataset"]["n_train"],
                        help="training samples, of 1,297 (default: 500)")
    parser.add_argument("--device", default=None, help="'auto', 'cpu', 'cuda' (default: auto)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    checks = {"--widths": (args.widths, 0.0), "--epochs": ([args.epochs], 0), "--n-train": ([args.n_train], 0),
              "--seeds": (args.seeds, -1)}  # (values, a bound each value must exceed)
    for option, (values, bound) in checks.items():
        if not all(math.isfinite(v) and v > bound for v in values):
            what = "non-negative" if bound < 0 else "positive"
            print(f"bin/demo: error: {option} must be {what}, got {' '.join(map(str, values))}; e.g. "
                  f"{option} {DEFAULTS_SHOWN[option]}", file=sys.stderr)
            return 2
    widths = [int(w) if float(w).is_integer() else w for w in args.widths]
    overrides = {"grid": {"widths": widths, "seeds": args.seeds}, "train": {"epochs": args.epochs},
                 "dataset": {"n_train": args.n_train}}
    start = time.perf_counter()
    try:
        exp = resolve(DEMO, "cpu", source="bin/demo (options)", overrides=overrides)
        Runner(exp, args.out, device=args.device, progress=not args.quiet).run()
    except (ConfigError, ExperimentError, DatasetError) as err:
        print(f"bin/demo: error: {err}", file=sys.stderr)
        return 2
    text, paths = write_report(args.out)
    print(text, end="")
    print(f"demo finished in {(time.perf_counter() - start) / 60:.1f} min; report {args.out / 'report.md'}", file=sys.stderr)
    for path in paths:
        print(f"figure: {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
