"""Solvers on a J known only by its products: scipy LinearOperators and the network's jvp/vjp.

The oracle for the network operator is J itself, materialized by ``vmap(jacrev)``
(``jacobian_store.functional.jacobian_rows``) and by a built store; the oracle for the solvers is
the same method on the stored J.
"""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse.linalg as spla
import torch

from conftest import DEVICES
from jacobian_store.architectures import create_model
from jacobian_store.functional import initial_parameters, jacobian_rows
from jacobian_store.matrix_free import NetworkJacobian
from jacobian_store.operators import as_product_operator
from solvers import solve, solve_path


def rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / max(np.linalg.norm(b), 1e-300))


def problem(m=30, p=20, seed=0):
    """A J with singular values spread over [1, 30] and a right-hand side r."""
    rng = np.random.default_rng(seed)
    U, _ = np.linalg.qr(rng.standard_normal((m, min(m, p))))
    V, _ = np.linalg.qr(rng.standard_normal((p, min(m, p))))
    return (U * np.geomspace(30.0, 1.0, min(m, p))) @ V.T, rng.standard_normal(m)


class ProductsOnly:
    """The protocol at its smallest: shape, matvec and rmatvec, nothing else (no matmat, no dtype)."""

    def __init__(self, J):
        self.J, self.shape, self.calls = J, J.shape, 0

    def matvec(self, u):
        self.calls += 1
        return self.J @ u

    def rmatvec(self, v):
        self.calls += 1
        return self.J.T @ v


# ---- solvers on any linear operator -----------------------------------------------------------

@pytest.mark.parametrize("wrap", [spla.aslinearoperator, ProductsOnly], ids=["LinearOperator", "protocol"])
def test_cg_and_rsvd_on_products_equal_the_array_solves(wrap):
    J, r = problem()
    for method, options in (("cg", {"tol": 1e-12, "maxiter": 200}), ("rsvd", {"rank": 12, "power_iter": 3})):
        ref = solve(J, r, method, **options)
        res = solve(wrap(J), r, method, **options)
        # the same float64 arithmetic on the same matrix, products in another order: rounding only
        assert rel(res.u, ref.u) < 1e-10, method
        assert (res.stop_code, res.n_iter, res.converged) == (ref.stop_code, ref.n_iter, ref.converged)
        assert res.residual_norm == pytest.approx(ref.residual_norm, rel=1e-10)
    path = solve_path(wrap(J), r, "cg", [2, 5])
    for k, res in zip([2, 5], path):
        assert rel(res.u, solve_path(J, r, "cg", [k])[0].u) < 1e-12 and res.stop_code == 4


def test_row_methods_refuse_a_J_of_products_naming_those_that_work():
    J, r = problem()
    for method, options in (("lstsq", {}), ("ridge", {"lam": 1.0}), ("sgd", {"lr": 1e-3})):
        with pytest.raises(TypeError, match=rf"method '{method}' needs the rows of J.*use method 'cg' or 'rsvd'"):
            solve(spla.aslinearoperator(J), r, method, **options)
    with pytest.raises(TypeError, match="rows of J"):
        solve_path(ProductsOnly(J), r, "ridge", [1.0])
    res = solve(spla.aslinearoperator(J), r, "auto")  # no Gram matrix to form: CGLS
    assert res.method == "cg" and res.requested_method == "auto"
    with pytest.raises(TypeError, match="shape, matvec and rmatvec"):
        solve(object(), r, "cg")


def test_check_finite_on_products_names_the_row_without_forming_J():
    J, r = problem()
    J[13, 4] = np.nan  # row 13 = sample 6, output 1 with n_outputs=2
    op = ProductsOnly(J)
    with pytest.raises(ValueError, match=r"row 13 \(sample 6, output 1\)"):
        solve(op, r, "cg", n_outputs=2)
    assert op.calls == 1  # one product with a random vector, no rows


def test_memory_plan_of_products_counts_vectors_not_row_blocks():
    from solvers.memory import memory_plan

    J, _ = problem()
    plan = dict(memory_plan(as_product_operator(spla.aslinearoperator(J)), "cg", {}))
    assert not any("row block" in what for what in plan)
    assert plan["CGLS vectors u, d, s (p) and ρ, q (n·L)"] == 8 * (4 * 20 + 3 * 30)


# ---- the network's Jacobian by jvp and vjp ------------------------------------------------------

@pytest.fixture(scope="module")
def digits_small():
    from jacobian_store.datasets import load_dataset

    return load_dataset("digits", n_train=12, n_test=10, seed=0)


def _lenet(dataset, dtype=torch.float32):
    return create_model("lenet", 0.25, in_channels=dataset.in_channels, n_outputs=dataset.n_outputs,
                        image_size=dataset.image_size, seed=0).to(dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_network_jacobian_products_equal_the_materialized_J(digits_small, device):
    x = digits_small.train.x
    model = _lenet(digits_small, torch.float64)
    J = jacobian_rows(model, initial_parameters(model), x.double()).numpy()  # vmap(jacrev), sample-major
    op = NetworkJacobian(model, x, device=device, batch_size=5)  # 3 batches, the last one short
    assert op.shape == J.shape == (12 * 10, op.shape[1]) and op.n_outputs == 10
    rng = np.random.default_rng(0)
    u, v = rng.standard_normal(op.shape[1]), rng.standard_normal(op.shape[0])
    # float64 network: jvp/vjp and jacrev are the same derivatives summed in another order
    assert rel(op.matvec(u), J @ u) < 1e-12
    assert rel(op.rmatvec(v), J.T @ v) < 1e-12
    assert op.matvec(u).dtype == np.float64 and isinstance(op.rmatvec(v), np.ndarray)
    U, V = rng.standard_normal((op.shape[1], 3)), rng.standard_normal((op.shape[0], 3))
    assert rel(op.matmat(U), J @ U) < 1e-12 and rel(op.rmatmat(V), J.T @ V) < 1e-12  # vmapped jvp / pullback
    # adjoint identity ⟨J u, v⟩ = ⟨u, Jᵀ v⟩, and the outputs f(w0, X)
    assert np.dot(op.matvec(u), v) == pytest.approx(np.dot(u, op.rmatvec(v)), rel=1e-12)
    np.testing.assert_allclose(op.outputs(), model(x.double()).detach().numpy(), rtol=1e-12, atol=1e-14)
    assert next(model.parameters()).device.type == "cpu"  # the caller's model was not moved


def test_network_jacobian_batch_size_comes_from_the_budget_and_does_not_change_J(digits_small):
    x = digits_small.train.x
    model = _lenet(digits_small)
    whole = NetworkJacobian(model, x, device="cpu")
    small = NetworkJacobian(model, x, device="cpu", memory_budget=1)
    assert whole.batch_size == 12 and small.batch_size == 1
    u = np.random.default_rng(1).standard_normal(whole.shape[1])
    v = np.random.default_rng(2).standard_normal(whole.shape[0])
    # float32 network: a per-sample product does not depend on its batch; the float32 vjp sums
    # over a batch's samples, then the batches are summed in float64: rounding of float32 sums
    assert rel(small.matvec(u), whole.matvec(u)) < 1e-6
    assert rel(small.rmatvec(v), whole.rmatvec(v)) < 1e-6
    with pytest.raises(ValueError, match="batch_size"):
        NetworkJacobian(model, x, device="cpu", batch_size=0)
    with pytest.raises(ValueError, match=r"u: expected shape"):
        whole.matvec(np.zeros(3))


@pytest.mark.filterwarnings("ignore::solvers.cg.ConvergenceWarning")  # cg stopped at maxiter on purpose
def test_matrix_free_cg_and_rsvd_equal_the_stored_J_ones(tmp_path):
    """LeNet ×0.25 on 40 digits: J 400 × 4,157 from a store, against the network's own jvp/vjp.

    Both in float64 (a float64 store and a float64 network): the same matrix to 2e-16. CG's
    iterates are far more sensitive than its products, so the comparison stops at 10 iterations:
    on this J (σ from 9.1 down to 1.6e-3) the 20th CGLS iterate moves by 5% when only the memory
    order of the same float64 J changes (BLAS summation order), while the 10th moves by 4e-14
    (measured); in float32 a relative perturbation of 1e-7 moves the 20th iterate by 2%.
    """
    from jacobian_store.build import BuildSpec, build_store
    from jacobian_store.datasets import load_dataset
    from jacobian_store.store import JacobianStore

    dataset = load_dataset("digits", n_train=40, n_test=10, seed=0)
    build_store(tmp_path / "s.h5", BuildSpec("lenet", 0.25, seed=0, dtype="float64"), dataset, progress=False)
    with JacobianStore.open(tmp_path / "s.h5") as store:
        J, r = store.train_J, store.residual()
        op = NetworkJacobian(store.model(), dataset.train.x, device="cpu")
        np.testing.assert_allclose(op.outputs(), store.f0(), rtol=1e-12, atol=1e-14)  # f0 of the build
        cases = [("cg", {"maxiter": 10, "tol": 0.0, "normal_tol": 0.0}), ("rsvd", {"rank": 10})]
        for method, options in cases:
            stored = solve(J, r, method, **options)
            free = solve(op, r, method, **options)
            assert free.n_iter == stored.n_iter and free.stop_code == stored.stop_code, method
            assert rel(free.u, stored.u) < 1e-6, (method, rel(free.u, stored.u))
            assert free.residual_norm == pytest.approx(stored.residual_norm, rel=1e-6)
            assert free.options["n_outputs"] == 10 and free.extras["J_held_in_memory"] is False


# ---- bin/solve without a store -------------------------------------------------------------------

NETWORK_ARGS = ["--arch", "lenet", "--width", "0.25", "--init-seed", "0", "--dataset", "digits", "--n-train", "40",
                "--n-test", "20", "--device", "cpu", "--quiet"]


@pytest.mark.filterwarnings("ignore::solvers.cg.ConvergenceWarning")  # cg stopped at maxiter on purpose
def test_bin_solve_without_a_store_runs_cg_matrix_free_like_the_store(tmp_path, capsys):
    import json

    from jacobian_store.build import BuildSpec, build_store
    from jacobian_store.datasets import load_dataset
    from study.solve import main

    free_u, store_u = tmp_path / "free.npy", tmp_path / "store.npy"
    assert main(NETWORK_ARGS + ["--method", "cg", "--maxiter", "5", "--save-u", str(free_u),
                                "--json", str(tmp_path / "free.json")]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("cg-maxiter5-tol1e-06: cg[cgls] NOT converged (iteration limit reached (maxiter=5))")
    assert line.endswith("(matrix-free)")
    free = json.loads((tmp_path / "free.json").read_text())
    assert free["stop_code"] == 3 and free["network"] == {"arch": "lenet", "width": 0.25, "seed": 0, "dtype": "float32"}

    path = tmp_path / "s.h5"
    build_store(path, BuildSpec("lenet", 0.25, seed=0), load_dataset("digits", n_train=40, n_test=20, seed=0),
                progress=False)
    assert main(["--store", str(path), "--method", "cg", "--maxiter", "5", "--save-u", str(store_u), "--quiet",
                 "--device", "cpu", "--json", str(tmp_path / "store.json")]) == 0
    stored = json.loads((tmp_path / "store.json").read_text())
    # float32 jvp/vjp against the float32 store: 5 CGLS iterations agree to ~4e-7 (measured)
    assert rel(np.load(free_u), np.load(store_u)) < 1e-5
    assert free["train_acc"] == stored["train_acc"] and free["test_acc"] == stored["test_acc"]
    assert free["initial"] == stored["initial"]


def test_bin_solve_without_a_store_refuses_what_needs_rows(tmp_path, capsys):
    from study.solve import main

    for method in (["--method", "lstsq"], ["--method", "ridge", "--lambda", "1"], ["--method", "sgd", "--lr", "0.1"]):
        with pytest.raises(SystemExit) as exit_:
            main(NETWORK_ARGS + method)
        assert exit_.value.code == 2
        assert "needs the rows of J, i.e. a Jacobian store" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--store", str(tmp_path / "s.h5"), "--arch", "lenet", "--width", "2"])
    assert "--width define J without a store" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(NETWORK_ARGS + ["--method", "cg", "--path", "--iterations", "1", "2", "--save-u", "u.npy"])
    assert "--save-u writes one solution" in capsys.readouterr().err
