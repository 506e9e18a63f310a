"""``bin/solve``: fit the linearized network on a Jacobian store with one solver, or sweep its knob.

    bin/solve --store runs/lenet-w5.h5 --method lstsq
    bin/solve --store runs/lenet-w5.h5 --method ridge --lambda 1e-3
    bin/solve --store runs/lenet-w5.h5 --method ridge --path --lambdas 1e-6 1e-4 1e-2 1
    bin/solve --store runs/lenet-w5.h5 --method sgd --lr 0.01 --epochs 20 --weight-decay 1e-4
    bin/solve --arch lenet --width 5 --dataset mnist --binary 0 --n-train 10000 --method cg --maxiter 200 \
              --save-u u.npy          # matrix-free: no store, J·v by jvp and Jᵀ·w by vjp (cg, rsvd)

Writes u and its diagnostics (every option used) into the store under ``/solutions/<name>``,
prints a one-line summary and writes a JSON record.

Every argument is checked here, before the store is opened; ``study.fitting.fit`` then solves,
evaluates and saves (read-only while the solver runs, u and its record saved together, a
non-finite or diverged result refused: see its docstring). Train accuracy is that of f0 + J u on
the stored training set; test accuracy that of f0(x) + J(x) u on the test set, with J(x) u computed
by ``torch.func.jvp`` at w0 (no test Jacobian needed; ``study.evaluation``).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from pathlib import Path

from jacobian_store.sizes import parse_bytes
from jacobian_store.store import check_solution_name
from solvers.api import KNOB_LABELS, METHOD_OPTIONS, METHODS, PATH_KNOBS, REQUIRED
from solvers.memory import MemoryLimitError, __doc__ as MEMORY_DOC
from solvers.result import SolverDivergedError
from study.fitting import DIVERGENCE_FIX, FitRequest, fit

# command-line flag (argparse dest) → solver option
FLAG_OPTIONS = {
    "lambda_": "lam", "rank": "rank", "maxiter": "maxiter", "tol": "tol", "normal_tol": "normal_tol",
    "lr": "lr", "weight_decay": "weight_decay", "epochs": "epochs", "batch_size": "batch_size",
    "lr_step": "lr_step", "lr_gamma": "lr_gamma", "momentum": "momentum", "seed": "seed", "driver": "driver",
    "form": "form", "rcond": "rcond", "oversample": "oversample", "power_iter": "power_iter", "precision": "precision",
}
OPTION_FLAGS = {v: "--" + k.rstrip("_").replace("_", "-") for k, v in FLAG_OPTIONS.items()}
OPTION_FLAGS["lam"] = "--lambda"
# the flag (argparse dest) listing a path's knob values, per method (solvers.api.PATH_KNOBS)
_KNOB_FLAGS = {"lam": "lambdas", "rank": "ranks", "maxiter": "iterations", "epochs": "epochs_list"}
PATH_FLAGS = {method: _KNOB_FLAGS[knob] for method, knob in PATH_KNOBS.items()}
# what a required option looks like, for the error that asks for it
REQUIRED_EXAMPLES = {"lam": "--lambda 1e-3", "rank": "--rank 50", "lr": "--lr 0.01"}


def build_parser() -> argparse.ArgumentParser:
    memory = MEMORY_DOC.split("\n\n", 1)[1]
    parser = argparse.ArgumentParser(
        prog="bin/solve", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="What each method holds in memory (J is read from the store chunk by chunk, never whole):\n\n"
               + memory + "\nA method that would not fit under --memory-limit is refused before it reads J, "
               "with the figure.")
    parser.add_argument("--store", type=Path, help="the Jacobian store (HDF5, from bin/build-jacobian); without it, "
                        "J is the network's own (options 'network' and 'data' below), matrix-free: cg and rsvd only")
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
    out.add_argument("--no-test", action="store_true", help="skip the test-set evaluation")
    out.add_argument("--eval-batch-size", type=int, help="test samples per jvp (default: as many as the memory "
                                                           "budget of bin/build-jacobian allows)")
    out.add_argument("--standard-run", type=Path,
                     help="a bin/train run directory (or its metrics.json) of the standard network, reported alongside")
    out.add_argument("--save-u", type=Path, metavar="FILE.npy", help="also write u (float64, length p) to this .npy file")
    out.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_matrix_free_arguments(parser)
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
    _check_matrix_free_args(parser, args, method)
    _check_arguments(parser, args, method, options)
    try:
        request = _request(args, method, options, _standard_metrics(args.standard_run))
        report = fit(request)
    except SolverDivergedError as error:  # raised by the solver itself: no result exists to save
        print(f"bin/solve: error: {error}; nothing was saved. {DIVERGENCE_FIX.get(method, '')}".rstrip(),
              file=sys.stderr)
        return 2
    except (MemoryLimitError, ValueError, TypeError, OSError, ImportError) as error:
        print(f"bin/solve: error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # StoreError and DatasetError are RuntimeError/ValueError subclasses
        from jacobian_store.store import StoreError

        if isinstance(error, StoreError):
            print(f"bin/solve: error: {error}", file=sys.stderr)
            return 2
        raise
    _print(request, report)
    return 0


def _request(args, method, options, standard) -> FitRequest:
    """The checked command line as the library's request."""
    network = None
    if args.store is None:
        from jacobian_store.datasets import dataset_from_args

        network = {"arch": args.arch, "width": args.width, "seed": args.init_seed, "dtype": args.network_dtype,
                   "batch_size": args.jvp_batch_size, "dataset": functools.partial(dataset_from_args, args)}
    return FitRequest(method=method, options=options, name=args.name, command=_command(args), store=args.store,
                      network=network, path=args.path, path_values=getattr(args, PATH_FLAGS[method]) if args.path
                      else None, json=args.json, out=args.out, save_u=args.save_u, no_save=args.no_save,
                      overwrite=args.overwrite, device=args.device, memory_limit=args.memory_limit,
                      scheduler=args.scheduler, test=not args.no_test, eval_batch_size=args.eval_batch_size,
                      data_root=args.data_root, standard=standard, progress=not args.quiet)


def _print(request: FitRequest, report) -> None:
    records, standard = report.records, request.standard
    if request.path:
        for rec in records:
            print(_summary_line(rec))
        knob = KNOB_LABELS[PATH_KNOBS[request.method]]
        print(f"path of {len(records)} {knob} values → {', '.join(str(p) for p in report.report_paths)}")
    elif request.store is None:
        print(_summary_line(records[0]) + " (matrix-free)")
    else:
        print(_summary_line(records[0]) + (f" | standard train_acc={standard['train_acc']:.4f} test_acc="
                                           f"{standard['test_acc']:.4f}" if standard else ""))


def _check_arguments(parser, args, method, options) -> None:
    """Refuse, before the store is opened, every argument that the command line alone shows is wrong;
    sets ``args.name``, ``args.json`` and (paths) ``args.out`` to the paths the run will write."""
    swept = PATH_KNOBS.get(method) if args.path else None
    for option, default in (METHOD_OPTIONS.get(method, {}) if method != "auto" else {}).items():
        if default is REQUIRED and option not in options and option != swept:
            parser.error(f"--method {method} needs {OPTION_FLAGS[option]} (e.g. {REQUIRED_EXAMPLES[option]})")
    if args.eval_batch_size is not None and args.eval_batch_size <= 0:
        parser.error(f"--eval-batch-size must be a positive integer, got {args.eval_batch_size}")
    if args.memory_limit != "auto":
        try:
            parse_bytes(args.memory_limit)
        except ValueError as error:
            parser.error(f"--memory-limit: {error}")
    try:
        default = f"{method}-path" if args.path else _default_name(method, options)
        args.name = check_solution_name(default if args.name is None else args.name)
    except ValueError as error:
        parser.error(f"--name: {error}")
    if args.store is None:  # matrix-free: only the files asked for (--out checked given with --path)
        stem = None
    else:
        stem = args.store.with_suffix("")
    if args.path:
        args.out = args.out or Path(f"{stem}.{args.name}")
        for suffix in (".md", ".csv", ".png"):
            _check_writable(parser, "--out", Path(f"{args.out}{suffix}"))
        args.json = args.json or Path(f"{args.out}.json")
    elif stem is not None:
        args.json = args.json or Path(f"{stem}.{args.name}.json")
    if args.json:
        _check_writable(parser, "--json", args.json)
    if args.save_u:
        _check_writable(parser, "--save-u", args.save_u)


def _check_writable(parser, flag: str, path: Path) -> None:
    """Refuse a file path that cannot be written: a directory, or under a file or a read-only folder."""
    if path.is_dir():
        parser.error(f"{flag}: {path} is a directory; give a file name (e.g. {path / 'record.json'})")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent  # the folders below it are created
    if not folder.is_dir():
        parser.error(f"{flag}: {folder} is a file, so {path} cannot be created; choose another path")
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        parser.error(f"{flag}: {path} is not writable; choose a path in a folder you can write")


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
    if args.path and args.save_u:
        parser.error("--save-u writes one solution; a --path has several (they are in the store, or drop --path)")
    for m, flag in PATH_FLAGS.items():
        if getattr(args, flag) is not None and not (args.path and m == method):
            parser.error(f"--{flag.replace('_', '-')} needs --path --method {m}")
    return options


# ---- matrix-free: J of the network itself, by jvp and vjp (no store) ----------------------------

MATRIX_FREE_METHODS = ("cg", "rsvd", "auto")


def _add_matrix_free_arguments(parser) -> None:
    """The network and data options of bin/build-jacobian, defining J when there is no --store (--seed
    and --dtype are this command's solver options, so w0's seed is --init-seed and the jvp/vjp's
    dtype --network-dtype)."""
    from jacobian_store.arguments import add_data_arguments, add_network_arguments

    net = add_network_arguments(parser, seed_flag="--init-seed", dtype_flag="--network-dtype",
                                dtype_help="dtype of the jvp/vjp (default float32, as a store's J)",
                                title="network (without --store: J = ∂f(w0, X)/∂w, never formed)")
    net.add_argument("--jvp-batch-size", type=int, help="samples per jvp/vjp (default: as many as the memory allows)")
    add_data_arguments(parser)


def _matrix_free_flags(parser) -> dict:
    """dest → flag of every option that defines J without a store (refused with --store)."""
    flags = {}
    for group in parser._action_groups:
        if group.title.startswith(("network", "data")):
            for action in group._group_actions:
                if action.dest != "data_root":  # also where a store's dataset lives
                    flags[action.dest] = action.option_strings[0]
    return flags


def _check_matrix_free_args(parser, args, method) -> None:
    given = [flag for dest, flag in _matrix_free_flags(parser).items()
             if getattr(args, dest) != parser.get_default(dest)]
    if args.store:
        if given:
            parser.error(f"{', '.join(given)} define J without a store; with --store the store's own network and data "
                         f"are used (drop them, or drop --store to run matrix-free)")
        return
    if method not in MATRIX_FREE_METHODS:
        parser.error(f"--method {method} needs the rows of J, i.e. a Jacobian store: build one with bin/build-jacobian "
                     f"and pass --store; without --store only cg and rsvd run (matrix-free, by jvp and vjp)")
    for flag, dest in (("--scheduler", "scheduler"), ("--name", "name"), ("--overwrite", "overwrite"),
                       ("--no-save", "no_save")):
        if getattr(args, dest):
            parser.error(f"{flag} applies to a store; without --store u is written by --save-u FILE.npy")
    if args.path and not args.out:
        parser.error("--path without --store needs --out PREFIX for its table and figure")


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


def _command(args) -> str:
    import shlex

    return "bin/solve " + " ".join(shlex.quote(a) for a in args.argv)


def _standard_metrics(path) -> dict | None:
    if path is None:
        return None
    path = Path(path)
    metrics = path / "metrics.json" if path.is_dir() else path
    fix = "give a bin/train run directory of a standard network (OUT/standard) or its metrics.json"
    try:
        data = json.loads(metrics.read_text())
        final = data["final"]
        final["train_acc"], final["test_acc"]
    except FileNotFoundError:
        raise ValueError(f"--standard-run: {metrics} does not exist; {fix}") from None
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"--standard-run: {metrics} is not a bin/train metrics record ({type(error).__name__}: "
                         f"{error}); {fix}") from None
    if data.get("model_kind") != "standard":
        raise ValueError(f"--standard-run: {metrics} is a {data.get('model_kind')!r} run, not a standard network's; {fix}")
    return {"train_acc": final["train_acc"], "test_acc": final["test_acc"], "epochs": final.get("epoch"),
            "run": str(path), "dataset": data.get("dataset")}


if __name__ == "__main__":
    sys.exit(main())
