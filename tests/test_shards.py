"""torchrun-sharded builds: 2 CPU ranks (gloo) give the same J as one process (to float32 rounding)."""
import os
import socket
import subprocess
import sys

import h5py
import numpy as np
import pytest

from jacobian_store.build import BuildSpec, build_store
from jacobian_store.shards import existing_shards
from jacobian_store.store import JacobianStore, StoreError
from jacobian_store.datasets import load_dataset

from conftest import REPO, assert_equal_to_float32_rounding

OPTIONS = ["--width", "0.5", "--dataset", "digits", "--n-train", "22", "--n-test", "6", "--chunk-samples", "3",
           "--test-jacobian", "--quiet"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(n_ranks: int, out) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n_ranks),
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
               str(REPO / "bin" / "build-jacobian"), *OPTIONS, "--out", str(out)]
    return subprocess.run(command, cwd=out.parent, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def single_store(tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "one.h5"
    dataset = load_dataset("digits", n_train=22, n_test=6)
    build_store(out, BuildSpec("lenet", 0.5, chunk_samples=3, test_jacobian=True), dataset, progress=False)
    return out


def assert_same_jacobians(a_path, b_path):
    """w0 is seeded, so equal bit for bit; J and f0 are float32 computations made by processes
    with other thread counts, so equal to float32 rounding (conftest.FLOAT32_BUILD_ATOL)."""
    with h5py.File(a_path, "r") as a, h5py.File(b_path, "r") as b:
        assert a["w0"][()].tobytes() == b["w0"][()].tobytes()
        for name in ("train/J", "test/J", "train/f0"):
            assert_equal_to_float32_rounding(a[name][()], b[name][()], name)


def test_two_ranks_equal_one_process_and_resume_with_another_rank_count(tmp_path, single_store):
    out = tmp_path / "sharded.h5"
    result = torchrun(2, out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("complete") == 1  # one report, from rank 0
    shards = existing_shards(out)
    assert [p.name for p in shards] == ["sharded.shard000.h5", "sharded.shard001.h5"]
    with h5py.File(out, "r") as f:
        assert f["train/J"].is_virtual
        assert set(f["train/chunk_shard"][()]) == {0, 1}  # both ranks did part of the work
    assert_same_jacobians(out, single_store)
    with JacobianStore.open(out) as store:
        assert store.train_J.shape == (22 * 10, store.n_params)

    # A lost shard is refused, never read as fill values ...
    shards[1].unlink()
    with JacobianStore.open(out) as store, pytest.raises(StoreError, match="shard .*shard001.h5 is missing"):
        store.train_J
    # ... and a rerun with a single process rebuilds exactly its chunks.
    dataset = load_dataset("digits", n_train=22, n_test=6)
    finished = []
    build_store(out, BuildSpec("lenet", 0.5, chunk_samples=3, test_jacobian=True), dataset, progress=False,
                on_chunk_done=finished.append)
    with h5py.File(out, "r") as f:
        rebuilt = np.flatnonzero(f["train/chunk_shard"][()] == 0)
    assert len(finished) > 0 and len(finished) < 8 + 2  # only the lost chunks (train and test)
    assert len(rebuilt) == 8  # all train chunks now in the shard this process wrote to
    assert_same_jacobians(out, single_store)


def test_single_process_store_cannot_be_resumed_by_ranks(tmp_path, single_store):
    out = tmp_path / "one.h5"
    out.write_bytes(single_store.read_bytes())
    result = torchrun(2, out)
    assert result.returncode != 0
    assert "started by a single process" in result.stderr
    assert out.read_bytes() == single_store.read_bytes()
