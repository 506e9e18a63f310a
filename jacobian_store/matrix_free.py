"""J known only by its products: any linear operator, and the network's own Jacobian by jvp/vjp.

The solvers that need only J·v and Jᵀ·w (CG and the randomized SVD) are written against a small
protocol, scipy's ``LinearOperator`` one:

- ``shape`` (n·L, p), ``dtype`` and ``n_outputs`` (L, rows per sample; 1 when unknown);
- ``matvec(u)`` = J u and ``rmatvec(v)`` = Jᵀ v on float64 vectors;
- ``matmat(U)`` and ``rmatmat(V)``, derived here column by column when the operator has none.

:class:`ProductOperator` is that protocol; :func:`as_product_operator` wraps a
``scipy.sparse.linalg.LinearOperator`` or any object with ``shape``, ``matvec`` and ``rmatvec``.
Row-block methods (lstsq, ridge, sgd) cannot run on it: they need rows of J
(``jacobian_store.operators.RowBlockOperator``).

:class:`NetworkJacobian` is J of a network at its initial weights w0 on a set of inputs X,
never formed: J u is one forward-mode pass (``torch.func.jvp``) and Jᵀ v one reverse pass
(``torch.func.vjp``) per batch of samples. Rows are sample-major like the store (row i·L + l is
output l of sample i) and columns follow ``named_parameters()`` order, so it is the same matrix
as a store built from the same network and data, to the rounding of the network's dtype.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from jacobian_store.device import array_module, is_cupy_array, resolve_device
from jacobian_store.functional import initial_parameters, jvp_outputs, parameter_layout, unflatten, vjp_flat
from torch.func import functional_call, vjp, vmap

# A reverse pass of a batch holds its activations (for the backward) plus their gradients, and a
# forward-mode pass the primal and the tangent of each: 4 copies of the activations bounds both.
ACTIVATION_COPIES = 4
# Seed of the probe vector of ``check_finite`` (any fixed seed: the test holds with probability 1).
PROBE_SEED = 12345
# Largest block of k columns (tangents or gradients, k·p numbers) a matmat/rmatmat holds at once.
COLUMN_BLOCK_BYTES = 256 * 2**20


class ProductOperator:
    """Base class: J by its products only. A subclass supplies ``shape``, ``dtype``, ``n_outputs``,
    ``matvec`` and ``rmatvec``; ``matmat``/``rmatmat`` default to one product per column.

    ``accepts_device_arrays``: whether the products take CuPy vectors (the solvers then keep
    their vectors on the GPU); a plain ``LinearOperator`` takes NumPy vectors only.
    ``workspace_bytes``: memory one product holds besides its input and output (for the
    solvers' memory plan).
    """

    shape: tuple[int, int]
    dtype: np.dtype = np.dtype(np.float64)  # the precision of J's entries; products are float64
    n_outputs: int = 1
    accepts_device_arrays = False
    workspace_bytes = 0

    def matvec(self, u):
        raise NotImplementedError

    def rmatvec(self, v):
        raise NotImplementedError

    def matmat(self, U):
        """J U, one ``matvec`` per column of ``U`` (p × k)."""
        columns = [self.matvec(U[:, j]) for j in range(U.shape[1])]
        return array_module(U).stack(columns, axis=1) if columns else array_module(U).zeros((self.shape[0], 0))

    def rmatmat(self, V):
        """Jᵀ V, one ``rmatvec`` per column of ``V`` (n·L × k)."""
        columns = [self.rmatvec(V[:, j]) for j in range(V.shape[1])]
        return array_module(V).stack(columns, axis=1) if columns else array_module(V).zeros((self.shape[1], 0))

    @property
    def n_samples(self) -> int:
        return self.shape[0] // self.n_outputs

    def __repr__(self) -> str:
        m, p = self.shape
        return f"{type(self).__name__}(shape=({m}, {p}), n_outputs={self.n_outputs})"

    def check_finite(self) -> None:
        """Raise ValueError naming the first row (sample, output) of J holding NaN or Inf.

        One product J g with a Gaussian g: an entry J_ij that is NaN or ±Inf makes (J g)_i NaN or
        ±Inf whenever g_j ≠ 0, which holds with probability 1, so no row of J needs to be formed.
        """
        g = np.random.default_rng(PROBE_SEED).standard_normal(self.shape[1])
        Jg = np.asarray(_host(self.matvec(g)))
        bad = np.flatnonzero(~np.isfinite(Jg))
        if bad.size:
            row = int(bad[0])
            sample, output = divmod(row, self.n_outputs)
            raise ValueError(f"J holds a non-finite value in row {row} (sample {sample}, output {output}): its "
                             f"product with a test vector is {Jg[row]}; {bad.size} such rows in all")

    def as_linear_operator(self):
        """The same operator as a ``scipy.sparse.linalg.LinearOperator`` (float64, NumPy vectors)."""
        from scipy.sparse.linalg import LinearOperator

        return LinearOperator(self.shape, matvec=lambda u: _host(self.matvec(np.asarray(u, np.float64).ravel())),
                              rmatvec=lambda v: _host(self.rmatvec(np.asarray(v, np.float64).ravel())),
                              dtype=np.float64)


class _WrappedOperator(ProductOperator):
    """Any object with ``shape``, ``matvec`` and ``rmatvec`` (e.g. a scipy LinearOperator)."""

    def __init__(self, J, n_outputs: int):
        self.J = J
        self.shape = (int(J.shape[0]), int(J.shape[1]))
        dtype = getattr(J, "dtype", None)  # (a NumPy dtype is falsy: it has no fields)
        self.dtype = np.dtype(np.float64 if dtype is None else dtype)
        self.n_outputs = n_outputs

    def matvec(self, u):
        return np.asarray(self.J.matvec(u), dtype=np.float64).reshape(-1)

    def rmatvec(self, v):
        return np.asarray(self.J.rmatvec(v), dtype=np.float64).reshape(-1)

    def matmat(self, U):
        if hasattr(self.J, "matmat"):
            return np.asarray(self.J.matmat(U), dtype=np.float64).reshape(self.shape[0], -1)
        return super().matmat(U)

    def rmatmat(self, V):
        if hasattr(self.J, "rmatmat"):
            return np.asarray(self.J.rmatmat(V), dtype=np.float64).reshape(self.shape[1], -1)
        return super().rmatmat(V)

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, wrapping {type(self.J).__name__})"


def has_products(J) -> bool:
    """Whether ``J`` offers the product protocol (``shape``, ``matvec``, ``rmatvec``)."""
    shape = getattr(J, "shape", None)
    return (shape is not None and len(shape) == 2 and callable(getattr(J, "matvec", None))
            and callable(getattr(J, "rmatvec", None)))


def as_product_operator(J, n_outputs: int | None = None) -> ProductOperator:
    """``J`` as a :class:`ProductOperator`: one is returned as is, any object with the product
    protocol (``scipy.sparse.linalg.LinearOperator`` included) is wrapped."""
    if isinstance(J, ProductOperator):
        if n_outputs is not None and n_outputs != J.n_outputs:
            raise ValueError(f"n_outputs={n_outputs} disagrees with the operator's n_outputs={J.n_outputs}")
        return J
    if not has_products(J):
        raise TypeError(f"J must offer shape, matvec and rmatvec (e.g. a scipy.sparse.linalg.LinearOperator); "
                        f"got {type(J).__name__}")
    n_outputs = 1 if n_outputs is None else n_outputs
    if not (isinstance(n_outputs, (int, np.integer)) and n_outputs > 0) or J.shape[0] % n_outputs:
        raise ValueError(f"n_outputs must be a positive integer dividing the {J.shape[0]} rows of J, got {n_outputs!r}")
    return _WrappedOperator(J, int(n_outputs))


class NetworkJacobian(ProductOperator):
    """J = ∂f(w, X)/∂w at w0, (n·L) × p, by jvp and vjp in batches of samples; J is never formed.

    ``model`` holds w0 and is not modified (a copy is moved when its device or dtype differ).
    ``x``: the inputs, (n, C, H, W); moved to ``device`` once. ``device``: ``auto | cpu | cuda |
    cuda:N``; every product runs inside ``Device.exact_float32()`` (no TF32). ``dtype``: the
    network's dtype for the products (default: the model's, float32 like a store; float64 for
    checking). Vectors are float64 in and out, NumPy or CuPy (the result lives where the input
    does). ``batch_size``: samples per jvp/vjp; default: as many as ``memory_budget`` bytes of
    activations allow (default budget: that of ``bin/build-jacobian``, half the free GPU memory or
    2 GiB on the CPU), from one probe forward pass.

    Cost of a product: one forward-mode (J u) or one forward and backward pass (Jᵀ v) of the
    network over X, i.e. about one to two epochs of training's compute.
    """

    accepts_device_arrays = True

    def __init__(self, model: nn.Module, x: torch.Tensor, *, device="auto", dtype: torch.dtype | None = None,
                 batch_size: int | None = None, memory_budget: int | None = None):
        self.device = resolve_device(device)
        first = next(model.parameters())
        self.torch_dtype = dtype or first.dtype
        if self.torch_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {self.torch_dtype}")
        if first.device != self.device.torch or first.dtype != self.torch_dtype:
            model = copy.deepcopy(model).to(device=self.device.torch, dtype=self.torch_dtype)
        if not (isinstance(x, torch.Tensor) and x.ndim >= 2 and x.shape[0] > 0):
            raise ValueError(f"x must be a tensor of inputs (n, ...) with n ≥ 1, got {type(x).__name__} "
                             f"{tuple(getattr(x, 'shape', ()))}")
        self.model = model.eval()
        self.params = initial_parameters(model)
        self.layout = parameter_layout(model)
        self.x = x.to(device=self.device.torch, dtype=self.torch_dtype)
        n, p = x.shape[0], sum(s.size for s in self.layout)
        with torch.no_grad(), self.device.exact_float32():
            probe_out, sample_bytes = _probe(self.model, self.x[:1])
        self.n_outputs = int(probe_out.shape[1])
        self.shape = (n * self.n_outputs, p)
        # the precision of J's entries (rsvd's rounding cut-off uses it); the vectors are float64
        self.dtype = np.dtype(str(self.torch_dtype).split(".")[-1])
        if batch_size is None:
            if memory_budget is None:
                from jacobian_store.build import default_memory_budget

                memory_budget = default_memory_budget(self.device.torch)
            batch_size = max(1, int(memory_budget) // (ACTIVATION_COPIES * sample_bytes))
        if not (isinstance(batch_size, (int, np.integer)) and batch_size > 0):
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.batch_size = int(min(batch_size, n))
        self.workspace_bytes = ACTIVATION_COPIES * sample_bytes * self.batch_size + 2 * p * 8

    def __repr__(self) -> str:
        return (f"{super().__repr__()[:-1]}, device={self.device}, dtype={str(self.torch_dtype).split('.')[-1]}, "
                f"batch_size={self.batch_size})")

    def _batches(self):
        n = self.x.shape[0]
        for start in range(0, n, self.batch_size):
            yield start, self.x[start:start + self.batch_size]

    def matvec(self, u):
        """J u: f's tangent along u at w0, one jvp per batch of samples."""
        self._check(u, self.shape[1], "u")
        with torch.no_grad(), self.device.exact_float32():
            tangent = unflatten(self._to_torch(u).to(self.torch_dtype), self.layout)
            out = torch.empty((self.x.shape[0], self.n_outputs), dtype=torch.float64, device=self.device.torch)
            for start, xb in self._batches():
                _, ju = jvp_outputs(self.model, self.params, xb, tangent)
                out[start:start + xb.shape[0]] = ju
        return self._from_torch(out.reshape(-1), like=u)

    def rmatvec(self, v):
        """Jᵀ v: the gradient of ⟨v, f(w, X)⟩ at w0, one vjp per batch, summed in float64."""
        self._check(v, self.shape[0], "v")
        with self.device.exact_float32():
            cot = self._to_torch(v).reshape(self.x.shape[0], self.n_outputs).to(self.torch_dtype)
            out = torch.zeros(self.shape[1], dtype=torch.float64, device=self.device.torch)
            for start, xb in self._batches():
                out += vjp_flat(self.model, self.params, xb, cot[start:start + xb.shape[0]])
        return self._from_torch(out, like=v)

    def matmat(self, U):
        """J U for U of shape (p, k): the k jvps of each batch vectorized (``vmap``), with
        ``batch_size`` samples × columns per pass so the activations held stay within the budget."""
        self._check(U, self.shape[1], "U", ndim=2)
        n, L, k = self.x.shape[0], self.n_outputs, U.shape[1]
        with torch.no_grad(), self.device.exact_float32():
            Ut = self._to_torch(U).to(self.torch_dtype)
            out = torch.empty((n, L, k), dtype=torch.float64, device=self.device.torch)
            for cols in self._column_blocks(k):
                tangents = {s.name: Ut[s.offset:s.offset + s.size, cols].T.reshape(-1, *s.shape) for s in self.layout}
                samples = max(1, self.batch_size // (cols.stop - cols.start))
                for start in range(0, n, samples):
                    xb = self.x[start:start + samples]
                    ju = vmap(lambda t: jvp_outputs(self.model, self.params, xb, t)[1])(tangents)  # (c, B, L)
                    out[start:start + xb.shape[0], :, cols] = ju.permute(1, 2, 0).to(torch.float64)
        return self._from_torch(out.reshape(n * L, k), like=U)

    def rmatmat(self, V):
        """Jᵀ V for V of shape (n·L, k): one forward pass per batch, its pullback applied to the k
        columns at once (``vmap``), summed over batches in float64."""
        self._check(V, self.shape[0], "V", ndim=2)
        n, L, k = self.x.shape[0], self.n_outputs, V.shape[1]
        with self.device.exact_float32():
            cot = self._to_torch(V).to(self.torch_dtype).reshape(n, L, k)
            out = torch.zeros((self.shape[1], k), dtype=torch.float64, device=self.device.torch)
            for start, xb in self._batches():
                _, pullback = vjp(lambda p: functional_call(self.model, p, (xb,)), self.params)
                for cols in self._column_blocks(k):
                    c = cot[start:start + xb.shape[0], :, cols].permute(2, 0, 1)  # (c, B, L)
                    grads = vmap(pullback)(c)[0]
                    out[:, cols] += torch.cat([g.reshape(c.shape[0], -1) for g in grads.values()], dim=1).T.double()
        return self._from_torch(out, like=V)

    def _column_blocks(self, k: int):
        width = max(1, min(k, COLUMN_BLOCK_BYTES // (self.shape[1] * self.x.element_size())))
        return [slice(start, min(start + width, k)) for start in range(0, k, width)]

    def outputs(self) -> np.ndarray:
        """f(w0, X), (n, L) float64 on the host: r = y − f(w0, X) is the right-hand side."""
        with torch.no_grad(), self.device.exact_float32():
            return torch.cat([self.model(xb).double().cpu() for _, xb in self._batches()]).numpy()

    def _check(self, x, length: int, name: str, ndim: int = 1):
        if getattr(x, "ndim", None) != ndim or x.shape[0] != length:
            want = f"({length},)" if ndim == 1 else f"({length}, k)"
            raise ValueError(f"{name}: expected shape {want} for J of shape {self.shape}, got "
                             f"{getattr(x, 'shape', type(x).__name__)}")

    def _to_torch(self, a) -> torch.Tensor:
        if is_cupy_array(a):
            return torch.from_dlpack(a).to(self.device.torch)
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64)).to(self.device.torch)

    @staticmethod
    def _from_torch(t: torch.Tensor, like):
        """``t`` as a float64 array of the input's kind: CuPy (on its GPU) or NumPy."""
        if is_cupy_array(like):
            import cupy

            with cupy.cuda.Device(like.device.id):
                return cupy.from_dlpack(t.to(f"cuda:{like.device.id}").contiguous())
        return t.cpu().numpy()


def _probe(model: nn.Module, x1: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(f(w0, x1), bytes of every leaf module's output) for one sample: the activations a pass holds."""
    sizes = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: sizes.append(out.numel() * out.element_size()))
             for m in model.modules() if not any(True for _ in m.children())]
    try:
        out = model(x1)
    finally:
        for h in hooks:
            h.remove()
    return out, max(1, sum(sizes) + x1.numel() * x1.element_size())


def _host(a):
    return a.get() if is_cupy_array(a) else a
