"""Regression tests of the hardening work: byte order on the fast paths,
consistent parameters under concurrent updates, streams mixing frames and
chunks, fork safety of the library's locks, interruptible long calls."""
import numpy as np
import pytest

import fastrnn
from fastrnn import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell


def swapped(a):
    """The same values in the other byte order ('>f4' on little-endian)."""
    a = np.asarray(a)
    return a.astype(a.dtype.newbyteorder())


# The call with swapped input converts it and may take the general path, whose
# products sum in another order than the fast path's: equal to rounding.
RTOL = {np.dtype("float32"): 2e-6, np.dtype("float64"): 1e-13}


def flat(res):
    if not isinstance(res, tuple):
        return [res]
    out = []
    for r in res:
        out += flat(r)
    return out


@pytest.mark.parametrize("cls", [RNNCell, GRUCell, LSTMCell])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_cell_fast_path_reads_the_other_byte_order(cls, dtype):
    cell = cls(5, 7, dtype=dtype, seed=0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(5).astype(dtype)
    h = rng.standard_normal(7).astype(dtype)
    state = (h, np.tanh(h)) if cls is LSTMCell else h
    other_state = tuple(swapped(s) for s in state) if cls is LSTMCell else swapped(state)
    expected = flat(cell(x, state))
    got = flat(cell(swapped(x), other_state))
    for e, g in zip(expected, got):
        assert g.dtype == np.dtype(dtype) and g.dtype.isnative
        np.testing.assert_allclose(g, e, rtol=RTOL[g.dtype], atol=RTOL[g.dtype])


@pytest.mark.parametrize("cls", [RNN, GRU, LSTM])
@pytest.mark.parametrize("batched", [False, True])
def test_layer_small_call_reads_the_other_byte_order(cls, batched):
    layer = cls(4, 6, num_layers=2, seed=1)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 3, 4) if batched else (5, 4)).astype(np.float32)
    h = rng.standard_normal((2, 3, 6) if batched else (2, 6)).astype(np.float32)
    state = (h, np.tanh(h)) if cls is LSTM else h
    other_state = tuple(swapped(s) for s in state) if cls is LSTM else swapped(state)
    expected = flat(layer(x, state))
    got = flat(layer(swapped(x), other_state))
    for e, g in zip(expected, got):
        assert g.dtype.isnative
        np.testing.assert_allclose(g, e, rtol=RTOL[g.dtype], atol=RTOL[g.dtype])


def test_sequential_and_stream_read_the_other_byte_order():
    model = fastrnn.Sequential([fastrnn.GRU(3, 5, batch_first=True, seed=0),
                                fastrnn.Linear(5, 2, seed=1)])
    x = np.random.default_rng(2).standard_normal((2, 4, 3)).astype(np.float32)
    tol = RTOL[np.dtype("float32")]
    np.testing.assert_allclose(model.predict(swapped(x)), model.predict(x), rtol=tol, atol=tol)
    native, other = fastrnn.Stream(model), fastrnn.Stream(model)
    for t in range(4):
        np.testing.assert_allclose(other.step(swapped(x[0, t])), native.step(x[0, t]),
                                   rtol=tol, atol=tol)
