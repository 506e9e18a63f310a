"""The report of a solver path (``bin/solve --path``): a table (.md, .csv) and a figure (.png) of
train and test accuracy and ‖u‖ along the method's knob (``solvers.api.PATH_KNOBS``)."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from solvers.api import KNOB_LABELS

CSV_COLUMNS = ["value", "train_acc", "test_acc", "u_norm", "relative_residual", "converged", "n_iter", "wall_time"]


def write_path_report(prefix: Path, records: list[dict], knob: str, method: str, standard: dict | None) -> list[Path]:
    """Write ``<prefix>.csv``, ``<prefix>.md`` and ``<prefix>.png`` from one record per knob value
    (``value``, the accuracies, ``u_norm``, …); ``standard``: the standard network's accuracies,
    drawn alongside. Returns the three paths."""
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    label = KNOB_LABELS[knob]
    paths = [Path(f"{prefix}{suffix}") for suffix in (".md", ".csv", ".png")]
    with open(paths[1], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([knob] + CSV_COLUMNS[1:])
        for rec in records:
            writer.writerow([rec.get(c) for c in CSV_COLUMNS])
    lines = [f"# {method} path: {label}", "",
             f"| {label} | train acc | test acc | ‖u‖ | ‖Ju−r‖/‖r‖ | converged |",
             "|---:|---:|---:|---:|---:|:---:|"]
    for rec in records:
        test = f"{rec['test_acc']:.4f}" if rec.get("test_acc") is not None else "n/a"
        lines.append(f"| {rec['value']:g} | {rec['train_acc']:.4f} | {test} | {rec['u_norm']:.4g} | "
                     f"{rec['relative_residual']:.3e} | {'yes' if rec['converged'] else 'no'} |")
    if standard:
        lines += ["", f"Standard network: train acc {standard['train_acc']:.4f}, test acc {standard['test_acc']:.4f}."]
    paths[0].write_text("\n".join(lines) + "\n")
    _figure(paths[2], records, label, method, standard)
    return paths


def _figure(path: Path, records, label: str, method: str, standard) -> None:
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
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    ax_acc.set_ylabel("accuracy")
    ax_acc.legend()
    ax_norm.set_ylabel("‖u‖")
    ax_norm.set_yscale("log")
    fig.suptitle(f"{method}: {label} as the regularizer")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
