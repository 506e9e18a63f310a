"""Solvers for the linearized network: fit u in J u = r = y − f(w0, X), each method a regularizer.

``solve(J, r, method="lstsq" | "ridge" | "cg" | "rsvd" | "sgd" | "auto", **options)`` returns a
:class:`SolveResult`; ``solve_path`` sweeps a method's knob from one factorization or one run.
``J`` is a :class:`RowBlockOperator` (the HDF5 store's row-chunk operator) or an array, for every
method; or, for ``cg`` and ``rsvd``, anything with ``shape``, ``matvec`` and ``rmatvec`` (a scipy
``LinearOperator``, the network's own ``jacobian_store.matrix_free.NetworkJacobian``).
"""
from .api import KNOB_LABELS, METHOD_OPTIONS, METHODS, PATH_KNOBS, REQUIRED, option_types, solve, solve_path
from .cg import ConvergenceWarning
from .memory import MemoryLimitError
from jacobian_store.operators import ArrayRowOperator, ProductOperator, RowBlockOperator, as_product_operator, as_row_operator
from .result import STOP_REASONS, SolveResult, SolverDivergedError

__all__ = ["solve", "solve_path", "SolveResult", "RowBlockOperator", "ArrayRowOperator", "as_row_operator",
           "ProductOperator", "as_product_operator",
           "METHODS", "METHOD_OPTIONS", "REQUIRED", "option_types", "PATH_KNOBS", "KNOB_LABELS", "MemoryLimitError", "ConvergenceWarning", "SolverDivergedError",
           "STOP_REASONS"]
