"""Check and time lincnn's GPU paths against the CPU, in a few minutes on one CUDA GPU.

Every check runs one computation on the checked device (``--device``, default ``cuda``) and on the
CPU, compares the two against a tolerance that says why it is what it is, and adds rows to one
table of timings and errors. The problem: LeNet×``--width`` at its seed on ``--n-train`` samples of
binary MNIST (class ``--binary``), or of scikit-learn's bundled ``digits`` when no MNIST is found
under ``--data-root`` (no download, no data needed).

Checks (``CHECKS``, in order; ``--checks`` picks some):

- ``tf32``: ``Device.exact_float32()`` turns TF32 off: with TF32 switched on globally, a float32
  matmul and a convolution inside the context agree with float64 to float32 rounding, and the
  flags are off inside and restored after (on the CPU, which has no TF32, left alone).
- ``build``: the Jacobian store built on the device equals the one built on the CPU (all rows).
- ``gram``: the structured Gram matrix K = J Jᵀ on the device against the CPU.
- ``lstsq``, ``ridge``, ``cg``, ``rsvd``, ``sgd``: ``solve`` with the CPU-built J held on the device
  (one upload, every product there) against ``solve`` on the store on the CPU; the same J on both
  sides, so the solvers alone are compared.
- ``matrix-free cg``: ``solve(..., method="cg")`` on the network's ``NetworkJacobian`` on the
  device (J·v by jvp, Jᵀ·w by vjp, never formed) against CGLS on the stored J on the CPU.
- ``second gpu``: the store built on cuda:1 equals the one built on the checked GPU (skipped
  without a second GPU).

Exit status: 0 when every check passes, 1 when any fails (a check that raises counts as failed;
the others still run), 2 when the device asked for does not exist. ``--device cpu`` runs the whole
script on the CPU against itself, as ``tests/test_gpu_check.py`` does on a tiny problem so that
this script cannot rot without a GPU.

    benchmarks/gpu_check.sh                    # on a GPU machine: sets up .venv with the right CuPy
    python benchmarks/gpu_check.py --device cpu --width 0.5 --n-train 40   # here, CPU against CPU
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from jacobian_store.build import BuildSpec, build_store
from jacobian_store.datasets import load_dataset
from jacobian_store.device import Device, resolve_device, to_numpy
from jacobian_store.gram import gram_matrix
from jacobian_store.matrix_free import NetworkJacobian
from jacobian_store.store import JacobianStore
from solvers import solve

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
EPS32 = float(np.finfo(np.float32).eps)
EPS64 = float(np.finfo(np.float64).eps)

# ---- tolerances: each one says why ---------------------------------------------------------------
# A float32 matmul or convolution with TF32 off agrees with float64 to float32 accumulation
# rounding, about √k·ε₃₂ relative for k = 1024 terms (≈ 4e-6); TF32 keeps 10 mantissa bits, an
# error near 2⁻¹¹ ≈ 5e-4, so 1e-5 tells the two apart by 50× either way.
TF32_OFF_RTOL = 1e-5
# J from two devices is the same float32 computation summed in other orders (cuDNN, cuBLAS and the
# CPU's BLAS; TF32 off): every entry carries at most a few ε₃₂ of rounding relative to the largest
# entry of its row (tests/conftest.py measures 0.4·ε₃₂ between CPU processes); 64·ε₃₂ ≈ 8e-6 leaves
# room for the GPU's longer reductions, while a wrong row, sample or chunk is off by O(1).
BUILD_RTOL = 64 * EPS32
# K's float32 block products are summed in chunks of ≤ 16,384 columns into float64 (gram.py): each
# entry carries float32 rounding of its chunk sums, a few ε₃₂·√chunk relative to max|K|.
GRAM_RTOL = 1e-5
# The solvers see the same float32 J on both sides and compute in float64, so GPU and CPU differ
# only by float64 summation order (and ridge's Cholesky on the CPU against eigh on the GPU). The
# forward error of u is about κ·ε₆₄ times a modest factor for the direct methods; at this problem
# κ(J) stays below 1e4 on the kept directions (the cut-off drops the rest), so 1e-9 is a wide
# margin for rounding while any wrong block, sign, scale or cut-off shows as O(1).
SOLVER_RTOL = {
    "lstsq": 1e-9,
    "ridge": 1e-9,
    # CGLS is compared where it has converged (‖ρ‖ ≤ tol·‖r‖ = 1e-8·‖r‖): two such runs both lie
    # within about κ·tol of the minimum-norm solution (measured 2e-9 between two summation orders
    # at LeNet×1 on 1,000 digits, 522 iterations). Mid-run iterates are far more sensitive: after
    # 20 of 40 iterations on 40 digits, permuting J's columns alone moved u by 3e-5.
    "cg": 1e-6,
    # the same Ω on both devices (drawn on the host); QR and SVD on cuSOLVER against LAPACK
    "rsvd": 1e-9,
    # heavy-ball steps from the same batches: a fixed linear recurrence, contracting at this
    # learning rate, so float64 rounding adds up over the steps without being amplified
    "sgd": 1e-9,
}
# Matrix-free products are float32 jvp/vjp where the stored J is multiplied in float64: measured
# 1e-7 to 4e-7 relative on digits (float32 accumulation over the layers); TF32 would give ~1e-3.
MATRIX_FREE_PRODUCT_RTOL = 1e-5
# Converged CGLS on those float32 products against CGLS on the stored J in float64: the
# products' 1e-7 error carried into u by κ(J) (measured 1.8e-6 on digits at κ = 35).
MATRIX_FREE_CG_RTOL = 1e-4


@dataclass
class Row:
    """One line of the table: what was compared, how long each side took, how far apart they are."""
    check: str
    device_seconds: float | None
    cpu_seconds: float | None
    error: float | None
    tolerance: float | None
    status: str  # "ok", "FAIL" or "skip"
    note: str = ""


def relative_error(a, b) -> float:
    """‖a − b‖ / ‖b‖ (2-norm of the flattened arrays)."""
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def compared(check: str, device_seconds, cpu_seconds, error: float, tolerance: float, note: str = "") -> Row:
    return Row(check, device_seconds, cpu_seconds, error, tolerance,
               "ok" if math.isfinite(error) and error <= tolerance else "FAIL", note)


def timed(fn, device: Device):
    """(fn(), seconds), the device synchronized so that queued GPU work is counted."""
    started = time.perf_counter()
    value = fn()
    if device.is_cuda:
        torch.cuda.synchronize(device.torch)
        device.array_module.cuda.Device(device.index).synchronize()
    return value, time.perf_counter() - started


class Context:
    """The problem every check shares; stores, held J and reference results are made on first use."""

    def __init__(self, args: argparse.Namespace, device: Device):
        self.args, self.device, self.cpu = args, device, resolve_device("cpu")
        have_mnist = (args.data_root / "MNIST" / "raw").is_dir()
        self.dataset = load_dataset("mnist" if have_mnist else "digits",
                                    data_root=args.data_root if have_mnist else None,
                                    n_train=args.n_train, n_test=args.n_test, binary=args.binary, seed=args.seed)
        self.spec = BuildSpec("lenet", args.width, seed=args.seed)
        args.out.mkdir(parents=True, exist_ok=True)
        self._stores: dict[str, tuple[JacobianStore, float]] = {}
        self._cpu_results: dict[str, tuple] = {}

    def store(self, role: str, device: Device) -> tuple[JacobianStore, float]:
        """The store of ``role`` ("device", "cpu", …) built on ``device``, and the seconds its build
        took; built once per role, so that with ``--device cpu`` both sides still build their own."""
        if role not in self._stores:
            path = self.args.out / f"lenet-w{self.args.width:g}-{role}.h5"
            _, seconds = timed(lambda: build_store(path, self.spec, self.dataset, device=str(device), overwrite=True,
                                                   progress=False), device)
            self._stores[role] = (JacobianStore.open(path), seconds)
        return self._stores[role]

    @property
    def cpu_store(self) -> JacobianStore:
        return self.store("cpu", self.cpu)[0]

    @property
    def cpu_J(self):
        return self.cpu_store.train_J

    @functools.cached_property
    def residual(self) -> np.ndarray:
        return self.cpu_store.residual()

    @functools.cached_property
    def held_J(self):
        """The CPU-built J as one float64 array on the checked device (CuPy on a GPU), as ``solve``
        holds it for its multi-pass methods: a float32 array would be cast block by block on every
        pass (measured 5× slower for CG on the CPU)."""
        return self.device.array_module.asarray(self.cpu_J.to_dense(np.float64))

    def cpu_solve(self, method: str, options: dict):
        """``solve`` on the CPU store (the reference), computed once per method."""
        if method not in self._cpu_results:
            self._cpu_results[method] = timed(lambda: solve(self.cpu_J, self.residual, method=method, device="cpu",
                                                            **options), self.cpu)
        return self._cpu_results[method]

    def solver_options(self, method: str) -> dict:
        a = self.args
        if method == "lstsq":
            return {}
        if method == "ridge":
            return {"lam": a.ridge_lambda}
        if method == "cg":
            # run to convergence, where u (the minimum-norm solution) is stable: see SOLVER_RTOL
            return {"maxiter": a.cg_iterations, "tol": a.cg_tol}
        if method == "rsvd":
            return {"rank": min(a.rsvd_rank, *self.cpu_J.shape), "seed": 0}
        if method == "sgd":
            return {"lr": self.sgd_learning_rate, "epochs": a.sgd_epochs, "batch_size": 32, "seed": 0}
        raise ValueError(f"no options for method {method!r}")

    @functools.cached_property
    def sgd_learning_rate(self) -> float:
        # Heavy-ball SGD on a quadratic is stable for lr·λ_max(H_B) < 2(1 + μ) (μ = 0.9), and the
        # mini-batch Hessian H_B = J_Bᵀ J_B / |B| has λ_max ≤ max_i ‖J_i‖²: lr = 1 / max_i ‖J_i‖²
        # stays below that limit with margin, so both devices follow a convergent trajectory.
        largest = max(float(np.max(np.einsum("ij,ij->i", block, block, dtype=np.float64)))
                      for _, block in self.cpu_J.row_blocks())
        return 1.0 / largest

    def close(self):
        for store, _ in self._stores.values():
            store.close()


# ---- the checks: each takes the context and returns rows of the table ------------------------------

def check_tf32(ctx: Context) -> list[Row]:
    """TF32 switched on globally; inside exact_float32 a float32 matmul and convolution must still
    agree with float64 to float32 rounding, the flags read off, and after it they read on again."""
    dev = ctx.device
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(1024, 1024, generator=generator, dtype=torch.float64) for _ in range(2))
    x, w = torch.randn(8, 16, 32, 32, generator=generator, dtype=torch.float64), torch.randn(32, 16, 5, 5, generator=generator, dtype=torch.float64)
    exact_mm, exact_conv = a @ b, F.conv2d(x, w, padding=2)

    def errors() -> tuple[float, float]:
        f32 = dict(device=dev.torch, dtype=torch.float32)
        mm = (a.to(**f32) @ b.to(**f32)).double().cpu()
        conv = F.conv2d(x.to(**f32), w.to(**f32), padding=2).double().cpu()
        return relative_error(mm, exact_mm), relative_error(conv, exact_conv)

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        outside, seconds = timed(errors, dev)
        with dev.exact_float32():
            flags_inside = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
            inside, seconds = timed(errors, dev)
        flags_after = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    # on a GPU the context turns TF32 off; the CPU has no TF32, so there it leaves the flags alone
    want_inside = (False, False) if dev.is_cuda else (True, True)
    flags_ok = flags_inside == want_inside and flags_after == (True, True)
    # outside the context a GPU with TF32 units shows ~5e-4: the control that the check can fail
    note = f"TF32 on, outside: matmul {outside[0]:.1e}, conv {outside[1]:.1e}"
    rows = [compared("tf32 off: matmul", seconds, None, inside[0], TF32_OFF_RTOL, note),
            compared("tf32 off: conv", seconds, None, inside[1], TF32_OFF_RTOL)]
    rows.append(Row("tf32 flags", None, None, None, None, "ok" if flags_ok else "FAIL",
                    f"inside {flags_inside}, restored {flags_after} (want {want_inside}, (True, True))"))
    return rows


def _max_row_error(J, reference) -> float:
    """max over rows of max|ΔJ_row| / max|J_row| (a row's scale: its largest entry)."""
    worst = 0.0
    for (_, a), (_, b) in zip(J.row_blocks(), reference.row_blocks()):
        scale = np.maximum(np.abs(b).max(axis=1), np.finfo(np.float32).tiny)
        worst = max(worst, float((np.abs(a.astype(np.float64) - b).max(axis=1) / scale).max()))
    return worst


def check_build(ctx: Context) -> list[Row]:
    """The store built on the device against the one built on the CPU, every row."""
    (built, device_seconds), (reference, cpu_seconds) = ctx.store("device", ctx.device), ctx.store("cpu", ctx.cpu)
    m, p = reference.train_J.shape
    note = f"J {m:,} × {p:,}, {m * p * 4 / 1e9:.2g} GB; {m / device_seconds:,.0f} rows/s on the device"
    return [compared("build J", device_seconds, cpu_seconds, _max_row_error(built.train_J, reference.train_J),
                     BUILD_RTOL, note)]


def check_gram(ctx: Context) -> list[Row]:
    """The structured Gram matrix of ``--gram-samples`` training inputs, on the device and the CPU."""
    model = ctx.cpu_store.model("cpu")
    x = ctx.dataset.train.x[:ctx.args.gram_samples]
    K, device_seconds = timed(lambda: gram_matrix(model, x, method="structured", device=str(ctx.device),
                                                  progress=False), ctx.device)
    K_cpu, cpu_seconds = timed(lambda: gram_matrix(model, x, method="structured", device="cpu", progress=False),
                               ctx.cpu)
    error = float(np.abs(K - K_cpu).max() / np.abs(K_cpu).max())
    return [compared("gram (structured)", device_seconds, cpu_seconds, error, GRAM_RTOL,
                     f"K {K.shape[0]:,} × {K.shape[1]:,}; max|ΔK| / max|K|")]


def check_solver(ctx: Context, method: str) -> list[Row]:
    """``solve`` with J held on the device against ``solve`` on the CPU store: ‖Δu‖/‖u‖."""
    options = ctx.solver_options(method)
    reference, cpu_seconds = ctx.cpu_solve(method, options)
    J = ctx.held_J
    result, device_seconds = timed(lambda: solve(J, ctx.residual, method=method, n_outputs=ctx.cpu_J.n_outputs,
                                                 device=str(ctx.device), **options), ctx.device)
    note = (f"{result.device}, {result.form}, {result.n_iter} it, ‖Ju−r‖/‖r‖ {result.relative_residual:.2e} "
            f"(cpu {reference.relative_residual:.2e})")
    row = compared(method, device_seconds, cpu_seconds, relative_error(to_numpy(result.u), reference.u),
                   SOLVER_RTOL[method], note)
    if method == "cg" and not (result.converged and reference.converged):
        row.status, row.note = "FAIL", f"not converged, so not comparable: raise --cg-iterations; {note}"
    return [row]


def check_matrix_free_cg(ctx: Context) -> list[Row]:
    """J as jvp/vjp of the network on the device (``NetworkJacobian``, J never formed) against the
    stored J on the CPU: the products J·v and Jᵀ·w for random v, w, then converged ``solve(...,
    method="cg")`` on each."""
    options = ctx.solver_options("cg")
    J = ctx.cpu_J
    op = NetworkJacobian(ctx.cpu_store.model("cpu"), ctx.dataset.train.x, device=str(ctx.device),
                         batch_size=ctx.args.matrix_free_batch)
    rng = np.random.default_rng(0)
    v, w = rng.standard_normal(J.shape[1]), rng.standard_normal(J.shape[0])
    (Jv, JTw), product_seconds = timed(lambda: (op.matvec(v), op.rmatvec(w)), ctx.device)
    (Jv_cpu, JTw_cpu), cpu_product_seconds = timed(lambda: (J.matvec(v), J.rmatvec(w)), ctx.cpu)
    rows = [compared("matrix-free J·v", product_seconds, cpu_product_seconds, relative_error(Jv, Jv_cpu),
                     MATRIX_FREE_PRODUCT_RTOL, f"one J·v and one Jᵀ·w; Jᵀ·w error {relative_error(JTw, JTw_cpu):.1e}"),
            compared("matrix-free Jᵀ·w", None, None, relative_error(JTw, JTw_cpu), MATRIX_FREE_PRODUCT_RTOL)]
    reference, cpu_seconds = ctx.cpu_solve("cg", options)
    result, device_seconds = timed(lambda: solve(op, ctx.residual, method="cg", device=str(ctx.device), **options),
                                   ctx.device)
    note = (f"{result.n_iter} it ({reference.n_iter} on cpu), {device_seconds / max(result.n_iter, 1) * 1e3:.1f} "
            f"ms/it; {result.stop_reason}")
    row = compared("matrix-free cg", device_seconds, cpu_seconds, relative_error(to_numpy(result.u), reference.u),
                   MATRIX_FREE_CG_RTOL, note)
    if not (result.converged and reference.converged):
        row.status, row.note = "FAIL", f"not converged, so not comparable: raise --cg-iterations; {note}"
    return rows + [row]


def check_second_gpu(ctx: Context) -> list[Row]:
    """The store built on cuda:1 against the one built on the checked GPU (the build on a GPU other
    than the current one: its copy event and current device)."""
    if not ctx.device.is_cuda or torch.cuda.device_count() < 2:
        return [Row("build on cuda:1", None, None, None, None, "skip", "needs two GPUs")]
    other = resolve_device("cuda:1" if ctx.device.index != 1 else "cuda:0")
    (built, seconds), (reference, _) = ctx.store("other-gpu", other), ctx.store("device", ctx.device)
    error = _max_row_error(built.train_J, reference.train_J)
    identical = all(np.array_equal(a, b) for (_, a), (_, b) in zip(built.train_J.row_blocks(),
                                                                  reference.train_J.row_blocks()))
    return [compared(f"build on {other}", seconds, None, error, BUILD_RTOL,
                     f"against {ctx.device}: {'bit for bit' if identical else 'to float32 rounding'}")]


CHECKS = {
    "tf32": check_tf32,
    "build": check_build,
    "gram": check_gram,
    **{method: functools.partial(check_solver, method=method) for method in ("lstsq", "ridge", "cg", "rsvd", "sgd")},
    "matrix-free-cg": check_matrix_free_cg,
    "second-gpu": check_second_gpu,
}


# ---- running and reporting ------------------------------------------------------------------------

def _cell(value, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def table(rows: list[Row]) -> str:
    header = f"{'check':<20} {'device s':>9} {'cpu s':>8} {'error':>9} {'tolerance':>9}  {'':4}  note"
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(f"{row.check:<20} {_cell(row.device_seconds, '9.2f'):>9} {_cell(row.cpu_seconds, '8.2f'):>8} "
                     f"{_cell(row.error, '9.1e'):>9} {_cell(row.tolerance, '9.0e'):>9}  {row.status:4}  {row.note}")
    return "\n".join(lines)


def environment(device: Device) -> dict:
    env = {"device": str(device), "torch": torch.__version__, "torch_cuda": torch.version.cuda}
    if device.is_cuda:
        cupy = device.array_module
        env.update(gpu=torch.cuda.get_device_name(device.torch), gpus=torch.cuda.device_count(),
                   cupy=cupy.__version__, cuda_driver=cupy.cuda.runtime.driverGetVersion())
    return env


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="the device checked against the CPU: cuda, cuda:N, or cpu "
                                                         "(the CPU against itself: the script's self-test)")
    parser.add_argument("--checks", default=",".join(CHECKS),
                        help=f"comma-separated subset of: {', '.join(CHECKS)} (default: all)")
    parser.add_argument("--width", type=float, default=3, help="LeNet width factor (default 3: p = 545,701)")
    parser.add_argument("--n-train", type=int, default=500, help="training samples, the rows of J (default 500)")
    parser.add_argument("--n-test", type=int, default=100)
    parser.add_argument("--binary", type=int, default=0, help="the class with target 1 (one output)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-root", type=Path, default=SHARED_DATA,
                        help="where MNIST/raw is looked for; without it the bundled digits are used")
    parser.add_argument("--gram-samples", type=int, default=300, help="inputs of the Gram check (default 300)")
    parser.add_argument("--ridge-lambda", type=float, default=1e-2)
    parser.add_argument("--cg-iterations", type=int, default=2000, help="CGLS iteration limit (default 2000)")
    parser.add_argument("--cg-tol", type=float, default=1e-8, help="CGLS stops at ‖Ju − r‖ ≤ tol·‖r‖ (default 1e-8)")
    parser.add_argument("--rsvd-rank", type=int, default=50)
    parser.add_argument("--sgd-epochs", type=int, default=2)
    parser.add_argument("--matrix-free-batch", type=int, default=256, help="samples per jvp/vjp batch")
    parser.add_argument("--out", type=Path, default=Path("runs/gpu-check"),
                        help="folder for the two stores and report.json (default runs/gpu-check)")
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    names = [name.strip() for name in args.checks.split(",") if name.strip()]
    unknown = [name for name in names if name not in CHECKS]
    if unknown:
        print(f"gpu_check: unknown check(s) {', '.join(unknown)}; known: {', '.join(CHECKS)}", file=sys.stderr)
        return 2
    try:
        device = resolve_device(args.device, arrays=True)
    except ValueError as error:
        print(f"gpu_check: {error} (torch {torch.__version__}, built for CUDA {torch.version.cuda})", file=sys.stderr)
        return 2
    env = environment(device)
    print("gpu_check: " + ", ".join(f"{k} {v}" for k, v in env.items()), flush=True)
    started = time.perf_counter()
    ctx = Context(args, device)
    print(f"gpu_check: {ctx.dataset.name} (binary {args.binary}), {ctx.dataset.train.x.shape[0]} samples, "
          f"LeNet×{args.width:g}", flush=True)
    rows: list[Row] = []
    try:
        for name in names:
            try:
                rows += CHECKS[name](ctx)
            except Exception as error:  # a broken path is a failed check, and the others still run
                traceback.print_exc()
                rows.append(Row(name, None, None, None, None, "FAIL", f"{type(error).__name__}: {error}"[:200]))
            print(f"  {name}: {rows[-1].status}", flush=True)
    finally:
        ctx.close()
    seconds = time.perf_counter() - started
    print(table(rows))
    failed = [row.check for row in rows if row.status == "FAIL"]
    (args.out / "report.json").write_text(json.dumps({"environment": env, "arguments": vars(args) | {
        "out": str(args.out), "data_root": str(args.data_root)}, "seconds": seconds, "rows": [asdict(r) for r in rows]},
        indent=1))
    if failed:
        print(f"gpu_check: FAILED: {', '.join(failed)} ({seconds:.0f} s)", file=sys.stderr)
        return 1
    print(f"gpu_check: {device} agrees with the CPU on every check ({seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
