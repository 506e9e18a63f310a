"""Solvers on a Dask cluster: J as a Dask array over the store's HDF5 chunks.

``pip install 'lincnn[distributed]'``, then::

    client = connect("local")                      # or connect("tcp://scheduler:8786")
    J = dask_operator_from_store("runs/x.h5", client)
    result = solve(J, r, method="lstsq")           # also "ridge", "cg", "rsvd" (and "sgd", read locally)

:class:`DaskRowOperator` is a :class:`~solvers.operators.RowBlockOperator` whose products run on
the cluster, so every solver in this package uses it unchanged:

- J is a Dask array of row blocks, each a whole number of stored HDF5 chunks (about
  ``block_bytes`` of them), and a block is read *inside the worker* that uses it;
- ``gram`` (K = J Jᵀ) is a set of block products X_i X_jᵀ (i ≤ j), ``normal_matrix`` (JᵀJ) a
  tree sum of X_iᵀ X_i; blocks are cast to float64 inside the graph, as the in-memory operator
  does, so the accumulation is float64 and only K (or JᵀJ) travels back;
- ``matvec`` (J u) broadcasts u to every worker once, ``rmatvec`` (Jᵀ v) scatters v's slices
  to go with their row blocks and sums the partial products on the cluster;
- ``check_finite`` runs on the cluster too; ``row_blocks``/``take_rows`` (SGD mini-batches,
  ``to_dense``) read locally.

**Reading HDF5 on workers.** HDF5 is not thread-safe and h5py objects cannot be pickled, so only
the path, the dataset name and the row/column range of a block travel in the task graph; each worker
process opens the file once, read-only, and keeps the handle in a module-level cache keyed by path
(reopened if the file is replaced; :func:`worker_files` reports the cache, :func:`close_files`
empties it). Worker handles are opened with HDF5 file locking off: J is immutable once its build is
complete (checked before a :class:`DaskRowOperator` is made from a store), and a lock held by a
long-lived worker would otherwise stop ``bin/solve`` from writing its solution into the store, and
a store opened for writing would stop the workers from reading it. One thread per worker process
(``threads_per_worker=1``) is the right setting: h5py serializes calls within a process anyway.

**Where the store must be.** A worker opens the store by the same absolute path as the client.
Workers on this machine always can. Workers on other machines need the store on a shared
filesystem mounted at the same path. A sharded store (an HDF5 virtual dataset over
``<store>.shard<r>.h5``, see :mod:`jacobian_store.shards`) is read through its main file, which finds
the shard files next to it, so the shard files must be on that filesystem too.

Results equal the in-memory operator's up to float64 summation order: each entry of K, J u or Jᵀ v
is a float64 dot product whose terms are summed in a different grouping, so it differs by at most
2γ_n |J||J|ᵀ (γ_n = n·ε₆₄/(1 − n·ε₆₄), n the length of the dot product), not more.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np

from jacobian_store.device import array_module, module_for_device, to_numpy
from jacobian_store.operators import RowBlockOperator, _check_n_outputs
from jacobian_store.progress import progress_bar

# Target size of one Dask block of J as stored: large enough that the per-task overhead (a few ms)
# is small against reading and multiplying it, small enough that a worker holds a few blocks and
# their float64 copies at once.
DEFAULT_BLOCK_BYTES = 128 * 2**20

INSTALL_HINT = "pip install 'lincnn[distributed]'"


def _require_dask():
    """``(dask.array, distributed)``, or an ImportError that says how to install them."""
    try:
        import dask.array as da
        import distributed
    except ImportError as error:
        raise ImportError(f"solving on a Dask cluster needs dask and distributed ({error}); install them with "
                          f"{INSTALL_HINT}") from error
    return da, distributed


def connect(scheduler: str, *, n_workers: int | None = None):
    """A ``distributed.Client``: ``"local"`` starts a LocalCluster on this machine, else ``scheduler`` is an address.

    The local cluster has one single-threaded worker process per core (``n_workers``, default
    ``os.cpu_count()``), so each worker keeps one HDF5 handle and BLAS runs one thread per process.
    Closing the client closes a local cluster with it. An address is that of a running scheduler
    (``dask scheduler``, with ``dask worker ADDRESS`` on each machine; lincnn must be importable there).
    """
    _, distributed = _require_dask()
    if scheduler == "local":
        n = int(n_workers or os.cpu_count() or 1)
        if n < 1:
            raise ValueError(f"n_workers must be a positive integer, got {n_workers!r}")
        return distributed.Client(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None)
    if n_workers is not None:
        raise ValueError("n_workers applies only to scheduler='local'; a remote cluster has the workers it was given")
    try:
        return distributed.Client(scheduler)
    except (OSError, TimeoutError) as error:
        raise OSError(f"cannot reach a Dask scheduler at {scheduler!r} ({error}); start one with `dask scheduler` "
                      f"and workers with `dask worker {scheduler}`, or use 'local' for a cluster on this "
                      f"machine") from error


# ---- worker side: one read-only handle per process and path --------------------------------------

_FILES: dict[str, tuple[tuple, h5py.File]] = {}  # path → (file identity when opened, handle)
_OPENS: dict[str, int] = {}                       # path → times opened in this process
_FILES_LOCK = threading.Lock()


def _identity(path: str) -> tuple:
    """What changes when the file is replaced or rewritten (then a cached handle is stale)."""
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _open_read_only(path: str, locking: bool) -> h5py.File:
    """``path`` read-only, with HDF5 file locking off (``locking=False``) or as h5py opens files by
    default (``True``, as JacobianStore does). HDF5 refuses to open a file twice in one process with
    different locking settings, and a locked open fails while another process holds the file for
    writing; either way the other setting is tried before giving up."""
    default, unlocked = {}, {"locking": False}
    first_try, second_try = (default, unlocked) if locking else (unlocked, default)
    try:
        return h5py.File(path, "r", **first_try)
    except OSError as first:
        try:
            return h5py.File(path, "r", **second_try)
        except OSError:
            raise first from None


def worker_file(path: str) -> h5py.File:
    """This process's read-only handle on ``path``, opened on first use and kept (see the module docstring)."""
    identity = _identity(path)
    with _FILES_LOCK:
        cached = _FILES.get(path)
        if cached is not None and cached[0] == identity and cached[1].id.valid:
            return cached[1]
        if cached is not None:  # replaced or rewritten since: the old handle may show stale metadata
            cached[1].close()
        handle = _open_read_only(path, locking=False)
        _FILES[path] = (identity, handle)
        _OPENS[path] = _OPENS.get(path, 0) + 1
        return handle


def worker_files() -> dict:
    """This process's cache: ``{"pid": ..., "files": {path: times opened}}`` (run it with ``client.run``)."""
    with _FILES_LOCK:
        return {"pid": os.getpid(), "files": {p: _OPENS[p] for p in _FILES if _FILES[p][1].id.valid}}


def close_files() -> None:
    """Close every handle this process caches (on every worker: ``client.run(close_files)``)."""
    with _FILES_LOCK:
        for _, handle in _FILES.values():
            if handle.id.valid:
                handle.close()
        _FILES.clear()


class _H5Rows:
    """An array-like over ``path:dataset`` for ``dask.array.from_array``: it pickles as the path,
    name, shape and dtype only, and reads through the current process's cached handle."""

    def __init__(self, path: str, name: str, shape: tuple[int, int], dtype):
        self.path, self.name, self.shape, self.dtype = path, name, tuple(shape), np.dtype(dtype)
        self.ndim = len(self.shape)

    def __getitem__(self, index):
        return worker_file(self.path)[self.name][index]

    def __reduce__(self):
        return _H5Rows, (self.path, self.name, self.shape, self.dtype.str)


# ---- the operator ------------------------------------------------------------------------------

class DaskRowOperator(RowBlockOperator):
    """J stored at ``path:dataset`` (e.g. ``"train/J"``) as a Dask array computed on ``client``'s cluster.

    Blocks are ``block_rows`` rows (a whole number of the ``chunk_rows`` stored rows per HDF5 chunk,
    about ``block_bytes`` in all) by all p columns, or, when even one chunk of rows is wider than
    that, by a whole number of HDF5 column chunks. ``chunk_rows`` defaults to the dataset's own
    chunking; give it for a virtual dataset, which has none (the store passes its build chunk).

    Nothing is sent to the cluster until a product is asked for. ``persist()`` holds J's blocks in
    the workers' memory, so later products (CG iterations, the passes of a randomized SVD) read no
    file. The store must be reachable at the same path from every worker (module docstring).
    """

    def __init__(self, path, dataset: str, client, *, n_outputs: int, chunk_rows: int | None = None,
                 block_bytes: int = DEFAULT_BLOCK_BYTES):
        da, distributed = _require_dask()
        from dask.base import tokenize

        if client is None or not hasattr(client, "compute") or not hasattr(client, "scatter"):
            raise TypeError(f"client must be a distributed.Client (e.g. solvers.distributed.connect('local')), got "
                            f"{type(client).__name__}")
        if not (isinstance(block_bytes, (int, np.integer)) and block_bytes > 0):
            raise ValueError(f"block_bytes must be a positive integer, got {block_bytes!r}")
        path = Path(path).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"no HDF5 file at {path}")
        self.path, self.dataset_name, self.client = str(path), dataset, client
        with _open_read_only(self.path, locking=True) as f:
            if dataset not in f or not isinstance(f[dataset], h5py.Dataset) or f[dataset].ndim != 2:
                raise ValueError(f"{self.path} holds no 2-D dataset {dataset!r}")
            ds = f[dataset]
            self.shape, self.dtype = (int(ds.shape[0]), int(ds.shape[1])), np.dtype(ds.dtype)
            chunks = ds.chunks
        _check_n_outputs(self.shape[0], n_outputs)
        self.n_outputs = int(n_outputs)
        m, p = self.shape
        chunk_rows = int(chunk_rows or (chunks[0] if chunks else 1))
        chunk_cols = int(chunks[1]) if chunks else p
        item = self.dtype.itemsize
        if chunk_rows * p * item <= block_bytes:
            cols = p
            rows = max(1, block_bytes // (p * item) // chunk_rows) * chunk_rows
        else:  # one chunk of rows is wider than a block: split the columns at HDF5 chunk boundaries
            rows = chunk_rows
            cols = max(1, block_bytes // (rows * item) // chunk_cols) * chunk_cols
        self.block_rows, self.block_cols = min(rows, max(m, 1)), min(cols, max(p, 1))
        source = _H5Rows(self.path, dataset, self.shape, self.dtype)
        name = "lincnn-J-" + tokenize(self.path, dataset, _identity(self.path), self.block_rows, self.block_cols)
        self._as_completed = distributed.as_completed
        self.array = da.from_array(source, chunks=(self.block_rows, self.block_cols), name=name, lock=False,
                                   asarray=True, fancy=False, meta=np.empty((0, 0), dtype=self.dtype))
        self._da = da

    def __repr__(self) -> str:
        return (f"DaskRowOperator({self.path}:{self.dataset_name}, shape={self.shape}, dtype={self.dtype.name}, "
                f"n_outputs={self.n_outputs}, blocks={self.array.numblocks})")

    @property
    def row_bounds(self) -> np.ndarray:
        """First row of every Dask row block, then n·L."""
        return np.concatenate([[0], np.cumsum(self.array.chunks[0])]).astype(np.int64)

    def persist(self) -> "DaskRowOperator":
        """Hold J's blocks (as stored) in the workers' memory from now on; returns self."""
        self.array = self.client.persist(self.array)
        return self

    def close_worker_files(self) -> None:
        """Close the HDF5 handles every worker caches (they reopen on the next read)."""
        self.client.run(close_files)

    # ---- cluster side --------------------------------------------------------------------------
    def _compute(self, collection):
        return self.client.compute(collection, sync=True)

    def _blocks(self, dtype):
        """J's blocks in ``dtype``, the cast done inside the graph (on the worker that read the block)."""
        return self.array if self.array.dtype == dtype else self.array.astype(dtype)

    def _broadcast(self, u):
        """``u`` (p or p × k) on every worker, as a Dask array chunked like J's columns."""
        # hash=False: a fresh key each time; re-scattering equal data under its content hash races with the
        # release of the previous call's future (the scheduler then drops the key: 'lost dependencies')
        future = self.client.scatter(u, broadcast=True, hash=False)
        U = self._da.from_delayed(future, shape=u.shape, dtype=u.dtype)
        return U.rechunk((self.array.chunks[1],) + tuple((n,) for n in u.shape[1:]))

    def _scatter_rows(self, v):
        """``v`` (n·L or n·L × k) as a Dask array whose chunks are J's row blocks, each slice scattered."""
        bounds = self.row_bounds
        parts = [v[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        futures = self.client.scatter(parts, hash=False)
        return self._da.concatenate([self._da.from_delayed(f, shape=x.shape, dtype=x.dtype)
                                     for f, x in zip(futures, parts)], axis=0)

    def _forward(self, u, ndim):
        xp = array_module(u)
        u = to_numpy(u)
        self._check_vector(u, self.shape[1], "u", ndim)
        dtype = np.result_type(self.dtype, u.dtype)
        out = self._compute(self._blocks(dtype) @ self._broadcast(u.astype(dtype, copy=False)))
        return xp.asarray(out)

    def _adjoint(self, v, ndim):
        xp = array_module(v)
        v = to_numpy(v)
        self._check_vector(v, self.shape[0], "v", ndim)
        dtype = np.result_type(self.dtype, v.dtype)
        out = self._compute(self._blocks(dtype).T @ self._scatter_rows(v.astype(dtype, copy=False)))
        return xp.asarray(out)

    def gram(self, dtype=np.float64, *, device: str = "cpu", panel_bytes: int | None = None,
             progress: bool = False):
        """K = J Jᵀ from the block products X_i X_jᵀ, i ≤ j, in ``dtype`` (float64 by default); K is
        returned exactly symmetric, on ``device``.

        ``panel_bytes`` bounds what the cluster holds at once: consecutive row blocks are grouped
        into panels of at most that many bytes in ``dtype`` (at least one block), and each panel is
        one computation that reads its own blocks and every later block once, as in the in-memory
        operator. None: all of J in one computation, each stored chunk read once.
        """
        dtype = np.dtype(dtype)
        m, p = self.shape
        X = self._blocks(dtype)
        bounds = self.row_bounds
        K = np.empty((m, m), dtype=dtype)
        bar = progress_bar(total=m, desc="Gram J Jᵀ (Dask)", unit="row", enabled=progress)
        for panel in self._panels(panel_bytes, dtype):
            # the strip of block row i from its diagonal block on: X_i [X_i, X_{i+1}, …]ᵀ; one graph
            # per panel (each block read once), strips placed in K as they arrive and then dropped
            futures = self.client.compute([X.blocks[i] @ X[bounds[i]:].T for i in panel])
            row_of = {future.key: i for future, i in zip(futures, panel)}
            for future in self._as_completed(futures):
                i, strip = row_of[future.key], future.result()
                a, b = bounds[i], bounds[i + 1]
                K[a:b, a:] = strip
                K[b:, a:b] = strip[:, b - a:].T
                diagonal = K[a:b, a:b]
                K[a:b, a:b] = np.triu(diagonal) + np.triu(diagonal, 1).T
                future.release()  # the workers drop the strip now, not when the whole panel is done
            bar.update(int(bounds[panel[-1] + 1] - bounds[panel[0]]))
        bar.close()
        return module_for_device(device).asarray(K)

    def _panels(self, panel_bytes, dtype) -> list[list[int]]:
        """Row-block indices grouped into consecutive panels of at most ``panel_bytes`` in ``dtype``."""
        sizes = np.asarray(self.array.chunks[0], dtype=np.int64) * self.shape[1] * np.dtype(dtype).itemsize
        if panel_bytes is None:
            return [list(range(len(sizes)))] if len(sizes) else []
        panels, current, held = [], [], 0
        for i, size in enumerate(sizes):
            if current and held + size > panel_bytes:
                panels.append(current)
                current, held = [], 0
            current.append(i)
            held += int(size)
        return panels + ([current] if current else [])

    def normal_matrix(self, dtype=np.float64, *, device: str = "cpu", progress: bool = False):
        """JᵀJ (p × p) as a tree sum of the block products X_iᵀ X_i, in ``dtype`` (float64 by default)."""
        X = self._blocks(np.dtype(dtype))
        N = self._compute(X.T @ X)
        N = np.triu(N) + np.triu(N, 1).T  # exactly symmetric, as the in-memory operator returns it
        return module_for_device(device).asarray(N)

    def check_finite(self) -> None:
        """One pass on the cluster; raise ValueError naming the first row holding NaN or Inf."""
        finite_rows = self._compute(self._da.isfinite(self.array).all(axis=1))
        if finite_rows.all():
            return
        row = int(np.flatnonzero(~finite_rows)[0])
        values = self.take_rows(np.array([row]))[0]
        col = int(np.flatnonzero(~np.isfinite(values))[0])
        sample, output = divmod(row, self.n_outputs)
        raise ValueError(f"J holds a non-finite value ({values[col]}) in row {row} (sample {sample}, output {output}), "
                         f"column {col}; rebuild the Jacobian store or drop that sample")

    # ---- local side: the row-block protocol, read in this process -------------------------------
    def _open_local(self) -> h5py.File:
        # locking as JacobianStore opens it, so this works beside an open store; not cached, so a
        # later JacobianStore.open(path, "r+") in this process is not refused
        return _open_read_only(self.path, locking=True)

    def row_blocks(self) -> Iterator[tuple[int, np.ndarray]]:
        return self.row_blocks_from(0)

    def row_blocks_from(self, first_row: int) -> Iterator[tuple[int, np.ndarray]]:
        bounds = self.row_bounds
        with self._open_local() as f:
            ds = f[self.dataset_name]
            for a, b in zip(bounds[:-1], bounds[1:]):
                if b > first_row:
                    yield int(a), ds[a:b]

    def take_rows(self, rows: np.ndarray) -> np.ndarray:
        from jacobian_store.store import HDF5RowOperator

        with self._open_local() as f:
            return HDF5RowOperator(f[self.dataset_name], self.n_outputs).take_rows(rows)


def dask_operator_from_store(store, client, split: str = "train", *,
                             block_bytes: int = DEFAULT_BLOCK_BYTES) -> DaskRowOperator:
    """J of ``split`` in ``store`` (a path or an open JacobianStore) as a :class:`DaskRowOperator` on ``client``.

    The store is checked here, before anything is sent to the cluster, by the same checks as
    ``JacobianStore.jacobian(split)``: it exists, its build of ``split`` is complete, and the shard
    files of a sharded store are present and hold their chunks. Otherwise StoreError.
    """
    from jacobian_store.store import JacobianStore

    if isinstance(store, JacobianStore):
        return _operator_from_open_store(store, client, split, block_bytes)
    with JacobianStore.open(store) as opened:
        return _operator_from_open_store(opened, client, split, block_bytes)


def _operator_from_open_store(store, client, split, block_bytes) -> DaskRowOperator:
    store.jacobian(split)  # raises StoreError: no such split, unfinished build, missing or stale shards
    J = store.file[f"{split}/J"]
    # a virtual dataset has no chunks of its own; its shards are mapped by whole build chunks
    chunk_rows = J.chunks[0] if J.chunks else int(store.file.attrs["chunk_samples"]) * store.n_outputs
    return DaskRowOperator(store.path, f"{split}/J", client, n_outputs=store.n_outputs, chunk_rows=chunk_rows,
                           block_bytes=block_bytes)
