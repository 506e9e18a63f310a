"""``bin/solve``: fit the linearized network on a Jacobian store with one solver, or sweep its knob.

    bin/solve --store runs/lenet-w5.h5 --method lstsq
    bin/solve --store runs/lenet-w5.h5 --method ridge --lambda 1e-3
    bin/solve --store runs/lenet-w5.h5 --method ridge --path --lambdas 1e-6 1e-4 1e-2 1
    bin/solve --store runs/lenet-w5.h5 --method sgd --lr 0.01 --epochs 20 --weight-decay 1e-4

Writes u and its diagnostics (every option used) into the store under ``/solutions/<name>``,
prints a one-line summary and writes a JSON record. Train accuracy is that of f0 + J u on the
stored training set; test accuracy that of f0(x) + J(x) u on the test set, with J(x) u computed by
``torch.func.jvp`` at w0 (no test Jacobian needed); prediction rule of ``study.metrics``.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from .api import METHOD_OPTIONS, METHODS, PATH_KNOBS, solve, solve_path
from .memory import MemoryLimitError, __doc__ as MEMORY_DOC
from .result import json_safe

# command-line flag (argparse dest) → solver option
FLAG_OPTIONS = {
    "lambda_": "lam", "rank": "rank", "maxiter": "maxiter", "tol": "tol", "normal_tol": "normal_tol",
    "lr": "lr", "weight_decay": "weight_decay", "epochs": "epochs", "batch_size": "batch_size",
    "lr_step": "lr_step", "lr_gamma": "lr_gamma", "momentum": "momentum", "seed": "seed", "driver": "driver",
    "form": "form", "rcond": "rcond", "oversample": "oversample", "power_iter": "power_iter", "precision": "precision",
}
OPTION_FLAGS = {v: "--" + k.rstrip("_").replace("_", "-") for k, v in FLAG_OPTIONS.items()}
OPTION_FLAGS["lam"] = "--lambda"
# the flag listing a path's knob values, per method
PATH_FLAGS = {"ridge": "lambdas", "rsvd": "ranks", "cg": "iterations", "sgd": "epochs_list"}
KNOB_LABELS = {"lam": "λ", "rank": "rank k", "maxiter": "CG iterations", "epochs": "SGD epochs"}


def build_parser() -> argparse.ArgumentParser:
    memory = MEMORY_DOC.split("\n\n", 1)[1]
    parser = argparse.ArgumentParser(
        prog="bin/solve", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="What each method holds in memory (J is read from the store chunk by chunk, never whole):\n\n"
               + memory + "\nA method that would not fit under --memory-limit is refused before it reads J, "
               "with the figure.")
    parser.add_argument("--store", type=Path, required=True, help="the Jacobian store (HDF5, from bin/build-jacobian)")
    parser.add_argument("--method", choices=METHODS + ("auto",), default="lstsq",
                        help="lstsq: minimum-norm least squares; ridge: + λ‖u‖²; cg: CGLS, iterations regularize; "
                             "rsvd: rank-k truncated SVD; sgd: momentum SGD as in network training; auto: lstsq if "
                             "it fits in memory, else cg (default: lstsq)")
    knobs = parser.add_argument_group("method options (each applies to the methods named)")
    knobs.add_argument("--lambda", dest="lambda_", type=float, help="ridge: λ ≥ 0")
    knobs.add_argument("--rank", type=int, help="rsvd: rank k ≤ min(n·L, p)")
    knobs.add_argument("--maxiter", type=int, help="cg: iteration limit (default 2·min(n·L, p))")
    knobs.add_argument("--tol", type=float, help="cg: stop when ‖J u − r‖ ≤ tol·‖r‖ (default 1e-6)")
    knobs.add_argument("--normal-tol", type=float, help="cg: stop when ‖Jᵀ(J u − r)‖ ≤ normal_tol·‖J‖·‖J u − r‖ (default 1e-10)")
    knobs.add_argument("--lr", type=float, help="sgd: learning rate (required for sgd)")
    knobs.add_argument("--weight-decay", type=float, help="sgd: weight decay on u (default 0); its stationary point is "
                                                           "ridge with λ = n·weight_decay")
    knobs.add_argument("--epochs", type=int, help="sgd: epochs (default 1)")
    knobs.add_argument("--batch-size", type=int, help="sgd: samples per mini-batch (default 32)")
    knobs.add_argument("--lr-step", type=int, help="sgd: multiply lr by --lr-gamma every this many epochs")
    knobs.add_argument("--lr-gamma", type=float, help="sgd: step-decay factor (default 0.1)")
    knobs.add_argument("--momentum", type=float, help="sgd: momentum (default 0.9)")
    knobs.add_argument("--seed", type=int, help="rsvd: seed of the test matrix; sgd: seed of the batch order (default 0)")
    knobs.add_argument("--driver", choices=("gelsd", "gelsy", "gelss"),
                       help="lstsq: solve J held in memory with scipy.linalg.lstsq (checking only)")
    knobs.add_argument("--form", choices=("auto", "dual", "primal"),
                       help="lstsq, ridge: K = J Jᵀ (dual) or JᵀJ (primal); auto takes the smaller")
    knobs.add_argument("--precision", choices=("auto", "float64", "mixed"),
                       help="lstsq, ridge: mixed = float32 Gram refined to float64 accuracy (falls back to float64 "
                            "when float32 cannot resolve J); auto = mixed for Gram matrices of order ≥ 64 on the "
                            "CPU (default: auto; see solvers/direct.py)")
    knobs.add_argument("--rcond", type=float, help="lstsq, rsvd: singular values ≤ rcond·σ_max count as zero "
                                                    "(default: the rounding floor, see solvers/direct.py)")
    knobs.add_argument("--oversample", type=int, help="rsvd: extra columns of the range finder (default 10)")
    knobs.add_argument("--power-iter", type=int, help="rsvd: subspace iterations (default 2)")

    sweep = parser.add_argument_group("paths (--path): the method's knob swept from one factorization or run")
    sweep.add_argument("--path", action="store_true", help="sweep the knob; writes a table (.md, .csv) and a figure (.png)")
    sweep.add_argument("--lambdas", type=float, nargs="+", help="ridge path: λ values (default: 9 on a log grid "
                                                               "from 1e-6 to 1e2 times the mean diagonal of J Jᵀ)")
    sweep.add_argument("--ranks", type=int, nargs="+", help="rsvd path: ranks (default 1, 2, 5, 10, … ≤ min(n·L, p))")
    sweep.add_argument("--iterations", type=int, nargs="+", help="cg path: iteration counts (default 1, 2, 5, … 1000)")
    sweep.add_argument("--epochs-list", type=int, nargs="+", help="sgd path: epoch counts (default 1, 2, 5, 10, 20)")

    out = parser.add_argument_group("output and resources")
    out.add_argument("--name", help="solution name in the store (default: from the method and its knobs)")
    out.add_argument("--overwrite", action="store_true", help="replace a solution of the same name")
    out.add_argument("--no-save", action="store_true", help="do not write u into the store")
    out.add_argument("--json", type=Path, help="the JSON record (default: <store>.<name>.json beside the store)")
    out.add_argument("--out", type=Path, help="path outputs' prefix (default: <store>.<name> beside the store)")
    out.add_argument("--memory-limit", default="auto",
                     help="refuse a method needing more (e.g. 16G; default: 80%% of the memory available now)")
    out.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                     help="auto: the GPU when CuPy/PyTorch see one (default), else the CPU")
    out.add_argument("--scheduler", metavar="ADDRESS|local",
                     help="run lstsq, ridge, cg or rsvd on a Dask cluster: 'local' starts one on this machine (one "
                          "worker process per core), else the address of a running scheduler (tcp://host:8786); "
                          "needs pip install 'lincnn[distributed]', and workers on other machines need the store "
                          "on a shared filesystem at the same path")
    out.add_argument("--data-root", type=Path, help="where the store's dataset lives, for the test accuracy")
    out.add_argument("--no-test", action="store_true", help="skip the test-set evaluation")
    out.add_argument("--eval-batch-size", type=int, default=256, help="test samples per jvp (default 256)")
    out.add_argument("--standard-run", type=Path,
                     help="a bin/train run directory (or its metrics.json) of the standard network, reported alongside")
    out.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    method = args.method
    if args.scheduler and method == "sgd":
        parser.error("--scheduler runs lstsq, ridge, cg and rsvd; sgd reads its mini-batches locally, drop --scheduler")
    if args.scheduler and args.driver:
        parser.error("--driver solves with LAPACK on J held in local memory; it does not combine with --scheduler")
    options = _options_from_args(parser, args, method)
    try:
        return _run(args, method, options)
    except (MemoryLimitError, ValueError, TypeError, OSError, ImportError) as error:
        print(f"bin/solve: error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # StoreError and DatasetError are RuntimeError/ValueError subclasses
        from jacobian_store.store import StoreError

        if isinstance(error, StoreError):
            print(f"bin/solve: error: {error}", file=sys.stderr)
            return 2
        raise


def _options_from_args(parser, args, method) -> dict:
    valid = METHOD_OPTIONS.get(method, {}) if method != "auto" else {}
    options = {}
    for dest, option in FLAG_OPTIONS.items():
        value = getattr(args, dest)
        if value is None:
            continue
        if option not in valid:
            own = ", ".join(OPTION_FLAGS[o] for o in valid if o in OPTION_FLAGS) or "none"
            parser.error(f"{OPTION_FLAGS[option]} does not apply to --method {method} (its options: {own})")
        options[option] = value
    if args.path:
        if method not in PATH_KNOBS:
            parser.error(f"--path sweeps a knob; --method {method} has none (paths: {', '.join(PATH_KNOBS)})")
        knob = PATH_KNOBS[method]
        if knob in options:
            parser.error(f"with --path, give the values of {OPTION_FLAGS[knob]} with --{PATH_FLAGS[method].replace('_', '-')}")
    for m, flag in PATH_FLAGS.items():
        if getattr(args, flag) is not None and not (args.path and m == method):
            parser.error(f"--{flag.replace('_', '-')} needs --path --method {m}")
    return options


def _run(args, method, options) -> int:
    from jacobian_store.store import JacobianStore

    started = time.perf_counter()
    mode = "r" if args.no_save else "r+"
    with JacobianStore.open(args.store, mode=mode) as store, contextlib.ExitStack() as cluster:
        J = store.train_J  # checks the build (and shards) before any cluster is started
        if args.scheduler:
            from .distributed import connect, dask_operator_from_store

            client = connect(args.scheduler)
            cluster.callback(client.close)  # closed before the store; a local cluster goes with it
            J = dask_operator_from_store(store, client)
        r = store.residual()
        f0, targets = store.f0("train"), store.targets("train")
        common = dict(device=args.device, memory_limit=args.memory_limit, progress=not args.quiet)
        name = args.name or (f"{method}-path" if args.path else _default_name(method, options))
        if not args.no_save and not args.overwrite and not args.path and name in store.solution_names():
            raise ValueError(f"{args.store} already holds solution {name!r}; pass --overwrite or another --name")
        if args.path:
            knob = PATH_KNOBS[method]
            values = _path_values(args, method, J, options)
            results = solve_path(J, r, method, values, **common, **options)
        else:
            results = [solve(J, r, method, **common, **options)]
        evaluation = _Evaluator(store, args)
        records = []
        for res in _progress(results, not args.quiet and len(results) > 1, "evaluate"):
            fitted = res.fitted.reshape(f0.shape)
            record = {"name": name, **res.to_dict(), **evaluation(res.u, f0 + fitted, targets)}
            if args.path:
                record["knob"], record["value"] = knob, res.options[knob]
                record["name"] = f"{name}@{knob}={res.options[knob]:g}"
            records.append(record)
            if not args.no_save:
                store.write_solution(record["name"], res.u, _info(record, args), overwrite=args.overwrite)
        standard = _standard_metrics(args.standard_run)
        init = evaluation.at_init(f0, targets)
        stem = args.store.with_suffix("")
        payload = {"store": str(args.store), "store_summary": store.summary(), "command": _command(args), "scheduler": args.scheduler,
                   "initial": init, "standard": standard, "seconds": time.perf_counter() - started}
    if args.path:
        prefix = args.out or Path(f"{stem}.{name}")
        _write_path_outputs(prefix, records, knob, method, standard)
        payload["path"] = records
        json_path = args.json or Path(f"{prefix}.json")
        for rec in records:
            print(_summary_line(rec))
        print(f"path of {len(records)} {KNOB_LABELS[knob]} values → {prefix}.md, {prefix}.csv, {prefix}.png")
    else:
        payload.update(records[0])
        json_path = args.json or Path(f"{stem}.{name}.json")
        print(_summary_line(records[0]) + (f" | standard train_acc={standard['train_acc']:.4f} test_acc="
                                           f"{standard['test_acc']:.4f}" if standard else ""))
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(json_safe(payload), indent=1) + "\n")
    return 0


class _Evaluator:
    """Train accuracy from f0 + J u; test accuracy from f0(x) + J(x) u by jvp at w0."""

    def __init__(self, store, args):
        self.model = self.x_test = self.y_test = None
        self.test_note = None
        if args.no_test:
            self.test_note = "skipped (--no-test)"
            return
        try:
            import torch

            dataset = store.dataset(data_root=args.data_root)
            device = "cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu"
            self.model = store.model(device=device)
            self.x_test, self.y_test = dataset.test.x, dataset.test.targets.numpy()
            self.batch_size = args.eval_batch_size
        except Exception as error:  # no data here: report train accuracy, say why test is missing
            self.test_note = f"not evaluated: {error}"
            print(f"bin/solve: warning: test accuracy {self.test_note}", file=sys.stderr)

    def __call__(self, u, train_outputs, train_targets) -> dict:
        from study.metrics import accuracy

        out = {"train_acc": accuracy(train_outputs, train_targets), "test_acc": None}
        if self.model is not None:
            import torch

            from jacobian_store.functional import linearized_outputs

            _, f_lin = linearized_outputs(self.model, torch.from_numpy(np.asarray(u)), self.x_test, self.batch_size)
            out["test_acc"] = accuracy(f_lin, self.y_test)
        else:
            out["test_note"] = self.test_note
        return out

    def at_init(self, f0, targets) -> dict:
        return self(np.zeros(1), f0, targets) if self.model is None else self._init_full(f0, targets)

    def _init_full(self, f0, targets) -> dict:
        import torch

        from study.metrics import accuracy

        with torch.no_grad():
            outs = torch.cat([self.model(self.x_test[i:i + self.batch_size].to(next(self.model.parameters())))
                              for i in range(0, self.x_test.shape[0], self.batch_size)])
        return {"train_acc": accuracy(f0, targets), "test_acc": accuracy(outs, self.y_test)}


def _path_values(args, method, J, options) -> list:
    given = getattr(args, PATH_FLAGS[method])
    if given:
        return given
    m, p = J.shape
    if method == "ridge":
        scale = _mean_row_norm2(J)  # mean diagonal of K = J Jᵀ: λ relative to the typical eigenvalue
        return [float(f"{scale * 10.0 ** e:.3g}") for e in range(-6, 3)]
    if method == "rsvd":
        grid = [k * 10 ** d for d in range(7) for k in (1, 2, 5)]
        return sorted({k for k in grid if k < min(m, p)} | {min(m, p)})
    if method == "cg":
        limit = options.get("maxiter") or 1000
        return [k for k in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000) if k <= limit]
    return [1, 2, 5, 10, 20]


def _mean_row_norm2(J) -> float:
    total = 0.0
    for _, block in J.row_blocks():
        b = np.asarray(block, dtype=np.float64)
        total += float(np.einsum("ij,ij->", b, b))
    return total / J.shape[0]


def _default_name(method, options) -> str:
    """Method and knobs, e.g. ``ridge-lam0.001`` or ``sgd-lr0.01-wd0-ep10-bs32`` (known before solving)."""
    if method == "auto":
        return "auto"
    o = {k: v for k, v in METHOD_OPTIONS[method].items() if isinstance(v, (int, float, str, type(None)))}
    o.update(options)
    if method == "lstsq":
        parts = [o.get("driver") or ""]
    elif method == "ridge":
        parts = [f"lam{o['lam']:g}"]
    elif method == "cg":
        parts = [f"maxiter{o['maxiter']}" if o.get("maxiter") else "", f"tol{o['tol']:g}"]
    elif method == "rsvd":
        parts = [f"k{o['rank']}"]
    else:
        parts = [f"lr{o['lr']:g}", f"wd{o['weight_decay']:g}", f"ep{o['epochs']}", f"bs{o['batch_size']}"]
    return "-".join([method] + [p for p in parts if p])


def _summary_line(rec) -> str:
    test = f"{rec['test_acc']:.4f}" if rec.get("test_acc") is not None else "n/a"
    conv = "converged" if rec["converged"] else "NOT converged"
    return (f"{rec['name']}: {rec['method']}[{rec['form']}] {conv} ({rec['stop_reason']}) iters={rec['n_iter']} "
            f"‖Ju−r‖/‖r‖={rec['relative_residual']:.3e} ‖u‖={rec['u_norm']:.4g} train_acc={rec['train_acc']:.4f} "
            f"test_acc={test} time={rec['wall_time']:.2f}s")


def _info(record, args) -> dict:
    info = {k: v for k, v in record.items() if k != "extras"}
    extras = dict(record.get("extras", {}))
    info["extras"] = extras
    info["command"] = _command(args)
    return json_safe(info)


def _command(args) -> str:
    import shlex

    return "bin/solve " + " ".join(shlex.quote(a) for a in args.argv)


def _standard_metrics(path) -> dict | None:
    if path is None:
        return None
    path = Path(path)
    metrics = path / "metrics.json" if path.is_dir() else path
    data = json.loads(metrics.read_text())
    if data.get("model_kind") != "standard":
        raise ValueError(f"{metrics} is a {data.get('model_kind')!r} run, not a standard network's")
    final = data["final"]
    return {"train_acc": final["train_acc"], "test_acc": final["test_acc"], "epochs": final.get("epoch"),
            "run": str(path), "dataset": data.get("dataset")}


def _write_path_outputs(prefix: Path, records, knob, method, standard) -> None:
    prefix.parent.mkdir(parents=True, exist_ok=True)
    cols = ["value", "train_acc", "test_acc", "u_norm", "relative_residual", "converged", "n_iter", "wall_time"]
    with open(f"{prefix}.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([knob] + cols[1:])
        for rec in records:
            writer.writerow([rec.get(c) for c in cols])
    lines = [f"# {method} path: {KNOB_LABELS[knob]}", "",
             f"| {KNOB_LABELS[knob]} | train acc | test acc | ‖u‖ | ‖Ju−r‖/‖r‖ | converged |",
             "|---:|---:|---:|---:|---:|:---:|"]
    for rec in records:
        test = f"{rec['test_acc']:.4f}" if rec.get("test_acc") is not None else "n/a"
        lines.append(f"| {rec['value']:g} | {rec['train_acc']:.4f} | {test} | {rec['u_norm']:.4g} | "
                     f"{rec['relative_residual']:.3e} | {'yes' if rec['converged'] else 'no'} |")
    if standard:
        lines += ["", f"Standard network: train acc {standard['train_acc']:.4f}, test acc {standard['test_acc']:.4f}."]
    Path(f"{prefix}.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.array([rec["value"] for rec in records], dtype=float)
    fig, (ax_acc, ax_norm) = plt.subplots(1, 2, figsize=(10, 4))
    ax_acc.plot(x, [rec["train_acc"] for rec in records], "o-", label="train (linearized)")
    if any(rec.get("test_acc") is not None for rec in records):
        ax_acc.plot(x, [rec["test_acc"] if rec.get("test_acc") is not None else np.nan for rec in records],
                    "s-", label="test (linearized)")
    if standard:
        ax_acc.axhline(standard["train_acc"], ls="--", c="C0", alpha=0.6, label="train (standard)")
        ax_acc.axhline(standard["test_acc"], ls="--", c="C1", alpha=0.6, label="test (standard)")
    ax_norm.plot(x, [rec["u_norm"] for rec in records], "o-", c="C2")
    for ax in (ax_acc, ax_norm):
        if (x > 0).all():
            ax.set_xscale("log")
        else:
            ax.set_xscale("symlog", linthresh=float(np.min(x[x > 0])) if (x > 0).any() else 1.0)
        ax.set_xlabel(KNOB_LABELS[knob])
        ax.grid(alpha=0.3)
    ax_acc.set_ylabel("accuracy")
    ax_acc.legend()
    ax_norm.set_ylabel("‖u‖")
    ax_norm.set_yscale("log")
    fig.suptitle(f"{method}: {KNOB_LABELS[knob]} as the regularizer")
    fig.tight_layout()
    fig.savefig(f"{prefix}.png", dpi=120)
    plt.close(fig)


def _progress(items, enabled, desc):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
