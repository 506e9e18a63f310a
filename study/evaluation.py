"""Evaluation of the linearized network f_lin(u, x) = f(w0, x) + J(x) u on a split: accuracy and loss.

One rule for every consumer (``bin/solve`` with a store or matrix-free, the experiment runner, the
interpolation experiment):

- on the training split the solver has already computed J u (``SolveResult.fitted``), so
  f_lin = f0 + J u costs nothing more;
- on any other split J(x) u comes from J(x) as an operator: by default the network itself
  (:meth:`Split.of_network`: ``NetworkJacobian.matmat``, the jvps of every solution of a path in one
  vectorized pass per batch, batched by its memory plan, J(x) never formed), or a J(x) that
  already exists (a store's test Jacobian, an evaluation Jacobian kept across points).

Accuracy is ``study.metrics.accuracy`` (the prediction rule of DESIGN.md); the loss is the L2 loss
of training, ½‖f(x) − y‖² summed over outputs and averaged over samples.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def scores(outputs, targets) -> dict:
    """{"acc", "loss"} of ``outputs`` against ``targets``, both (n, L)."""
    from study.metrics import accuracy

    outputs = np.asarray(outputs, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.float64)
    outputs = outputs.reshape(targets.shape)
    return {"acc": accuracy(outputs, targets), "loss": float(0.5 * ((outputs - targets) ** 2).sum() / len(targets))}


@dataclass
class Split:
    """One split to score f_lin on: f0 = f(w0, x) and the targets, both (n, L); and J(x), rows
    sample-major, as anything with ``matmat`` (a NetworkJacobian, a store's row operator) or an
    array. J is None for the training split, whose J u each solution carries (``fitted``)."""

    f0: np.ndarray
    targets: np.ndarray
    J: object = None

    def __post_init__(self):
        self.targets = _host(self.targets).astype(np.float64)
        self.f0 = _host(self.f0).astype(np.float64).reshape(self.targets.shape)

    @classmethod
    def of_network(cls, model, x, targets, *, device="auto", batch_size: int | None = None) -> "Split":
        """The split of inputs ``x``, J(x) by jvp at the model's w0 (``batch_size`` samples per pass;
        default: as many as the memory plan of ``NetworkJacobian`` allows)."""
        from jacobian_store.matrix_free import NetworkJacobian

        J = NetworkJacobian(model, x, device=device, batch_size=batch_size)
        return cls(J.outputs(), targets, J)

    def outputs(self, U) -> np.ndarray:
        """f0 + J(x) u for each column u of U (p, k): an array (k, n, L)."""
        if self.J is None:
            raise ValueError("this split has no J(x): its J u comes from the solver (evaluate(..., fitted=...))")
        U = np.asarray(U, dtype=np.float64)
        JU = self.J @ U if isinstance(self.J, np.ndarray) else _host(self.J.matmat(U))
        n, L = self.f0.shape
        return self.f0[None] + np.asarray(JU, dtype=np.float64).T.reshape(U.shape[1], n, L)

    def at_init(self) -> dict:
        """Scores of f(w0, x), i.e. u = 0."""
        return scores(self.f0, self.targets)


def evaluate(solutions, splits: dict) -> list[dict]:
    """Scores of every solution on every split: one dict per solution with ``<split>_acc`` and
    ``<split>_loss`` for each name of ``splits``.

    ``solutions``: SolveResults (anything with ``u`` and, for a split without J, ``fitted`` = J u).
    All solutions share one pass over each split's J(x) (``Split.outputs`` of U = [u₁ … u_k]).
    """
    solutions = list(solutions)
    out = [{} for _ in solutions]
    for name, split in splits.items():
        if split.J is None:
            outputs = [split.f0 + _host(s.fitted).reshape(split.f0.shape) for s in solutions]
        else:
            outputs = split.outputs(np.stack([_host(s.u).astype(np.float64) for s in solutions], axis=1))
        for row, f in zip(out, outputs):
            got = scores(f, split.targets)
            row[f"{name}_acc"], row[f"{name}_loss"] = got["acc"], got["loss"]
    return out


def _host(array) -> np.ndarray:
    from jacobian_store.device import is_torch_tensor, to_numpy

    if is_torch_tensor(array):
        return array.detach().cpu().numpy()
    return np.asarray(to_numpy(array))
