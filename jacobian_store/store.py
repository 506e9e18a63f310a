"""The HDF5 Jacobian store: one file holding J = ∇_w f(w0, X) and everything needed to use it.

Layout (format version 1), readable with plain h5py::

    /train/J         (n·L, p)  float32|float64  row i·L + l = ∂f_l(w0, x_i)/∂w; chunked by row blocks
    /train/done      (n_chunks,) bool           completion mark of each build chunk (n_chunk_samples samples)
    /train/f0        (n, L)    f(w0, x_i)
    /train/y         (n, L)    targets (one-hot, or 1/0 when binary)
    /train/labels    (n,)      original class labels
    /train/indices   (n,)      positions of the samples in the source split
    /test/...        the same; /test/J and /test/done only with --test-jacobian
    /w0              (p,)      the initial weights, flat in named_parameters() order
    /params/names, /params/offsets, /params/sizes   the column layout; attribute ``shapes`` (JSON)
    /solutions/<name>/u  (p,)  fitted u, with the solver's options and diagnostics as attributes

File attributes: format_version, arch, width, seed, dtype, in_channels, image_size, n_params,
n_outputs, n_samples, chunk_samples, test_jacobian, dataset (JSON: the dataset's rebuild spec),
versions (JSON), device, created, command.

Concurrent use rests on the file's own lock, the ``flock`` HDF5 takes when it opens a file: shared
while a reader has the store open, exclusive while a writer has (a build, a solve's final write).
A reader never opens a store for writing (HDF5's "r+" would turn a 0-byte file into an empty HDF5
file); an open that meets another process's lock is reported as a lock, not as damage.

Columns follow ``model.named_parameters()`` order, each tensor flattened in C order (DESIGN.md).
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np

from jacobian_store.errors import StoreError
from jacobian_store.operators import RowBlockOperator
from jacobian_store.provenance import dumps

FORMAT_VERSION = 1
# Reads are grouped into blocks of about this many bytes: large enough to amortize HDF5 call
# overhead, small enough that one block plus a solver's working set fits in memory.
READ_BLOCK_BYTES = 256 * 2**20
# Where a solution is written before it is moved to /solutions/<name>.
PARTIAL_SOLUTIONS = "partial_solutions"


class HDF5RowOperator(RowBlockOperator):
    """J as stored in an HDF5 dataset, streamed by row blocks (never loaded whole).

    ``row_blocks`` reads whole groups of stored chunks, so each HDF5 chunk is read once per pass.
    """

    def __init__(self, dataset: h5py.Dataset, n_outputs: int, block_bytes: int = READ_BLOCK_BYTES):
        self._dataset = dataset
        self.shape = tuple(dataset.shape)
        self.dtype = dataset.dtype
        self.n_outputs = n_outputs
        chunk_rows = dataset.chunks[0] if dataset.chunks else 1
        row_bytes = self.shape[1] * self.dtype.itemsize
        self.block_rows = max(chunk_rows, (block_bytes // max(row_bytes, 1)) // chunk_rows * chunk_rows)

    def row_blocks(self) -> Iterator[tuple[int, np.ndarray]]:
        return self.row_blocks_from(0)

    def row_blocks_from(self, first_row: int) -> Iterator[tuple[int, np.ndarray]]:
        n_rows = self.shape[0]
        for start in range(first_row, n_rows, self.block_rows):
            yield start, self._dataset[start:min(start + self.block_rows, n_rows)]

    def to_dense(self, dtype=None):
        """All of J in one array, read by HDF5 straight into it in the stored dtype (no block copies)."""
        if dtype is not None and np.dtype(dtype) != self.dtype:
            return super().to_dense(dtype)
        out = np.empty(self.shape, dtype=self.dtype)
        self._dataset.read_direct(out)
        return out

    def take_rows(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.shape[0]):
            raise IndexError(f"row index out of range [0, {self.shape[0]})")
        out = np.empty((rows.size, self.shape[1]), dtype=self.dtype)
        # Read each run of consecutive rows with one slice (a sample's L rows are one run);
        # h5py's fancy indexing is far slower than a handful of slices.
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        run_starts = np.flatnonzero(np.diff(sorted_rows, prepend=-2) != 1)
        run_ends = np.append(run_starts[1:], sorted_rows.size)
        for a, b in zip(run_starts, run_ends):
            out[order[a:b]] = self._dataset[sorted_rows[a]:sorted_rows[b - 1] + 1]
        return out


def is_lock_error(error: OSError) -> bool:
    """True when HDF5 refused to open a file because another process holds its lock."""
    return "unable to lock file" in str(error) or getattr(error, "errno", None) in (errno.EAGAIN, errno.EWOULDBLOCK)


def lock_message(path) -> str:
    return (f"{path} is in use by another process (it holds the file's lock: a running bin/build-jacobian, bin/solve "
            f"or another program has the store open); wait for it to finish, then rerun")


def open_hdf5(path: str | os.PathLike, mode: str = "r", **kwargs) -> h5py.File:
    """``h5py.File(path, mode)``, with a lock held by another process reported as a StoreError saying so."""
    try:
        return h5py.File(path, mode, **kwargs)
    except OSError as error:
        if is_lock_error(error):
            raise StoreError(lock_message(path)) from None
        raise


@contextmanager
def exclusive_lock(path: str | os.PathLike, wait: bool = False):
    """Hold the exclusive lock of the existing file ``path`` (the lock HDF5 writers take); yields its fd.

    Without ``wait`` a lock held by another process (a reader included) raises StoreError at once;
    with it, a message says what it waits for. Files opened with HDF5 while this lock is held must
    pass ``locking=False`` (the lock is per open file, so HDF5's own would conflict with ours).
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                raise StoreError(lock_message(path)) from None
            print(f"waiting for the other process using {path} to close it (it holds the file's lock)", flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)  # releases the lock


def file_identity(path_or_fd) -> tuple[int, int]:
    """(device, inode): the same path names another file once a store has been replaced."""
    info = os.fstat(path_or_fd) if isinstance(path_or_fd, int) else os.stat(path_or_fd)
    return info.st_dev, info.st_ino


def check_solution_name(name) -> str:
    """A solution name is a plain name: one HDF5 link, never a path (no '/', not '.' or '..')."""
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise ValueError(f"a solution name must be a plain name (not empty, '.' or '..', no '/' or '\\'); got "
                         f"{name!r}: choose e.g. --name ridge-small")
    return name


def dataset_spec_json(spec: dict) -> str:
    """Canonical JSON of a dataset spec, so equal specs compare equal as strings."""
    return json.dumps(spec, sort_keys=True)


class JacobianStore:
    """A Jacobian store opened for reading (or ``r+`` to add solutions).

    >>> with JacobianStore.open("runs/lenet-w5.h5") as store:
    ...     J = store.train_J                      # HDF5RowOperator over /train/J
    ...     r = (store.targets() - store.f0()).reshape(-1)
    """

    # What every store holds, checked when it is opened so that a damaged or foreign file is named
    # before any work starts (and not by a KeyError after an hour of solving).
    REQUIRED_ATTRS = ("arch", "width", "seed", "dtype", "in_channels", "image_size", "n_params", "n_outputs",
                      "n_samples", "dataset")
    REQUIRED_DATASETS = ("w0", "train/f0", "train/y", "train/labels", "train/indices")

    def __init__(self, file: h5py.File):
        self.file = file
        self.path = Path(file.filename)
        if file.attrs.get("format_version") is None or "train" not in file:
            raise StoreError(f"{self.path} is not a lincnn Jacobian store (no format_version attribute or /train group)")
        if int(file.attrs["format_version"]) > FORMAT_VERSION:
            raise StoreError(f"{self.path} has format version {file.attrs['format_version']}, newer than this lincnn "
                             f"reads ({FORMAT_VERSION}); upgrade lincnn")
        self._check_structure()

    def _damaged(self, problem: str) -> StoreError:
        return StoreError(f"{self.path} is damaged: {problem}; rebuild it with bin/build-jacobian (the command that "
                          f"made it is in its 'command' attribute), at another --out if it holds solutions you keep")

    def _check_structure(self) -> None:
        missing = [f"attribute {a!r}" for a in self.REQUIRED_ATTRS if a not in self.file.attrs]
        missing += [f"/{d}" for d in self.REQUIRED_DATASETS if d not in self.file]
        if missing:
            raise self._damaged(f"it lacks {', '.join(missing)}")
        n, L, p = self.n_samples, self.n_outputs, self.n_params
        expected = {"w0": (p,), "train/f0": (n, L), "train/y": (n, L), "train/labels": (n,), "train/indices": (n,)}
        for name, shape in expected.items():
            if self.file[name].shape != shape:
                raise self._damaged(f"/{name} has shape {self.file[name].shape}, but its attributes (n_samples={n}, "
                                    f"n_outputs={L}, n_params={p}) say {shape}")
        if "J" in self.file["train"] and self.file["train/J"].shape != (n * L, p):
            raise self._damaged(f"/train/J has shape {self.file['train/J'].shape}, expected ({n * L}, {p})")

    def check_finite_inputs(self, split: str = "train") -> None:
        """Refuse NaN/Inf in w0, f0 and y (J is checked by the solvers' ``check_finite`` as it streams)."""
        for name in ("w0", f"{split}/f0", f"{split}/y"):
            values = self.file[name][()]
            bad = np.flatnonzero(~np.isfinite(values.reshape(-1)))
            if bad.size:
                raise self._damaged(f"/{name} holds {bad.size} non-finite value(s) (first at flat index {int(bad[0])})")

    @classmethod
    def open(cls, path: str | os.PathLike, mode: str = "r") -> "JacobianStore":
        """Open the store at ``path``: ``"r"`` (never modifies the file) or ``"r+"`` (to add solutions).

        "r+" is taken only on a file that opens as a store read-only first, so a file that is not a
        store is never turned into one.
        """
        path = Path(path)
        if mode not in ("r", "r+"):
            raise ValueError(f"mode must be 'r' or 'r+', got {mode!r}")
        if path.is_dir():
            raise StoreError(f"{path} is a directory, not a Jacobian store; give the store's .h5 file")
        if not path.exists():
            raise StoreError(f"no Jacobian store at {path}; build one with bin/build-jacobian --out {path}")
        if mode == "r+":
            cls.open(path).close()
        try:
            file = open_hdf5(path, mode, rdcc_nbytes=64 * 2**20)
        except OSError as error:
            raise StoreError(f"cannot open {path} as HDF5 ({error}); the file is damaged or not a store") from error
        try:
            return cls(file)
        except StoreError:
            file.close()
            raise

    def close(self):
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- metadata -----------------------------------------------------------------------------
    @property
    def attrs(self) -> dict:
        out = {}
        for key, value in self.file.attrs.items():
            if isinstance(value, np.generic):
                value = value.item()
            if key in ("dataset", "versions"):
                value = json.loads(value)
            out[key] = value
        return out

    @property
    def identity(self) -> tuple[int, int]:
        """(device, inode) of the open file: compared before a later write, to catch a replaced store."""
        return file_identity(self.file.id.get_vfd_handle())

    @property
    def n_outputs(self) -> int:
        return int(self.file.attrs["n_outputs"])

    @property
    def n_params(self) -> int:
        return int(self.file.attrs["n_params"])

    @property
    def n_samples(self) -> int:
        return int(self.file.attrs["n_samples"])

    def is_complete(self, split: str = "train") -> bool:
        return f"{split}/done" in self.file and bool(np.all(self.file[f"{split}/done"][()]))

    def jacobian(self, split: str = "train") -> HDF5RowOperator:
        """J of ``split`` as a row operator; refuses a store whose build has not finished."""
        if f"{split}/done" not in self.file:
            hint = " (build with --test-jacobian)" if split == "test" else ""
            raise StoreError(f"{self.path} holds no {split} Jacobian{hint}")
        done = self.file[f"{split}/done"][()]
        if not np.all(done) or f"{split}/J" not in self.file:
            raise StoreError(f"{self.path}: the {split} Jacobian build is unfinished ({int(done.sum())} of {done.size} "
                             f"chunks done); rerun the same bin/build-jacobian command to resume it")
        if self.file[f"{split}/J"].is_virtual:
            from jacobian_store.shards import verify_shards

            verify_shards(self.file, split)
        return HDF5RowOperator(self.file[f"{split}/J"], self.n_outputs)

    @property
    def train_J(self) -> HDF5RowOperator:
        return self.jacobian("train")

    def f0(self, split: str = "train") -> np.ndarray:
        return self.file[f"{split}/f0"][()]

    def targets(self, split: str = "train") -> np.ndarray:
        return self.file[f"{split}/y"][()]

    def labels(self, split: str = "train") -> np.ndarray:
        return self.file[f"{split}/labels"][()]

    def indices(self, split: str = "train") -> np.ndarray:
        return self.file[f"{split}/indices"][()]

    def residual(self, split: str = "train") -> np.ndarray:
        """r = y − f(w0, X), flattened sample-major to match the rows of J."""
        return (self.targets(split) - self.f0(split)).reshape(-1)

    def w0(self) -> np.ndarray:
        return self.file["w0"][()]

    # -- rebuilding what made the store ------------------------------------------------------
    def model(self, device: str = "cpu"):
        """The network with w0 loaded exactly as stored."""
        import torch

        from jacobian_store.architectures import create_model

        a = self.attrs
        model = create_model(a["arch"], a["width"], in_channels=int(a["in_channels"]), n_outputs=self.n_outputs,
                             image_size=int(a["image_size"]), seed=int(a["seed"]))
        w0 = torch.from_numpy(self.w0())
        offset = 0
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(w0[offset:offset + p.numel()].view_as(p))
                offset += p.numel()
        return model.to(device=device, dtype=w0.dtype)

    def dataset(self, data_root=None):
        """The dataset the store was built from, rebuilt from its recorded spec."""
        from jacobian_store.datasets import dataset_from_spec

        return dataset_from_spec(self.attrs["dataset"], data_root=data_root)

    # -- solutions ----------------------------------------------------------------------------
    def solution_names(self) -> list[str]:
        return sorted(self.file["solutions"]) if "solutions" in self.file else []

    def write_solution(self, name: str, u: np.ndarray, info: dict, overwrite: bool = False) -> None:
        """Store u under /solutions/<name> with ``info`` (options, diagnostics) as JSON attributes.

        u and info are written in one group, flushed together: a reader sees both or neither.
        """
        check_solution_name(name)
        u = np.asarray(u)
        if u.shape != (self.n_params,):
            raise ValueError(f"u has shape {u.shape}, expected ({self.n_params},)")
        if not np.all(np.isfinite(u)):
            raise ValueError(f"u holds {int(np.sum(~np.isfinite(u)))} non-finite value(s); a diverged solution is "
                             f"not stored")
        group = self.file.require_group("solutions")
        if name in group and not overwrite:
            raise StoreError(f"{self.path} already holds solution {name!r}; pass --overwrite or another --name")
        # Written under a scratch name and moved into place by one link operation, so a process killed
        # while writing leaves no half-written solution under ``name``.
        scratch = self.file.require_group(PARTIAL_SOLUTIONS)
        if name in scratch:
            del scratch[name]
        entry = scratch.create_group(name)
        entry.create_dataset("u", data=u)
        entry.attrs["info"] = dumps(info, sort_keys=True)
        if name in group:
            del group[name]
        self.file.move(f"{PARTIAL_SOLUTIONS}/{name}", f"solutions/{name}")
        self.file.flush()

    def read_solution(self, name: str) -> tuple[np.ndarray, dict]:
        if name not in self.solution_names():
            raise StoreError(f"{self.path} holds no solution {name!r}; it has: {', '.join(self.solution_names()) or 'none'}")
        entry = self.file["solutions"][name]
        return entry["u"][()], json.loads(entry.attrs["info"])

    def summary(self) -> str:
        a = self.attrs
        n_rows = self.n_samples * self.n_outputs
        itemsize = np.dtype(a["dtype"]).itemsize
        status = "complete" if self.is_complete() else "unfinished"
        return (f"{self.path}: {a['arch']} ×{a['width']:g} on {a['dataset']['name']} — J {n_rows:,} × {self.n_params:,} "
                f"{a['dtype']} ({n_rows * self.n_params * itemsize / 1e9:.3g} GB), {status}, "
                f"{len(self.solution_names())} solution(s)")

