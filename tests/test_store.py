"""The HDF5 Jacobian store: contents against torch.func references, resume after a kill, bad input."""
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest
import torch
from torch.func import functional_call, jacrev, jvp

from jacobian_store.build import BuildSpec, build_store, choose_chunking, main
from jacobian_store.sizes import parse_bytes
from jacobian_store.functional import initial_parameters, unflatten, parameter_layout
from jacobian_store.store import JacobianStore, StoreError
from jacobian_store.datasets import load_dataset

from conftest import DEVICES, REPO, assert_equal_to_float32_rounding


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", n_train=24, n_test=10, seed=0)


@pytest.fixture(scope="module")
def digits_binary():
    return load_dataset("digits", n_train=20, n_test=10, binary=3, seed=1)


def reference_rows(model, x, rows, n_outputs):
    """Rows of J by torch.func.jacrev of the whole network, one sample at a time."""
    params = initial_parameters(model)
    out = []
    for row in rows:
        sample, output = divmod(int(row), n_outputs)
        jac = jacrev(lambda p: functional_call(model, p, (x[sample:sample + 1],))[0, output])(params)
        out.append(torch.cat([jac[name].reshape(-1) for name in params]))
    return torch.stack(out).numpy()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dataset_name,dtype,tol", [
    ("digits", "float32", 1e-5),          # float32 rounding of a few hundred products per entry
    ("digits_binary", "float64", 1e-12),  # float64: the two computations differ only in summation order
])
def test_stored_rows_equal_jacrev(tmp_path, request, dataset_name, dtype, tol, device):
    dataset = request.getfixturevalue(dataset_name)
    out = tmp_path / "s.h5"
    build_store(out, BuildSpec("lenet", 0.5, seed=3, dtype=dtype, chunk_samples=7), dataset, device=device,
                progress=False)
    with JacobianStore.open(out) as store:
        J = store.train_J
        model = store.model()  # in the store's dtype
        L = dataset.n_outputs
        assert J.shape == (dataset.train.x.shape[0] * L, store.n_params)
        assert J.dtype == np.dtype(dtype)
        rows = np.random.default_rng(0).choice(J.shape[0], size=6, replace=False)
        expected = reference_rows(model, dataset.train.x.to(getattr(torch, dtype)), rows, L)
        got = J.take_rows(rows)
        assert np.abs(got - expected).max() <= tol * np.abs(expected).max()
        # w0 in the file rebuilds the model the store was made from
        fresh = store.model()
        assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), model.parameters()))
        f0 = fresh(dataset.train.x.to(getattr(torch, dtype))).detach().numpy()
        np.testing.assert_allclose(store.f0(), f0, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(store.targets(), dataset.train.targets.numpy())
        np.testing.assert_array_equal(store.labels("test"), dataset.test.labels.numpy())


def test_matvec_equals_jvp(tmp_path, digits):
    out = tmp_path / "s.h5"
    build_store(out, BuildSpec("lenet", 1, chunk_samples=5), digits, progress=False)
    with JacobianStore.open(out) as store:
        model = store.model().double()
        u = np.random.default_rng(1).standard_normal(store.n_params)
        params = {k: v.double() for k, v in initial_parameters(model).items()}
        tangent = unflatten(torch.from_numpy(u), parameter_layout(model))
        _, ju = jvp(lambda p: functional_call(model, p, (digits.train.x.double(),)), (params,), (tangent,))
        got = store.train_J.matvec(u)  # float32 J times a float64 u, accumulated in float64
        np.testing.assert_allclose(got, ju.reshape(-1).numpy(), rtol=1e-5, atol=1e-5 * np.abs(got).max())


def test_alexnet_store(tmp_path):
    dataset = load_dataset("digits", n_train=3, n_test=2, image_size=64, seed=0)
    out = tmp_path / "a.h5"
    build_store(out, BuildSpec("alexnet", 0.05, chunk_samples=2), dataset, progress=False)
    with JacobianStore.open(out) as store:
        rows = np.array([0, 13, 29])
        expected = reference_rows(store.model(), dataset.train.x, rows, 10)
        assert np.abs(store.train_J.take_rows(rows) - expected).max() <= 1e-5 * np.abs(expected).max()


KILLED_BUILD = textwrap.dedent("""
    import os, signal, sys
    from jacobian_store.build import BuildSpec, build_store
    from jacobian_store.datasets import load_dataset
    dataset = load_dataset("digits", n_train=24, n_test=10, seed=0)
    def die_after_two(chunk):
        if chunk == 1:
            os.kill(os.getpid(), signal.SIGKILL)
    build_store(sys.argv[1], BuildSpec("lenet", 0.5, seed=3, chunk_samples=5), dataset, progress=False,
                on_chunk_done=die_after_two)
""")


def test_killed_build_resumes_to_the_uninterrupted_result(tmp_path, digits):
    killed, whole = tmp_path / "killed.h5", tmp_path / "whole.h5"
    spec = BuildSpec("lenet", 0.5, seed=3, chunk_samples=5)
    result = subprocess.run([sys.executable, "-c", KILLED_BUILD, str(killed)], cwd=REPO)
    assert result.returncode == -signal.SIGKILL
    with h5py.File(killed, "r") as f:
        assert f["train/done"][()].tolist() == [True, True, False, False, False]
    with pytest.raises(StoreError, match="unfinished.*2 of 5 chunks"):
        JacobianStore.open(killed).train_J
    with h5py.File(killed, "r") as f:
        kept = f["train/J"][:2 * 5 * 10]  # the two finished chunks (5 samples × 10 outputs each)
    finished = []
    build_store(killed, spec, digits, progress=False, on_chunk_done=finished.append)
    assert finished == [2, 3, 4]  # only the missing chunks were computed
    build_store(whole, spec, digits, progress=False)
    with h5py.File(killed, "r") as a, h5py.File(whole, "r") as b:
        assert a["train/J"][:kept.shape[0]].tobytes() == kept.tobytes()  # finished chunks are never rewritten
        for name in ("train/y", "w0", "params/names"):
            np.testing.assert_array_equal(a[name][()], b[name][()], err_msg=name)
        # computed by another process (other thread count): equal to float32 rounding
        for name in ("train/J", "train/f0", "test/f0"):
            assert_equal_to_float32_rounding(a[name][()], b[name][()], name)


def test_mismatched_spec_refuses_and_keeps_the_store(tmp_path, digits):
    out = tmp_path / "s.h5"
    build_store(out, BuildSpec("lenet", 0.5, chunk_samples=8), digits, progress=False)
    before = out.read_bytes()
    with pytest.raises(StoreError, match="different width: stored 0.5, this command asks for 1.0"):
        build_store(out, BuildSpec("lenet", 1, chunk_samples=8), digits, progress=False)
    other_data = load_dataset("digits", n_train=24, n_test=10, seed=5)
    with pytest.raises(StoreError, match="different dataset"):
        build_store(out, BuildSpec("lenet", 0.5, chunk_samples=8), other_data, progress=False)
    assert out.read_bytes() == before
    build_store(out, BuildSpec("lenet", 1, chunk_samples=8), digits, progress=False, overwrite=True)
    with JacobianStore.open(out) as store:
        assert store.attrs["width"] == 1.0


def test_refuses_a_file_that_is_not_a_store(tmp_path, digits):
    out = tmp_path / "notes.h5"
    out.write_bytes(b"precious")
    with pytest.raises(StoreError, match="is not an HDF5 file.*another --out"):
        build_store(out, BuildSpec("lenet", 0.5), digits, progress=False)
    assert out.read_bytes() == b"precious"
    with pytest.raises(StoreError, match="cannot open"):
        JacobianStore.open(out)
    with pytest.raises(StoreError, match="no Jacobian store at"):
        JacobianStore.open(tmp_path / "missing.h5")


def test_refuses_when_the_disk_is_too_small(tmp_path, digits, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(StoreError, match=r"needs about .* GB but .* has .* GB free"):
        build_store(tmp_path / "s.h5", BuildSpec("lenet", 0.5), digits, progress=False)
    assert not (tmp_path / "s.h5").exists()


def test_test_jacobian_and_solutions(tmp_path, digits):
    out = tmp_path / "s.h5"
    build_store(out, BuildSpec("lenet", 0.5, test_jacobian=True, chunk_samples=4), digits, progress=False)
    with JacobianStore.open(out, "r+") as store:
        assert store.jacobian("test").shape == (10 * 10, store.n_params)
        u = np.arange(store.n_params, dtype=np.float64)
        store.write_solution("lstsq", u, {"method": "lstsq", "rcond": np.float64(1e-7)})
        with pytest.raises(StoreError, match="already holds solution 'lstsq'"):
            store.write_solution("lstsq", u, {})
        got, info = store.read_solution("lstsq")
        np.testing.assert_array_equal(got, u)
        assert info == {"method": "lstsq", "rcond": 1e-7}
        with pytest.raises(ValueError, match="expected"):
            store.write_solution("bad", u[:-1], {})
    build_store(tmp_path / "t.h5", BuildSpec("lenet", 0.5, chunk_samples=4), digits, progress=False)
    with JacobianStore.open(tmp_path / "t.h5") as store:
        with pytest.raises(StoreError, match="no test Jacobian.*--test-jacobian"):
            store.jacobian("test")


def test_chunking_covers_whole_hdf5_chunks():
    for n_outputs, n_params in [(10, 61_706), (1, 1_518_090), (10, 218_000_000)]:
        chunk_samples, chunk_rows, columns = choose_chunking(n_outputs, n_params, 4, 2**31, None)
        assert (chunk_samples * n_outputs) % chunk_rows == 0
        assert chunk_rows * columns * 4 < 2**32  # HDF5's limit on one chunk
    assert choose_chunking(10, 61_706, 4, 2**31, 7)[0] == 7
    assert parse_bytes("2GiB") == 2 * 2**30 and parse_bytes("512MB") == 512 * 10**6
    with pytest.raises(ValueError, match="cannot read"):
        parse_bytes("lots")


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli.h5"
    assert main(["--arch", "lenet", "--width", "0.5", "--dataset", "digits", "--n-train", "12", "--n-test", "6",
                 "--binary", "0", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "J 12 × 15,351" in printed and "complete" in printed
    with JacobianStore.open(out) as store:
        assert store.attrs["command"].startswith("bin/build-jacobian --arch lenet")
        assert store.attrs["dataset"]["binary"] == 0
    assert main(["--dataset", "mnist", "--data-root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "m.h5")]) == 2
    assert "--data-root" in capsys.readouterr().err
    assert not (tmp_path / "m.h5").exists()


def test_cli_help_documents_every_option():
    result = subprocess.run([str(REPO / "bin" / "build-jacobian"), "--help"], capture_output=True, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0
    for option in ("--arch", "--width", "--dataset", "--binary", "--n-train", "--out", "--device", "--dtype",
                   "--test-jacobian", "--chunk-samples", "--memory-budget", "--overwrite"):
        assert option in result.stdout
