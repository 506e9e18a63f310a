"""Experiment configs, the resumable runner, search, and the bin/study / bin/demo entry points.

Runs use the bundled digits at tiny sizes (LeNet ×0.5, tens of samples, one epoch)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from study.experiments import (ConfigError, ExperimentError, Runner, available_experiments, load_experiment, write_report,
                               plan_units, resolve)
from study.experiments import cli, demo
from study.experiments.search import select, validation_dataset
from study.experiments.spectra import singular_value_cutoff, spectrum_metrics

TINY = {
    "experiment": {"name": "tiny", "kind": "compare"},
    "dataset": {"name": "digits", "binary": 0, "n_train": 40, "n_test": 30},
    "grid": {"arch": "lenet", "widths": [0.5], "seeds": [0, 1], "models": ["standard", "linearized"],
             "solvers": ["lstsq", "sgd"]},
    "train": {"epochs": 1, "lr": 0.05, "weight_decay": 5e-5, "batch_size": 16, "device": "cpu"},
}


def tiny(**overrides):
    return resolve(TINY, "cpu", source="test", overrides=overrides or None)


# ------------------------------------------------------------------------------------------------
# configs


def test_every_shipped_experiment_resolves_for_both_presets():
    shipped = available_experiments()
    assert {"mnist", "mnist-shifted", "cifar10", "snakes", "binary-mnist", "binary-mnist-shifted", "spectrum",
            "regularization"} <= set(shipped)
    for name in shipped:
        cpu, paper = load_experiment(name, "cpu"), load_experiment(name, "paper")
        assert cpu.expected_cost and paper.expected_cost, f"{name}: document the cost of each preset"
        assert "MEASURED" not in cpu.expected_cost and "PAPER_COST" not in paper.expected_cost
        if paper.kind == "compare":
            assert paper.train["epochs"] == 100 and len(paper.grid["seeds"]) == 5
            assert paper.dataset["n_train"] == "all"
            if paper.grid["arch"] == "lenet":
                assert min(paper.grid["widths"]) == 1 and max(paper.grid["widths"]) == 60
                for model in ("standard", "linearized"):
                    assert paper.hyperparameters(model, 60) == {"lr": 0.1, "weight_decay": 5e-5}


def test_binary_experiments_compare_standard_linearized_and_lstsq():
    for name in ("binary-mnist", "binary-mnist-shifted"):
        exp = load_experiment(name, "cpu")
        assert exp.dataset["binary"] == 0
        assert exp.grid["models"] == ["standard", "linearized"] and exp.grid["solvers"] == ["lstsq"]
    assert load_experiment("binary-mnist-shifted", "cpu").dataset["name"] == "mnist-shifted"
    labels = [v["label"] for v in load_experiment("spectrum", "cpu").variants]
    assert labels == ["mnist", "mnist-shifted"]


@pytest.mark.parametrize("raw, message", [
    ({"trian": {}}, "unknown table [trian]; valid tables: experiment"),
    ({"train": {"lrr": 0.1}}, "unknown key 'train.lrr'; valid keys there: epochs"),
    ({"train": {"epochs": "ten"}}, "'train.epochs' must be an integer"),
    ({"train": {"linearized": {"width": {"four": {"lr": 1}}}}}, "'train.linearized.width.four'"),
    ({"train": {"linearized": {"momentum": 0.5}}}, "unknown key 'train.linearized.momentum'; valid keys there: lr, weight_decay"),
    ({"grid": {"solvers": ["qr"]}}, "unknown solver 'qr'; valid solvers: lstsq, ridge, cg, rsvd, sgd"),
    ({"grid": {"widths": []}}, "grid.widths must be a non-empty list"),
    ({"dataset": {"name": "imagenet"}}, "dataset name 'imagenet' is unknown; known datasets: digits"),
    ({"solver": {"lstsq": {"tier": "disk"}}}, "solver.lstsq.tier must be 'store'"),
    ({"solver": {"cg": {"maxiter": 1.5}}}, "'solver.cg.maxiter' must be an integer"),
    ({"solver": {"ridge": {"lambda": 1}}}, "unknown key 'solver.ridge.lambda'; valid keys there: lam, form"),
    ({"solver": {"sgd": {"lr": 0.1}}}, "unknown key 'solver.sgd.lr'; valid keys there: lr_gamma"),
    ({"report": {"figures": ["pie"]}}, "unknown figure 'pie' for a compare experiment; valid figures: accuracy, gap"),
    ({"presets": {"gpu": {}}}, "unknown preset [presets.gpu]; valid presets: cpu, paper"),
    ({"presets": {"cpu": {"grid": {"width": [1]}}}}, "unknown key 'presets.cpu.grid.width'; valid keys there: arch, widths"),
])
def test_bad_configs_name_the_key_and_the_valid_ones(raw, message):
    merged = {**TINY, **{k: {**TINY.get(k, {}), **v} if k in TINY and k != "presets" else v for k, v in raw.items()}}
    with pytest.raises(ConfigError) as err:
        resolve(merged, "cpu", source="bad.toml")
    assert message in str(err.value)
    assert "bad.toml" in str(err.value)


def test_solver_tables_derive_from_the_solvers_option_schema():
    """[solver.<method>] accepts every scalar option of solvers.api.METHOD_OPTIONS with its type, so an
    option added to a solver is settable from an experiment file without a second schema."""
    from solvers.api import METHOD_OPTIONS, PATH_KNOBS, option_types
    from study.experiments.config import _SOLVER_OPTIONS, PATH_VALUE_KEYS

    for method in METHOD_OPTIONS:
        assert set(_SOLVER_OPTIONS[method]) - {"tier"} <= set(option_types(method)) <= set(METHOD_OPTIONS[method])
    assert set(_SOLVER_OPTIONS["cg"]) == {"maxiter", "tol", "normal_tol"}
    exp = tiny(solver={"cg": {"normal_tol": 1e-8, "tol": 1}, "rsvd": {"oversample": 5}})
    assert exp.solver["cg"]["normal_tol"] == 1e-8 and exp.solver["rsvd"]["oversample"] == 5
    assert set(PATH_VALUE_KEYS) == set(PATH_KNOBS.values())  # every path knob has its [regularization] key


def test_unknown_experiment_and_missing_preset(tmp_path):
    with pytest.raises(ConfigError, match="unknown experiment 'mnsit'; shipped experiments: .*binary-mnist"):
        load_experiment("mnsit")
    path = tmp_path / "only-cpu.toml"
    path.write_text('[experiment]\nname = "x"\nkind = "compare"\n[dataset]\nname = "digits"\n[presets.cpu]\n')
    with pytest.raises(ConfigError, match=r"defines no \[presets.paper\]; it defines: cpu"):
        load_experiment(str(path), "paper")
    path.write_text("[experiment\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_experiment(str(path))


def test_hyperparameters_per_model_and_width():
    exp = tiny(train={"linearized": {"lr": 0.01, "width": {"2": {"weight_decay": 0.0}, "0.5": {"lr": 1.0}}}})
    assert exp.hyperparameters("standard", 2) == {"lr": 0.05, "weight_decay": 5e-5}
    assert exp.hyperparameters("linearized", 1) == {"lr": 0.01, "weight_decay": 5e-5}
    assert exp.hyperparameters("linearized", 2) == {"lr": 0.01, "weight_decay": 0.0}
    assert exp.hyperparameters("linearized", 0.5) == {"lr": 1.0, "weight_decay": 5e-5}


def test_plan_units_covers_the_grid():
    exp = tiny(grid={"widths": [2, 1]})
    units = plan_units(exp)
    assert len(units) == 2 * 2 * 4 and len({u.key for u in units}) == len(units)
    assert [u.width for u in units[:4]] == [1, 1, 1, 1]  # cheapest widths first
    spectrum = load_experiment("spectrum", "cpu")  # one unit per variant × seed × width
    expected = len(spectrum.variants) * len(spectrum.grid["seeds"]) * len(spectrum.grid["widths"])
    assert len(plan_units(spectrum)) == expected == 2 * 2 * 3


# ------------------------------------------------------------------------------------------------
# running, resuming


def test_run_records_resume_and_refuse_changed_settings(tmp_path, monkeypatch):
    exp = tiny()
    records = Runner(exp, tmp_path, progress=False).run()
    assert len(records) == 8
    for record in records:
        assert set(record["metrics"]) >= {"train_acc", "test_acc", "train_loss", "test_loss"}
        assert record["versions"]["torch"] and record["settings"]["dataset"]["name"] == "digits"
        assert record["seconds"] > 0
    by_key = {r["key"]: r["metrics"] for r in records}
    # lstsq interpolates the training set; SGD on the stored J is the matrix-free linearized run
    assert by_key["digits__lstsq__w0.5__s0"]["train_acc"] == 1.0
    assert by_key["digits__lstsq__w0.5__s0"]["relative_residual"] < 1e-6
    for seed in (0, 1):
        sgd, lin = by_key[f"digits__sgd__w0.5__s{seed}"], by_key[f"digits__linearized__w0.5__s{seed}"]
        assert sgd["test_acc"] == lin["test_acc"]
        assert math.isclose(sgd["train_loss"], lin["train_loss"], rel_tol=1e-3)
    assert not list(tmp_path.glob("train/*/checkpoint.pt"))  # deleted once the record is written
    assert len(list((tmp_path / "stores").glob("*.h5"))) == 2

    # a finished unit is never recomputed; a lost record is recomputed alone
    import study.train

    calls = []
    real_train = study.train.train
    monkeypatch.setattr(study.train, "train", lambda *a, **k: calls.append(a[2]) or real_train(*a, **k))
    (tmp_path / "records" / "digits__standard__w0.5__s1.json").unlink()
    again = Runner(exp, tmp_path, progress=False).run()
    assert calls == ["standard"]
    assert {r["key"]: r["metrics"]["test_acc"] for r in again} == {k: m["test_acc"] for k, m in by_key.items()}

    before = (tmp_path / "experiment.json").read_text()
    with pytest.raises(ExperimentError, match=r"train.lr was 0.05, now 0.01"):
        Runner(tiny(train={"lr": 0.01}), tmp_path, progress=False).run()
    assert (tmp_path / "experiment.json").read_text() == before  # a refused run changes nothing
    # growing the grid keeps the finished units
    calls.clear()
    Runner(tiny(grid={"seeds": [0, 1, 2], "solvers": []}), tmp_path, progress=False).run()
    assert calls == ["standard", "linearized"]


def test_gram_tier_lstsq_matches_the_store(tmp_path):
    base = {"grid": {"models": [], "solvers": ["lstsq"], "seeds": [0]}}
    store = Runner(tiny(**base), tmp_path / "store", progress=False).run()[0]["metrics"]
    gram = Runner(tiny(**base, solver={"lstsq": {"tier": "gram"}}), tmp_path / "gram", progress=False).run()[0]["metrics"]
    assert not (tmp_path / "gram" / "stores").exists()
    for key in ("train_acc", "test_acc"):
        assert store[key] == gram[key]
    assert math.isclose(store["test_loss"], gram["test_loss"], rel_tol=1e-3)
    assert math.isclose(store["u_norm"], gram["u_norm"], rel_tol=1e-3)


def test_spectrum_and_regularization_runs(tmp_path):
    spectrum = resolve({"experiment": {"name": "s", "kind": "spectrum"},
                        "dataset": {"name": "digits", "n_train": 12, "n_test": 10},
                        "variants": [{"label": "a", "name": "digits"}, {"label": "b", "name": "digits", "seed": 1}],
                        "grid": {"widths": [0.5, 1], "seeds": [0]}, "train": {"device": "cpu"}}, "cpu")
    records = Runner(spectrum, tmp_path / "s", progress=False).run()
    assert len(records) == 4
    for r in records:
        s = np.array(r["singular_values"])
        assert s.size == 12 * 10 and np.all(np.diff(s) <= 0)
        assert 1 <= r["metrics"]["effective_rank"] <= r["metrics"]["numerical_rank"] <= 120

    reg = resolve({"experiment": {"name": "r", "kind": "regularization"},
                   "dataset": {"name": "digits", "binary": 0, "n_train": 30, "n_test": 20},
                   "train": {"device": "cpu", "batch_size": 10},
                   "regularization": {"width": 0.5, "lambdas": [1e-3, 1e3], "ranks": [2, 20],
                                      "cg_iterations": [1, 50], "sgd_epochs": [1, 3], "sgd_lr": 0.01}}, "cpu")
    records = {r["unit"]["name"]: r["metrics"] for r in Runner(reg, tmp_path / "r", progress=False).run()}
    assert set(records) == {"lstsq", "ridge-path", "rsvd-path", "cg-path", "sgd-path"}
    ridge = records["ridge-path"]["points"]
    assert ridge[0]["u_norm"] > ridge[1]["u_norm"]  # more λ, smaller u
    cg = records["cg-path"]["points"]
    assert cg[1]["relative_residual"] < cg[0]["relative_residual"]
    assert math.isclose(cg[1]["u_norm"], records["lstsq"]["u_norm"], rel_tol=1e-2)


def test_a_path_record_depends_on_its_own_inputs_only(tmp_path):
    """A path unit's settings digest covers what its solve reads and nothing else: a new sgd_lr
    recomputes the SGD path alone, a new batch size (which SGD reads from [train]) recomputes it too."""
    from study.experiments import plan_units
    from study.experiments.records import settings_digest

    def digests(**regularization):
        raw = {"experiment": {"name": "r", "kind": "regularization"},
               "dataset": {"name": "digits", "binary": 0, "n_train": 30, "n_test": 20},
               "train": {"device": "cpu", "batch_size": regularization.pop("batch_size", 10)},
               "regularization": {"width": 0.5, "lambdas": [1e-3, 1e3], "ranks": [2, 20], "cg_iterations": [1, 50],
                                  "sgd_epochs": [1, 3], "sgd_lr": 0.01, **regularization}}
        exp = resolve(raw, "cpu")
        runner = Runner(exp, tmp_path, progress=False)
        return {u.name: settings_digest(runner.settings(u)) for u in plan_units(exp)}

    base = digests()
    changed = {name for name, digest in digests(sgd_lr=0.02).items() if digest != base[name]}
    assert changed == {"sgd-path"}
    assert {name for name, digest in digests(batch_size=5).items() if digest != base[name]} == {"sgd-path"}
    assert {name for name, digest in digests(lambdas=[1.0]).items() if digest != base[name]} == {"ridge-path"}


def test_search_selects_on_a_validation_split(tmp_path):
    exp = tiny(grid={"seeds": [0], "solvers": [], "models": ["linearized"]},
               search={"lrs": [0.05, 1e-6], "weight_decays": [0.0], "validation_fraction": 0.25})
    runner = Runner(exp, tmp_path, progress=False)
    runner.run(search=True)
    trials = list((tmp_path / "search").glob("*.json"))
    assert len(trials) == 2
    selection = json.loads((tmp_path / "search_selection.json").read_text())["selected"]
    assert len(selection) == 1 and selection[0]["model"] == "linearized"
    record = json.loads((tmp_path / "records" / "digits__linearized__w0.5__s0.json").read_text())
    assert record["settings"]["hyperparameters_source"] == "search"
    assert record["settings"]["train"]["lr"] == selection[0]["lr"]

    data = runner.dataset("digits")
    split = validation_dataset(data, 0.25, seed=0)
    assert split.test.x.shape[0] == 10 and split.train.x.shape[0] == 30
    assert not set(split.train.indices) & set(split.test.indices)
    assert set(split.train.indices) | set(split.test.indices) == set(data.train.indices)


def test_select_prefers_accuracy_then_loss_and_skips_divergence():
    def trial(lr, acc, loss, diverged=False):
        return {"unit": {"variant": "v", "name": "standard", "width": 1},
                "metrics": {"lr": lr, "weight_decay": 0.0, "val_acc": acc, "val_loss": loss, "diverged": diverged}}

    chosen = select([trial(1.0, 0.99, float("nan"), diverged=True), trial(0.1, 0.9, 0.2), trial(0.01, 0.9, 0.1)])
    assert chosen[("v", "standard", 1)]["lr"] == 0.01


def test_spectrum_metrics_known_answers():
    m = spectrum_metrics([4.0, 2.0, 1.0, 1e-12], (4, 10))  # cut-off 4·10·ε₃₂ ≈ 4.8e-6
    assert m["numerical_rank"] == 3 and m["condition_number"] == 4.0
    assert math.isclose(m["stable_rank"], 21 / 16)
    assert math.isclose(spectrum_metrics([2.0, 2.0, 2.0], (3, 5))["effective_rank"], 3.0)
    # the lstsq cut-off: max(√(max(m, p)·ε₆₄)·σ_1, ε₃₂·‖σ‖)
    assert math.isclose(singular_value_cutoff([1.0, 0.5], (100, 10**6)), math.sqrt(1e6 * np.finfo(float).eps))
    assert math.isclose(singular_value_cutoff([1.0], (1, 1)), np.finfo(np.float32).eps)


# ------------------------------------------------------------------------------------------------
# command lines


def test_cli_list_run_report_and_errors(tmp_path, capsys):
    assert cli.main(["--list"]) == 0
    listing = capsys.readouterr().out
    assert "binary-mnist (compare)" in listing and "--preset paper" in listing

    config = tmp_path / "mine.toml"
    config.write_text('[experiment]\nname = "mine"\nkind = "compare"\n'
                      '[dataset]\nname = "digits"\nbinary = 0\nn_train = 20\nn_test = 10\n'
                      '[grid]\nwidths = [0.5]\nmodels = ["standard"]\n'
                      '[train]\nepochs = 1\ndevice = "cpu"\n')
    out = tmp_path / "run"
    assert cli.main([str(config), "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "| width | n | standard train | standard test |" in text
    assert (out / "report.md").read_text() == text
    assert (out / "figures" / "accuracy.png").stat().st_size > 0
    assert cli.main(["report", str(out), "--no-figures"]) == 0
    assert cli.main([str(config), "--out", str(out), "--report-only", "--quiet"]) == 0
    capsys.readouterr()
    assert cli.main(["mnsit"]) == 2
    assert "unknown experiment 'mnsit'" in capsys.readouterr().err
    assert cli.main(["report", str(tmp_path / "nothing")]) == 2
    assert cli.main(["spectrum", "--search", "--out", str(tmp_path / "s"), "--quiet"]) == 2
    assert "nothing to tune" in capsys.readouterr().err


def test_demo_runs_on_digits(tmp_path, capsys):
    assert demo.main(["--out", str(tmp_path), "--widths", "0.5", "--epochs", "1", "--n-train", "30", "--quiet",
                      "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "lstsq (exact) test" in text and "| 0.5 | 1 |" in text
    assert (tmp_path / "figures" / "accuracy.png").is_file() and (tmp_path / "figures" / "gap.png").is_file()


# ------------------------------------------------------------------------------------------------
# bad input: exit 2, one line naming the problem and the fix, no traceback, nothing changed


def _toml(path, **dataset):
    data = {"name": "digits", "binary": 0, "n_train": 20, "n_test": 10, **dataset}
    lines = [f"{k} = {v!r}".replace("'", '"') for k, v in data.items()]
    path.write_text('[experiment]\nname = "mine"\nkind = "compare"\n[dataset]\n' + "\n".join(lines) +
                    '\n[grid]\nwidths = [0.5]\nmodels = ["standard"]\n[train]\nepochs = 1\ndevice = "cpu"\n')
    return path


def _read_only(tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o500)
    return folder / "run"


BAD_INPUT = [
    ("study", lambda t: [str(_toml(t / "a.toml", n_train=-3)), "--out", str(t / "r")],
     ["dataset.n_train must be a positive integer", "got -3"]),
    ("study", lambda t: [str(_toml(t / "a.toml", n_test="some")), "--out", str(t / "r")],
     ["dataset.n_test must be a positive integer or \"all\""]),
    ("study", lambda t: [str(_toml(t / "a.toml")), "--out", str(_read_only(t))], ["cannot be written", "choose another --out"]),
    ("study", lambda t: [str(_toml(t / "a.toml")), "--out", str(t / "a.toml")], ["is not a directory", "choose another --out"]),
    ("demo", lambda t: ["--widths", "0", "--out", str(t / "r")], ["--widths must be positive, got 0.0", "e.g. --widths 1 4"]),
    ("demo", lambda t: ["--n-train", "-3", "--out", str(t / "r")], ["--n-train must be positive, got -3"]),
    ("demo", lambda t: ["--widths", "nan", "--out", str(t / "r")], ["--widths must be positive, got nan"]),
    ("demo", lambda t: ["--n-train", "5000", "--out", str(t / "r")], ["n_train=5000", "more than the"]),
    ("demo", lambda t: ["--out", str(_read_only(t))], ["cannot be written", "choose another --out"]),
]


@pytest.mark.parametrize("command, argv, expected", BAD_INPUT)
def test_bad_input_exits_2_with_one_line_and_changes_nothing(tmp_path, capsys, command, argv, expected):
    import os

    if os.geteuid() == 0 and any("cannot be written" in e for e in expected):
        pytest.skip("root writes into read-only folders")
    args = argv(tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    rc = (cli.main if command == "study" else demo.main)([*args, "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for text in expected:
        assert text in err
    assert {p: p.read_bytes() for p in before} == before


def test_changed_setting_on_an_existing_run_is_one_line_naming_it(tmp_path, capsys):
    config = _toml(tmp_path / "a.toml")
    out = tmp_path / "run"
    assert cli.main([str(config), "--out", str(out), "--quiet", "--no-figures"]) == 0
    capsys.readouterr()
    config.write_text(config.read_text().replace("epochs = 1", "epochs = 2"))
    records = {p: p.read_bytes() for p in (out / "records").iterdir()}
    assert cli.main([str(config), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "train.epochs was 1, now 2" in err and "use another --out" in err
    assert {p: p.read_bytes() for p in (out / "records").iterdir()} == records


@pytest.mark.parametrize("table, value, message", [
    ("variants", [{"label": "../../escaped", "name": "digits"}], "variants.label '../../escaped' is not a plain file name"),
    ("experiment", {"name": "../../../x", "kind": "compare"}, "experiment.name '../../../x' is not a plain file name"),
    ("variants", [{"label": ".", "name": "digits"}], "is not a plain file name"),
])
def test_names_that_are_not_plain_file_names_are_refused(table, value, message):
    with pytest.raises(ConfigError, match="plain file name") as err:
        resolve({**TINY, table: value}, "cpu", source="bad.toml")
    assert message in str(err.value)


def test_every_path_a_run_writes_is_checked_inside_the_run_directory(tmp_path):
    runner = Runner(tiny(), tmp_path / "run")
    unit = plan_units(runner.exp)[0]
    assert runner.store_path(unit).is_relative_to(tmp_path / "run")
    escaped = type(unit)("../../escaped", unit.name, unit.width, unit.seed)  # a label the config would refuse
    with pytest.raises(ExperimentError, match="outside the run directory"):
        runner.store_path(escaped)


# ------------------------------------------------------------------------------------------------
# interpolation


TINY_INTERPOLATION = {
    "experiment": {"name": "tiny-interpolation", "kind": "interpolation"},
    "dataset": {"name": "digits", "binary": 0, "n_test": 60},
    "grid": {"arch": "lenet", "widths": [0.125, 0.25], "seeds": [0], "models": ["linearized"]},
    "train": {"epochs": 1, "lr": 0.05, "batch_size": 16, "device": "cpu"},
    "interpolation": {"width": 0.125, "n_trains": [20, 120], "n_train": 20, "lambdas": [0.01, 1.0],
                      "cg_iterations": [2, 5], "validation_fraction": 0.5},
    "claims": [{"claim": "lstsq interpolates at the smallest n", "kind": "compare", "a": "solvers.lstsq.train_acc",
                "op": ">=", "b": 1.0, "along": "n_train", "at": "smallest"},
               {"claim": "rank rises with width", "kind": "trend", "a": "solvers.numerical_rank",
                "direction": "increases"}],
}


def test_interpolation_points_solvers_and_claims(tmp_path):
    from jacobian_store.store import JacobianStore
    from solvers import solve

    exp = resolve(TINY_INTERPOLATION, "cpu", source="test")
    units = plan_units(exp)
    assert [(u.name, u.width, u.n_train) for u in units] == [
        ("linearized", 0.125, 20), ("solvers", 0.125, 20), ("linearized", 0.125, 120), ("solvers", 0.125, 120),
        ("linearized", 0.25, 20), ("solvers", 0.25, 20)]
    runner = Runner(exp, tmp_path / "run", progress=False)
    records = {r["key"]: r for r in runner.run()}
    point = records["digits__solvers__w0.125__s0__n20"]["metrics"]
    assert point["n_rows"] == 20 and point["numerical_rank"] == 20  # 20 rows of a 1,014-column J: full row rank
    # the λ = 0 point of the ridge path is the minimum-norm lstsq solution
    with JacobianStore.open(tmp_path / "run" / records["digits__solvers__w0.125__s0__n20"]["store"]) as store:
        lstsq = solve(store.train_J, store.residual(), "lstsq", device="cpu")
    assert np.isclose(point["lstsq"]["u_norm"], lstsq.u_norm, rtol=1e-8)
    assert point["lstsq"]["train_acc"] == 1.0
    assert point["ridge_val"]["lambda"] in (0.01, 1.0) and point["cg_val"]["iterations"] in (2, 5)
    assert [p["value"] for p in point["ridge_path"]] == [0.0, 0.01, 1.0]
    # validation and test images: disjoint halves of the 60 test images
    dataset, val = runner._cache[("point", "digits", 20)]
    assert len(val.indices) == 30 and len(dataset.test.indices) == 30
    assert not set(val.indices) & set(dataset.test.indices)
    text, paths = write_report(tmp_path / "run")
    assert {p.name for p in paths} == {"threshold.png", "width_sweep.png", "threshold_paths.png"}
    assert "n-sweep at width 0.125" in text and "width sweep at n = 20" in text
    claims = json.loads((tmp_path / "run" / "claims.json").read_text())
    assert [c["verdict"] for c in claims] == ["holds", "holds"]
    assert "1 seed: spread unknown" in claims[0]["evidence"]
    # a finished grid resumes without recomputing
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "run" / "records").iterdir()}
    Runner(exp, tmp_path / "run", progress=False).run()
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "run" / "records").iterdir()} == before
