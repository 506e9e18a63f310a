"""What every solver returns: the solution u and an honest account of how it was reached.

Every result carries a stop code (scipy's ``istop`` style) and its text. The codes:

====  ==============================  ==========  ==================================================
code  stop reason                     converged   when
====  ==============================  ==========  ==================================================
 0    direct solve                    yes         lstsq, ridge (a factorization of K or JᵀJ); rsvd (a
                                                  factorization of the randomized range finder's B:
                                                  no iteration to converge, see below)
 1    residual tolerance              yes         cg: ‖J u − r‖ ≤ tol·‖r‖
 2    least-squares optimality        yes         cg: ‖Jᵀ(r − J u)‖ ≤ normal_tol·‖J‖·‖r − J u‖, or
                                                  J d = 0 (the normal equations solved exactly)
 3    iteration limit                 no          cg: ``maxiter`` iterations ran without 1 or 2
 4    knob reached                    yes         a path point: the requested iteration count (cg)
                                                  or epoch count (sgd) ran; sgd: see below
 5    all epochs run                  yes         sgd, see below
-1    diverged                        (raised)    non-finite u, J u or loss; sgd: the loss rose
====  ==============================  ==========  ==================================================

"converged" is true exactly when the method's stated stopping rule held:

- **rsvd** has no iterative stopping rule: u = V_k Σ_k⁻¹ U_kᵀ r is a direct solve on the SVD of
  the range finder's sketch. "converged" says that solve was done, not that the sketch captured
  J's top k directions exactly; that accuracy is set by ``oversample`` and ``power_iter``, and
  ``n_iter`` is 0 (the number of products with J and Jᵀ is ``extras["passes"]``).
- **sgd** runs all its epochs (its only stopping rule). It converged when, besides, the final
  loss is finite and not above the initial one: ‖J u − r‖ ≤ ‖J u₀ − r‖. A single run whose final
  loss rose above the initial one diverged (step too large) and raises; in a path, an epoch count
  whose iterate sits above the initial loss while the final one does not is reported with code 4
  and ``converged=False``.

Code −1 is never returned: divergence and non-finite u raise :class:`SolverDivergedError`, so a
result that exists can be saved.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from jacobian_store.device import is_cupy_array, module_for_device, scalar
from jacobian_store.provenance import jsonable

DIRECT, RESIDUAL_TOLERANCE, LSQ_OPTIMALITY, ITERATION_LIMIT, KNOB_REACHED, ALL_EPOCHS, DIVERGED = 0, 1, 2, 3, 4, 5, -1
STOP_REASONS = {
    DIRECT: "direct solve",
    RESIDUAL_TOLERANCE: "residual tolerance reached",
    LSQ_OPTIMALITY: "least-squares optimality reached",
    ITERATION_LIMIT: "iteration limit reached",
    KNOB_REACHED: "requested knob value reached",
    ALL_EPOCHS: "all epochs run",
    DIVERGED: "diverged",
}


class SolverDivergedError(ValueError):
    """A solver diverged or produced a non-finite u: there is no solution to return or save.

    The message names the knobs to change (e.g. a lower ``lr`` for sgd). ``stop_code`` is −1.
    """

    stop_code = DIVERGED


@dataclasses.dataclass
class SolveResult:
    """The fitted correction u of f_lin(u, x) = f(w0, x) + J(x) u, with diagnostics.

    ``u`` lives on the host unless J itself was a CuPy array. ``fitted`` is J u (length n·L).
    ``residual_norm`` is ‖J u − r‖₂ and ``relative_residual`` is that over ‖r‖₂.
    ``method`` is the method that ran; ``requested_method`` what was asked for ("auto" included);
    ``form`` says how it ran ("dual" (K = J Jᵀ), "primal" (JᵀJ), "gelsd", "cgls", ...).
    ``extras`` holds the method's own figures: singular values, λ, rank, cut-off, loss curve.
    ``stop_code`` and ``stop_reason``: why it stopped, from the table in the module docstring
    (the text may add detail, e.g. the iteration limit's value).
    """

    u: Any
    method: str
    converged: bool
    stop_reason: str
    n_iter: int
    residual_norm: float
    u_norm: float
    rhs_norm: float
    stop_code: int = DIRECT
    wall_time: float = 0.0
    form: str = ""
    device: str = "cpu"
    requested_method: str = ""
    options: dict = dataclasses.field(default_factory=dict)
    extras: dict = dataclasses.field(default_factory=dict)
    fitted: Any = dataclasses.field(default=None, repr=False)

    @property
    def relative_residual(self) -> float:
        return self.residual_norm / self.rhs_norm if self.rhs_norm > 0 else self.residual_norm

    def __repr__(self) -> str:
        return (f"SolveResult(method={self.method!r}, form={self.form!r}, converged={self.converged}, "
                f"stop_code={self.stop_code}, stop_reason={self.stop_reason!r}, n_iter={self.n_iter}, "
                f"relative_residual={self.relative_residual:.3e}, u_norm={self.u_norm:.6g}, "
                f"wall_time={self.wall_time:.3f}s)")

    def summary(self) -> str:
        """One line for logs and the CLI."""
        knobs = ", ".join(f"{k}={_short(v)}" for k, v in self.options.items()
                          if k in ("lam", "rank", "maxiter", "tol", "lr", "weight_decay", "epochs",
                                   "batch_size", "driver") and v is not None)
        return (f"{self.method}[{self.form}{', ' + knobs if knobs else ''}] "
                f"{'converged' if self.converged else 'NOT converged'} ({self.stop_reason}) "
                f"iters={self.n_iter} ‖Ju−r‖/‖r‖={self.relative_residual:.3e} ‖u‖={self.u_norm:.4g} "
                f"time={self.wall_time:.2f}s device={self.device}")

    def to_dict(self) -> dict:
        """JSON-safe record (``jsonable``): every scalar and option, small arrays as lists, no u and no J u."""
        out = {}
        for field in dataclasses.fields(self):
            if field.name in ("u", "fitted"):
                continue
            out[field.name] = jsonable(getattr(self, field.name))
        out["relative_residual"] = jsonable(self.relative_residual)
        out["n_params"] = int(self.u.shape[0]) if self.u is not None else None
        return out


def finish(op, r, u, fitted, *, method, form, n_iter, extras, stop_code=DIRECT, stop_reason=None,
           converged=None) -> SolveResult:
    """Assemble a SolveResult; J u is computed (one pass) when the method did not provide it.

    ``stop_reason`` defaults to the code's text and ``converged`` to what the code means (every
    code but 3, iteration limit); a method passes either only to say more. A non-finite u or J u
    raises :class:`SolverDivergedError`: such a result is never returned.
    """
    xp = module_for_device("cuda") if is_cupy_array(u) else np
    if stop_code == DIVERGED:
        raise SolverDivergedError(f"{method} diverged: {stop_reason}")
    if fitted is None:
        fitted = op.matvec(u)
    u_norm = scalar(xp.linalg.norm(u))
    r = xp.asarray(r)
    residual_norm = scalar(xp.linalg.norm(fitted - r))
    if not (np.isfinite(u_norm) and np.isfinite(residual_norm)):
        raise SolverDivergedError(
            f"{method} produced a non-finite {'u' if not np.isfinite(u_norm) else 'J u'} (‖u‖ = {u_norm}, "
            f"‖J u − r‖ = {residual_norm}); check J and r for NaN/Inf (check_finite=True), and for sgd lower lr")
    if converged is None:
        converged = stop_code != ITERATION_LIMIT
    return SolveResult(u=u, method=method, converged=bool(converged), stop_code=int(stop_code),
                       stop_reason=stop_reason or STOP_REASONS[stop_code], n_iter=int(n_iter),
                       residual_norm=residual_norm, u_norm=u_norm, rhs_norm=scalar(xp.linalg.norm(r)), form=form,
                       extras=extras, fitted=fitted)


def _short(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)
