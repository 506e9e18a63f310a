"""Faults and bad input: kills at chosen instants resume to the uninterrupted result; bad input is
refused with exit status 2, one line naming the problem and the fix, and no file changed.

Kills are placed, not timed: a child process runs the command with one function wrapped so that it
SIGKILLs itself at that point (``KILL_AT``), so the tests do not depend on this machine's speed.
"""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import REPO, assert_equal_to_float32_rounding
from jacobian_store.architectures import create_model, n_parameters, parameter_count
from jacobian_store.build import partial_path
from jacobian_store.build import main as build_main
from jacobian_store.store import JacobianStore, StoreError, exclusive_lock
from study.solve import main as solve_main
from study.train import main as train_main

DIGITS = ["--dataset", "digits", "--n-train", "12", "--n-test", "6"]
BUILD = ["--arch", "lenet", "--width", "0.25", "--chunk-samples", "4", "--quiet", *DIGITS]
TRAIN = ["--arch", "lenet", "--width", "0.25", "--epochs", "2", "--batch-size", "4", "--device", "cpu", "--quiet",
         "--model", "linearized", *DIGITS]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """LeNet ×0.25 on 12 digits (J 120 × 4,157), built once; tests work on copies."""
    path = tmp_path_factory.mktemp("built") / "s.h5"
    assert build_main([*BUILD, "--out", str(path)]) == 0
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished 1-epoch bin/train run directory (linearized, float32)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    train_main([*TRAIN, "--epochs", "1", "--out", str(out)])
    return out


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_refused(code, capsys, expected, folder, before) -> None:
    """Exit status 2, no traceback, a last line naming each expected piece, ``folder`` unchanged."""
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    message = err.strip().splitlines()[-1]
    for piece in expected:
        assert piece in message, (piece, message)
    assert snapshot(folder) == before


# ---- the parameter count is known before anything is built -------------------------------------

@pytest.mark.parametrize("arch,width,image_size", [("lenet", 0.25, 28), ("lenet", 3, 32), ("alexnet", 0.05, 64),
                                                   ("alexnet", 0.1, 224)])
def test_parameter_count_equals_the_built_model(arch, width, image_size):
    assert parameter_count(arch, width, 3, 7, image_size) == n_parameters(create_model(arch, width, 3, 7, image_size))


# ---- bad input: exit 2, one line naming problem and fix, no file changed ------------------------

def _damage(path: Path, how: str) -> None:
    with h5py.File(path, "r+") as f:
        if how == "nan_w0":
            f["w0"][3] = np.nan
        elif how == "nan_f0":
            f["train/f0"][2, 1] = np.nan
        elif how == "nan_J":
            f["train/J"][5, 7] = np.nan
        elif how == "no_n_params":
            del f.attrs["n_params"]
        elif how == "no_f0":
            del f["train/f0"]
        elif how == "y_shape":
            y = f["train/y"][()]
            del f["train/y"]
            f["train/y"] = y[:, :3]
        elif how == "solution":
            f.create_group("solutions/kept").create_dataset("u", data=np.zeros(f.attrs["n_params"]))
        elif how != "intact":
            raise ValueError(how)


def _solve(store, *args):
    return solve_main(["--store", str(store), "--quiet", "--no-test", *args])


# (id, store damage, command, expected pieces of the message: the problem, then the fix)
BAD_SOLVES = [
    ("name-empty", "intact", ["--name", ""], ["plain name", "--name ridge-small"]),
    ("name-dot", "intact", ["--name", "."], ["plain name"]),
    ("name-dotdot", "intact", ["--name", ".."], ["plain name"]),
    ("name-slash", "intact", ["--name", "a/b"], ["plain name"]),
    ("json-dir", "intact", ["--json", "{tmp}"], ["is a directory", "give a file name"]),
    ("standard-run-missing", "intact", ["--standard-run", "{tmp}/nope"], ["does not exist", "bin/train run"]),
    ("ridge-no-lambda", "intact", ["--method", "ridge"], ["needs --lambda", "--lambda 1e-3"]),
    ("sgd-no-lr", "intact", ["--method", "sgd"], ["needs --lr", "--lr 0.01"]),
    ("eval-batch-0", "intact", ["--eval-batch-size", "0"], ["--eval-batch-size must be a positive integer"]),
    ("memory-1K", "intact", ["--memory-limit", "1K"], ["limit is 1.0 KiB", "raise the limit"]),
    ("sgd-diverges", "intact", ["--method", "sgd", "--lr", "10", "--epochs", "3"], ["nothing was saved", "Lower --lr"]),
    ("sgd-overflows", "intact", ["--method", "sgd", "--lr", "1e30"], ["nothing was saved", "Lower --lr"]),
    ("nan-w0", "nan_w0", [], ["/w0 holds 1 non-finite", "rebuild it"]),
    ("nan-f0", "nan_f0", [], ["/train/f0 holds 1 non-finite", "rebuild it"]),
    ("nan-J", "nan_J", [], ["J holds a non-finite value", "row 5", "rebuild"]),
    ("nan-J-ridge-path", "nan_J", ["--method", "ridge", "--path"], ["J holds a non-finite value", "rebuild"]),
    ("no-n-params", "no_n_params", [], ["lacks attribute 'n_params'", "rebuild it"]),
    ("no-f0", "no_f0", [], ["lacks /train/f0", "rebuild it"]),
    ("y-shape", "y_shape", [], ["/train/y has shape (12, 3)", "rebuild it"]),
    ("existing-name", "solution", ["--name", "kept"], ["already holds solution 'kept'", "--overwrite"]),
]


@pytest.mark.parametrize("damage,command,expected", [c[1:] for c in BAD_SOLVES], ids=[c[0] for c in BAD_SOLVES])
def test_bad_solve_input_is_refused_and_changes_nothing(built, tmp_path, capsys, damage, command, expected):
    store = tmp_path / "s.h5"
    shutil.copy(built, store)
    _damage(store, damage)
    before = snapshot(tmp_path)
    try:
        code = _solve(store, *[a.replace("{tmp}", str(tmp_path)) for a in command])
    except SystemExit as exit_:  # argparse's refusal
        code = exit_.code
    assert_refused(code, capsys, expected, tmp_path, before)


def test_readers_never_write(built, tmp_path, capsys):
    empty = tmp_path / "empty.h5"
    empty.touch()
    assert _solve(empty) == 2 and "cannot open" in capsys.readouterr().err
    assert empty.stat().st_size == 0
    store = tmp_path / "s.h5"
    shutil.copy(built, store)
    before = store.read_bytes()
    assert _solve(store, "--no-save", "--json", str(tmp_path / "rec.json")) == 0
    with JacobianStore.open(store) as s:
        s.train_J.matvec(np.zeros(s.n_params))
    assert store.read_bytes() == before


BAD_BUILDS = [
    ("width-huge", ["--width", "1e6"], ["parameters", "lower --width"]),
    ("width-nan", ["--width", "nan"], ["--width must be a positive number"]),
    ("discard-alone", ["--discard-solutions"], ["only applies with --overwrite"]),
    ("out-dir", ["--out", "{tmp}"], ["is a directory", "store.h5"]),
    ("changed-n-test", ["--n-test", "5"], ["different dataset.n_test: stored 6", "use the same option"]),
    ("overwrite-solutions", ["--width", "0.5", "--overwrite"], ["1 solution(s) (kept)", "--discard-solutions"]),
    ("n-train-negative", ["--n-train", "-3"], ["n_train must be at least 1, got -3"]),
]


@pytest.mark.parametrize("command,expected", [c[1:] for c in BAD_BUILDS], ids=[c[0] for c in BAD_BUILDS])
def test_bad_build_input_is_refused_and_changes_nothing(built, tmp_path, capsys, command, expected):
    store = tmp_path / "s.h5"
    shutil.copy(built, store)
    _damage(store, "solution")
    before = snapshot(tmp_path)
    try:
        code = build_main([*BUILD, "--out", str(store), *[a.replace("{tmp}", str(tmp_path)) for a in command]])
    except SystemExit as exit_:
        code = exit_.code
    assert_refused(code, capsys, expected, tmp_path, before)


BAD_TRAINS = [
    ("no-data-root", ["--dataset", "mnist", "--data-root", "{tmp}/nowhere"], ["--data-root"]),
    ("n-train-negative", ["--n-train", "-3"], ["n_train must be at least 1, got -3"]),
    ("width-nan", ["--width", "nan"], ["--width must be a positive number"]),
    ("width-0", ["--width", "0"], ["--width must be a positive number"]),
    ("width-huge", ["--width", "1e6"], ["parameters", "lower --width"]),
    ("lr-nan", ["--lr", "nan"], ["lr must be a non-negative number, got nan"]),
    ("batch-0", ["--batch-size", "0"], ["batch_size must be a positive integer, got 0"]),
    ("out-file", ["--out", "{tmp}/file"], ["is a file", "--out"]),
    ("changed-lr", ["--lr", "0.02"], ["lr=0.01", "lr=0.02", "use the same lr"]),
    ("changed-n-test", ["--n-test", "5"], ["dataset.spec.n_test=6", "dataset.spec.n_test=5"]),
    ("truncated-checkpoint", ["truncate"], ["is truncated or damaged", "delete it", "--no-resume"]),
]


@pytest.mark.parametrize("command,expected", [c[1:] for c in BAD_TRAINS], ids=[c[0] for c in BAD_TRAINS])
def test_bad_train_input_is_refused_and_changes_nothing(trained, tmp_path, capsys, command, expected):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    (tmp_path / "file").write_text("not a directory")
    if command == ["truncate"]:
        checkpoint = run / "linearized" / "checkpoint.pt"
        checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
        command = []
    before = snapshot(tmp_path)
    argv = [*TRAIN, "--epochs", "1", "--lr", "0.01", "--out", str(run)]
    with pytest.raises(SystemExit) as exit_:
        train_main([*argv, *[a.replace("{tmp}", str(tmp_path)) for a in command]])
    assert_refused(exit_.value.code, capsys, expected, tmp_path, before)


# ---- nothing overwritten silently; locks named as locks ----------------------------------------

def test_overwrite_needs_discard_solutions_and_never_replaces_an_open_store(built, tmp_path, capsys):
    store = tmp_path / "s.h5"
    shutil.copy(built, store)
    _damage(store, "solution")
    other = [*BUILD, "--width", "0.5", "--out", str(store), "--overwrite"]
    with h5py.File(store, "r"):  # another reader: HDF5 holds the file's shared lock
        assert build_main([*other, "--discard-solutions"]) == 2
    assert "in use by another process" in capsys.readouterr().err
    with exclusive_lock(store):  # a writer
        with pytest.raises(StoreError, match="in use by another process.*wait for it to finish"):
            JacobianStore.open(store)
    assert build_main([*other, "--discard-solutions"]) == 0
    with JacobianStore.open(store) as s:
        assert s.attrs["width"] == 0.5 and s.solution_names() == []


# ---- kills at chosen instants resume to the uninterrupted result -------------------------------

KILLER = textwrap.dedent("""
    import importlib, os, signal, sys
    module, attribute, nth = sys.argv[1].rsplit(":", 2)
    target = __import__(module, fromlist=["_"])
    owner, name = (target, attribute) if "." not in attribute else (
        getattr(target, attribute.split(".")[0]), attribute.split(".")[1])
    original, calls = getattr(owner, name), [0]
    def killing(*args, **kwargs):
        calls[0] += 1
        if calls[0] == int(nth):
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)
    setattr(owner, name, killing)
    result = importlib.import_module(sys.argv[2]).main(sys.argv[3:])
    sys.exit(result if isinstance(result, int) else 0)
""")


def killed_at(point: str, module: str, argv: list[str]) -> None:
    """Run ``python -m module argv`` and SIGKILL it on the n-th call of ``point`` ("module:function:n")."""
    result = subprocess.run([sys.executable, "-c", KILLER, point, module, *argv], cwd=REPO, capture_output=True,
                            text=True)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]


@pytest.mark.parametrize("point", [
    "jacobian_store.build:_create_jacobian_dataset:1",  # during creation, J not yet allocated
    "jacobian_store.build:os.replace:1",                 # creation written, not yet renamed into place
    "jacobian_store.layer_jacobians:structured_jacobian_rows:3",  # mid-build
])
def test_killed_build_resumes_to_the_uninterrupted_result(built, tmp_path, point):
    out = tmp_path / "s.h5"
    killed_at(point, "jacobian_store.build", [*BUILD, "--out", str(out)])
    assert not out.exists() or JacobianStore.open(out).close() is None  # absent, or a store to resume
    assert build_main([*BUILD, "--out", str(out)]) == 0
    assert not partial_path(out).exists()
    with h5py.File(out, "r") as a, h5py.File(built, "r") as b:
        for name in ("train/y", "train/labels", "w0", "params/names", "train/done"):
            np.testing.assert_array_equal(a[name][()], b[name][()], err_msg=name)
        for name in ("train/J", "train/f0", "test/f0"):  # computed by other processes
            assert_equal_to_float32_rounding(a[name][()], b[name][()], name)


@pytest.mark.parametrize("point", [
    "study.fitting:check_result:1",                         # solved, nothing written
    "os:fsync:1",                                           # JSON record being staged
    "jacobian_store.store:JacobianStore.write_solution:1",  # record in place, u not yet stored
    "h5py:Group.move:1",                                     # u written under its scratch name
])
def test_killed_solve_reruns_to_the_uninterrupted_result(built, tmp_path, point):
    store, whole = tmp_path / "s.h5", tmp_path / "whole.h5"
    shutil.copy(built, store)
    shutil.copy(built, whole)
    argv = ["--store", str(store), "--method", "ridge", "--lambda", "1e-3", "--quiet", "--no-test"]
    killed_at(point, "study.solve", argv)
    with JacobianStore.open(store) as s:
        assert s.solution_names() == []  # a stored solution always comes with its record
    assert solve_main(argv) == 0
    assert solve_main(["--store", str(whole), *argv[2:]]) == 0
    with JacobianStore.open(store) as a, JacobianStore.open(whole) as b:
        (u, info), (v, _) = a.read_solution("ridge-lam0.001"), b.read_solution("ridge-lam0.001")
        np.testing.assert_allclose(u, v, rtol=1e-10, atol=0)  # the same float64 solve, each in its own process
    record = json.loads((tmp_path / "s.ridge-lam0.001.json").read_text())
    assert record["name"] == "ridge-lam0.001" and record["u_norm"] == pytest.approx(info["u_norm"])
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("point", [
    "study.train:_atomic_write:1",  # epoch 1 trained, its checkpoint not yet written
    "os:replace:3",                 # epoch 2's checkpoint written to its temporary file, not renamed
])
def test_killed_training_resumes_to_the_uninterrupted_result(tmp_path, point):
    argv = [*TRAIN, "--float64"]
    killed_at(point, "study.train", [*argv, "--out", str(tmp_path / "killed")])
    (resumed,) = train_main([*argv, "--out", str(tmp_path / "killed")])
    (whole,) = train_main([*argv, "--out", str(tmp_path / "whole")])
    timings = ("seconds", "eval_seconds")
    assert [{k: v for k, v in h.items() if k not in timings} for h in resumed.history] == \
           [{k: v for k, v in h.items() if k not in timings} for h in whole.history]
    assert np.array_equal(resumed.u.numpy(), whole.u.numpy())
