"""study.evaluation: f_lin(u, x) = f(w0, x) + J(x) u on a split, by jvp, against J formed by jacrev."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from jacobian_store.architectures import create_model
from jacobian_store.functional import initial_parameters, jacobian_rows
from study.evaluation import Split, evaluate, scores


@pytest.fixture(scope="module")
def network():
    torch.manual_seed(0)
    model = create_model("lenet", 0.25, in_channels=1, n_outputs=3, image_size=28, seed=0).double()
    x = torch.randn(7, 1, 28, 28, dtype=torch.float64)
    targets = np.eye(3)[np.arange(7) % 3]
    J = jacobian_rows(model, initial_parameters(model), x).numpy()  # vmap(jacrev): the reference J(x)
    with torch.no_grad():
        f0 = model(x).numpy()
    return model, x, targets, J, f0


class _Result:
    def __init__(self, u, fitted):
        self.u, self.fitted = u, fitted


def test_split_of_network_is_f0_plus_J_u_for_every_column(network):
    model, x, targets, J, f0 = network
    U = np.random.default_rng(0).standard_normal((J.shape[1], 4))
    split = Split.of_network(model, x, targets, device="cpu", batch_size=3)  # batches that do not divide n
    out = split.outputs(U)
    assert out.shape == (4, 7, 3)
    reference = f0[None] + (J @ U).T.reshape(4, 7, 3)
    # float64 network: jvp and jacrev agree to rounding of sums over p ≈ 1e3 terms
    np.testing.assert_allclose(out, reference, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(split.f0, f0, rtol=1e-12)


def test_evaluate_scores_train_from_fitted_and_other_splits_by_J(network):
    model, x, targets, J, f0 = network
    rng = np.random.default_rng(1)
    results = [_Result(u, J @ u) for u in rng.standard_normal((2, J.shape[1]))]
    splits = {"train": Split(f0, targets), "test": Split.of_network(model, x, targets, device="cpu"),
              "held": Split(f0, targets, J)}  # an evaluation Jacobian kept as an array
    rows = evaluate(results, splits)
    for row, res in zip(rows, results):
        want = scores(f0 + (J @ res.u).reshape(7, 3), targets)
        for split in splits:
            assert row[f"{split}_acc"] == want["acc"]
            assert row[f"{split}_loss"] == pytest.approx(want["loss"], rel=1e-10)


def test_scores_known_answer():
    outputs = np.array([[0.9, 0.1], [0.2, 0.3], [1.0, 0.0]])
    targets = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    got = scores(outputs, targets)
    assert got["acc"] == pytest.approx(1 / 3)
    # ½‖f − y‖² per sample, averaged: (0.02 + 0.73 + 2) / 2 / 3
    assert got["loss"] == pytest.approx((0.01 + 0.01 + 0.64 + 0.09 + 1 + 1) / 2 / 3)
    with pytest.raises(ValueError, match="no J"):
        Split(outputs, targets).outputs(np.zeros((4, 1)))
