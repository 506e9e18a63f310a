"""Sharded Jacobian builds under ``torchrun``: one shard file per rank, joined by an HDF5 virtual dataset.

``torchrun --nproc-per-node N bin/build-jacobian ... --out runs/x.h5`` starts N ranks. Rank 0
writes ``runs/x.h5`` with everything but J (f0, targets, w0, layout, attributes). Each rank r
writes the chunks it is given into its own ``runs/x.shard<r>.h5``, a full-shape /<split>/J with
storage allocated only for the chunks written, plus its own /<split>/done marks. When every rank
is done, rank 0 maps each chunk of the main file's /<split>/J onto the shard that holds it (an
HDF5 virtual dataset, source paths relative to the main file), so every reader and solver sees
the same layout as a single-process store.

A virtual dataset reads a missing source as fill values, silently. So the main file records which
shard holds each chunk (/<split>/chunk_shard, /<split>/shards), the fill value is NaN, and
:func:`verify_shards` (run by the store reader before handing out J) refuses a store whose shard
files are missing or no longer mark their chunks done.

Resuming: the chunks not done in any shard are dealt round-robin to the ranks of the new run,
whatever their number; a rank reopens its own shard file if one is left from an earlier run.
Shard files are opened with ``libver="latest"`` so their metadata is written in an order that
keeps the file readable after a kill.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import torch

from jacobian_store.device import Device, resolve_device
from jacobian_store.errors import StoreError


class Ranks:
    """The ranks of a ``torchrun`` job (or a single process), with the few collectives a build needs."""

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0, owns_group: bool = False):
        self.rank, self.world_size, self.local_rank, self._owns_group = rank, world_size, local_rank, owns_group

    @classmethod
    def from_environment(cls) -> "Ranks":
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return cls()
        import torch.distributed as dist

        owns_group = not dist.is_initialized()
        if owns_group:
            # gloo: the build only exchanges a few small objects and barriers, on CPU or GPU alike.
            dist.init_process_group(backend="gloo")
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), owns_group)

    def device(self, device) -> Device:
        """``device`` ("auto", "cpu", "cuda", "cuda:N") resolved for this rank: one GPU per rank on a
        multi-GPU node, rank r of a node taking GPU local_rank mod count; "cuda:N" is kept as asked."""
        resolved = resolve_device(device)
        if resolved.is_cuda and self.world_size > 1 and str(device).strip().lower() in ("auto", "cuda"):
            return Device("cuda", self.local_rank % torch.cuda.device_count())
        return resolved

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def from_rank0(self, compute: Callable):
        """Run ``compute`` on rank 0 after all ranks arrive; every rank returns its result or raises its error."""
        if self.world_size == 1:
            return compute()
        import torch.distributed as dist

        self.barrier()
        box = [None]
        if self.rank == 0:
            try:
                box[0] = ("ok", compute())
            except Exception as error:  # handed to every rank so none waits forever
                box[0] = ("error", error)
        dist.broadcast_object_list(box, src=0)
        status, value = box[0]
        if status == "error":
            raise value
        return value

    def close(self) -> None:
        if self._owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()
            self._owns_group = False


def shard_path(out: Path, rank: int) -> Path:
    return out.with_name(f"{out.stem}.shard{rank:03d}{out.suffix}")


def existing_shards(out: Path) -> list[Path]:
    pattern = re.compile(re.escape(out.stem) + r"\.shard\d{3,}" + re.escape(out.suffix) + "$")
    return sorted(p for p in out.parent.glob(f"{out.stem}.shard*{out.suffix}") if pattern.match(p.name))


def is_sharded(main: h5py.File) -> bool:
    """True when the store's J lives in shard files (or is still being built into them)."""
    return "J" not in main["train"] or main["train/J"].is_virtual


def remove_shards(out: Path) -> None:
    for path in existing_shards(out):
        path.unlink()


def _shard_done(path: Path, split: str, identity: dict, n_chunks: int) -> np.ndarray:
    with h5py.File(path, "r") as f:
        for key in ("arch", "width", "seed", "dtype", "dataset", "chunk_samples", "n_params"):
            stored = f.attrs.get(key)
            stored = stored.item() if isinstance(stored, np.generic) else stored
            if stored != identity[key]:
                raise StoreError(f"shard {path} belongs to another build (its {key} is {stored!r}, this build's is "
                                 f"{identity[key]!r}); remove it or pass --overwrite")
        if f"{split}/done" not in f:
            return np.zeros(n_chunks, dtype=bool)
        return f[f"{split}/done"][()]


def build_shard(out: Path, split: str, n_rows: int, n_chunks: int, identity: dict, ranks: Ranks, chunk_rows: int,
                chunk_columns: int, build: Callable[[h5py.File, np.ndarray], int]) -> int:
    """Build this rank's share of the chunks no shard holds yet; returns the rows it built."""
    ranks.barrier()  # no shard file is created before every rank has read the existing ones
    done = np.zeros(n_chunks, dtype=bool)
    for path in existing_shards(out):
        done |= _shard_done(path, split, identity, n_chunks)
    todo = np.flatnonzero(~done)
    if done.any() and ranks.rank == 0:
        print(f"resuming: {int(done.sum())} of {n_chunks} {split} chunks already in shards; "
              f"{len(todo)} left for {ranks.world_size} rank(s)", flush=True)
    ranks.barrier()
    mine = todo[ranks.rank::ranks.world_size]
    path = shard_path(out, ranks.rank)
    with h5py.File(path, "a", libver="latest") as f:
        for key, value in identity.items():
            f.attrs[key] = value
        group = f.require_group(split)
        if "J" not in group:
            n_params = identity["n_params"]
            group.create_dataset("J", shape=(n_rows, n_params), dtype=identity["dtype"],
                                 chunks=(min(chunk_rows, n_rows), chunk_columns))
            group.create_dataset("done", data=np.zeros(n_chunks, dtype=bool))
        rows = build(f, mine)
    ranks.barrier()
    return rows


def assemble_virtual_jacobian(out: Path, split: str, n_chunks: int, chunk_samples: int, n_outputs: int) -> None:
    """(Rank 0) map the main file's /<split>/J chunk by chunk onto the shards that hold the chunks."""
    shards = existing_shards(out)
    owner = np.full(n_chunks, -1, dtype=np.int64)
    with h5py.File(out, "r+") as main:
        group = main[split]
        n_rows, n_params, dtype = group["f0"].shape[0] * n_outputs, main["w0"].shape[0], group["y"].dtype
        for index, path in enumerate(shards):
            with h5py.File(path, "r") as f:
                if f"{split}/done" in f:
                    owner[(owner < 0) & f[f"{split}/done"][()]] = index
        layout = h5py.VirtualLayout(shape=(n_rows, n_params), dtype=dtype)
        sources = [h5py.VirtualSource(path.name, f"{split}/J", shape=(n_rows, n_params)) for path in shards]
        chunk_rows = chunk_samples * n_outputs
        # One mapping per run of consecutive chunks held by the same shard.
        run_starts = np.flatnonzero(np.diff(owner, prepend=-2) != 0)
        for first, last in zip(run_starts, np.append(run_starts[1:], n_chunks)):
            if owner[first] >= 0:
                lo, hi = first * chunk_rows, min(last * chunk_rows, n_rows)
                layout[lo:hi] = sources[owner[first]][lo:hi]
        for name in ("J", "done", "shards", "chunk_shard"):
            if name in group:
                del group[name]
        group.create_virtual_dataset("J", layout, fillvalue=np.nan)
        group.create_dataset("done", data=owner >= 0)
        group.create_dataset("shards", data=[p.name for p in shards], dtype=h5py.string_dtype())
        group.create_dataset("chunk_shard", data=owner)


def verify_shards(main: h5py.File, split: str) -> None:
    """Refuse a sharded J whose shard files are missing or no longer hold the chunks mapped to them."""
    group = main[split]
    directory = Path(main.filename).parent
    owner = group["chunk_shard"][()]
    for index, name in enumerate(group["shards"].asstr()[()]):
        mapped = owner == index
        if not mapped.any():
            continue
        path = directory / name
        if not path.exists():
            raise StoreError(f"{main.filename}: shard {path} is missing, so {int(mapped.sum())} chunks of J would read "
                             f"as NaN; restore it, or delete the store's shard record by rerunning bin/build-jacobian "
                             f"with the same options to rebuild the missing chunks")
        with h5py.File(path, "r") as f:
            if f"{split}/done" not in f or not np.all(f[f"{split}/done"][()][mapped]):
                raise StoreError(f"{main.filename}: shard {path} no longer holds all the chunks mapped to it; rerun "
                                 f"the same bin/build-jacobian command to rebuild them")
