"""``solve(J, r, method=...)``: one interface over every way of fitting J u = r.

The method is the regularizer:

============  =================================================  =====================================
method        objective                                          knob (regularizer)
============  =================================================  =====================================
``lstsq``     minimum-norm argmin ‖J u − r‖                       none (cut-off ``rcond`` only)
``ridge``     argmin ‖J u − r‖² + λ‖u‖²                           ``lam`` (explicit)
``cg``        CGLS on JᵀJ u = Jᵀ r from u₀ (0 by default)         ``maxiter`` (iterations, implicit)
``rsvd``      V_k Σ_k⁻¹ U_kᵀ r from a randomized rank-k SVD       ``rank`` (spectral truncation)
``sgd``       momentum SGD on (1/|B|) Σ_B ½‖J_i u − r_i‖²          ``epochs``, ``lr``, ``weight_decay``
============  =================================================  =====================================

Each private ``_solve_<name>`` lives in its own module with its stopping rule written as a formula.
``method="auto"`` picks ``lstsq`` when its Gram matrix fits the memory limit, else ``cg``; the
choice is recorded (``result.method``; ``result.requested_method == "auto"``).

What J may be (scipy ``_isolve`` style, each method asks only for what it uses):

- rows of J, for every method: a ``RowBlockOperator`` (a store's ``train_J``) or a NumPy/CuPy array;
- only the products J·v and Jᵀ·w, for ``cg`` and ``rsvd``: a ``scipy.sparse.linalg.LinearOperator``,
  any object with ``shape``, ``matvec`` and ``rmatvec``, or the network itself
  (``jacobian_store.matrix_free.NetworkJacobian``: jvp and vjp, J never formed). ``lstsq``,
  ``ridge`` and ``sgd`` refuse such a J (they need K, JᵀJ or mini-batches of rows), and
  ``method="auto"`` takes ``cg``. ``check_finite`` is then one product with a random vector.
"""
from __future__ import annotations

import math
import time

import numpy as np

from jacobian_store.device import is_cupy_array, module_for_device, resolve_device, to_numpy
from .cg import _solve_cg, cg_path
from .direct import DRIVERS, FORMS, PRECISIONS, _solve_lstsq, _solve_ridge, resolve_form, ridge_path
from jacobian_store.sizes import parse_bytes

from .memory import check_memory, choose_panel_bytes, default_memory_limit, memory_plan
from jacobian_store.operators import ProductOperator, as_product_operator, has_products
from jacobian_store.operators import ArrayRowOperator, RowBlockOperator, as_row_operator
from .result import SolveResult
from .rsvd import _solve_rsvd, rsvd_path
from .sgd import _solve_sgd, sgd_path

METHODS = ("lstsq", "ridge", "cg", "rsvd", "sgd")
# The methods that use only J·v and Jᵀ·w; the others need rows of J (K, JᵀJ, mini-batches).
PRODUCT_METHODS = ("cg", "rsvd")
# The default of an option that has none: the caller must give it.
REQUIRED = object()

# Every option of every method, with its default; REQUIRED ones have none. This is the one option
# schema: bin/solve's checks and the experiment files' [solver.<method>] tables derive from it.
METHOD_OPTIONS: dict[str, dict] = {
    "lstsq": {"form": "auto", "driver": None, "rcond": None, "panel_bytes": None, "precision": "auto"},
    "ridge": {"lam": REQUIRED, "form": "auto", "factorization": "auto", "panel_bytes": None, "precision": "auto"},
    "cg": {"maxiter": None, "tol": 1e-6, "normal_tol": 1e-10, "x0": None},
    "rsvd": {"rank": REQUIRED, "oversample": 10, "power_iter": 2, "seed": 0, "rcond": None},
    "sgd": {"lr": REQUIRED, "weight_decay": 0.0, "epochs": 1, "batch_size": 32, "lr_step": None,
            "lr_gamma": 0.1, "momentum": 0.9, "seed": 0, "x0": None},
}
# The type of each option whose default does not show it (None or REQUIRED); every other option
# has its default's type. x0, a vector, has no scalar type.
_UNTYPED_DEFAULTS = {"lam": float, "rank": int, "lr": float, "maxiter": int, "driver": str, "rcond": float,
                     "panel_bytes": int, "lr_step": int}
COMMON_OPTIONS = ("n_outputs", "device", "memory_limit", "check_finite", "progress")

# The knob each path sweeps, and the function that serves all its values from one run.
PATH_KNOBS = {"ridge": "lam", "rsvd": "rank", "cg": "maxiter", "sgd": "epochs"}
# How a knob is named in tables and figures.
KNOB_LABELS = {"lam": "ridge λ", "rank": "rank k", "maxiter": "CG iterations", "epochs": "SGD epochs"}
_PATHS = {"ridge": ridge_path, "rsvd": rsvd_path, "cg": cg_path, "sgd": sgd_path}

_SOLVERS = {"lstsq": _solve_lstsq, "ridge": _solve_ridge, "cg": _solve_cg, "rsvd": _solve_rsvd, "sgd": _solve_sgd}


def option_types(method: str) -> dict[str, type]:
    """The scalar options of ``method`` and their types (``float`` for a number: an int is one too),
    from METHOD_OPTIONS: a default's own type, or ``_UNTYPED_DEFAULTS`` where the default is None or
    REQUIRED. Options that are not scalars (x0) are left out."""
    out = {}
    for option, default in METHOD_OPTIONS[method].items():
        kind = _UNTYPED_DEFAULTS.get(option, type(default))
        if kind in (bool, int, float, str):
            out[option] = kind
    return out


def solve(J, r, method: str = "lstsq", *, n_outputs: int | None = None, device: str = "auto",
          memory_limit="auto", check_finite: bool = True, progress: bool = False, **options) -> SolveResult:
    """Fit u in J u ≈ r with ``method``; see the module table and each method's module.

    ``J``: a RowBlockOperator (the store's ``train_J``), or a NumPy/CuPy array (rows sample-major,
    ``n_outputs`` rows per sample). ``r``: length n·L (or shape (n, L)). ``device``: "auto" (GPU
    when CuPy sees one), "cpu" or "cuda"; a CuPy J always runs on the GPU. ``memory_limit``: bytes
    (or "16G"), "auto" = 80% of free memory, None = no check; a method that would exceed it is
    refused before it reads J. ``check_finite`` streams J once first and names any NaN/Inf row.
    """
    t0 = time.perf_counter()
    op, r, dev, limit = _prepare(J, r, method, n_outputs, device, memory_limit)
    requested = method
    if method == "auto":
        # lstsq is exact and the fastest when its Gram matrix fits; otherwise CGLS, which holds
        # only vectors (implicitly regularized by its iteration count: see cg.py). A J known only
        # by its products has no Gram matrix to form: CGLS.
        if isinstance(op, ProductOperator):
            method = "cg"
        else:
            plan = memory_plan(op, "lstsq", {}, form=resolve_form("auto", op.shape))
            method = "lstsq" if limit is None or sum(b for _, b in plan) <= limit else "cg"
    opts = _validate_options(op, method, options)
    plan_total = _check_plan(op, method, opts, dev, limit)
    work_op = _held_in_memory(op, method, dev, limit, plan_total, opts)
    if check_finite:
        work_op.check_finite()
    with dev.exact_float32():
        result = _SOLVERS[method](work_op, r, device=dev.type, progress=progress, **opts)
    result.extras["J_held_in_memory"] = work_op is not op
    return _finalize(result, op, requested, dev, opts, limit, check_finite, t0)


def solve_path(J, r, method: str, values, *, n_outputs: int | None = None, device: str = "auto",
               memory_limit="auto", check_finite: bool = True, progress: bool = False, **options) -> list[SolveResult]:
    """Solutions along ``method``'s knob (ridge: λ; rsvd: rank; cg: iterations; sgd: epochs), all
    from one factorization or one run. Returns one SolveResult per value, in the given order."""
    t0 = time.perf_counter()
    if method not in PATH_KNOBS:
        raise ValueError(f"no path for method {method!r}; paths exist for {', '.join(PATH_KNOBS)} "
                         f"(lstsq has no regularization knob)")
    op, r, dev, limit = _prepare(J, r, method, n_outputs, device, memory_limit)
    knob = PATH_KNOBS[method]
    values = list(values)
    if not values:
        raise ValueError(f"the {method} path needs at least one value of {knob}")
    if knob in options:
        raise TypeError(f"{knob!r} is the knob the {method} path sweeps; pass its values, not a single {knob}")
    for v in values:  # each value goes through the same checks as a single solve
        _validate_options(op, method, {**options, knob: v})
    opts = _validate_options(op, method, {**options, knob: max(values)})
    opts.pop(knob)
    planned = {**opts, knob: max(values)}
    plan_total = _check_plan(op, method, planned, dev, limit, n_knobs=len(values))
    if "panel_bytes" in opts:
        opts["panel_bytes"] = planned["panel_bytes"]
    work_op = _held_in_memory(op, method, dev, limit, plan_total, opts)
    if check_finite:
        work_op.check_finite()
    if method == "cg":  # a path runs to its largest count unless tolerances are asked for
        opts["tol"], opts["normal_tol"] = options.get("tol", 0.0), options.get("normal_tol", 0.0)
    extra = {k: opts.pop(k) for k in ("factorization", "driver") if k in opts}
    if method == "ridge" and extra.get("factorization", "auto") not in ("auto", "eigh"):
        raise ValueError("the ridge path always uses one eigendecomposition; drop factorization=")
    with dev.exact_float32():
        results = _PATHS[method](work_op, r, values, device=dev.type, progress=progress, **opts)
    for res in results:
        res.extras["J_held_in_memory"] = work_op is not op
    return [_finalize(res, op, method, dev, {**opts, knob: v}, limit, check_finite, t0, path=True)
            for res, v in zip(results, values)]


# ---- validation --------------------------------------------------------------------------------

def _prepare(J, r, method, n_outputs, device, memory_limit):
    if method not in METHODS + ("auto",):
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)} or 'auto'")
    op = _as_operator(J, n_outputs, method)
    if isinstance(op, ProductOperator):
        dev = _vector_device(op, device)
    else:
        on_gpu = isinstance(op, ArrayRowOperator) and is_cupy_array(op.J)
        # a CuPy J computes on the GPU that holds it, whatever ``device`` says
        dev = resolve_device(f"cuda:{op.J.device.id}" if on_gpu else device, arrays=True)
    with dev.exact_float32():  # r lands on that GPU
        r = _validate_rhs(op, r, dev)
    if memory_limit == "auto":
        limit = default_memory_limit(dev)
    elif memory_limit is None:
        limit = None
    else:
        limit = parse_bytes(memory_limit)
        if limit <= 0:
            raise ValueError(f"memory_limit must be positive, got {memory_limit!r}")
    return op, r, dev, limit


def _as_operator(J, n_outputs, method):
    """Rows of J for every method; J's products alone for cg and rsvd (see the module docstring)."""
    if isinstance(J, RowBlockOperator) or isinstance(J, np.ndarray) or is_cupy_array(J):
        return as_row_operator(J, n_outputs)
    if not has_products(J):
        raise TypeError(f"J must be a RowBlockOperator (e.g. a store's train_J) or a NumPy/CuPy array, or, for "
                        f"methods {' and '.join(PRODUCT_METHODS)}, an operator with shape, matvec and rmatvec (a "
                        f"scipy.sparse.linalg.LinearOperator, a NetworkJacobian); got {type(J).__name__}")
    if method not in PRODUCT_METHODS + ("auto",):
        raise TypeError(f"method {method!r} needs the rows of J (a RowBlockOperator such as a store's train_J, or "
                        f"an array), but this {type(J).__name__} offers only the products J·v and Jᵀ·w; use "
                        f"method {' or '.join(map(repr, PRODUCT_METHODS))}, or build the Jacobian store "
                        f"(bin/build-jacobian) for {method}")
    return as_product_operator(J, n_outputs)


def _vector_device(op, device):
    """Where the solver's vectors live for a J known by its products: anywhere the products accept
    (a NetworkJacobian takes CuPy vectors), else on the host."""
    if op.accepts_device_arrays:
        return resolve_device(device, arrays=True)
    if str(device).strip().lower() != "auto" and resolve_device(device).is_cuda:
        raise ValueError(f"J is a {type(op).__name__} whose products take NumPy vectors, so the solver's vectors "
                         f"stay on the host: use device='cpu' or 'auto' (the products run wherever J computes them)")
    return resolve_device("cpu")


def _validate_rhs(op, r, device):
    m = op.shape[0]
    if is_cupy_array(r):
        r = r.get()
    r = np.asarray(r)
    if r.ndim == 2 and r.shape == (op.n_samples, op.n_outputs):
        r = r.reshape(-1)  # (n, L) → sample-major rows i·L + l
    if r.ndim != 1 or r.shape[0] != m:
        raise ValueError(f"r must have length n·L = {m} (or shape ({op.n_samples}, {op.n_outputs})) to match J of "
                         f"shape {op.shape}; got shape {r.shape}")
    if r.dtype.kind not in "biuf":
        raise ValueError(f"r must be real numbers, got dtype {r.dtype}")
    bad = np.flatnonzero(~np.isfinite(r))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"r holds a non-finite value ({r[i]}) at row {i} (sample {i // op.n_outputs}, output "
                         f"{i % op.n_outputs}); {bad.size} bad entries in all")
    return module_for_device(device).asarray(r, dtype=np.float64)


def _validate_options(op, method, options) -> dict:
    spec = METHOD_OPTIONS[method]
    unknown = sorted(set(options) - set(spec))
    if unknown:
        raise TypeError(f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} for method "
                        f"{method!r}; valid options: {', '.join(spec)} (and for every method: "
                        f"{', '.join(COMMON_OPTIONS)})")
    opts = {k: options.get(k, v) for k, v in spec.items()}
    missing = [k for k, v in opts.items() if v is REQUIRED]
    if missing:
        raise TypeError(f"method {method!r} needs {', '.join(missing)} (e.g. solve(J, r, method={method!r}, "
                        f"{missing[0]}=...))")
    m, p = op.shape
    for k, v in opts.items():
        _check_option(method, k, v, m, p)
    return opts


def _check_option(method, k, v, m, p):
    def number(nonneg=True, positive=False, integer=False, allow_none=False):
        if v is None and allow_none:
            return
        ok = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
        ok = ok and math.isfinite(float(v)) and (not integer or float(v) == int(v))
        ok = ok and (not positive or v > 0) and (not nonneg or v >= 0)
        if not ok:
            kind = "a positive" if positive else ("a non-negative" if nonneg else "a")
            raise ValueError(f"{method}: {k} must be {kind} {'integer' if integer else 'number'}"
                             f"{' or None' if allow_none else ''}; got {v!r}")

    if k == "lam":
        if isinstance(v, (int, float, np.integer, np.floating)) and float(v) < 0:
            raise ValueError(f"ridge: λ (lam) must be ≥ 0, got {v}; λ = 0 is minimum-norm least squares")
        number()
    elif k == "form":
        if v not in FORMS:
            raise ValueError(f"{method}: form must be one of {', '.join(FORMS)}; got {v!r}")
    elif k == "driver":
        if v is not None and v not in DRIVERS:
            raise ValueError(f"lstsq: driver must be one of {', '.join(DRIVERS)} or None; got {v!r}")
    elif k == "precision":
        if v not in PRECISIONS:
            raise ValueError(f"{method}: precision must be one of {', '.join(map(repr, PRECISIONS))} (float32 Gram "
                             f"with float64 refinement: 'mixed'); got {v!r}")
    elif k == "factorization":
        if v not in ("auto", "cholesky", "eigh"):
            raise ValueError(f"ridge: factorization must be 'auto', 'cholesky' or 'eigh'; got {v!r}")
    elif k == "rank":
        number(positive=True, integer=True)
        if v > min(m, p):
            raise ValueError(f"rsvd: rank k={v} exceeds the rank bound min(n·L, p) = min({m}, {p}) = {min(m, p)}")
    elif k in ("rcond", "panel_bytes", "lr_step"):
        number(integer=k != "rcond", allow_none=True)
    elif k == "maxiter":
        number(positive=True, integer=True, allow_none=True)
    elif k in ("tol", "normal_tol", "weight_decay", "oversample", "power_iter", "lr_gamma"):
        number(integer=k in ("oversample", "power_iter"))
    elif k in ("lr",):
        number(positive=True)
    elif k in ("epochs", "batch_size"):
        number(positive=True, integer=True)
    elif k == "momentum":
        number()
        if v >= 1:
            raise ValueError(f"sgd: momentum must be in [0, 1), got {v}")
    elif k == "seed":
        number(integer=True)
    elif k == "x0":
        if v is not None:
            x = to_numpy(v)
            if x.shape != (p,) or not np.isfinite(x).all():
                raise ValueError(f"{method}: warm start x0 must be a finite vector of length p = {p}; got shape {x.shape}")


def _check_plan(op, method, opts, dev, limit, n_knobs=1):
    """Refuse up front when the method would not fit; fill in the Gram panel size (in ``opts``)."""
    form = None
    if method in ("lstsq", "ridge") and not opts.get("driver"):
        form = resolve_form(opts["form"], op.shape)
    fixed = memory_plan(op, method, opts, form=form, n_knobs=n_knobs)
    if form == "dual" and opts.get("panel_bytes") is None:
        opts["panel_bytes"] = choose_panel_bytes(op, limit, sum(b for _, b in fixed))
    plan = memory_plan(op, method, opts, form=form, n_knobs=n_knobs, panel_bytes=opts.get("panel_bytes") or 0)
    return check_memory(plan, limit, method=method, form=form,
                        device="cpu" if opts.get("driver") else resolve_device(dev, arrays=True).type)


# Methods that pass over J many times (CGLS twice per iteration, the range finder 2q + 2 times,
# SGD once per epoch in scattered mini-batches, which HDF5 serves slowest of all).
_MULTI_PASS = ("cg", "rsvd", "sgd")


def _held_in_memory(op, method: str, device, limit: int | None, plan_total: int, opts: dict):
    """J held in memory, read from its store once, when that is free or affordable; else ``op``.
    Whatever reads J next (``check_finite``, then the method) reads the held copy.

    - lstsq and ridge in the dual form on the CPU: a float32 J whose planned Gram panel holds all
      of it (``panel_bytes`` ≥ 4·n·L·p: the Gram takes one pass) is read once, in float32 (exact),
      into memory the plan has already counted; the finiteness check, the Gram and the later
      passes (u = Jᵀα, J u, the refinement of mixed precision) then read memory, not HDF5. On the
      2,000 × 60,941 store that is one read of 0.49 GB instead of two or three.
    - multi-pass methods: J as a float64 array on ``device`` (host memory or the GPU's). Every pass
      over a stored J reads it from HDF5, casts each block to float64 and, on a GPU, uploads it;
      holding the float64 copy once where the products run makes each later pass one BLAS
      product. Taken only when the copy fits beside the method's own plan within the memory
      limit of that device, so the out-of-core guarantee is unchanged.
    """
    if not isinstance(op, RowBlockOperator):
        return op  # (J known by its products has no rows to hold)
    m, p = op.shape
    if method in ("lstsq", "ridge"):
        if (isinstance(op, ArrayRowOperator) or device.is_cuda or opts.get("driver")
                or np.dtype(op.dtype) != np.float32 or type(op).gram is not RowBlockOperator.gram
                or (opts.get("panel_bytes") or 0) < 4 * m * p):
            return op  # (an operator with its own Gram, e.g. a Dask cluster's, keeps it)
        return ArrayRowOperator(op.to_dense(), op.n_outputs)
    if method not in _MULTI_PASS or limit is None:
        return op
    if isinstance(op, ArrayRowOperator) and (is_cupy_array(op.J) or not device.is_cuda):
        return op  # already an array where the products run
    if plan_total + 8 * m * p > limit:
        return op
    held = op.to_dense().astype(np.float64, copy=False)
    return ArrayRowOperator(device.array_module.asarray(held), op.n_outputs)


def _finalize(result: SolveResult, op, requested, dev, opts, limit, check_finite, t0, path=False) -> SolveResult:
    data_on_gpu = isinstance(op, ArrayRowOperator) and is_cupy_array(op.J)
    if not data_on_gpu:  # the result lives where J lives
        result.u = to_numpy(result.u)
        result.fitted = to_numpy(result.fitted) if result.fitted is not None else None
    result.wall_time = time.perf_counter() - t0
    result.requested_method = requested
    result.device = "cpu" if opts.get("driver") else str(dev)
    options = {k: v for k, v in opts.items() if k != "x0"}
    if "x0" in opts:
        options["warm_start"] = opts["x0"] is not None
    options.update(n_outputs=op.n_outputs, memory_limit=limit, check_finite=check_finite)
    if path:
        options["path"] = True  # wall_time is that of the whole path
    result.options = options
    return result
