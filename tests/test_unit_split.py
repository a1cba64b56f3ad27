"""Batch-1 unidirectional layers split their hidden units between two threads
that meet at a barrier every step (_parallel.unit_halves / run_pair,
_forward.recur_units): against the reference, one thread, concurrency and
failure of one part."""
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import fastrnn
from fastrnn import _parallel
from fastrnn._kernels import forward as _forward
from reference import layer_forward
from test_forward import make_layer

SPLIT_KINDS = ["rnn_tanh", "rnn_relu", "gru", "lstm"]


@pytest.fixture
def count_pairs(monkeypatch):
    calls = []
    real = _parallel.run_pair

    def counting(fn):
        calls.append(fn)
        return real(fn)

    monkeypatch.setattr(_parallel, "run_pair", counting)
    monkeypatch.setattr(_parallel, "_threads", 2)
    return calls


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("kind", SPLIT_KINDS)
@pytest.mark.parametrize("H,num_layers,unbatched", [(187, 2, True), (260, 1, True),
                                                    (300, 1, False)])
def test_split_layer_matches_reference(kind, dtype, H, num_layers, unbatched, count_pairs,
                                       close):
    rng = np.random.default_rng(H)
    layer = make_layer(kind, 40, H, num_layers=num_layers, dtype=dtype, seed=1)
    T = 60
    x = rng.standard_normal((T, 1, 40)).astype(dtype)
    h0 = rng.standard_normal((num_layers, 1, H)).astype(dtype)
    c0 = rng.standard_normal((num_layers, 1, H)).astype(dtype)
    ref_out, ref_h, ref_c = layer_forward(kind, layer.state_dict(), x, h0,
                                          c0 if kind == "lstm" else None, num_layers)
    hx = (h0, c0) if kind == "lstm" else h0
    if unbatched:
        hx = tuple(a[:, 0] for a in hx) if kind == "lstm" else hx[:, 0]
        out, state = layer(x[:, 0], hx)
        ref_out, ref_h = ref_out[:, 0], ref_h[:, 0]
        ref_c = None if ref_c is None else ref_c[:, 0]
    else:
        out, state = layer(x, hx)
    assert len(count_pairs) == num_layers          # the split really ran
    close(out, ref_out, dtype)
    close(state[0] if kind == "lstm" else state, ref_h, dtype)
    if kind == "lstm":
        close(state[1], ref_c, dtype)


@pytest.mark.parametrize("kind", SPLIT_KINDS)
def test_split_is_close_to_one_thread(kind, count_pairs, monkeypatch):
    """The parts' products run on packed rows (and gemv blocks differ), so
    the last bits may differ from one thread's; the values may not."""
    layer = make_layer(kind, 24, 200, dtype="float64", seed=2)
    x = np.random.default_rng(0).standard_normal((60, 1, 24))
    split = layer(x)
    assert count_pairs
    monkeypatch.setattr(_parallel, "_threads", 1)
    single = layer(x)
    for a, b in zip(_flat(split), _flat(single)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)


def _flat(result):
    out, state = result
    return (out, *state) if isinstance(state, tuple) else (out, state)


def test_split_calls_from_many_threads(count_pairs):
    """Eight threads share the one worker: a part may wait for its partner to
    be scheduled, never deadlock, and every result is the one-call result."""
    layer = fastrnn.GRU(32, 128, seed=3)
    inputs = [np.random.default_rng(i).standard_normal((50, 1, 32)).astype(np.float32)
              for i in range(8)]
    expected = [layer(x) for x in inputs]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(layer, inputs * 3))
    for i, result in enumerate(got):
        for a, b in zip(_flat(result), _flat(expected[i % 8])):
            np.testing.assert_array_equal(a, b)


def test_a_failing_part_releases_the_other():
    """If one part fails before its kernel starts, the other leaves its
    barrier waits and the error reaches the caller (no hang)."""
    T, H = 20, 64
    gx = np.zeros((T, 4 * H), np.float32)
    w_hh = np.zeros((4 * H, H), np.float32)

    def fn(part, sync):
        if part == 1:
            raise RuntimeError("part 1 failed")
        _forward.recur_units(cell=_forward.CELL_LSTM, T=T, lo=0, hi=32, w_hh=w_hh,
                             w_hh_t=np.ascontiguousarray(w_hh.T), bias_h=None,
                             h=np.zeros((1, 1, H), np.float32), c=np.zeros((1, 1, H), np.float32),
                             gx=gx, gh=None, out=np.zeros((T, H), np.float32),
                             acts=np.zeros((1, 4 * H), np.float32), sync=sync, part=part)

    with pytest.raises(RuntimeError, match="part 1 failed"):
        _parallel.run_pair(fn)


def test_no_split_where_it_does_not_pay(count_pairs):
    fastrnn.LSTM(8, 64, seed=0)(np.zeros((500, 1, 8), np.float32))      # too small a step
    fastrnn.GRU(8, 128, seed=0)(np.zeros((3, 1, 8), np.float32))        # too little work
    fastrnn.GRU(8, 128, seed=0)(np.zeros((50, 2, 8), np.float32))       # batch 2
    fastrnn.GRU(8, 128, bidirectional=True, seed=0)(np.zeros((50, 1, 8), np.float32))
    fastrnn.GRU(8, 128, reset_after=False, seed=0)(np.zeros((50, 1, 8), np.float32))
    fastrnn.GRU(8, 128, seed=0)(np.zeros((50, 1, 8), np.float32), lengths=[40])
    fastrnn.GRU(8, 128, seed=0)(np.zeros((50, 1, 8), np.float32))       # the control: splits
    assert len(count_pairs) == 1
