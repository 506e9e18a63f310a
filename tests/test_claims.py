"""Claims and their verdicts, on hand-made records whose answers are known."""
from __future__ import annotations

import json

import pytest

from study.experiments import ConfigError, resolve, write_report
from study.experiments.claims import evaluate_claims, parse_expression
from study.experiments.records import make_record, unit_key, write_json_atomic

BASE = {"experiment": {"name": "fake", "kind": "compare"},
        "dataset": {"name": "digits", "binary": 0},
        "grid": {"widths": [1, 2, 4], "seeds": [0, 1, 2], "solvers": ["lstsq"]}}


def experiment(claims, **tables):
    return resolve({**BASE, **tables, "claims": claims}, "cpu", source="test.toml")


def record(variant, name, width, seed, **metrics):
    unit = {"variant": variant, "name": name, "width": width, "seed": seed}
    return {"unit": unit, "metrics": metrics}


def grid(values: dict, variant="digits"):
    """values: (name, metric) → {width: [value per seed]} → records."""
    out = {}
    for (name, metric), by_width in values.items():
        for width, per_seed in by_width.items():
            for seed, value in enumerate(per_seed):
                key = (variant, name, width, seed)
                out.setdefault(key, record(variant, name, width, seed))["metrics"][metric] = value
    return list(out.values())


def verdict(claim, records, **tables):
    [result] = evaluate_claims(experiment([claim], **tables), records)
    return result


STANDARD_WINS = {("standard", "test_acc"): {1: [0.90, 0.91, 0.92], 2: [0.93, 0.93, 0.94], 4: [0.95, 0.95, 0.96]},
                 ("linearized", "test_acc"): {1: [0.80, 0.82, 0.81], 2: [0.88, 0.89, 0.90], 4: [0.94, 0.94, 0.95]}}


def test_compare_at_every_width_holds_and_its_reverse_fails():
    records = grid(STANDARD_WINS)
    claim = {"claim": "standard beats linearized", "kind": "compare", "a": "standard.test_acc", "op": ">",
             "b": "linearized.test_acc"}
    result = verdict(claim, records)
    assert result["verdict"] == "holds"
    assert "width 1: a = 0.91, b = 0.81, a − b = 0.1 ± 0.0058 (mean ± SE, 3 seeds) → holds" in result["evidence"]
    assert verdict({**claim, "op": "<"}, records)["verdict"] == "fails"


def test_noisy_difference_is_inconclusive():
    # differences 0.03, −0.01, 0.01: mean 0.01, SE 0.0115: the ±2 SE interval straddles 0
    noisy = {("standard", "test_acc"): {1: [0.93, 0.90, 0.92]}, ("linearized", "test_acc"): {1: [0.90, 0.91, 0.91]}}
    claim = {"claim": "c", "kind": "compare", "a": "standard.test_acc", "op": ">", "b": "linearized.test_acc"}
    result = verdict(claim, grid(noisy))
    assert result["verdict"] == "inconclusive" and "0.01 ± 0.012" in result["evidence"]


def test_every_fails_when_one_point_fails_and_single_points_are_selectable():
    values = {("standard", "test_acc"): {1: [0.9, 0.9], 2: [0.9, 0.9]},
              ("linearized", "test_acc"): {1: [0.8, 0.81], 2: [0.95, 0.96]}}
    claim = {"claim": "c", "kind": "compare", "a": "standard.test_acc", "op": ">", "b": "linearized.test_acc"}
    assert verdict(claim, grid(values))["verdict"] == "fails"
    assert verdict({**claim, "at": "smallest"}, grid(values))["verdict"] == "holds"
    assert verdict({**claim, "at": "largest"}, grid(values))["verdict"] == "fails"
    assert verdict({**claim, "at": 1}, grid(values))["verdict"] == "holds"
    # at the width where linearized test accuracy is largest (2): fails
    assert verdict({**claim, "at": "argmax:linearized.test_acc"}, grid(values))["verdict"] == "fails"


def test_thresholds_against_numbers_strict_and_not():
    values = {("lstsq", "train_acc"): {1: [1.0, 1.0], 2: [1.0, 1.0]},
              ("linearized", "train_acc"): {1: [0.97, 0.98], 2: [1.0, 1.0]}}
    full = {"claim": "lstsq interpolates", "kind": "compare", "a": "lstsq.train_acc", "op": ">=", "b": 1.0}
    assert verdict(full, grid(values))["verdict"] == "holds"
    short = {"claim": "linearized SGD short of 100 %", "kind": "compare", "a": "linearized.train_acc", "op": "<",
             "b": 1.0, "at": "smallest"}
    assert verdict(short, grid(values))["verdict"] == "holds"
    assert verdict({**short, "at": "largest"}, grid(values))["verdict"] == "fails"  # equality fails a strict <


def test_gap_trend_decreasing_holds_increasing_fails_flat_noise_inconclusive():
    records = grid(STANDARD_WINS)
    claim = {"claim": "gap shrinks", "kind": "trend", "a": "standard.test_acc - linearized.test_acc",
             "direction": "decreases"}
    result = verdict(claim, records)
    assert result["verdict"] == "holds" and "slope per log(width)" in result["evidence"]
    assert verdict({**claim, "direction": "increases"}, records)["verdict"] == "fails"
    flat = {("standard", "test_acc"): {1: [0.90, 0.92, 0.91], 2: [0.92, 0.90, 0.91], 4: [0.90, 0.91, 0.92]},
            ("linearized", "test_acc"): {1: [0.9] * 3, 2: [0.9] * 3, 4: [0.9] * 3}}
    assert verdict(claim, grid(flat))["verdict"] == "inconclusive"


def test_compare_across_variants():
    records = grid(STANDARD_WINS, "plain") + grid(
        {("standard", "test_acc"): {1: [0.80, 0.81, 0.80]}, ("linearized", "test_acc"): {1: [0.50, 0.52, 0.51]}},
        "shifted")
    variants = [{"label": "plain", "name": "digits"}, {"label": "shifted", "name": "digits"}]
    claim = {"claim": "gap larger on shifted digits", "kind": "compare", "at": 1, "op": ">",
             "a": "shifted:standard.test_acc - shifted:linearized.test_acc",
             "b": "plain:standard.test_acc - plain:linearized.test_acc"}
    assert verdict(claim, records, variants=variants)["verdict"] == "holds"
    # an expression without a variant must hold on each variant
    each = {"claim": "standard wins", "kind": "compare", "at": 1, "a": "standard.test_acc", "op": ">",
            "b": "linearized.test_acc"}
    result = verdict(each, records, variants=variants)
    assert result["verdict"] == "holds" and "[plain]" in result["evidence"] and "[shifted]" in result["evidence"]


def test_one_seed_decides_by_sign_and_says_so():
    values = {("standard", "test_acc"): {1: [0.9]}, ("linearized", "test_acc"): {1: [0.89]}}
    claim = {"claim": "c", "kind": "compare", "a": "standard.test_acc", "op": ">", "b": "linearized.test_acc"}
    result = verdict(claim, grid(values))
    assert result["verdict"] == "holds" and "1 seed: spread unknown" in result["evidence"]
    assert verdict({**claim, "margin": 0.02}, grid(values))["verdict"] == "fails"


def test_missing_records_are_inconclusive():
    claim = {"claim": "c", "kind": "compare", "a": "standard.test_acc", "op": ">", "b": "linearized.test_acc"}
    result = verdict(claim, [])
    assert result["verdict"] == "inconclusive" and "no records" in result["evidence"]


INTERPOLATION = {"experiment": {"name": "interp", "kind": "interpolation"},
                 "grid": {"widths": [0.25, 0.5], "seeds": [0, 1], "models": ["linearized"]},
                 "interpolation": {"width": 0.25, "n_trains": [100, 200, 300, 400], "n_train": 200}}


def sweep_records(lstsq, ridge, ratio):
    out = []
    for seed in (0, 1):
        for i, n in enumerate((100, 200, 300, 400)):
            metrics = {"rows_per_rank": ratio[i], "lstsq": {"test_acc": lstsq[seed][i]},
                       "ridge_val": {"test_acc": ridge[seed][i]}}
            out.append({"unit": {"variant": "digits", "name": "solvers", "width": 0.25, "n_train": n, "seed": seed},
                        "metrics": metrics})
    # a width-sweep point off the n-sweep, which n-sweep claims must ignore
    out.append({"unit": {"variant": "digits", "name": "solvers", "width": 0.5, "n_train": 200, "seed": 0},
                "metrics": {"rows_per_rank": 0.3, "lstsq": {"test_acc": 0.1}, "ridge_val": {"test_acc": 0.1}}})
    return out


def test_dip_location_and_its_removal():
    records = sweep_records(lstsq=[[0.93, 0.74, 0.83, 0.91], [0.92, 0.75, 0.82, 0.90]],
                            ridge=[[0.95, 0.96, 0.97, 0.975], [0.95, 0.965, 0.97, 0.97]],
                            ratio=[0.4, 0.8, 1.2, 1.6])
    claims = [
        {"claim": "lstsq dips", "kind": "drop", "a": "solvers.lstsq.test_acc", "along": "n_train", "op": ">", "b": 0.05},
        {"claim": "ridge does not", "kind": "drop", "a": "solvers.ridge_val.test_acc", "along": "n_train", "op": "<",
         "b": 0.01},
        {"claim": "dip at the threshold", "kind": "location", "a": "solvers.lstsq.test_acc", "along": "n_train",
         "extreme": "min", "x": "solvers.rows_per_rank", "within": [0.5, 1.5]},
        {"claim": "far from it", "kind": "location", "a": "solvers.lstsq.test_acc", "along": "n_train",
         "extreme": "min", "x": "solvers.rows_per_rank", "within": [1.5, 3]},
        {"claim": "ridge beats lstsq at the dip", "kind": "compare", "a": "solvers.ridge_val.test_acc", "op": ">",
         "b": "solvers.lstsq.test_acc", "along": "n_train", "at": "argmin:solvers.lstsq.test_acc"},
    ]
    exp = resolve({**INTERPOLATION, "dataset": {"name": "digits", "binary": 0}, "claims": claims}, "cpu")
    results = {r["claim"]: r for r in evaluate_claims(exp, records)}
    assert {k: r["verdict"] for k, r in results.items()} == {
        "lstsq dips": "holds", "ridge does not": "holds", "dip at the threshold": "holds", "far from it": "fails",
        "ridge beats lstsq at the dip": "holds"}
    assert "n 200" in results["ridge beats lstsq at the dip"]["evidence"]
    assert "largest drop 0.18" in results["lstsq dips"]["evidence"]  # 0.93 → 0.74 and 0.92 → 0.75


def test_report_writes_claims_json_and_the_verdict_table(tmp_path):
    exp = experiment([{"claim": "standard beats linearized", "kind": "compare", "a": "standard.test_acc", "op": ">",
                       "b": "linearized.test_acc"}])
    write_json_atomic(tmp_path / "experiment.json", exp.to_dict())
    for r in grid({**STANDARD_WINS, ("standard", "train_acc"): {1: [1, 1, 1], 2: [1, 1, 1], 4: [1, 1, 1]},
                   ("linearized", "train_acc"): {1: [1, 1, 1], 2: [1, 1, 1], 4: [1, 1, 1]}}):
        u = r["unit"]
        key = unit_key(u["variant"], u["name"], u["width"], u["seed"])
        metrics = {"train_loss": 0.0, "test_loss": 0.0, **r["metrics"]}
        write_json_atomic(tmp_path / "records" / f"{key}.json", make_record(key, u, {}, metrics, 1.0))
    text, _ = write_report(tmp_path, figures=False)
    claims = json.loads((tmp_path / "claims.json").read_text())
    assert [(c["claim"], c["verdict"]) for c in claims] == [("standard beats linearized", "holds")]
    assert set(claims[0]) >= {"claim", "verdict", "evidence"}
    assert "| standard beats linearized | **holds** |" in text and "## Claims" in text


@pytest.mark.parametrize("claim, message", [
    ({"claim": "c", "kind": "bigger", "a": "standard.test_acc"}, "unknown claim kind 'bigger'; valid kinds: compare"),
    ({"claim": "c", "kind": "compare", "a": "standard.test_accuracy", "op": ">", "b": 1},
     "unknown metric 'test_accuracy' of standard; valid metrics: train_acc"),
    ({"claim": "c", "kind": "compare", "a": "cg.test_acc", "op": ">", "b": 1},
     "'cg' is not a unit this experiment runs; units: standard, linearized, lstsq"),
    ({"claim": "c", "kind": "compare", "a": "standard.test_acc", "op": "=>", "b": 1}, "op must be one of >, >=, <, <="),
    ({"claim": "c", "kind": "compare", "a": "standard.test_acc", "op": ">"}, "a compare claim needs 'b'"),
    ({"claim": "c", "kind": "trend", "a": "standard.test_acc", "direction": "up"}, "direction must be 'increases'"),
    ({"claim": "c", "kind": "compare", "a": "shifted:standard.test_acc", "op": ">", "b": 1},
     "unknown variant 'shifted'; variants: digits"),
    ({"claim": "c", "kind": "compare", "a": "standard.test_acc", "op": ">", "b": 1, "at": "median"}, "at must be"),
    ({"claim": "c", "kind": "compare", "a": "standard.test_acc", "op": ">", "b": 1, "along": "n_train"},
     "needs an interpolation experiment"),
    ({"claim": "c", "kind": "compare", "a": "standard.test_acc", "op": ">", "b": 1, "colour": "red"},
     "unknown key 'colour'"),
    ({"kind": "compare", "a": "standard.test_acc", "op": ">", "b": 1}, "needs 'claim'"),
])
def test_bad_claims_are_config_errors(claim, message):
    with pytest.raises(ConfigError) as err:
        experiment([claim])
    assert message in str(err.value) and "test.toml" in str(err.value)


def test_expression_parsing():
    [term] = parse_expression("mnist-shifted:standard.test_acc")
    assert (term.variant, term.unit, term.metric) == ("mnist-shifted", "standard", "test_acc")
    a, b = parse_expression("solvers.lstsq.u_norm - solvers.ridge_val.u_norm")
    assert a.metric == "lstsq.u_norm" and b.metric == "ridge_val.u_norm"


def test_b_at_compares_each_point_with_one_point_of_b():
    # "a wide linearization beats the narrowest standard net": linearized at width 4 vs standard at width 1
    records = grid(STANDARD_WINS)
    claim = {"claim": "wide linearization beats narrow standard", "kind": "compare", "a": "linearized.test_acc",
             "op": ">", "b": "standard.test_acc", "at": "largest", "b_at": "smallest"}
    result = verdict(claim, records)
    assert result["verdict"] == "holds" and "b (width 1) = 0.91" in result["evidence"]
    assert verdict({**claim, "at": "smallest"}, records)["verdict"] == "fails"
    with pytest.raises(ConfigError, match="b_at picks one point"):
        experiment([{**claim, "b": 0.5}])
