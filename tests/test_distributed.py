"""Solvers on a Dask cluster: a LocalCluster of 2 worker processes gives the in-memory results.

The reference is the in-memory HDF5RowOperator (or ArrayRowOperator) on the same stored J. Both
compute in float64 from the same float32 entries; only the grouping of the float64 sums differs
(BLAS blocking, Dask's split of the rows into blocks). By the standard bound on a float64 dot
product of length n, |fl(xᵀy) − xᵀy| ≤ γ_n |x|ᵀ|y| with γ_n = n·ε₆₄/(1 − n·ε₆₄), two such
computations differ entrywise by at most 2γ_n |x|ᵀ|y|: the product tests check exactly that bound.
"""
from __future__ import annotations

import json
import os
import shutil
import sys

import h5py
import numpy as np
import pytest

pytest.importorskip("distributed")

from jacobian_store.build import BuildSpec, build_store  # noqa: E402
from jacobian_store.store import JacobianStore, StoreError  # noqa: E402
from solvers import ArrayRowOperator, solve  # noqa: E402
from solvers.distributed import (DaskRowOperator, _require_dask, connect, dask_operator_from_store,  # noqa: E402
                                 worker_files)
from jacobian_store.datasets import load_dataset  # noqa: E402

EPS64 = np.finfo(np.float64).eps


def gamma(n: int) -> float:
    return n * EPS64 / (1 - n * EPS64)


@pytest.fixture(scope="module")
def client():
    client = connect("local", n_workers=2)
    yield client
    client.close()


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    """LeNet ×0.5 on 24 digits: J is 240 × 15,738 float32, stored in chunks of 10 rows (one sample)."""
    path = tmp_path_factory.mktemp("store") / "lenet.h5"
    dataset = load_dataset("digits", n_train=24, n_test=6)
    build_store(path, BuildSpec("lenet", 0.5, chunk_samples=4), dataset, device="cpu", progress=False)
    return path


@pytest.fixture(scope="module")
def tall_path(tmp_path_factory):
    """A random 48 × 20 float32 J (n·L > p, so lstsq/ridge take the primal form JᵀJ), in the store's
    /train/J layout but chunked by 8 rows × 16 columns, so Dask blocks split the columns too."""
    path = tmp_path_factory.mktemp("tall") / "tall.h5"
    J = np.random.default_rng(0).standard_normal((48, 20)).astype(np.float32)
    with h5py.File(path, "w") as f:
        f.create_dataset("train/J", data=J, chunks=(8, 16))
    return path


def dask_store_op(store_path, client):
    # 2 row blocks of 8 stored chunks and one of 8: several blocks, as on a real store
    return dask_operator_from_store(store_path, client, block_bytes=80 * 15_738 * 4)


def dask_tall_op(tall_path, client):
    # a row of chunks (8 × 20) exceeds block_bytes, so a block is one chunk: 6 × 2 blocks
    return DaskRowOperator(tall_path, "train/J", client, n_outputs=1, block_bytes=8 * 16 * 4)


def test_products_equal_in_memory(client, store_path, tall_path):
    with JacobianStore.open(store_path) as store:
        lenet = store.train_J.to_dense()
    with h5py.File(tall_path, "r") as f:
        tall = f["train/J"][()]
    cases = [(dask_store_op(store_path, client), lenet), (dask_tall_op(tall_path, client), tall)]
    assert cases[0][0].array.numblocks == (3, 1) and cases[1][0].array.numblocks == (6, 2)
    rng = np.random.default_rng(1)
    for op, J in cases:
        ref = ArrayRowOperator(J, n_outputs=op.n_outputs, block_rows=7)  # another blocking on purpose
        A = np.abs(J.astype(np.float64))
        m, p = J.shape
        u, v = rng.standard_normal(p), rng.standard_normal(m)
        U, V = rng.standard_normal((p, 3)), rng.standard_normal((m, 3))
        checks = [(op.matvec(u), ref.matvec(u), 2 * gamma(p) * A @ np.abs(u)),
                  (op.rmatvec(v), ref.rmatvec(v), 2 * gamma(m) * A.T @ np.abs(v)),
                  (op.matmat(U), ref.matmat(U), 2 * gamma(p) * A @ np.abs(U)),
                  (op.rmatmat(V), ref.rmatmat(V), 2 * gamma(m) * A.T @ np.abs(V)),
                  (op.gram(), ref.gram(), 2 * gamma(p) * A @ A.T)]
        if op.n_outputs == 1:  # JᵀJ of the tall matrix only (p × p of LeNet would be 2 GB)
            checks.append((op.normal_matrix(), ref.normal_matrix(), 2 * gamma(m) * A.T @ A))
        for got, want, bound in checks:
            assert got.shape == want.shape and got.dtype == np.float64
            assert np.all(np.abs(got - want) <= bound)
    # K in panels (2 row blocks per panel, 3 computations) equals K in one, and is exactly symmetric
    op, A = cases[1][0], np.abs(tall.astype(np.float64))
    assert [len(panel) for panel in op._panels(2 * 8 * 20 * 8, np.float64)] == [2, 2, 2]
    K = op.gram(panel_bytes=2 * 8 * 20 * 8)
    np.testing.assert_array_equal(K, K.T)
    assert np.all(np.abs(K - op.gram()) <= 2 * gamma(20) * A @ A.T)


# Relative difference ‖u_dask − u_mem‖/‖u_mem‖ allowed. The two Gram matrices differ by at most
# 2γ_p‖J‖² entrywise, 7e-12 relative for p = 15,738; a direct solve turns that into a relative
# change of u of at most κ(K)·7e-12, and κ(K) = (σ_max/σ_min)² ≈ 9.2e3 here (LeNet ×0.5 on 24
# digits, σ_max/σ_min ≈ 96, checked below): 6.5e-8. CG and rsvd run the same products in the same
# order and differ only by each product's rounding (≤ 2γ_n relative); we allow 1e-9, far above the
# 1e-15 measured and below any real disagreement (a wrong block or a dropped row moves u by ≥ 1e-3).
SOLVE_TOL = {"lstsq": 1e-7, "ridge": 1e-7, "cg": 1e-9, "rsvd": 1e-9}


@pytest.mark.filterwarnings("ignore::solvers.cg.ConvergenceWarning")  # 6 CG iterations do not converge
@pytest.mark.parametrize("method,options", [("lstsq", {}), ("ridge", {"lam": 1e-3}), ("cg", {"maxiter": 6}),
                                            ("rsvd", {"rank": 20, "power_iter": 1})])
def test_solve_equals_in_memory(client, store_path, method, options):
    with JacobianStore.open(store_path) as store:
        J, r = store.train_J, store.residual()
        op = dask_store_op(store, client)
        got = solve(op, r, method, **options)
        want = solve(J, r, method, **options)
    assert got.form == want.form == {"cg": "cgls", "rsvd": "randomized"}.get(method, "dual")
    assert np.linalg.norm(got.u - want.u) <= SOLVE_TOL[method] * np.linalg.norm(want.u)
    assert np.linalg.norm(got.fitted - want.fitted) <= SOLVE_TOL[method] * np.linalg.norm(want.fitted)
    assert got.n_iter == want.n_iter
    if method == "lstsq":
        sv = want.extras["singular_values"]
        assert (sv[0] / sv[-1]) ** 2 < 1.2e4  # the κ(K) the tolerance assumes


def test_primal_form_sgd_and_writing_the_solution_beside_the_workers(client, store_path, tall_path, tmp_path):
    # tall J: lstsq and ridge through JᵀJ on the cluster
    op = dask_tall_op(tall_path, client)
    with h5py.File(tall_path, "r") as f:
        J = f["train/J"][()]
    r = np.random.default_rng(2).standard_normal(48)
    results = {}
    for method, options in [("lstsq", {}), ("ridge", {"lam": 0.5})]:
        got, want = solve(op, r, method, **options), solve(J, r, method, **options)
        assert got.form == "primal"
        assert np.linalg.norm(got.u - want.u) <= 1e-10 * np.linalg.norm(want.u)  # κ(JᵀJ) ≈ 20 here
        results[method] = got
    # J held in the workers' memory: the same answer
    held = dask_tall_op(tall_path, client).persist()
    np.testing.assert_array_equal(solve(held, r, "lstsq").u, results["lstsq"].u)
    # SGD reads its mini-batches locally (take_rows), so it is the in-memory run exactly
    got, want = solve(op, r, "sgd", lr=1e-3, epochs=2), solve(J, r, "sgd", lr=1e-3, epochs=2)
    np.testing.assert_array_equal(got.u, want.u)

    # As bin/solve does: the store is open for writing in this process while the workers read it
    # (their handles are unlocked), and the solution is written into it afterwards.
    path = tmp_path / "copy.h5"
    shutil.copy(store_path, path)
    with JacobianStore.open(path, mode="r+") as store:
        res = solve(dask_operator_from_store(store, client), store.residual(), "ridge", lam=1e-2)
        store.write_solution("dask-ridge", res.u, res.to_dict())
    with JacobianStore.open(path) as store:
        np.testing.assert_array_equal(store.read_solution("dask-ridge")[0], res.u)


def test_each_worker_process_opens_the_file_once(client, store_path):
    op = dask_store_op(store_path, client)
    path = str(store_path.resolve())
    workers = sorted(client.scheduler_info()["workers"])
    rng = np.random.default_rng(3)
    for _ in range(2):
        for worker in workers:  # every worker reads every block, twice
            client.compute(op.array.sum(), workers=[worker], sync=True)
        op.matvec(rng.standard_normal(op.shape[1]))
        op.rmatvec(rng.standard_normal(op.shape[0]))
    op.gram()
    reports = client.run(worker_files)  # {worker address: that process's cache}
    assert sorted(reports) == workers
    pids = {report["pid"] for report in reports.values()}
    assert len(pids) == 2 and os.getpid() not in pids  # two processes, neither of them this one
    # one handle per process, opened once however many tasks read through it
    # (the count covers the whole module: the earlier tests read this store through the same handles)
    assert [report["files"][path] for report in reports.values()] == [1, 1]
    assert path not in worker_files()["files"]  # the client reads locally without caching


def test_sharded_store_is_read_through_its_main_file(client, tmp_path):
    # A virtual dataset over two source files named relative to the main file, as a torchrun build
    # writes it; the workers' working directory is not the store's directory.
    J = np.random.default_rng(4).standard_normal((40, 12)).astype(np.float32)
    layout = h5py.VirtualLayout(shape=J.shape, dtype=J.dtype)
    for rank in range(2):
        with h5py.File(tmp_path / f"x.shard00{rank}.h5", "w") as f:
            f.create_dataset("train/J", data=J[20 * rank:20 * rank + 20], chunks=(10, 12))
        layout[20 * rank:20 * rank + 20] = h5py.VirtualSource(f"x.shard00{rank}.h5", "train/J", shape=(20, 12))
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f.create_group("train").create_virtual_dataset("J", layout, fillvalue=np.nan)
    assert os.path.realpath(os.getcwd()) != os.path.realpath(tmp_path)
    op = DaskRowOperator(tmp_path / "x.h5", "train/J", client, n_outputs=2, chunk_rows=10, block_bytes=10 * 12 * 4)
    assert op.array.numblocks == (4, 1)
    np.testing.assert_array_equal(op.array.compute(scheduler=client), J)
    op.check_finite()


def test_check_finite_runs_on_the_cluster_and_names_the_row(client, tmp_path):
    J = np.ones((30, 5), dtype=np.float32)
    J[17, 3] = np.nan
    with h5py.File(tmp_path / "bad.h5", "w") as f:
        f.create_dataset("train/J", data=J, chunks=(5, 5))
    op = DaskRowOperator(tmp_path / "bad.h5", "train/J", client, n_outputs=3, block_bytes=5 * 5 * 4)
    with pytest.raises(ValueError, match=r"non-finite value \(nan\) in row 17 \(sample 5, output 2\), column 3"):
        solve(op, np.zeros(30), "lstsq")


class _NoCluster:
    """A client that fails the test if anything is asked of it."""

    def __getattr__(self, name):
        raise AssertionError(f"the cluster was used (client.{name}) before the store was checked")


def test_bad_store_is_refused_before_anything_reaches_the_cluster(store_path, tmp_path):
    with pytest.raises(StoreError, match="no Jacobian store"):
        dask_operator_from_store(tmp_path / "missing.h5", _NoCluster())
    unfinished = tmp_path / "unfinished.h5"
    shutil.copy(store_path, unfinished)
    with h5py.File(unfinished, "r+") as f:
        f["train/done"][1] = False
    with pytest.raises(StoreError, match="unfinished.*5 of 6 chunks"):
        dask_operator_from_store(unfinished, _NoCluster())
    with pytest.raises(StoreError, match="holds no test Jacobian"):
        dask_operator_from_store(store_path, _NoCluster(), split="test")


def test_missing_dask_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed → ImportError
    with pytest.raises(ImportError, match=r"pip install 'lincnn\[distributed\]'"):
        _require_dask()
    with pytest.raises(ImportError, match=r"lincnn\[distributed\]"):
        connect("local")



def test_cli_scheduler(client, store_path, tmp_path, capsys):
    from study.solve import main

    path = tmp_path / "s.h5"
    shutil.copy(store_path, path)
    assert main(["--store", str(path), "--method", "ridge", "--lambda", "1e-2", "--scheduler",
                 client.scheduler.address, "--no-test", "--quiet"]) == 0
    record = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert record["scheduler"] == client.scheduler.address
    with JacobianStore.open(path) as store:
        u_cluster, _ = store.read_solution(store.solution_names()[0])
        expected = solve(store.train_J, store.residual(), method="ridge", lam=1e-2).u
    np.testing.assert_allclose(u_cluster, expected, rtol=1e-9, atol=1e-12)
    with pytest.raises(SystemExit):
        main(["--store", str(path), "--method", "sgd", "--lr", "0.1", "--scheduler", "local"])
    assert "sgd reads its mini-batches locally" in capsys.readouterr().err
