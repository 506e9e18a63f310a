"""``bin/study``: run an experiment grid into a run directory, resume it, and report on it.

    bin/study --list
    bin/study binary-mnist --preset cpu --out runs/binary-mnist --data-root ../shared/data
    bin/study binary-mnist --preset cpu --out runs/binary-mnist --report-only
    bin/study report runs/binary-mnist
    bin/study findings runs/interpolation-cpu runs/binary-mnist --findings-out docs/findings.md
    bin/study path/to/custom.toml --preset cpu --out runs/custom
"""
from __future__ import annotations

import argparse
import sys
import textwrap
import time
from pathlib import Path

from jacobian_store.datasets import DatasetError

from .config import PRESETS, ConfigError, available_experiments, load_experiment
from .findings import write_findings
from .report import write_report
from .runner import ExperimentError, Runner


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bin/study",
        description="Run an experiment (a TOML file: dataset, architecture, widths, seeds, models, solvers, "
                    "hyperparameters) unit by unit into a run directory, then write its report (Markdown "
                    "tables and figures). Each finished unit is one JSON record; rerunning the same command "
                    "resumes where it stopped and never recomputes a finished unit.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=textwrap.dedent("""\
            examples:
              bin/study --list
              bin/study binary-mnist --preset cpu --out runs/binary-mnist --data-root ../shared/data
              bin/study report runs/binary-mnist          (report from the run directory alone)
              bin/study my-experiment.toml --preset cpu --out runs/mine"""))
    parser.add_argument("experiment", nargs="?",
                        help="a shipped experiment name (see --list), a path to a .toml file, 'report' followed "
                             "by a run directory, or 'findings' followed by run directories")
    parser.add_argument("run_dirs", nargs="*", type=Path,
                        help="with 'report': the run directory to report on; with 'findings': the run directories")
    parser.add_argument("--findings-out", type=Path, default=Path("docs/findings.md"), metavar="FILE",
                        help="with 'findings': the page to write or update (default: docs/findings.md)")
    parser.add_argument("--list", action="store_true", help="list the shipped experiments and their presets")
    parser.add_argument("--preset", default="cpu", choices=PRESETS,
                        help="cpu: a reduced grid that finishes in well under an hour on a CPU; paper: the full "
                             "protocol (default: cpu)")
    parser.add_argument("--out", type=Path, default=None,
                        help="run directory (default: runs/<experiment>-<preset>)")
    parser.add_argument("--data-root", type=Path, default=None, metavar="DIR",
                        help="folder holding MNIST/raw/, cifar-10-batches-py/ or snakes/ (default: $LINCNN_DATA, "
                             "else ~/.cache/lincnn)")
    parser.add_argument("--device", default=None,
                        help="'auto', 'cpu', 'cuda', ... (default: the experiment's train.device, normally auto)")
    parser.add_argument("--search", action="store_true",
                        help="first search lr × weight decay per model and width on a validation split "
                             "([search] table), then run the grid with the selected values")
    parser.add_argument("--report-only", action="store_true", help="write the report from the run directory; run nothing")
    parser.add_argument("--no-figures", action="store_true", help="tables only")
    parser.add_argument("--keep-checkpoints", action="store_true",
                        help="keep each training unit's last checkpoint (deleted once its record is written)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def list_experiments() -> str:
    lines = []
    for name in available_experiments():
        try:
            cpu = load_experiment(name, "cpu")
            paper = load_experiment(name, "paper")
        except ConfigError as err:
            lines.append(f"{name}: INVALID ({err})")
            continue
        lines.append(f"{name} ({cpu.kind}): {cpu.description}")
        for exp in (cpu, paper):
            grid = exp.grid
            what = ", ".join([*grid["models"], *grid["solvers"]]) if exp.kind == "compare" else exp.kind
            n_train = exp.dataset["n_train"]
            if exp.kind == "interpolation":
                sweep = exp.interpolation
                n_train = f"{min(sweep['n_trains'])}-{max(sweep['n_trains'])} at width {sweep['width']:g}"
            lines.append(f"    --preset {exp.preset:<5} {grid['arch']} widths {','.join(f'{w:g}' for w in grid['widths'])}, "
                         f"{len(grid['seeds'])} seed(s), n_train {n_train}, {exp.train['epochs']} "
                         f"epochs; {what}, {len(exp.claims)} claim(s)")
            if exp.expected_cost:
                lines.append(textwrap.fill(exp.expected_cost, 100, initial_indent=" " * 18, subsequent_indent=" " * 18))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list:
        print(list_experiments())
        return 0
    if args.experiment is None:
        parser.error("name an experiment (see --list), or 'report RUN_DIR'")
    try:
        if args.experiment == "report":
            if len(args.run_dirs) != 1:
                parser.error("'report' needs one run directory: bin/study report runs/<name>")
            return _report(args.run_dirs[0], args)
        if args.experiment == "findings":
            if not args.run_dirs:
                parser.error("'findings' needs run directories: bin/study findings runs/<name> …")
            write_findings(args.run_dirs, args.findings_out)
            print(f"findings: {args.findings_out}", file=sys.stderr)
            return 0
        if args.run_dirs:
            parser.error(f"unexpected argument {args.run_dirs[0]}; use --out to choose the run directory")
        exp = load_experiment(args.experiment, args.preset)
        out = args.out or Path("runs") / f"{exp.name}-{exp.preset}"
        if args.report_only:
            return _report(out, args)
        runner = Runner(exp, out, data_root=args.data_root, device=args.device, progress=not args.quiet,
                        keep_checkpoints=args.keep_checkpoints)
        runner.check(records=not args.search)  # a search first chooses the settings the records hold
        print(f"{exp.name} [{exp.preset}] → {out}", file=sys.stderr)
        if exp.expected_cost:
            print(f"expected cost: {exp.expected_cost}", file=sys.stderr)
        start = time.perf_counter()
        runner.run(search=args.search)
        print(f"finished in {(time.perf_counter() - start) / 60:.1f} min", file=sys.stderr)
        return _report(out, args)
    except (ConfigError, ExperimentError, FileNotFoundError, DatasetError) as err:
        print(f"bin/study: error: {err}", file=sys.stderr)
        return 2


def _report(run_dir: Path, args) -> int:
    text, paths = write_report(run_dir, figures=not args.no_figures)
    print(text, end="")
    print(f"report: {run_dir / 'report.md'}", file=sys.stderr)
    for path in paths:
        print(f"figure: {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
