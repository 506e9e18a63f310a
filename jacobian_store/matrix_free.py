"""The network's own Jacobian, never formed: J u by jvp and Jᵀ v by vjp.

:class:`NetworkJacobian` is J of a network at its initial weights w0 on a set of inputs X: J u is
one forward-mode pass (``torch.func.jvp``) and Jᵀ v one reverse pass (``torch.func.vjp``) per batch
of samples. It is a ``jacobian_store.operators.ProductOperator`` (the protocol of the solvers that
need only products: CG and the randomized SVD). Rows are sample-major like the store (row i·L + l
is output l of sample i) and columns follow ``named_parameters()`` order, so it is the same matrix
as a store built from the same network and data, to the rounding of the network's dtype.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from jacobian_store.device import is_cupy_array, resolve_device
from jacobian_store.functional import initial_parameters, jvp_outputs, parameter_layout, unflatten, vjp_flat
from jacobian_store.operators import ProductOperator
from torch.func import functional_call, vjp, vmap

# A reverse pass of a batch holds its activations (for the backward) plus their gradients, and a
# forward-mode pass the primal and the tangent of each: 4 copies of the activations bounds both.
ACTIVATION_COPIES = 4
# Largest block of k columns (tangents or gradients, k·p numbers) a matmat/rmatmat holds at once.
COLUMN_BLOCK_BYTES = 256 * 2**20


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
