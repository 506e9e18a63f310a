"""Reports from a run directory alone: ``report.md`` (Markdown tables), ``claims.json`` (the verdict on
each claim the experiment declares, ``claims.py``) and ``figures/*.png``.

Everything is read back from ``experiment.json`` and the unit records, so a report can be redrawn
at any time, from a partial run too (units not finished yet are simply absent: the ``n`` column
says how many seeds each mean is over). Means ± sample standard deviations (ddof = 1) over seeds;
accuracies in percent.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from solvers.api import KNOB_LABELS, PATH_KNOBS

from .claims import RULE, evaluate_claims
from .formatting import _plt, _pm, _save, _stats, _table
from .config import MODEL_KINDS, SOLVERS, Experiment
from .interpolation import report as _interpolation
from .interpolation import with_reference_rank
from .records import load_records, write_json_atomic

LABELS = {"standard": "standard", "linearized": "linearized (SGD)", "lstsq": "lstsq (exact)",
          "ridge": "ridge", "cg": "CG", "rsvd": "rSVD", "sgd": "SGD (stored J)"}


def load_run(run_dir: str | Path) -> tuple[Experiment, list[dict]]:
    run_dir = Path(run_dir)
    path = run_dir / "experiment.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no experiment.json); run bin/study first")
    return Experiment.from_dict(json.loads(path.read_text())), load_records(run_dir)


def write_report(run_dir: str | Path, figures: bool = True) -> tuple[str, list[Path]]:
    """Write ``report.md``, ``claims.json`` and the figures into ``run_dir``; return (Markdown, figure paths)."""
    run_dir = Path(run_dir)
    exp, records = load_run(run_dir)
    records = with_reference_rank(exp, records)
    # Presets belong to experiment files; a config built in code (bin/demo, tests) has none to name.
    preset = f" ({exp.preset} preset)" if exp.source.endswith(".toml") else ""
    lines = [f"# {exp.name}{preset}", ""]
    if exp.description:
        lines += [exp.description, ""]
    lines += [_setup_line(exp, records), ""]
    builder = {"compare": _compare, "spectrum": _spectrum, "regularization": _regularization,
               "interpolation": _interpolation}[exp.kind]
    verdicts = evaluate_claims(exp, records)
    write_json_atomic(run_dir / "claims.json", verdicts)
    if verdicts:
        lines += claims_section(verdicts)
    body, paths = builder(exp, records, run_dir / "figures" if figures else None)
    lines += body
    search = run_dir / "search_selection.json"
    if search.is_file():
        lines += ["", *_search_table(json.loads(search.read_text())["selected"])]
    if paths:
        lines += ["", "Figures: " + ", ".join(f"[{p.name}](figures/{p.name})" for p in paths)]
    text = "\n".join(lines).rstrip() + "\n"
    (run_dir / "report.md").write_text(text)
    return text, paths


def claims_section(verdicts: list[dict]) -> list[str]:
    """The verdict table: one row per claim, with the check and the numbers that decided it."""
    cell = lambda text: text.replace("|", "\\|")  # a pipe would end the Markdown cell
    rows = [[cell(v["claim"]), f"**{v['verdict']}**", cell(f"`{v['check']}`: {v['evidence']}")] for v in verdicts]
    return ["## Claims", "", *_table(["claim", "verdict", "evidence"], rows), "", RULE, "", "## Results", ""]


def _setup_line(exp: Experiment, records: list[dict]) -> str:
    d = exp.dataset
    sizes = f"n_train={d['n_train']}, n_test={d['n_test']}"
    binary = f", binary: class {d['binary']} against the rest" if d.get("binary") is not None else ""
    t = exp.train
    seconds = sum(r.get("seconds", 0.0) for r in records)
    devices = sorted({r.get("device", "?") for r in records})
    data = f"data {', '.join(v['label'] for v in exp.variants)} ({sizes}{binary})"
    done = f"{len(records)} units finished, {seconds / 60:.1f} min of compute on {', '.join(devices) or '-'}."
    if exp.kind == "regularization":
        reg = exp.regularization
        return f"{exp.grid['arch']} ×{reg['width']:g}, seed {reg['seed']}; {data}. {done}"
    if exp.kind == "interpolation":
        sweep = exp.interpolation
        return (f"{exp.grid['arch']}: n = {', '.join(f'{n:,}' for n in sorted(sweep['n_trains']))} at width "
                f"{sweep['width']:g}, and widths {', '.join(f'{w:g}' for w in exp.grid['widths'])} at n = "
                f"{sweep['n_train']:,}; seeds {', '.join(map(str, exp.grid['seeds']))}; {data}, "
                f"{sweep['validation_fraction']:g} of the test images for validation; SGD {t['epochs']} epochs, "
                f"batch {t['batch_size']}. {done}")
    grid = (f"{exp.grid['arch']} at widths {', '.join(f'{w:g}' for w in exp.grid['widths'])}; seeds "
            f"{', '.join(map(str, exp.grid['seeds']))}; {data}")
    if exp.kind == "compare":
        grid += f"; SGD {t['epochs']} epochs, batch {t['batch_size']}, momentum {t['momentum']}"
    return f"{grid}. {done}"


def _grouped(records: list[dict]) -> dict:
    """(variant, name, width) → list of records over seeds."""
    groups = defaultdict(list)
    for r in records:
        u = r["unit"]
        groups[(u["variant"], u["name"], u["width"])].append(r)
    return groups


# -------------------------------------------------------------------------------------------------
# compare: accuracy of each model and solver against width


def compare_names(exp: Experiment, records: list[dict]) -> list[str]:
    present = {r["unit"]["name"] for r in records}
    order = [*MODEL_KINDS, *SOLVERS]
    return [n for n in order if n in present]


def _compare(exp: Experiment, records: list[dict], figure_dir: Path | None):
    groups = _grouped(records)
    names = compare_names(exp, records)
    lines = ["Accuracy (%) on the training and test splits, mean ± std over seeds (n seeds). "
             "Gap: standard test accuracy minus linearized test accuracy (percentage points, paired by seed)."]
    widths = sorted({r["unit"]["width"] for r in records})
    for variant in [v["label"] for v in exp.variants]:
        header = ["width", "n"] + [f"{LABELS[n]} {split}" for n in names for split in ("train", "test")]
        has_gap = "standard" in names and "linearized" in names
        if has_gap:
            header.append("gap")
        rows = []
        for width in widths:
            if not any((variant, n, width) in groups for n in names):
                continue
            n_seeds = max(len(groups.get((variant, n, width), [])) for n in names)
            row = [f"{width:g}", str(n_seeds)]
            for name in names:
                recs = groups.get((variant, name, width), [])
                for split in ("train", "test"):
                    row.append(_pm(*_stats([r["metrics"][f"{split}_acc"] for r in recs])[:2]))
            if has_gap:
                row.append(_pm(*_stats(_paired_gaps(groups, variant, width, "linearized"))[:2]))
            rows.append(row)
        lines += ["", f"### {variant}", ""] + _table(header, rows)
    paths = []
    if figure_dir is not None and records:
        paths = [_accuracy_figure(exp, groups, names, widths, figure_dir)]
        if "standard" in names and len(names) > 1:
            paths.append(_gap_figure(exp, groups, names, widths, figure_dir))
        paths = [p for p in paths if p.stem in exp.figures]
    return lines, paths


def _paired_gaps(groups, variant, width, other: str) -> list[float]:
    standard = {r["unit"]["seed"]: r["metrics"]["test_acc"] for r in groups.get((variant, "standard", width), [])}
    others = {r["unit"]["seed"]: r["metrics"]["test_acc"] for r in groups.get((variant, other, width), [])}
    return [standard[s] - others[s] for s in sorted(set(standard) & set(others))]


def _series(groups, variant, name, widths, metric):
    xs, means, stds = [], [], []
    for w in widths:
        recs = groups.get((variant, name, w), [])
        if recs:
            m, s, _ = _stats([r["metrics"][metric] for r in recs])
            xs.append(w), means.append(m * 100), stds.append(0.0 if math.isnan(s) else s * 100)
    return np.array(xs), np.array(means), np.array(stds)


def _accuracy_figure(exp, groups, names, widths, figure_dir: Path) -> Path:
    plt = _plt()
    variants = [v["label"] for v in exp.variants]
    fig, axes = plt.subplots(len(variants), 2, figsize=(10, 3.6 * len(variants)), squeeze=False)
    for row, variant in enumerate(variants):
        for col, split in enumerate(("train", "test")):
            ax = axes[row, col]
            for name in names:
                x, m, s = _series(groups, variant, name, widths, f"{split}_acc")
                if x.size:
                    ax.errorbar(x, m, yerr=s, marker="o", capsize=3, label=LABELS[name])
            ax.set_xlabel("width factor k")
            ax.set_ylabel(f"{split} accuracy (%)")
            ax.set_title(f"{variant}: {split}")
            ax.grid(alpha=0.3)
            _width_axis(ax, widths)
        axes[row, 0].legend(fontsize=8)
    fig.suptitle(f"{exp.name} ({exp.grid['arch']}): accuracy against width, mean ± std over seeds")
    fig.tight_layout()
    return _save(fig, figure_dir / "accuracy.png")


def _gap_figure(exp, groups, names, widths, figure_dir: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for variant in [v["label"] for v in exp.variants]:
        for other in [n for n in names if n != "standard"]:
            xs, ms, ss = [], [], []
            for w in widths:
                m, s, n = _stats(_paired_gaps(groups, variant, w, other))
                if n:
                    xs.append(w), ms.append(m * 100), ss.append(0.0 if math.isnan(s) else s * 100)
            if xs:
                label = LABELS[other] if len(exp.variants) == 1 else f"{variant}: {LABELS[other]}"
                ax.errorbar(xs, ms, yerr=ss, marker="o", capsize=3, label=label)
    ax.axhline(0, color="k", lw=0.8)
    _width_axis(ax, widths)
    ax.set_xlabel("width factor k")
    ax.set_ylabel("test accuracy gap (pp)")
    ax.set_title("standard minus linearized/solver test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, figure_dir / "gap.png")


def _width_axis(ax, widths) -> None:
    """Log-scaled width axis labelled at the widths themselves (no minor-tick labels like 3×10⁰)."""
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks(widths, [f"{w:g}" for w in widths])


# -------------------------------------------------------------------------------------------------
# spectrum: effective rank and singular values of J(w0, X) against width


def _spectrum(exp: Experiment, records: list[dict], figure_dir: Path | None):
    groups = _grouped(records)
    widths = sorted({r["unit"]["width"] for r in records})
    variants = [v["label"] for v in exp.variants]
    header = ["data", "width", "n", "parameters", "effective rank", "numerical rank", "condition number",
              "σ_max", "stable rank"]
    rows = []
    for variant in variants:
        for width in widths:
            recs = groups.get((variant, "spectrum", width), [])
            if not recs:
                continue
            stat = lambda key, scale=1.0, digits=1: _pm(*_stats([r["metrics"][key] for r in recs])[:2], scale, digits)
            rows.append([variant, f"{width:g}", str(len(recs)), f"{recs[0]['metrics']['n_parameters']:,}",
                         stat("effective_rank"), stat("numerical_rank", digits=0),
                         _sci(_stats([r["metrics"]["condition_number"] for r in recs])[0]),
                         stat("sigma_max", digits=3), stat("stable_rank", digits=2)])
    lines = ["Singular values σ of J(w0, X) (n·L rows) from the Gram matrix K = J Jᵀ at initialization. "
             "Numerical rank: σ > τ = max(√(max(n·L, p)·ε₆₄)·σ_max, ε₃₂·‖J‖_F), the cut-off of the lstsq solver; "
             "effective rank: exp of the entropy of σ/Σσ over the kept σ; condition number: σ_max over the "
             "smallest kept σ (mean over seeds); stable rank: Σσ²/σ_max².", ""] + _table(header, rows)
    paths = []
    if figure_dir is not None and records:
        if "effective_rank" in exp.figures:
            paths.append(_effective_rank_figure(groups, variants, widths, figure_dir))
        if "singular_values" in exp.figures:
            paths.append(_histogram_figure(exp, groups, variants, widths, figure_dir))
    return lines, paths


def _sci(x: float) -> str:
    return "–" if math.isnan(x) else f"{x:.3g}"


def _effective_rank_figure(groups, variants, widths, figure_dir) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for variant in variants:
        for ax, key in zip(axes, ("effective_rank", "condition_number")):
            xs, ms, ss = [], [], []
            for w in widths:
                recs = groups.get((variant, "spectrum", w), [])
                if recs:
                    m, s, _ = _stats([r["metrics"][key] for r in recs])
                    xs.append(w), ms.append(m), ss.append(0.0 if math.isnan(s) else s)
            ax.errorbar(xs, ms, yerr=ss, marker="o", capsize=3, label=variant)
    for ax, title in zip(axes, ("effective rank", "condition number (kept σ)")):
        _width_axis(ax, widths)
        ax.set_xlabel("width factor k")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[1].set_yscale("log")
    fig.tight_layout()
    return _save(fig, figure_dir / "effective_rank.png")


def _histogram_figure(exp, groups, variants, widths, figure_dir) -> Path:
    plt = _plt()
    columns = min(4, len(widths))
    rows = math.ceil(len(widths) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 3.0 * rows), squeeze=False)
    bins = exp.spectrum.get("bins", 40)
    for ax, width in zip(axes.ravel(), widths):
        for variant in variants:
            recs = groups.get((variant, "spectrum", width), [])
            if not recs:
                continue
            s = np.asarray(recs[0]["singular_values"], dtype=np.float64)
            s = s[s > 0]
            ax.hist(np.log10(s / s.max()), bins=bins, histtype="step", lw=1.4, label=f"{variant}",
                    weights=np.full(s.size, 1.0 / s.size))
        ax.set_title(f"width {width:g}")
        ax.set_xlabel("log10(σ / σ_max)")
        ax.grid(alpha=0.3)
    for ax in axes.ravel()[len(widths):]:
        ax.axis("off")
    axes[0, 0].set_ylabel("fraction of singular values")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle("singular values of J(w0, X) per width (first seed)")
    fig.tight_layout()
    return _save(fig, figure_dir / "singular_values.png")


# -------------------------------------------------------------------------------------------------
# regularization: solver paths on one store


# method → its path knob's label, in the order of solvers.api.PATH_KNOBS
_KNOB_LABELS = {method: KNOB_LABELS[knob] for method, knob in PATH_KNOBS.items()}


def _regularization(exp: Experiment, records: list[dict], figure_dir: Path | None):
    paths_by_variant = defaultdict(dict)
    lstsq = {}
    for r in records:
        u = r["unit"]
        if u["name"] == "lstsq":
            lstsq[u["variant"]] = r["metrics"]
        elif u["name"].endswith("-path"):
            paths_by_variant[u["variant"]][r["metrics"]["method"]] = r["metrics"]
    lines = ["Accuracy (%) along each solver's regularization knob on one stored J "
             f"({exp.grid['arch']} ×{exp.regularization['width']:g}, seed {exp.regularization['seed']}); "
             "‖u‖ is the norm of the fitted correction, residual ‖J u − r‖/‖r‖ on the training set."]
    for variant in [v["label"] for v in exp.variants]:
        if variant in lstsq:
            m = lstsq[variant]
            lines += ["", f"### {variant}", "", f"Reference, exact minimum-norm lstsq: train {m['train_acc'] * 100:.2f}, "
                      f"test {m['test_acc'] * 100:.2f}, ‖u‖ {m['u_norm']:.4g}, residual {m['relative_residual']:.3g}."]
        for method in [m for m in _KNOB_LABELS if m in paths_by_variant[variant]]:
            metrics = paths_by_variant[variant][method]
            rows = [[f"{p['value']:g}", f"{p['train_acc'] * 100:.2f}", f"{p['test_acc'] * 100:.2f}",
                     f"{p['u_norm']:.4g}", f"{p['relative_residual']:.3g}"] for p in metrics["points"]]
            lines += ["", f"**{_KNOB_LABELS[method]}** ({metrics['solve_seconds']:.1f} s for the whole path)", ""]
            lines += _table([_KNOB_LABELS[method], "train", "test", "‖u‖", "residual"], rows)
    paths = []
    if figure_dir is not None and records:
        if "paths" in exp.figures:
            paths.append(_paths_figure(paths_by_variant, lstsq, figure_dir))
        if "norm" in exp.figures:
            paths.append(_norm_figure(paths_by_variant, lstsq, figure_dir))
    return lines, paths


def _paths_figure(paths_by_variant, lstsq, figure_dir) -> Path:
    plt = _plt()
    methods = [m for m in PATH_KNOBS if any(m in p for p in paths_by_variant.values())]
    fig, axes = plt.subplots(1, max(1, len(methods)), figsize=(4.2 * max(1, len(methods)), 3.6), squeeze=False)
    for ax, method in zip(axes[0], methods):
        for variant, paths in paths_by_variant.items():
            if method not in paths:
                continue
            points = paths[method]["points"]
            x = [p["value"] for p in points]
            for split, style in (("train", "--"), ("test", "-")):
                ax.plot(x, [p[f"{split}_acc"] * 100 for p in points], style, marker="o", label=f"{variant} {split}")
            if variant in lstsq:
                ax.axhline(lstsq[variant]["test_acc"] * 100, color="gray", lw=0.8, ls=":", label=f"{variant} lstsq test")
        ax.set_xscale("log")
        ax.set_xlabel(_KNOB_LABELS[method])
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
        if method == "ridge":
            ax.invert_xaxis()  # less regularization to the right, as for the other knobs
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("regularization paths (ridge λ decreasing to the right)")
    fig.tight_layout()
    return _save(fig, figure_dir / "paths.png")


def _norm_figure(paths_by_variant, lstsq, figure_dir) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for variant, paths in paths_by_variant.items():
        for method, metrics in paths.items():
            points = metrics["points"]
            ax.plot([p["u_norm"] for p in points], [p["test_acc"] * 100 for p in points], marker="o",
                    label=f"{variant}: {_KNOB_LABELS[method]}")
        if variant in lstsq:
            ax.plot([lstsq[variant]["u_norm"]], [lstsq[variant]["test_acc"] * 100], "k*", ms=10,
                    label=f"{variant}: lstsq")
    ax.set_xscale("log")
    ax.set_xlabel("‖u‖")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("test accuracy against the norm of u, every path")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, figure_dir / "norm.png")


def _search_table(selected: list[dict]) -> list[str]:
    rows = [[s["variant"], s["model"], f"{s['width']:g}", f"{s['lr']:g}", f"{s['weight_decay']:g}",
             f"{s['val_acc'] * 100:.2f}"] for s in selected]
    return ["### Hyperparameters selected by the search (validation accuracy, %)", ""] + _table(
        ["data", "model", "width", "lr", "weight decay", "validation acc"], rows)
