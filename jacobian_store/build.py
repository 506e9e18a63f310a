"""Materialize J = ∇_w f(w0, X) chunk by chunk into an HDF5 store (``bin/build-jacobian``).

A build is split into chunks of ``chunk_samples`` samples (rows [c·B·L, (c+1)·B·L) of J). Each
chunk is computed layer by layer (``layer_jacobians.structured_jacobian_rows``: linear layers as outer
products δ ⊗ a written in place, convolutions from their input patches, anything else by
``vmap(jacrev)``) on the build device, handed to a writer thread (so the
device-to-host copy and HDF5 write of chunk c overlap the computation of chunk c + 1), written,
flushed and only then marked done in ``/train/done``. A killed build therefore loses at most the chunks in flight, and
rerunning the same command computes exactly the chunks not marked done, with the same chunk
boundaries: the chunks already done are kept byte for byte, and the result equals an uninterrupted
build to float32 rounding (a chunk is a float32 BLAS computation, whose summation order, and so
its last bits, depend on the thread count and buffer alignment of the process that runs it).

J's storage is allocated when the file is created (HDF5 early allocation, no fill), so writing a
chunk touches only raw data, never the file's chunk index: a kill mid-write cannot damage the
structure of the file, only the chunk being written, which is not yet marked done.

The store is created under a scratch name beside it (``<out>.partial``) and renamed into place
once everything but J's rows is written: ``out`` is therefore either absent or a complete
skeleton, so a kill at any instant resumes. ``--overwrite`` replaces a store built from another
spec, but never one another process has open (its lock is held) and never one that holds
solutions unless ``--discard-solutions`` says they go too.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import queue
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import torch

from jacobian_store.architectures import create_model, parameter_count
from jacobian_store.arguments import NETWORK_DTYPES, add_network_arguments
from jacobian_store.functional import initial_parameters, parameter_layout
from jacobian_store.progress import progress_bar
from jacobian_store.provenance import library_versions
from jacobian_store.sizes import available_memory, format_bytes, parse_bytes
from jacobian_store.store import (FORMAT_VERSION, JacobianStore, StoreError, dataset_spec_json, exclusive_lock,
                                  open_hdf5)

DTYPES = {name: getattr(torch, name) for name in NETWORK_DTYPES}
# HDF5 chunks of about this size: one chunk is the unit of every read and write, and 32 MiB keeps
# the chunk cache small while making each I/O call large.
HDF5_CHUNK_BYTES = 32 * 2**20
# A single HDF5 chunk must stay below 4 GiB, and a chunk holds at least one sample's L rows; when
# those are longer than this, the columns are split into chunks of this size.
MAX_SAMPLE_CHUNK_BYTES = 256 * 2**20
# A chunk's computation holds the Jacobian chunk plus the layers' Δ (L per sample), inputs and
# patches; on LeNet and AlexNet the peak stays below three times the chunk itself.
JACOBIAN_WORKSPACE_FACTOR = 3
# A build chunk of about this size: vmap(jacrev)'s throughput is flat from ~16 LeNet samples on
# (measured 4,100-4,300 rows/s at ×1 for 16-256 samples), and small chunks let the writer thread
# overlap the HDF5 write of one chunk with the computation of the next.
TARGET_CHUNK_BYTES = 128 * 2**20


@dataclass(frozen=True)
class BuildSpec:
    """What a store contains; two builds with equal specs and datasets give identical J."""
    arch: str
    width: float
    seed: int = 0
    dtype: str = "float32"
    test_jacobian: bool = False
    chunk_samples: int | None = None  # None: chosen from the memory budget


@dataclass
class BuildReport:
    path: Path
    shape: tuple[int, int]
    itemsize: int
    seconds: float
    rows_built: int
    device: str

    @property
    def bytes(self) -> int:
        return self.shape[0] * self.shape[1] * self.itemsize

    @property
    def rows_per_second(self) -> float:
        return self.rows_built / self.seconds if self.seconds > 0 else float("nan")

    @property
    def megabytes_per_second(self) -> float:
        return self.rows_per_second * self.shape[1] * self.itemsize / 1e6

    def __str__(self):
        return (f"{self.path}: J {self.shape[0]:,} × {self.shape[1]:,} ({self.bytes / 1e9:.3g} GB); built "
                f"{self.rows_built:,} rows in {self.seconds:.1f} s on {self.device} "
                f"({self.rows_per_second:,.0f} rows/s, {self.megabytes_per_second:,.0f} MB/s)")


def check_model_fits(arch: str, width: float, dataset, bytes_per_parameter: int, what: str, device,
                     fix: str) -> int:
    """p of the network, from its layer sizes; refuse (ValueError, with the figures) when ``what``,
    which holds ``bytes_per_parameter`` bytes per weight, exceeds the memory free on ``device``.
    Called before any model is built, so an impossible width is refused without allocating it."""
    p = parameter_count(arch, width, in_channels=dataset.in_channels, n_outputs=dataset.n_outputs,
                        image_size=dataset.image_size)
    needed, free = p * bytes_per_parameter, available_memory(device)
    if free is not None and needed > free:
        raise ValueError(f"{arch} ×{width:g} has {p:,} parameters, so {what} needs about {format_bytes(needed)} but "
                         f"{format_bytes(free)} of memory is free; {fix}")
    return p


def default_memory_budget(device: torch.device) -> int:
    """Bytes the build may use for one chunk's workspace: half the free GPU memory, or 2 GiB on the CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 2
    return 2 * 2**30


def choose_chunking(n_outputs: int, n_params: int, itemsize: int, memory_budget: int,
                    chunk_samples: int | None) -> tuple[int, int, int]:
    """(build chunk samples, HDF5 chunk rows, HDF5 chunk columns).

    The build chunk is a whole number of HDF5 chunks, so every write covers whole HDF5 chunks.
    """
    row_bytes = n_params * itemsize
    columns = min(n_params, max(1, MAX_SAMPLE_CHUNK_BYTES // (n_outputs * itemsize)))
    sample_bytes = n_outputs * columns * itemsize
    hdf5_samples = max(1, HDF5_CHUNK_BYTES // sample_bytes)
    if chunk_samples is None:
        affordable = memory_budget // JACOBIAN_WORKSPACE_FACTOR
        chunk_samples = max(1, min(affordable, TARGET_CHUNK_BYTES) // (n_outputs * row_bytes))
        chunk_samples = max(hdf5_samples, chunk_samples // hdf5_samples * hdf5_samples)
    hdf5_samples = math.gcd(hdf5_samples, chunk_samples)
    return chunk_samples, hdf5_samples * n_outputs, columns


def store_identity(spec: BuildSpec, dataset, n_params: int, chunk_samples: int) -> dict:
    """The attributes that determine a store's contents; a resume must match all of them."""
    return {"format_version": FORMAT_VERSION, "arch": spec.arch, "width": float(spec.width), "seed": int(spec.seed),
            "dtype": spec.dtype, "test_jacobian": bool(spec.test_jacobian), "chunk_samples": int(chunk_samples),
            "dataset": dataset_spec_json(dataset.spec), "n_params": int(n_params),
            "n_outputs": int(dataset.n_outputs), "n_samples": int(dataset.train.x.shape[0]),
            "in_channels": int(dataset.in_channels), "image_size": int(dataset.image_size)}


def _check_identity(path: Path, file: h5py.File, identity: dict) -> None:
    if "format_version" not in file.attrs:
        raise StoreError(f"{path} exists but is not a complete lincnn store (its creation was interrupted, or it is "
                         f"another file); pass --overwrite to replace it or choose another --out")
    for key, wanted in identity.items():
        found = file.attrs.get(key)
        if isinstance(found, np.generic):
            found = found.item()
        if found != wanted:
            if key == "dataset" and isinstance(found, str):  # name the fields of the spec that differ
                key, found, wanted = _first_difference("dataset", json.loads(found), json.loads(wanted))
            raise StoreError(f"{path} was built with a different {key}: stored {found!r}, this command asks for "
                             f"{wanted!r}; use the same option, choose another --out, or pass --overwrite to "
                             f"replace the store")


def _first_difference(prefix: str, stored: dict, wanted: dict) -> tuple[str, object, object]:
    """(``prefix.field``, stored value, wanted value) of the first field two specs disagree on."""
    for field in sorted(set(stored) | set(wanted)):
        if stored.get(field) != wanted.get(field):
            return f"{prefix}.{field}", stored.get(field), wanted.get(field)
    return prefix, stored, wanted


def _create_jacobian_dataset(group: h5py.Group, n_rows: int, n_params: int, dtype: np.dtype,
                             chunk_rows: int, chunk_columns: int) -> None:
    """/<split>/J with early allocation and no fill (see the module docstring for why)."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_chunk((min(chunk_rows, n_rows), chunk_columns))
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    space = h5py.h5s.create_simple((n_rows, n_params))
    h5py.h5d.create(group.id, b"J", h5py.h5t.py_create(dtype), space, dcpl=dcpl)


@torch.no_grad()
def _forward_outputs(model, x: torch.Tensor, device, dtype, batch: int = 512) -> np.ndarray:
    return torch.cat([model(x[i:i + batch].to(device=device, dtype=dtype)).cpu()
                      for i in range(0, x.shape[0], batch)]).numpy()


def _create_store(path: Path, identity: dict, model, dataset, spec: BuildSpec, device, chunk_rows: int,
                  chunk_columns: int, command: str | None, jacobian_in_file: bool = True) -> None:
    """Write everything but J's rows; J itself is allocated here, or left to the shards of a torchrun build."""
    dtype = DTYPES[spec.dtype]
    np_dtype = np.dtype(spec.dtype)
    layout = parameter_layout(model)
    n_chunks = {split: math.ceil(getattr(dataset, split).x.shape[0] / identity["chunk_samples"]) for split in ("train", "test")}
    partial = partial_path(path)
    partial.unlink(missing_ok=True)  # left by a creation that was killed: it is rewritten whole
    with h5py.File(partial, "w") as f:
        for split in ("train", "test"):
            data = getattr(dataset, split)
            group = f.create_group(split)
            group.create_dataset("f0", data=_forward_outputs(model, data.x, device, dtype))
            group.create_dataset("y", data=data.targets.numpy().astype(np_dtype))
            group.create_dataset("labels", data=data.labels.numpy())
            group.create_dataset("indices", data=np.asarray(data.indices, dtype=np.int64))
            if split == "train" or spec.test_jacobian:
                if jacobian_in_file:
                    _create_jacobian_dataset(group, data.x.shape[0] * dataset.n_outputs, identity["n_params"], np_dtype,
                                             chunk_rows, chunk_columns)
                group.create_dataset("done", data=np.zeros(n_chunks[split], dtype=bool))
        f.create_dataset("w0", data=torch.cat([p.detach().reshape(-1).cpu() for p in model.parameters()]).numpy())
        params = f.create_group("params")
        params.create_dataset("names", data=[s.name for s in layout], dtype=h5py.string_dtype())
        params.create_dataset("offsets", data=[s.offset for s in layout], dtype=np.int64)
        params.create_dataset("sizes", data=[s.size for s in layout], dtype=np.int64)
        params.attrs["shapes"] = json.dumps([list(s.shape) for s in layout])
        f.attrs["versions"] = json.dumps(library_versions())
        f.attrs["device"] = str(device)
        f.attrs["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        f.attrs["command"] = command or ""
        for key, value in identity.items():
            f.attrs[key] = value
    _fsync(partial)
    os.replace(partial, path)  # the store appears complete, or not at all


def partial_path(out: Path) -> Path:
    """Where a store is created before it is renamed to ``out``."""
    return out.with_name(out.name + ".partial")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _ChunkWriter:
    """Writes finished chunks from a background thread so HDF5 I/O overlaps the next computation."""

    def __init__(self, file: h5py.File, split: str, on_chunk_done: Callable[[int], None] | None):
        self._file, self._split, self._on_chunk_done = file, split, on_chunk_done
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        dataset, done = self._file[f"{self._split}/J"], self._file[f"{self._split}/done"]
        while (item := self._queue.get()) is not None:
            if self._error is not None:
                continue
            chunk, first_row, rows, copied = item
            try:
                if copied is not None:  # a GPU chunk: wait for its device-to-host copy to land
                    copied.synchronize()
                rows = rows.numpy()
                dataset[first_row:first_row + rows.shape[0]] = rows
                self._file.flush()  # the rows reach the file before the mark that says they did
                done[chunk] = True
                self._file.flush()
                if self._on_chunk_done is not None:
                    self._on_chunk_done(chunk)
            except BaseException as error:  # re-raised in the building thread
                self._error = error

    def put(self, chunk: int, first_row: int, rows: torch.Tensor):
        """Queue ``rows`` (on any device) for writing at ``first_row``; returns once the copy is under way.

        From a GPU the rows go into pinned host memory by an asynchronous copy, so the next chunk's
        computation is queued on the device while this one crosses to the host and is written.
        """
        if self._error is not None:
            raise self._error
        copied = None
        if rows.device.type == "cuda":
            host = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=True)
            host.copy_(rows, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(torch.cuda.current_stream(rows.device))  # the stream that queued the copy, on its GPU
            rows = host
        self._queue.put((chunk, first_row, rows, copied))

    def close(self):
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error


def build_store(out: str | Path, spec: BuildSpec, dataset, *, device: str = "auto", overwrite: bool = False,
                discard_solutions: bool = False, memory_budget: int | None = None, progress: bool = True,
                command: str | None = None, on_chunk_done: Callable[[int], None] | None = None) -> BuildReport:
    """Build (or resume) the store ``out`` for ``spec`` on ``dataset`` and return a report.

    ``overwrite`` replaces a store at ``out`` built from another spec (or a file that is not a
    store); one that holds solutions only with ``discard_solutions`` too, and never one that
    another process has open.

    Under ``torchrun`` (WORLD_SIZE > 1) each rank builds its share of the chunks into its own shard
    file and rank 0 joins them into ``out`` (see :mod:`jacobian_store.shards`); otherwise J is
    written into ``out`` itself. ``on_chunk_done(chunk)`` is called after each chunk is durably
    written and marked done.
    """
    from jacobian_store.shards import Ranks

    out = Path(out)
    if spec.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {spec.dtype!r}")
    if spec.chunk_samples is not None and spec.chunk_samples <= 0:
        raise ValueError(f"chunk_samples must be positive, got {spec.chunk_samples}")
    if out.is_dir():
        raise StoreError(f"--out {out} is a directory; give the store's file name, e.g. {out / 'store.h5'}")
    ranks = Ranks.from_environment()
    build_device = ranks.device(device)
    # The network's weights, plus one sample's L rows of J in the chunk workspace: the least a build holds.
    itemsize = np.dtype(spec.dtype).itemsize
    check_model_fits(spec.arch, spec.width, dataset, itemsize * (1 + JACOBIAN_WORKSPACE_FACTOR * dataset.n_outputs),
                     "building one sample's Jacobian rows", build_device.torch, "lower --width")
    with build_device.exact_float32():
        return _build_store(out, spec, dataset, ranks, build_device.torch, overwrite, discard_solutions,
                            memory_budget, progress, command, on_chunk_done)


def _remove_replaced_store(out: Path, discard_solutions: bool) -> None:
    """Delete the store ``out`` that --overwrite replaces, unless another process has it open or it holds
    solutions that ``discard_solutions`` does not give up."""
    with exclusive_lock(out):
        try:
            with h5py.File(out, "r", locking=False) as f:
                solutions = sorted(f["solutions"]) if "solutions" in f else []
        except OSError:
            solutions = []  # not an HDF5 file: --overwrite was asked for exactly this
        if solutions and not discard_solutions:
            shown = ", ".join(solutions[:5]) + (", …" if len(solutions) > 5 else "")
            raise StoreError(f"{out} holds {len(solutions)} solution(s) ({shown}) that --overwrite would delete; "
                             f"pass --discard-solutions as well to delete them, or choose another --out")
        out.unlink()


def _build_store(out: Path, spec: BuildSpec, dataset, ranks, torch_device: torch.device, overwrite: bool,
                 discard_solutions: bool, memory_budget: int | None, progress: bool, command: str | None,
                 on_chunk_done) -> BuildReport:
    from jacobian_store.shards import assemble_virtual_jacobian, build_shard, is_sharded, remove_shards

    dtype = DTYPES[spec.dtype]
    model = create_model(spec.arch, spec.width, in_channels=dataset.in_channels, n_outputs=dataset.n_outputs,
                         image_size=dataset.image_size, seed=spec.seed).to(device=torch_device, dtype=dtype)
    n_params = sum(p.numel() for p in model.parameters())
    itemsize = np.dtype(spec.dtype).itemsize
    budget = memory_budget if memory_budget is not None else default_memory_budget(torch_device)
    # Every rank must cut the same chunks: rank 0 decides (keeping an existing store's chunking).
    chunk_samples = ranks.from_rank0(lambda: choose_chunking(
        dataset.n_outputs, n_params, itemsize, budget, spec.chunk_samples or _stored_chunk_samples(out, overwrite))[0])
    chunk_samples, chunk_rows, chunk_columns = choose_chunking(dataset.n_outputs, n_params, itemsize, budget,
                                                               chunk_samples)
    identity = store_identity(spec, dataset, n_params, chunk_samples)
    splits = ["train", "test"] if spec.test_jacobian else ["train"]
    n_rows = {s: getattr(dataset, s).x.shape[0] * dataset.n_outputs for s in splits}

    def prepare() -> bool:
        """Create or check ``out`` (rank 0 only); True when J lives in shard files."""
        if out.exists() and not overwrite:
            try:
                existing = open_hdf5(out, "r")
            except OSError:
                raise StoreError(f"{out} exists and is not an HDF5 file, so not a lincnn store; choose another --out "
                                 f"(or pass --overwrite to replace it)") from None
            with existing:
                _check_identity(out, existing, identity)
                sharded = is_sharded(existing)
            if ranks.world_size > 1 and not sharded:
                raise StoreError(f"{out} was started by a single process, which wrote J into the file itself; resume "
                                 f"it without torchrun (or pass --overwrite to rebuild it sharded)")
            return sharded
        needed = sum(n_rows.values()) * n_params * itemsize
        out.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(out.parent).free + (out.stat().st_size if out.exists() else 0)
        if needed > 0.98 * free:
            raise StoreError(f"the store needs about {needed / 1e9:.3g} GB but {out.parent} has {free / 1e9:.3g} GB "
                             f"free; free space, choose another --out, or reduce --n-train/--width")
        if out.exists():
            _remove_replaced_store(out, discard_solutions)
        sharded = ranks.world_size > 1
        remove_shards(out)  # left from an earlier build at this path: they belong to another store
        _create_store(out, identity, model, dataset, spec, torch_device, chunk_rows, chunk_columns, command,
                      jacobian_in_file=not sharded)
        return sharded

    try:
        sharded = ranks.from_rank0(prepare)
        params = initial_parameters(model)
        started, rows_built = time.perf_counter(), 0
        for split in splits:
            x = getattr(dataset, split).x
            n_chunks = math.ceil(x.shape[0] / chunk_samples)

            def build(f: h5py.File, chunks: np.ndarray, split=split, x=x) -> int:
                return _build_split(f, split, x, chunks, model, params, chunk_samples, dataset.n_outputs,
                                    torch_device, dtype, progress and ranks.rank == 0, on_chunk_done)

            if sharded:
                rows_built += build_shard(out, split, n_rows[split], n_chunks, identity, ranks, chunk_rows,
                                          chunk_columns, build)
                ranks.from_rank0(lambda: assemble_virtual_jacobian(out, split, n_chunks, chunk_samples,
                                                                   dataset.n_outputs))
            else:
                with open_hdf5(out, "r+") as f:
                    done = f[f"{split}/done"][()]
                    if done.any() and progress:
                        print(f"resuming: {int(done.sum())} of {done.size} {split} chunks already done", flush=True)
                    rows_built += build(f, np.flatnonzero(~done))
        seconds = time.perf_counter() - started
    finally:
        ranks.close()
    return BuildReport(out, (n_rows["train"], n_params), itemsize, seconds, rows_built, str(torch_device))


def _stored_chunk_samples(out: Path, overwrite: bool) -> int | None:
    """The chunking a store was created with: a resume keeps it, whatever memory this machine has now."""
    if overwrite or not out.exists():
        return None
    try:
        with h5py.File(out, "r") as f:
            return int(f.attrs["chunk_samples"]) if "chunk_samples" in f.attrs else None
    except OSError:
        return None  # not an HDF5 file: refused with a clear message when the store is prepared


def _build_split(f: h5py.File, split: str, x: torch.Tensor, chunks: np.ndarray, model, params, chunk_samples: int,
                 n_outputs: int, device, dtype, progress: bool, on_chunk_done) -> int:
    """Compute the given chunks of J(x) into ``f``'s /<split>/J and mark them done; returns rows built."""
    from jacobian_store.layer_jacobians import layer_plan, structured_jacobian_rows

    plan = layer_plan(model, x[:1].to(device=device, dtype=dtype))
    n_samples, n_params = x.shape[0], f[f"{split}/J"].shape[1]
    row_bytes = n_params * f[f"{split}/J"].dtype.itemsize
    rows_todo = sum(min(chunk_samples, n_samples - c * chunk_samples) for c in chunks) * n_outputs
    bar = progress_bar(total=rows_todo, unit="row", unit_scale=True, desc=f"J[{split}]", enabled=progress)
    writer = _ChunkWriter(f, split, on_chunk_done)
    started = time.perf_counter()
    try:
        for chunk in chunks:
            lo = int(chunk) * chunk_samples
            hi = min(lo + chunk_samples, n_samples)
            rows = structured_jacobian_rows(model, params, x[lo:hi].to(device=device, dtype=dtype), plan)
            writer.put(int(chunk), lo * n_outputs, rows)
            bar.update(rows.shape[0])
            bar.set_postfix_str(f"{bar.n * row_bytes / 1e9:.2f} GB, "
                                f"{bar.n * row_bytes / 1e6 / max(time.perf_counter() - started, 1e-9):.0f} MB/s")
    finally:
        writer.close()
        bar.close()
    return rows_todo


def _parser() -> argparse.ArgumentParser:
    from jacobian_store.arguments import add_data_arguments

    parser = argparse.ArgumentParser(
        prog="bin/build-jacobian",
        description="Materialize the Jacobian J = ∇_w f(w0, X) of a network at its initialization into one HDF5 "
                    "store, chunk by chunk. Resumable: rerun the same command after an interruption.",
        epilog="Example: bin/build-jacobian --arch lenet --width 5 --dataset mnist --binary 0 --n-train 2000 "
               "--out runs/lenet-w5.h5\nThe store's layout is documented in README.md ('The store format').",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_network_arguments(parser)
    add_data_arguments(parser)
    build = parser.add_argument_group("build")
    build.add_argument("--out", required=True, type=Path, help="the HDF5 store to write (or resume)")
    build.add_argument("--device", default="auto", help="auto (a GPU when present), cpu, cuda or cuda:N")
    build.add_argument("--test-jacobian", action="store_true",
                       help="also store the test set's Jacobian: bin/solve then scores test accuracy from it, with "
                            "NumPy alone (without it: a jvp of the network, which costs torch's import and "
                            "the test images' reload, about 4 s per command)")
    build.add_argument("--chunk-samples", type=int, default=None,
                       help="samples per build chunk (default: as many as --memory-budget allows)")
    build.add_argument("--memory-budget", type=parse_bytes, default=None,
                       help="memory for one chunk's computation, e.g. 2GiB (default: 2 GiB on the CPU, half the "
                            "free memory on a GPU)")
    build.add_argument("--overwrite", action="store_true",
                       help="replace an existing store built from another spec (never one another process has open)")
    build.add_argument("--discard-solutions", action="store_true",
                       help="with --overwrite: also replace a store that holds solutions, deleting them")
    build.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    from jacobian_store.datasets import DatasetError, dataset_from_args

    parser = _parser()
    args = parser.parse_args(argv)
    if args.discard_solutions and not args.overwrite:
        parser.error("--discard-solutions only applies with --overwrite (it names what --overwrite may delete)")
    if args.chunk_samples is not None and args.chunk_samples <= 0:
        parser.error(f"--chunk-samples must be a positive integer, got {args.chunk_samples}")
    try:
        dataset = dataset_from_args(args)
        spec = BuildSpec(arch=args.arch, width=args.width, seed=args.seed, dtype=args.dtype,
                         test_jacobian=args.test_jacobian, chunk_samples=args.chunk_samples)
        command = " ".join(["bin/build-jacobian", *(sys.argv[1:] if argv is None else argv)])
        report = build_store(args.out, spec, dataset, device=args.device, overwrite=args.overwrite,
                             discard_solutions=args.discard_solutions, memory_budget=args.memory_budget,
                             progress=not args.quiet, command=command)
    except (DatasetError, StoreError, ValueError, OSError) as error:
        print(f"bin/build-jacobian: error: {error}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one report for the whole job
        print(report)
        with JacobianStore.open(report.path) as store:
            print(store.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
