"""Properties of the shared mini-batch order and the row operators, for arbitrary sizes (hypothesis)."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jacobian_store.build import choose_chunking
from solvers import ArrayRowOperator
from solvers.minibatches import epoch_permutation, minibatches, step_learning_rate


@given(n=st.integers(1, 500), batch=st.integers(1, 64), seed=st.integers(0, 2**31), epoch=st.integers(0, 50))
def test_an_epoch_visits_every_sample_once_in_full_batches(n, batch, seed, epoch):
    batches = list(minibatches(n, batch, seed, epoch))
    assert np.array_equal(np.sort(np.concatenate(batches)), np.arange(n))
    assert all(len(b) == batch for b in batches[:-1]) and 1 <= len(batches[-1]) <= batch
    # the order is a function of (seed, epoch) only: the network, the linearization and the sgd
    # solver all see these batches
    assert np.array_equal(np.concatenate(batches), epoch_permutation(n, seed, epoch))


def test_epochs_and_seeds_differ():
    assert not np.array_equal(epoch_permutation(100, 0, 0), epoch_permutation(100, 0, 1))
    assert not np.array_equal(epoch_permutation(100, 0, 0), epoch_permutation(100, 1, 0))


@given(lr=st.floats(1e-6, 10), epoch=st.integers(0, 300), step=st.integers(1, 100))
def test_step_decay(lr, epoch, step):
    assert step_learning_rate(lr, epoch, step) == pytest.approx(lr * 0.1 ** (epoch // step))
    assert step_learning_rate(lr, epoch, None) == lr == step_learning_rate(lr, epoch, 0)


def test_bad_sizes():
    with pytest.raises(ValueError, match="n_samples must be positive"):
        epoch_permutation(0, 0, 0)
    with pytest.raises(ValueError, match="batch_size must be positive"):
        next(minibatches(10, 0, 0, 0))


@settings(max_examples=30, deadline=None)
@given(n_samples=st.integers(1, 12), n_outputs=st.integers(1, 4), p=st.integers(1, 9), block_rows=st.integers(1, 7),
       seed=st.integers(0, 1000))
def test_row_operator_products_equal_dense(n_samples, n_outputs, p, block_rows, seed):
    rng = np.random.default_rng(seed)
    J = rng.standard_normal((n_samples * n_outputs, p))
    op = ArrayRowOperator(J, n_outputs=n_outputs, block_rows=block_rows)
    u, v = rng.standard_normal(p), rng.standard_normal(J.shape[0])
    np.testing.assert_allclose(op.matvec(u), J @ u, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(op.rmatvec(v), J.T @ v, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(op.gram(panel_bytes=8 * p), J @ J.T, rtol=1e-12, atol=1e-12)
    rows = rng.permutation(J.shape[0])[: max(1, J.shape[0] // 2)]
    np.testing.assert_array_equal(op.take_rows(rows), J[rows])


@given(n_outputs=st.integers(1, 20), n_params=st.integers(1, 10**9), budget=st.integers(2**20, 2**36),
       chunk=st.one_of(st.none(), st.integers(1, 10**4)))
def test_build_chunks_cover_whole_hdf5_chunks(n_outputs, n_params, budget, chunk):
    chunk_samples, chunk_rows, columns = choose_chunking(n_outputs, n_params, 4, budget, chunk)
    assert chunk_samples >= 1 and (chunk_samples * n_outputs) % chunk_rows == 0
    assert chunk is None or chunk_samples == chunk
    assert 1 <= columns <= n_params and chunk_rows * columns * 4 < 2**32  # HDF5's limit on one chunk
