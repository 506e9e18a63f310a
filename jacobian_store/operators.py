"""The two operator protocols the solvers are written against: J by row blocks, and J by products.

J is n·L × p, rows sample-major (row ``i*L + l`` is output l of sample i). A subclass of
:class:`RowBlockOperator` supplies only

- ``shape`` (n·L, p), ``dtype`` (a NumPy dtype) and ``n_outputs`` (L, rows per sample);
- ``row_blocks()``: ``(first_row, block)`` pairs of consecutive row blocks covering every row in
  order (from HDF5 a block is one stored chunk);
- ``take_rows(rows)``: the given rows, in the given order, as a dense array (SGD mini-batches);

and optionally ``row_blocks_from(first_row)``, which by default reads and drops the blocks before
``first_row``; an operator that can seek (an in-memory array, an HDF5 dataset) should override it.

Everything else is derived here by streaming the blocks: ``matvec`` (J u), ``rmatvec`` (Jᵀ v),
``matmat``, ``rmatmat``, ``gram`` (K = J Jᵀ), ``normal_matrix`` (JᵀJ), ``to_dense``,
``check_finite`` and ``as_linear_operator``. Peak memory is one block (plus its float64 copy, cut
into slices of at most ``SLICE_BYTES``) and the output.

Arithmetic runs in the result dtype of J and the vector, so a float32 J times a float64 vector is
computed in float64 (float32 values are exact in float64; only the accumulation rounds). ``gram``
and ``normal_matrix`` always accumulate in float64 unless told otherwise.

The array module follows the data (``cupy.get_array_module`` style): a CuPy vector makes the
blocks stream to the GPU and the products run there; ``gram(device="cuda")`` does the same.

J known only by its products (CG and the randomized SVD need nothing more) follows scipy's
``LinearOperator`` protocol, :class:`ProductOperator`:

- ``shape`` (n·L, p), ``dtype`` and ``n_outputs`` (L, rows per sample; 1 when unknown);
- ``matvec(u)`` = J u and ``rmatvec(v)`` = Jᵀ v on float64 vectors;
- ``matmat(U)`` and ``rmatmat(V)``, derived column by column when the operator has none.

:func:`as_product_operator` wraps a ``scipy.sparse.linalg.LinearOperator`` or any object with
``shape``, ``matvec`` and ``rmatvec``; the network's own Jacobian by jvp/vjp is
``jacobian_store.matrix_free.NetworkJacobian``. Row-block methods (lstsq, ridge, sgd) cannot run on a
ProductOperator: they need rows of J.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from jacobian_store.device import array_module, is_cupy_array, module_for_device, to_numpy
from jacobian_store.progress import progress_bar

# Largest float64 working copy of a float32 block made at once (blocks are cut into row slices).
SLICE_BYTES = 64 * 2**20
# Default panel held for ``gram``: the rows of J paired against all later rows in one pass.
PANEL_BYTES = 256 * 2**20
# Seed of the probe vector of ``check_finite`` (any fixed seed: the test holds with probability 1).
PROBE_SEED = 12345


def _to_module(block, xp):
    """``block`` as an array of module ``xp`` (host → GPU stream, or GPU → host copy)."""
    if xp is np:
        return block.get() if is_cupy_array(block) else np.asarray(block)
    return xp.asarray(block)


def _slices(block, dtype, max_bytes: int = SLICE_BYTES):
    """Yield ``(offset, rows)`` of ``block`` cast to ``dtype``, each copy at most ``max_bytes``."""
    n_rows, n_cols = block.shape
    if block.dtype == dtype:
        yield 0, block
        return
    step = max(1, max_bytes // max(1, n_cols * np.dtype(dtype).itemsize))
    for start in range(0, n_rows, step):
        yield start, block[start:start + step].astype(dtype)


class RowBlockOperator:
    """Base class: J as consecutive row blocks. See the module docstring for the protocol."""

    shape: tuple[int, int]
    dtype: np.dtype
    n_outputs: int

    # ---- the primitives a subclass implements -------------------------------------------------
    def row_blocks(self) -> Iterator[tuple[int, np.ndarray]]:
        raise NotImplementedError

    def take_rows(self, rows: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def row_blocks_from(self, first_row: int) -> Iterator[tuple[int, np.ndarray]]:
        """Blocks covering rows ``first_row:`` (the first block may start earlier). Override to seek."""
        for start, block in self.row_blocks():
            if start + block.shape[0] > first_row:
                yield start, block

    # ---- derived -------------------------------------------------------------------------------
    @property
    def n_samples(self) -> int:
        return self.shape[0] // self.n_outputs

    @property
    def nbytes(self) -> int:
        return int(self.shape[0]) * int(self.shape[1]) * np.dtype(self.dtype).itemsize

    def __repr__(self) -> str:
        m, p = self.shape
        return f"{type(self).__name__}(shape=({m}, {p}), dtype={np.dtype(self.dtype).name}, n_outputs={self.n_outputs})"

    def _check_vector(self, x, length: int, name: str, ndim: int):
        if x.ndim != ndim or x.shape[0] != length:
            want = f"({length},)" if ndim == 1 else f"({length}, k)"
            raise ValueError(f"{name}: expected shape {want} for J of shape {self.shape}, got {x.shape}")

    def matvec(self, u):
        """J u, with ``u`` of length p (NumPy or CuPy; the result lives where ``u`` does)."""
        return self._forward(u, ndim=1)

    def matmat(self, U):
        """J U, with ``U`` of shape (p, k)."""
        return self._forward(U, ndim=2)

    def rmatvec(self, v):
        """Jᵀ v, with ``v`` of length n·L."""
        return self._adjoint(v, ndim=1)

    def rmatmat(self, V):
        """Jᵀ V, with ``V`` of shape (n·L, k)."""
        return self._adjoint(V, ndim=2)

    def _forward(self, u, ndim):
        xp = array_module(u)
        u = xp.asarray(u)
        self._check_vector(u, self.shape[1], "u", ndim)
        dtype = np.result_type(self.dtype, u.dtype)
        out = xp.empty((self.shape[0],) + u.shape[1:], dtype=dtype)
        for start, block in self.row_blocks():
            block = _to_module(block, xp)
            for offset, rows in _slices(block, dtype):
                first = start + offset
                out[first:first + rows.shape[0]] = rows @ u
        return out

    def _adjoint(self, v, ndim):
        xp = array_module(v)
        v = xp.asarray(v)
        self._check_vector(v, self.shape[0], "v", ndim)
        dtype = np.result_type(self.dtype, v.dtype)
        out = xp.zeros((self.shape[1],) + v.shape[1:], dtype=dtype)
        for start, block in self.row_blocks():
            block = _to_module(block, xp)
            for offset, rows in _slices(block, dtype):
                first = start + offset
                out += rows.T @ v[first:first + rows.shape[0]]
        return out

    def gram(self, dtype=np.float64, *, device: str = "cpu", panel_bytes: int | None = None,
             progress: bool = False):
        """K = J Jᵀ (n·L × n·L) accumulated in ``dtype`` (float64 by default).

        A panel of consecutive rows (at most ``panel_bytes`` in ``dtype``, at least one row) is
        held and multiplied against itself and against every later block as it streams past, so
        pass t reads J from the panel's first row on and the number of passes is the number of
        panels. Memory: K, one panel and one block.
        """
        xp = module_for_device(device)
        dtype = np.dtype(dtype)
        m, p = self.shape
        K = xp.zeros((m, m), dtype=dtype)
        panel_rows = max(1, (panel_bytes or PANEL_BYTES) // max(1, p * dtype.itemsize))
        bar = progress_bar(total=m, desc="Gram J Jᵀ", unit="row", enabled=progress)
        first = 0
        while first < m:
            cap = min(m - first, panel_rows)
            P = xp.empty((cap, p), dtype=dtype)  # panel: rows first:first+cap, in dtype
            filled = 0
            for start, block in self.row_blocks_from(first):
                block = _to_module(block, xp)
                if start < first:  # a block straddling the panel's first row: drop its head
                    block, start = block[first - start:], first
                if filled < cap:  # blocks arrive in row order, so the panel fills first
                    take = min(cap - filled, block.shape[0])
                    P[filled:filled + take] = block[:take]
                    filled += take
                    block, start = block[take:], start + take
                    if block.shape[0] == 0:
                        continue
                # every row left in this block lies after the panel: K[panel, rows] = P rowsᵀ
                for offset, rows in _slices(block, dtype):
                    s, e = start + offset, start + offset + rows.shape[0]
                    G = P @ rows.T
                    K[first:first + cap, s:e] = G
                    K[s:e, first:first + cap] = G.T
            K[first:first + cap, first:first + cap] = P @ P.T  # gemm: faster than syrk here, measured
            bar.update(cap)
            first += cap
        bar.close()
        return K

    def normal_matrix(self, dtype=np.float64, *, device: str = "cpu", progress: bool = False):
        """JᵀJ (p × p) accumulated in ``dtype`` over one pass of the row blocks."""
        xp = module_for_device(device)
        dtype = np.dtype(dtype)
        p = self.shape[1]
        upper = xp is np and dtype in (np.float32, np.float64)
        N = np.zeros((p, p), dtype=dtype, order="F") if upper else xp.zeros((p, p), dtype=dtype)
        bar = progress_bar(total=self.shape[0], desc="JᵀJ", unit="row", enabled=progress)
        for _, block in self.row_blocks():
            block = _to_module(block, xp)
            for _, rows in _slices(block, dtype):
                if upper:  # BLAS syrk, upper triangle only: half the flops of rows.T @ rows
                    N = _blas_syrk(dtype)(1.0, rows.T, beta=1.0, c=N, trans=0, lower=0, overwrite_c=1)
                else:
                    N += rows.T @ rows
            bar.update(block.shape[0])
        bar.close()
        if upper:
            N = np.triu(N) + np.triu(N, 1).T
        return N

    def to_dense(self, dtype=None):
        """All of J as one array (in-memory checks and small problems only)."""
        dtype = np.dtype(dtype or self.dtype)
        out = np.empty(self.shape, dtype=dtype)
        for start, block in self.row_blocks():
            block = _to_module(block, np)
            out[start:start + block.shape[0]] = block
        return out

    def check_finite(self) -> None:
        """Stream J once; raise ValueError naming the first row (sample, output) holding NaN or Inf.

        Each block is multiplied by a vector of ones in J's dtype: one BLAS pass and no block-sized
        temporary (on the 0.49 GB LeNet ×1 J held in memory, 0.013 s against 0.056 s for an
        ``isfinite`` mask, whose temporary also pays first-touch page faults;
        ``benchmarks/bench_lstsq_parts.py``).
        NaN and ±Inf propagate through products and sums, so a row holding one has a non-finite
        product; a finite row has one only when its sum overflows the dtype, so the flagged rows
        are then tested entry by entry and only a true NaN or Inf is reported.
        """
        for start, block in self.row_blocks():
            xp = array_module(block)
            sums = block @ xp.ones(block.shape[1], dtype=block.dtype)
            for i in _to_module(xp.flatnonzero(~xp.isfinite(sums)), np):
                row_values = _to_module(block[int(i)], np)
                bad = np.flatnonzero(~np.isfinite(row_values))
                if bad.size:
                    row, col = start + int(i), int(bad[0])
                    sample, output = divmod(row, self.n_outputs)
                    raise ValueError(f"J holds a non-finite value ({row_values[col]}) in row {row} (sample {sample}, "
                                     f"output {output}), column {col}; rebuild the Jacobian store or drop that sample")

    def as_linear_operator(self):
        """The same operator as a ``scipy.sparse.linalg.LinearOperator`` (float64 products)."""
        from scipy.sparse.linalg import LinearOperator

        return LinearOperator(self.shape, matvec=lambda u: self.matvec(np.asarray(u, np.float64).ravel()),
                              rmatvec=lambda v: self.rmatvec(np.asarray(v, np.float64).ravel()),
                              matmat=lambda U: self.matmat(np.asarray(U, np.float64)),
                              rmatmat=lambda V: self.rmatmat(np.asarray(V, np.float64)),
                              dtype=np.result_type(self.dtype, np.float64))


class ArrayRowOperator(RowBlockOperator):
    """An in-memory NumPy or CuPy array J seen as row blocks of ``block_rows`` rows."""

    def __init__(self, J, n_outputs: int = 1, block_rows: int = 4096):
        if getattr(J, "ndim", None) != 2:
            raise ValueError(f"J must be a 2-D array (n·L × p), got {type(J).__name__} with shape "
                             f"{getattr(J, 'shape', None)}")
        if not is_cupy_array(J):
            J = np.asarray(J)
        if J.dtype.kind not in "fc":
            J = J.astype(np.float64)
        _check_n_outputs(J.shape[0], n_outputs)
        if not (isinstance(block_rows, (int, np.integer)) and block_rows > 0):
            raise ValueError(f"block_rows must be a positive integer, got {block_rows!r}")
        self.J = J
        self.shape = (int(J.shape[0]), int(J.shape[1]))
        self.dtype = np.dtype(J.dtype)
        self.n_outputs = int(n_outputs)
        self.block_rows = int(block_rows)

    def row_blocks(self):
        return self.row_blocks_from(0)

    def row_blocks_from(self, first_row: int):
        step = self.block_rows
        for start in range((first_row // step) * step, self.shape[0], step):
            yield start, self.J[start:start + step]

    def take_rows(self, rows):
        xp = array_module(self.J)
        return self.J[xp.asarray(rows)]

    def to_dense(self, dtype=None):
        J = self.J.get() if is_cupy_array(self.J) else self.J
        return np.array(J, dtype=dtype or self.dtype)


def as_row_operator(J, n_outputs: int | None = None) -> RowBlockOperator:
    """``J`` as a :class:`RowBlockOperator`: an operator is returned as is, an array is wrapped."""
    if isinstance(J, RowBlockOperator):
        if n_outputs is not None and n_outputs != J.n_outputs:
            raise ValueError(f"n_outputs={n_outputs} disagrees with the operator's n_outputs={J.n_outputs}")
        return J
    if isinstance(J, np.ndarray) or is_cupy_array(J):
        return ArrayRowOperator(J, n_outputs=1 if n_outputs is None else n_outputs)
    raise TypeError(f"J must be a RowBlockOperator (e.g. the store's train_J), a NumPy or a CuPy array; "
                    f"got {type(J).__name__}")


def _check_n_outputs(n_rows: int, n_outputs) -> None:
    if not (isinstance(n_outputs, (int, np.integer)) and n_outputs > 0):
        raise ValueError(f"n_outputs must be a positive integer, got {n_outputs!r}")
    if n_rows % n_outputs:
        raise ValueError(f"J has {n_rows} rows, not a multiple of n_outputs={n_outputs} (rows are sample-major)")


def _blas_syrk(dtype):
    from scipy.linalg import blas

    return blas.dsyrk if dtype == np.float64 else blas.ssyrk


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
        Jg = np.asarray(to_numpy(self.matvec(g)))
        bad = np.flatnonzero(~np.isfinite(Jg))
        if bad.size:
            row = int(bad[0])
            sample, output = divmod(row, self.n_outputs)
            raise ValueError(f"J holds a non-finite value in row {row} (sample {sample}, output {output}): its "
                             f"product with a test vector is {Jg[row]}; {bad.size} such rows in all")

    def as_linear_operator(self):
        """The same operator as a ``scipy.sparse.linalg.LinearOperator`` (float64, NumPy vectors)."""
        from scipy.sparse.linalg import LinearOperator

        return LinearOperator(self.shape, matvec=lambda u: to_numpy(self.matvec(np.asarray(u, np.float64).ravel())),
                              rmatvec=lambda v: to_numpy(self.rmatvec(np.asarray(v, np.float64).ravel())),
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
