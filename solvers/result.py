"""What every solver returns: the solution u and an honest account of how it was reached."""
from __future__ import annotations

import dataclasses
from typing import Any


from jacobian_store.provenance import jsonable


@dataclasses.dataclass
class SolveResult:
    """The fitted correction u of f_lin(u, x) = f(w0, x) + J(x) u, with diagnostics.

    ``u`` lives on the host unless J itself was a CuPy array. ``fitted`` is J u (length n·L).
    ``residual_norm`` is ‖J u − r‖₂ and ``relative_residual`` is that over ‖r‖₂.
    ``method`` is the method that ran; ``requested_method`` what was asked for ("auto" included);
    ``form`` says how it ran ("dual" (K = J Jᵀ), "primal" (JᵀJ), "gelsd", "cgls", ...).
    ``extras`` holds the method's own figures: singular values, λ, rank, cut-off, loss curve.
    """

    u: Any
    method: str
    converged: bool
    stop_reason: str
    n_iter: int
    residual_norm: float
    u_norm: float
    rhs_norm: float
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
                f"stop_reason={self.stop_reason!r}, n_iter={self.n_iter}, "
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


def _short(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)
