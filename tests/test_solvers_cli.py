"""bin/solve smoke tests: ``main([...])`` on a tiny store built once, so the examples cannot rot."""
from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest

from solvers import solve
from study.solve import build_parser, main


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    """LeNet ×0.25 on 40 digits (10 outputs, J 400 × 4,157), with a test Jacobian for checking the jvp path."""
    from jacobian_store.build import BuildSpec, build_store
    from jacobian_store.datasets import load_dataset

    path = tmp_path_factory.mktemp("store") / "tiny.h5"
    dataset = load_dataset("digits", n_train=40, n_test=20, seed=0)
    build_store(path, BuildSpec("lenet", 0.25, seed=0, test_jacobian=True), dataset, progress=False)
    return path


@pytest.fixture
def store(tiny_store, tmp_path):
    """A private copy, so tests writing solutions do not see each other's."""
    path = tmp_path / "s.h5"
    shutil.copy(tiny_store, path)
    return path


def test_lstsq_writes_solution_json_and_summary(store, tmp_path, capsys):
    from jacobian_store.store import JacobianStore

    record_path = tmp_path / "rec.json"
    assert main(["--store", str(store), "--method", "lstsq", "--json", str(record_path), "--quiet"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("lstsq: lstsq[dual] converged") and "train_acc=1.0000" in line
    record = json.loads(record_path.read_text())
    assert record["method"] == "lstsq" and record["train_acc"] == 1.0 and 0 <= record["test_acc"] <= 1
    assert record["options"]["form"] == "auto" and record["command"].startswith("bin/solve --store")
    with JacobianStore.open(store) as s:
        u, info = s.read_solution("lstsq")
        assert info["options"]["n_outputs"] == 10 and info["extras"]["rank"] == 400
        # the stored u is the library's answer, and test accuracy by jvp equals f0 + J_test u
        ref = solve(s.train_J, s.residual(), "lstsq")
        np.testing.assert_allclose(u, ref.u, rtol=1e-12)
        from study.metrics import accuracy

        f_test = s.f0("test") + (s.jacobian("test").matvec(u)).reshape(-1, 10)
        assert record["test_acc"] == pytest.approx(accuracy(f_test, s.targets("test")))


def test_every_method_runs_and_refuses_an_existing_name(store, capsys):
    for args in (["--method", "ridge", "--lambda", "1e-3"], ["--method", "cg", "--maxiter", "30"],
                 ["--method", "rsvd", "--rank", "50"], ["--method", "sgd", "--lr", "0.01", "--epochs", "2"],
                 ["--method", "lstsq", "--driver", "gelsd"], ["--method", "auto"]):
        assert main(["--store", str(store), "--quiet", "--no-test", *args]) == 0, args
    out = capsys.readouterr().out
    for name in ("ridge-lam0.001:", "cg-maxiter30-tol1e-06:", "rsvd-k50:", "sgd-lr0.01-wd0-ep2-bs32:", "lstsq-gelsd:"):
        assert name in out
    assert main(["--store", str(store), "--quiet", "--method", "rsvd", "--rank", "50"]) == 2
    assert "already holds solution 'rsvd-k50'" in capsys.readouterr().err
    assert main(["--store", str(store), "--quiet", "--no-test", "--method", "rsvd", "--rank", "50", "--overwrite"]) == 0


@pytest.mark.parametrize("method,flag,values,extra", [("ridge", "--lambdas", ["0", "1e-4", "1e-2", "1"], []),
                                                       ("rsvd", "--ranks", ["5", "50", "400"], []),
                                                       ("cg", "--iterations", ["1", "10", "40"], []),
                                                       ("sgd", "--epochs-list", ["1", "3"], ["--lr", "0.02"])])
def test_path_writes_table_figure_and_solutions(store, tmp_path, method, flag, values, extra):
    from jacobian_store.store import JacobianStore

    prefix = tmp_path / f"{method}-sweep"
    assert main(["--store", str(store), "--method", method, "--path", "--out", str(prefix), "--quiet", flag, *values,
                 *extra]) == 0
    table = (tmp_path / f"{method}-sweep.md").read_text()
    assert table.count("\n|") == 2 + len(values)
    assert (tmp_path / f"{method}-sweep.png").stat().st_size > 1000
    assert len((tmp_path / f"{method}-sweep.csv").read_text().splitlines()) == 1 + len(values)
    record = json.loads((tmp_path / f"{method}-sweep.json").read_text())
    assert [p["value"] for p in record["path"]] == [float(v) for v in values]
    assert all(p["test_acc"] is not None for p in record["path"])
    with JacobianStore.open(store) as s:
        assert len([n for n in s.solution_names() if n.startswith(f"{method}-path@")]) == len(values)


def test_ridge_path_default_grid_and_standard_network(store, tmp_path, capsys):
    run = tmp_path / "std"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"model_kind": "standard", "final": {"epoch": 5, "train_acc": 0.9,
                                                                                    "test_acc": 0.7}}))
    assert main(["--store", str(store), "--method", "ridge", "--path", "--no-save", "--no-test", "--quiet",
                 "--standard-run", str(run), "--out", str(tmp_path / "p")]) == 0
    record = json.loads((tmp_path / "p.json").read_text())
    assert len(record["path"]) == 9 and record["standard"]["test_acc"] == 0.7
    assert "Standard network: train acc 0.9000" in (tmp_path / "p.md").read_text()


def test_bad_input_is_refused_clearly(store, tmp_path, capsys):
    assert main(["--store", str(tmp_path / "none.h5")]) == 2
    assert "no Jacobian store at" in capsys.readouterr().err
    unfinished = tmp_path / "unfinished.h5"
    shutil.copy(store, unfinished)
    with h5py.File(unfinished, "r+") as f:
        f["train/done"][0] = False
    assert main(["--store", str(unfinished), "--quiet"]) == 2
    assert "build is unfinished" in capsys.readouterr().err
    assert main(["--store", str(store), "--method", "ridge", "--lambda", "-1", "--quiet"]) == 2
    assert "must be ≥ 0" in capsys.readouterr().err
    assert main(["--store", str(store), "--method", "rsvd", "--rank", "401", "--quiet"]) == 2
    assert "exceeds the rank bound" in capsys.readouterr().err
    assert main(["--store", str(store), "--memory-limit", "100K", "--quiet"]) == 2
    assert "would hold about" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--store", str(store), "--method", "ridge", "--rank", "3"])
    assert "--rank does not apply to --method ridge" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--store", str(store), "--method", "ridge", "--path", "--lambda", "1"])
    with pytest.raises(SystemExit):
        main(["--store", str(store), "--method", "lstsq", "--path"])


def test_help_says_what_each_method_holds_in_memory():
    text = build_parser().format_help()
    for needle in ("K = J Jᵀ", "JᵀJ", "cg", "rsvd (rank k)", "sgd", "refused before it reads J"):
        assert needle in text


def test_bin_solve_and_build_jacobian_share_the_network_options(capsys):
    """One argparse helper (jacobian_store.arguments.add_network_arguments) for both commands; each
    keeps its own flags for the seed of w0 and the dtype (bin/solve's --seed and --dtype are solver options)."""
    from jacobian_store.build import _parser as build_parser_

    def network_group(parser):
        (group,) = [g for g in parser._action_groups if g.title.startswith("network")]
        return {a.option_strings[0]: (a.default, a.choices) for a in group._group_actions}

    build, solve_ = network_group(build_parser_()), network_group(build_parser())
    assert build == {"--arch": ("lenet", build["--arch"][1]), "--width": (1.0, None), "--seed": (0, None),
                     "--dtype": ("float32", ("float32", "float64"))}
    assert {k: v for k, v in solve_.items() if k != "--jvp-batch-size"} == {
        "--arch": build["--arch"], "--width": build["--width"], "--init-seed": build["--seed"],
        "--network-dtype": build["--dtype"]}
    for parser in (build_parser_(), build_parser()):
        with pytest.raises(SystemExit):
            parser.parse_args(["--width", "-1", "--out", "x.h5"])
        assert "--width must be a positive number, got -1" in capsys.readouterr().err


def test_test_accuracy_from_the_stored_test_jacobian_equals_the_jvp(store, tmp_path):
    """With a test Jacobian (--test-jacobian) bin/solve reads J(x) u from it; without one it takes the
    jvp of the network at w0 on the test images rebuilt from the store's dataset spec. Both are
    f0 + J(x) u of the same float32 J(x), so they agree to float32 rounding."""
    without = tmp_path / "without.h5"
    shutil.copy(store, without)
    with h5py.File(without, "r+") as file:
        del file["test/J"], file["test/done"]
    records = {}
    for name, path in (("stored", store), ("jvp", without)):
        records[name] = tmp_path / f"{name}.json"
        assert main(["--store", str(path), "--method", "lstsq", "--no-save", "--json", str(records[name]),
                     "--quiet"]) == 0
    stored, jvp = (json.loads(records[name].read_text()) for name in ("stored", "jvp"))
    assert stored["test_loss"] == pytest.approx(jvp["test_loss"], rel=1e-5)
    # a test output within float32 rounding of a class boundary could flip: at most one of 20 samples
    assert abs(stored["test_acc"] - jvp["test_acc"]) <= 1 / 20


def test_a_solve_on_a_store_does_not_import_torch(store):
    """A stored J (and a stored test J) needs NumPy only: torch's import would cost a third of a small
    store's whole command (jacobian_store.device, jacobian_store.arguments)."""
    import subprocess
    import sys
    from pathlib import Path

    code = (f"import sys; from study.solve import main; "
            f"rc = main(['--store', {str(store)!r}, '--method', 'lstsq', '--no-save', '--quiet']); "
            f"print(rc, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-2:] == ["0", "False"]
