"""Reports from a run directory alone, on hand-made records with known means and deviations."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from study.experiments import resolve, write_report
from study.experiments.records import make_record, unit_key, write_json_atomic
from study.experiments.report import _pm, _stats

COMPARE = {"experiment": {"name": "fake", "kind": "compare", "description": "hand-made records"},
           "dataset": {"name": "digits", "binary": 0},
           "grid": {"widths": [1, 2], "seeds": [0, 1, 2], "solvers": ["lstsq"]}}


def write_run(run_dir, raw, records):
    exp = resolve(raw, "cpu")
    write_json_atomic(run_dir / "experiment.json", exp.to_dict())
    for (variant, name, width, seed), metrics, extra in records:
        key = unit_key(variant, name, width, seed)
        unit = {"variant": variant, "name": name, "width": width, "seed": seed}
        write_json_atomic(run_dir / "records" / f"{key}.json",
                          make_record(key, unit, {"x": 1}, metrics, 1.5, device="cpu", **extra))
    return exp


def acc(train, test):
    return {"train_acc": train, "test_acc": test, "train_loss": 0.1, "test_loss": 0.2}


def test_stats_and_formatting():
    mean, std, n = _stats([0.9, 0.92, 0.94])
    assert n == 3 and math.isclose(mean, 0.92) and math.isclose(std, 0.02)
    assert _pm(mean, std) == "92.00 ± 2.00"
    assert _pm(0.5, math.nan) == "50.00"  # one seed: no deviation
    assert _stats([float("nan")])[2] == 0 and _pm(*_stats([])[:2]) == "–"


def test_compare_table_means_gap_and_figures(tmp_path):
    test_std = {0: 0.90, 1: 0.92, 2: 0.94}
    records = []
    for seed in range(3):
        records.append((("digits", "standard", 1, seed), acc(1.0, test_std[seed]), {}))
        records.append((("digits", "linearized", 1, seed), acc(0.95, test_std[seed] - 0.1), {}))
        records.append((("digits", "lstsq", 1, seed), acc(1.0, 0.8), {}))
    records.append((("digits", "standard", 2, 0), acc(1.0, 0.97), {}))  # a partial run: one seed so far
    write_run(tmp_path, COMPARE, records)
    text, paths = write_report(tmp_path)
    assert (tmp_path / "report.md").read_text() == text
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| width"))
    assert header == ("| width | n | standard train | standard test | linearized (SGD) train | linearized (SGD) test | "
                      "lstsq (exact) train | lstsq (exact) test | gap |")
    row1 = next(line for line in lines if line.startswith("| 1 |"))
    assert row1 == ("| 1 | 3 | 100.00 ± 0.00 | 92.00 ± 2.00 | 95.00 ± 0.00 | 82.00 ± 2.00 | 100.00 ± 0.00 | "
                    "80.00 ± 0.00 | 10.00 ± 0.00 |")
    row2 = next(line for line in lines if line.startswith("| 2 |"))
    assert row2 == "| 2 | 1 | 100.00 | 97.00 | – | – | – | – | – |"
    assert [p.name for p in paths] == ["accuracy.png", "gap.png"]
    assert all(p.stat().st_size > 10_000 for p in paths)
    assert "10 units finished" in text


def test_report_figures_can_be_restricted_and_skipped(tmp_path):
    raw = {**COMPARE, "report": {"figures": ["gap"]}}
    write_run(tmp_path, raw, [(("digits", "standard", 1, 0), acc(1, 0.9), {}),
                              (("digits", "linearized", 1, 0), acc(1, 0.8), {})])
    _, paths = write_report(tmp_path)
    assert [p.name for p in paths] == ["gap.png"]
    _, paths = write_report(tmp_path, figures=False)
    assert paths == []


def test_spectrum_report(tmp_path):
    raw = {"experiment": {"name": "s", "kind": "spectrum"}, "dataset": {"name": "mnist"},
           "variants": [{"label": "mnist", "name": "mnist"}, {"label": "shifted", "name": "mnist-shifted"}],
           "grid": {"widths": [1, 2], "seeds": [0, 1]}}
    records = []
    for variant, scale in (("mnist", 1.0), ("shifted", 2.0)):
        for width in (1, 2):
            for seed in (0, 1):
                s = np.geomspace(10, 0.01, 50) * scale
                metrics = {"effective_rank": 10.0 * width + seed, "numerical_rank": 50, "condition_number": 1000.0,
                           "sigma_max": 10 * scale, "stable_rank": 1.5, "n_parameters": 1000 * width}
                records.append(((variant, "spectrum", width, seed), metrics, {"singular_values": s.tolist()}))
    write_run(tmp_path, raw, records)
    text, paths = write_report(tmp_path)
    assert "| mnist | 2 | 2 | 2,000 | 20.5 ± 0.7 | 50 ± 0 | 1e+03 |" in text
    assert "| shifted | 1 |" in text
    assert [p.name for p in paths] == ["effective_rank.png", "singular_values.png"]


def test_regularization_report(tmp_path):
    raw = {"experiment": {"name": "r", "kind": "regularization"}, "dataset": {"name": "digits", "binary": 0}}
    point = lambda v, a, norm: {"value": v, "train_acc": a, "test_acc": a - 0.05, "u_norm": norm,
                                "relative_residual": 1 - a}
    paths = {"ridge": [point(1e-2, 0.99, 5.0), point(10, 0.9, 1.0)], "cg": [point(1, 0.9, 1.0), point(10, 0.99, 4.0)]}
    records = [(("digits", "lstsq", 1, 0), {**acc(1.0, 0.93), "u_norm": 6.0, "relative_residual": 1e-12}, {})]
    for method, points in paths.items():
        records.append((("digits", f"{method}-path", 1, 0),
                        {"method": method, "knob": "x", "points": points, "solve_seconds": 2.0}, {}))
    write_run(tmp_path, raw, records)
    text, figures = write_report(tmp_path)
    assert "Reference, exact minimum-norm lstsq: train 100.00, test 93.00" in text
    assert "| 0.01 | 99.00 | 94.00 | 5 | 0.01 |" in text
    assert "**CG iterations**" in text
    assert [p.name for p in figures] == ["paths.png", "norm.png"]


def test_report_needs_a_run_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        write_report(tmp_path)


def test_records_are_written_atomically(tmp_path):
    path = tmp_path / "records" / "a.json"
    write_json_atomic(path, {"x": np.float64(1.5), "y": np.arange(3)})
    assert json.loads(path.read_text()) == {"x": 1.5, "y": [0, 1, 2]}
    assert [p.name for p in path.parent.iterdir()] == ["a.json"]


def test_findings_page_from_run_directories_keeps_the_written_account(tmp_path):
    from study.experiments import cli

    raw = {**COMPARE, "claims": [{"claim": "standard beats lstsq", "kind": "compare", "a": "standard.test_acc",
                                  "op": ">", "b": "lstsq.test_acc"}]}
    run = tmp_path / "runs" / "fake-cpu"
    write_run(run, raw, [(("digits", name, w, s), acc(1.0, 0.95 if name == "standard" else 0.9), {})
                         for name in ("standard", "lstsq") for w in (1, 2) for s in (0, 1, 2)])
    page = tmp_path / "docs" / "findings.md"
    assert cli.main(["findings", str(run), "--findings-out", str(page)]) == 0
    text = page.read_text()
    assert "| fake | standard beats lstsq | **holds** |" in text
    assert "![fake: accuracy](figures/findings/fake-cpu-accuracy.png)" in text
    assert (tmp_path / "docs" / "figures" / "findings" / "fake-cpu-accuracy.png").stat().st_size > 0
    # the account written around the generated part survives a regeneration
    page.write_text("# Findings\n\nWhat holds and why.\n\n" + text.split("# Findings\n\n", 1)[1] + "\nMore prose.\n")
    assert cli.main(["findings", str(run), "--findings-out", str(page)]) == 0
    again = page.read_text()
    assert again.startswith("# Findings\n\nWhat holds and why.") and again.rstrip().endswith("More prose.")
    assert again.count("## Verdicts") == 1


def test_findings_show_the_cost_the_preset_file_states_now(tmp_path):
    """A preset's cost is measured by a run and written into its file afterwards: the page shows the file's
    figure, not the one frozen into the run's experiment.json (which it keeps when the file is gone)."""
    from study.experiments import load_experiment
    from study.experiments.findings import preset_cost

    toml = tmp_path / "fake.toml"
    body = """[experiment]\nname = "fake"\nkind = "compare"\n[dataset]\nname = "digits"\nbinary = 0\n[grid]\nwidths = [1]\n"""
    toml.write_text(body + '[presets.cpu]\nexpected_cost = "not measured yet"\n')
    exp = load_experiment(str(toml), "cpu")
    toml.write_text(body + '[presets.cpu]\nexpected_cost = "Measured: 2 min"\n')
    assert exp.expected_cost == "not measured yet" and preset_cost(exp) == "Measured: 2 min"
    toml.unlink()
    assert preset_cost(exp) == "not measured yet"
