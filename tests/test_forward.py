"""Layers and cells against the NumPy reference (tests/reference.py)."""
import numpy as np
import pytest

import fastrnn
from fastrnn import _plan, _validation
from fastrnn._kernels import forward as _forward
from reference import cell_forward, layer_forward

KINDS = ["rnn_tanh", "rnn_relu", "gru", "gru_reset_before", "lstm"]


def make_layer(kind, D, H, **kw):
    if kind.startswith("rnn"):
        return fastrnn.RNN(D, H, nonlinearity=kind[4:], **kw)
    if kind == "gru_reset_before":
        return fastrnn.GRU(D, H, reset_after=False, **kw)
    return {"gru": fastrnn.GRU, "lstm": fastrnn.LSTM}[kind](D, H, **kw)


def make_cell(kind, D, H, **kw):
    if kind.startswith("rnn"):
        return fastrnn.RNNCell(D, H, nonlinearity=kind[4:], **kw)
    if kind == "gru_reset_before":
        return fastrnn.GRUCell(D, H, reset_after=False, **kw)
    return {"gru": fastrnn.GRUCell, "lstm": fastrnn.LSTMCell}[kind](D, H, **kw)


def check_layer(kind, dtype, T, B, D, H, num_layers=1, bidirectional=False, batch_first=False,
                bias=True, use_lengths=False, use_h0=True, unbatched=False, seed=0, close=None):
    rng = np.random.default_rng(seed)
    layer = make_layer(kind, D, H, num_layers=num_layers, bidirectional=bidirectional,
                       batch_first=batch_first, bias=bias, dtype=dtype, seed=seed)
    dirs = 2 if bidirectional else 1
    x = rng.standard_normal((T, B, D))
    h0 = rng.standard_normal((num_layers * dirs, B, H)) if use_h0 else None
    c0 = rng.standard_normal((num_layers * dirs, B, H)) if use_h0 and kind == "lstm" else None
    lengths = rng.integers(1, T + 1, size=B) if use_lengths else None
    # the reference sees exactly the values the layer sees
    x = x.astype(dtype)
    zeros = np.zeros((num_layers * dirs, B, H))
    ref_h0 = zeros if h0 is None else h0.astype(dtype)
    ref_c0 = None if kind != "lstm" else (zeros if c0 is None else c0.astype(dtype))
    ref_out, ref_h, ref_c = layer_forward(kind, layer.state_dict(), x, ref_h0, ref_c0,
                                          num_layers, bidirectional, lengths)

    hx = None if h0 is None else ((h0, c0) if kind == "lstm" else h0)
    if unbatched:
        assert B == 1 and not use_lengths
        hx = None if hx is None else (tuple(a[:, 0] for a in hx) if kind == "lstm" else hx[:, 0])
        result = layer(x[:, 0], hx)
        ref_out, ref_h = ref_out[:, 0], ref_h[:, 0]
        ref_c = None if ref_c is None else ref_c[:, 0]
    else:
        xin = x.transpose(1, 0, 2) if batch_first else x
        result = layer(xin, hx, lengths=lengths)
        if batch_first:
            ref_out = ref_out.transpose(1, 0, 2)
    out, state = result
    h_n, c_n = state if kind == "lstm" else (state, None)
    assert out.dtype == np.dtype(dtype) and h_n.dtype == np.dtype(dtype)
    close(out, ref_out, dtype)
    close(h_n, ref_h, dtype)
    if kind == "lstm":
        close(c_n, ref_c, dtype)


EDGE_CASES = [
    dict(T=1, B=1, D=1, H=1),
    dict(T=1, B=3, D=2, H=5),
    dict(T=7, B=1, D=3, H=1),
    dict(T=5, B=2, D=1, H=3, num_layers=3),
    dict(T=6, B=4, D=3, H=7, num_layers=2, bidirectional=True, use_lengths=True),
    dict(T=6, B=4, D=3, H=7, num_layers=2, bidirectional=True, use_lengths=True,
         batch_first=True),
    dict(T=4, B=1, D=3, H=7, bidirectional=True, unbatched=True),
    dict(T=4, B=3, D=5, H=3, bias=False, use_h0=False),
    dict(T=9, B=5, D=7, H=7, num_layers=2, batch_first=True),
    dict(T=1, B=4, D=3, H=3, bidirectional=True, use_lengths=True),
]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", EDGE_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_layer_edge_cases(kind, dtype, case, close):
    check_layer(kind, dtype, close=close, **case)


def random_case(seed):
    rng = np.random.default_rng(1000 + seed)
    B = int(rng.integers(1, 6))
    return dict(T=int(rng.integers(1, 13)), B=B, D=int(rng.integers(1, 10)),
                H=int(rng.integers(1, 10)), num_layers=int(rng.integers(1, 4)),
                bidirectional=bool(rng.integers(2)), batch_first=bool(rng.integers(2)),
                bias=bool(rng.integers(4)), use_lengths=bool(rng.integers(2)),
                use_h0=bool(rng.integers(4)), seed=seed)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", range(12))
def test_layer_random_configs(kind, dtype, seed, close):
    check_layer(kind, dtype, close=close, **random_case(seed))


@pytest.mark.parametrize("kind", KINDS)
def test_layer_realistic_size_float32(kind, close):
    """float32 accumulation error at a production-like size stays within 1e-5."""
    check_layer(kind, "float32", T=40, B=8, D=48, H=96, num_layers=2, bidirectional=True,
                use_lengths=True, close=close)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("use_h", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("B,D,H", [(1, 1, 1), (3, 4, 7), (6, 16, 32)])
def test_cells(kind, dtype, batched, use_h, bias, B, D, H, close):
    rng = np.random.default_rng(B * 100 + D * 10 + H)
    cell = make_cell(kind, D, H, bias=bias, dtype=dtype, seed=3)
    x = rng.standard_normal((B, D)).astype(dtype)
    h = rng.standard_normal((B, H)).astype(dtype) if use_h else np.zeros((B, H), dtype)
    c = rng.standard_normal((B, H)).astype(dtype) if use_h else np.zeros((B, H), dtype)
    ref_h, ref_c = cell_forward(kind, cell.state_dict(), x, h, c if kind == "lstm" else None)
    hx = (h, c) if kind == "lstm" else h
    if not batched:
        x, hx, ref_h = x[0], (tuple(a[0] for a in hx) if kind == "lstm" else hx[0]), ref_h[0]
        ref_c = None if ref_c is None else ref_c[0]
    result = cell(x, hx if use_h else None)
    got_h, got_c = result if kind == "lstm" else (result, None)
    assert got_h.dtype == np.dtype(dtype)
    close(got_h, ref_h, dtype)
    if kind == "lstm":
        close(got_c, ref_c, dtype)


@pytest.mark.parametrize("kind", KINDS)
def test_cell_equals_one_step_of_layer(kind):
    """A cell and a one-layer sequence with the same weights agree step by step."""
    rng = np.random.default_rng(7)
    layer = make_layer(kind, 5, 6, dtype="float64", seed=1)
    cell = make_cell(kind, 5, 6, dtype="float64")
    cell.load_state_dict({k[:-3]: v for k, v in layer.state_dict().items()})
    x = rng.standard_normal((8, 3, 5))
    out, _ = layer(x)
    state = None
    for t in range(8):
        state = cell(x[t], state)
        h = state[0] if kind == "lstm" else state
        np.testing.assert_allclose(h, out[t], rtol=0, atol=1e-14)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch_first", [False, True])
def test_blas_int_limit_paths(kind, batch_first, monkeypatch):
    """With a tiny BLAS int limit the input GEMM is split into row chunks and
    batch-first input takes the time-major route: results must not change."""
    rng = np.random.default_rng(3)
    layer = make_layer(kind, 4, 5, num_layers=2, bidirectional=True, batch_first=batch_first,
                       dtype="float64", seed=2)
    x = rng.standard_normal((6, 7, 4))
    T, B = (7, 6) if batch_first else (6, 7)
    lengths = rng.integers(1, T + 1, size=B)
    expected = layer(x, lengths=lengths)
    monkeypatch.setattr(_validation, "BLAS_INT_MAX", 8)
    # the plan depends on the limit (a plan cached before it must not be taken)
    plan = _plan.forward_plan(layer, T, B, batch_first=batch_first, train=False,
                              has_lengths=True)
    assert plan.time_major == batch_first
    got = layer(x, lengths=lengths)
    np.testing.assert_array_equal(got[0], expected[0])
    for g, e in zip(np.atleast_1d(got[1]), np.atleast_1d(expected[1])):
        np.testing.assert_array_equal(g, e)
    monkeypatch.setattr(_validation, "BLAS_INT_MAX", 5)
    with pytest.raises(ValueError, match="batch size 6|batch size 7"):
        layer(x, lengths=lengths)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch_first", [False, True])
def test_float64_time_windows_keep_to_the_blas_int_limit(kind, batch_first, monkeypatch):
    """A float64 bidirectional layer's time windows project a window's rows
    in one BLAS call: the window takes at most BLAS' int range of rows
    (steps * B), however many steps the window bytes allow; the numbers are
    the whole sequence's."""
    rng = np.random.default_rng(4)
    layer = make_layer(kind, 4, 5, bidirectional=True, batch_first=batch_first,
                       dtype="float64", seed=3)
    T, B = 9, 6
    x = rng.standard_normal((B, T, 4) if batch_first else (T, B, 4))
    lengths = rng.integers(1, T + 1, size=B)
    monkeypatch.setattr(_plan, "WINDOW_BYTES", 1 << 40)   # one call, not windows
    expected = layer(x, lengths=lengths)
    monkeypatch.setattr(_plan, "WINDOW_BYTES", 1)
    monkeypatch.setattr(_plan, "FLOAT64_WINDOWS_MIN_BYTES", 0)
    monkeypatch.setattr(_validation, "BLAS_INT_MAX", 13)   # two rows of 6, not four
    plan = _plan.forward_plan(layer, T, B, batch_first=batch_first, train=False,
                              has_lengths=True)
    assert plan.window == 2
    got = layer(x, lengths=lengths)
    np.testing.assert_array_equal(got[0], expected[0])
    for g, e in zip(np.atleast_1d(got[1]), np.atleast_1d(expected[1])):
        np.testing.assert_array_equal(g, e)


@pytest.mark.parametrize("kind", KINDS)
def test_batch_first_is_a_transpose(kind):
    rng = np.random.default_rng(5)
    tm = make_layer(kind, 3, 4, num_layers=2, bidirectional=True, seed=9)
    bf = make_layer(kind, 3, 4, num_layers=2, bidirectional=True, batch_first=True, seed=9)
    x = rng.standard_normal((5, 6, 3))
    lengths = [5, 1, 3, 5, 2, 4]
    out_tm, s_tm = tm(x, lengths=lengths)
    out_bf, s_bf = bf(x.transpose(1, 0, 2), lengths=lengths)
    np.testing.assert_allclose(out_bf.transpose(1, 0, 2), out_tm, rtol=0, atol=1e-6)
    assert out_bf.flags.c_contiguous


def test_initialisation_is_pytorch_uniform_and_seeded():
    layer = fastrnn.LSTM(10, 25, num_layers=2, bidirectional=True, seed=42)
    bound = 1 / np.sqrt(25)
    values = np.concatenate([p.ravel() for p in layer.state_dict().values()])
    assert values.min() >= -bound and values.max() <= bound
    assert abs(values.std() - bound / np.sqrt(3)) < 0.01 * bound  # std of U(-b, b)
    again = fastrnn.LSTM(10, 25, num_layers=2, bidirectional=True, seed=42)
    other = fastrnn.LSTM(10, 25, num_layers=2, bidirectional=True, seed=43)
    from_gen = fastrnn.LSTM(10, 25, num_layers=2, bidirectional=True,
                            seed=np.random.default_rng(42))
    for name, value in layer.state_dict().items():
        np.testing.assert_array_equal(again.state_dict()[name], value)
        np.testing.assert_array_equal(from_gen.state_dict()[name], value)
        assert not np.array_equal(other.state_dict()[name], value)


def test_parameter_names_and_shapes_follow_pytorch():
    gru = fastrnn.GRU(3, 4, num_layers=2, bidirectional=True)
    expected = {}
    for k, in_size in enumerate([3, 8]):
        for sfx in ("", "_reverse"):
            expected[f"weight_ih_l{k}{sfx}"] = (12, in_size)
            expected[f"weight_hh_l{k}{sfx}"] = (12, 4)
            expected[f"bias_ih_l{k}{sfx}"] = (12,)
            expected[f"bias_hh_l{k}{sfx}"] = (12,)
    assert {k: v.shape for k, v in gru.state_dict().items()} == expected
    assert list(gru.state_dict()) == list(expected)
    cell = fastrnn.LSTMCell(3, 4, bias=False)
    assert {k: v.shape for k, v in cell.state_dict().items()} == {
        "weight_ih": (16, 3), "weight_hh": (16, 4)}
    assert gru.weight_hh_l1_reverse.shape == (12, 4)


def test_state_dict_round_trip_and_copies():
    a = fastrnn.GRU(3, 4, num_layers=2, seed=1)
    b = fastrnn.GRU(3, 4, num_layers=2, seed=2)
    sd = a.state_dict()
    b.load_state_dict(sd)
    x = np.random.default_rng(0).standard_normal((5, 2, 3))
    np.testing.assert_array_equal(a(x)[0], b(x)[0])
    sd["weight_ih_l0"][...] = 0  # the dict holds copies
    np.testing.assert_array_equal(a(x)[0], b(x)[0])
    assert not np.array_equal(a.weight_ih_l0, 0)


def test_float64_state_dict_into_float32_layer():
    src = fastrnn.LSTM(3, 4, dtype="float64", seed=1)
    dst = fastrnn.LSTM(3, 4, seed=2)
    dst.load_state_dict(src.state_dict())
    for name, value in dst.state_dict().items():
        assert value.dtype == np.float32
        np.testing.assert_array_equal(value, src.state_dict()[name].astype(np.float32))


def test_repr():
    assert repr(fastrnn.LSTM(3, 4)) == "LSTM(3, 4)"
    assert (repr(fastrnn.RNN(3, 4, num_layers=2, nonlinearity="relu", bidirectional=True,
                             dtype="float64"))
            == "RNN(3, 4, nonlinearity='relu', num_layers=2, bidirectional=True, dtype='float64')")
    assert repr(fastrnn.GRUCell(2, 5, bias=False)) == "GRUCell(2, 5, bias=False)"
    # PyTorch's order: proj_size right after the sizes; a cell's bias, then nonlinearity
    assert (repr(fastrnn.LSTM(5, 7, proj_size=4, num_layers=2, dropout=0.5))
            == "LSTM(5, 7, proj_size=4, num_layers=2, dropout=0.5)")
    assert (repr(fastrnn.RNNCell(3, 4, bias=False, nonlinearity="relu", dtype="float64"))
            == "RNNCell(3, 4, bias=False, nonlinearity='relu', dtype='float64')")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bias", [True, False])
def test_cell_streaming_path_equals_general_path(kind, dtype, bias, close):
    """Plain unbatched frames take the CellStep fast path; other inputs the
    general one: the same numbers, the caller's state untouched, and a
    parameter change seen at once."""
    rng = np.random.default_rng(11)
    cell = make_cell(kind, 5, 7, bias=bias, dtype=dtype, seed=1)
    x = rng.standard_normal(5).astype(dtype)
    state = tuple(rng.standard_normal(7).astype(dtype) for _ in range(2 if kind == "lstm" else 1))
    hx = state if kind == "lstm" else state[0]
    keep = [s.copy() for s in state]
    fast = cell(x, hx)
    general = cell(x[None], tuple(s[None] for s in state) if kind == "lstm" else hx[None])
    for f, g in zip(fast if kind == "lstm" else (fast,), general if kind == "lstm" else (general,)):
        assert f.shape == (7,) and f.dtype == np.dtype(dtype)
        close(f, g[0], dtype)
    for s, k in zip(state, keep):
        np.testing.assert_array_equal(s, k)                      # hx untouched
    strided = np.repeat(x, 2)[::2]                               # not contiguous: general path
    close(np.asarray(cell(strided, hx)[0] if kind == "lstm" else cell(strided, hx)),
          np.asarray(fast[0] if kind == "lstm" else fast), dtype)
    ref_h, _ = cell_forward(kind, cell.state_dict(), x[None], state[0][None],
                            state[1][None] if kind == "lstm" else None)
    close(fast[0] if kind == "lstm" else fast, ref_h[0], dtype)
    zero = {k: np.zeros_like(v) for k, v in cell.state_dict().items()}
    cell.load_state_dict(zero)                                    # the cached step must follow
    after = cell(x, hx)
    ref_h, _ = cell_forward(kind, zero, x[None], state[0][None],
                            state[1][None] if kind == "lstm" else None)
    close(after[0] if kind == "lstm" else after, ref_h[0], dtype)


def in_layout(a, layout):
    """A copy of a in another memory layout: Fortran order, every other
    element of a wider array (sliced), or C order read-only."""
    if layout == "fortran":
        return np.asfortranarray(a)
    if layout == "sliced":
        wide = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
        wide[..., ::2] = a
        return wide[..., ::2]
    out = a.copy()
    out.flags.writeable = False
    return out


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", ["fortran", "sliced", "read_only"])
def test_cell_streaming_path_copies_states_of_any_layout(kind, layout):
    """The fast path copies a C-contiguous state with one memcpy and any
    other layout through numpy: a batched state given in another memory
    layout gives the bits of the contiguous one, and the caller's arrays
    keep their values."""
    rng = np.random.default_rng(5)
    cell = make_cell(kind, 6, 9, seed=3)
    x = rng.standard_normal((3, 6)).astype(np.float32)
    state = [rng.standard_normal((3, 9)).astype(np.float32)
             for _ in range(2 if kind == "lstm" else 1)]
    given = [in_layout(s, layout) for s in state]
    keep = [g.copy() for g in given]
    expect = cell(x, tuple(state) if kind == "lstm" else state[0])
    got = cell(x, tuple(given) if kind == "lstm" else given[0])
    for e, g in zip(expect if kind == "lstm" else (expect,), got if kind == "lstm" else (got,)):
        assert g.flags.c_contiguous and g.flags.writeable
        np.testing.assert_array_equal(g, e)
    for g, k in zip(given, keep):
        np.testing.assert_array_equal(g, k)
    # the result is the caller's own: writing it leaves the given state alone
    (got[0] if kind == "lstm" else got)[...] = 0
    np.testing.assert_array_equal(given[0], keep[0])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch_first", [False, True])
def test_windowed_inference_equals_whole_sequence(kind, batch_first, monkeypatch):
    """Long unidirectional inference runs in time windows with the state
    carried over (bounded memory): the same numbers as one pass."""
    from fastrnn import _plan
    rng = np.random.default_rng(4)
    layer = make_layer(kind, 3, 5, num_layers=2, batch_first=batch_first, dtype="float64",
                       seed=2)
    T, B = 150, 4
    x = rng.standard_normal((B, T, 3) if batch_first else (T, B, 3))
    lengths = np.array([150, 1, 70, 130])
    hx = rng.standard_normal((2, B, 5))
    hx = (hx, rng.standard_normal((2, B, 5))) if kind == "lstm" else hx
    whole = layer(x, hx, lengths=lengths)
    monkeypatch.setattr(_plan, "WINDOW_BYTES", 1)              # windows of 64 steps
    monkeypatch.setattr(_plan, "MIN_WINDOW_STEPS", 64)
    assert _plan.window_steps(B, 5, "float64") == 64
    windowed = layer(x, hx, lengths=lengths)
    np.testing.assert_allclose(windowed[0], whole[0], rtol=0, atol=1e-13)
    for w, v in zip(np.atleast_1d(windowed[1]), np.atleast_1d(whole[1])):
        np.testing.assert_allclose(w, v, rtol=0, atol=1e-13)


# Batch-1 recurrent products below _forward.AXPY_LIMIT are vectorised loops in
# column blocks (64 float32 / 32 float64 columns, then 8 / 4, then single
# columns): these sizes reach every block width and tail, in both dtypes.
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("H", [1, 9, 27, 75, 130])
def test_batch_one_products_every_block_width(kind, dtype, H, close):
    check_layer(kind, dtype, T=5, B=1, D=11, H=H, close=close)
    check_layer(kind, dtype, T=3, B=1, D=11, H=H, unbatched=True, close=close)
    cell = make_cell(kind, 11, H, dtype=dtype, seed=2)
    rng = np.random.default_rng(H)
    x, h, c = (rng.standard_normal(n).astype(dtype) for n in (11, H, H))
    ref_h, ref_c = cell_forward(kind, cell.state_dict(), x[None], h[None],
                                c[None] if kind == "lstm" else None)
    got = cell(x, (h, c) if kind == "lstm" else h)
    close(got[0] if kind == "lstm" else got, ref_h[0], dtype)
    if kind == "lstm":
        close(got[1], ref_c[0], dtype)


def _padded_state(layer, H, wide):
    """layer's parameters in a layer of ``wide`` units: each gate block's
    rows and W_hh's columns past H are zeros, so the first H units compute
    the same chains (zero terms added) and the others stay 0."""
    out = {}
    for name, value in layer.state_dict().items():
        blocks = value.reshape((-1, H) + value.shape[1:])   # gate blocks of H rows
        padded = np.zeros((blocks.shape[0], wide) + value.shape[1:], value.dtype)
        padded[:, :H] = blocks
        padded = padded.reshape((-1,) + value.shape[1:])
        if name.startswith("weight_hh"):
            padded = np.concatenate(
                [padded, np.zeros((padded.shape[0], wide - H), value.dtype)], axis=1)
        out[name] = padded
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_row_tails_give_the_vector_loops_bits(kind):
    """The last units % lanes (at least 3; 16 lanes AVX-512, 8 otherwise) of
    a float32 row run through a padded scratch vector (_gates.pxd.tp: the
    rows' tails). A layer of 21 units (a 5-unit tail) and the same layer
    padded to 32 units with zero weights (no tail: those units in the
    vectorised loops) give the same bits for the first 21 units: inference,
    the training forward, dx, the initial state's gradient and the weight
    gradients."""
    H, wide, T, B, D = 21, 32, 6, 3, 5
    rng = np.random.default_rng(21)
    narrow = make_layer(kind, D, H, seed=3)
    padded = make_layer(kind, D, wide, seed=4)
    padded.load_state_dict(_padded_state(narrow, H, wide))
    x = rng.standard_normal((T, B, D)).astype(np.float32)
    h0 = rng.standard_normal((1, B, H)).astype(np.float32)
    dout = rng.standard_normal((T, B, H)).astype(np.float32)

    def run(layer, units):
        pad = ((0, 0), (0, 0), (0, units - H))
        hx = (np.pad(h0, pad), np.pad(h0, pad) * 0.5) if kind == "lstm" else np.pad(h0, pad)
        inferred = layer(x, hx)[0]
        (out, _), backprop = layer.forward_train(x, hx)
        dx, dstate = backprop(np.pad(dout, pad))
        dh0 = dstate[0] if kind == "lstm" else dstate
        return inferred[..., :H], out[..., :H], dx, dh0[..., :H], layer.grads

    got, want = run(narrow, H), run(padded, wide)
    for a, b in zip(got[:4], want[:4]):
        np.testing.assert_array_equal(a, b)
    for name, grad in got[4].items():
        np.testing.assert_array_equal(grad, _unpad(want[4][name], name, H, wide))


def _unpad(value, name, H, wide):
    """_padded_state's inverse for one parameter."""
    blocks = value.reshape((-1, wide) + value.shape[1:])[:, :H]
    value = blocks.reshape((-1,) + value.shape[1:])
    return value[:, :H] if name.startswith("weight_hh") else value


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("num_layers,bidirectional,batch_first,unbatched,with_hx", [
    (1, False, False, False, True), (1, False, True, True, True), (2, True, True, False, True),
    (3, False, False, False, False), (2, True, False, True, False), (1, True, True, False, True)])
def test_lean_path_equals_general_path(kind, dtype, num_layers, bidirectional, batch_first,
                                       unbatched, with_hx):
    """Small calls take SequenceRunner (one Cython call); lengths covering
    every step send the same call down the general path: the numbers must
    be bit-identical, and the caller's arrays untouched."""
    rng = np.random.default_rng(11)
    layer = make_layer(kind, 5, 6, num_layers=num_layers, bidirectional=bidirectional,
                       batch_first=batch_first, dtype=dtype, seed=4)
    dirs = 2 if bidirectional else 1
    T, B = 7, 3
    if unbatched:
        x = rng.standard_normal((T, 5)).astype(dtype)
        shape = (num_layers * dirs, 6)
    else:
        x = rng.standard_normal((B, T, 5) if batch_first else (T, B, 5)).astype(dtype)
        shape = (num_layers * dirs, B, 6)
    hx = None
    if with_hx:
        hx = tuple(rng.standard_normal(shape).astype(dtype) for _ in range(2))
        hx = hx if kind == "lstm" else hx[0]
    keep = [a.copy() for a in np.atleast_1d(*(hx if kind == "lstm" else (hx,)))] if with_hx else []
    lean = layer._sequence_runner(layer._params).run(x, hx)
    assert lean is not None                      # this call is small: the lean path takes it
    got = layer(x, hx)
    if unbatched:
        general = layer(x[None] if batch_first else x[:, None], None if hx is None else
                        (tuple(a[:, None] for a in hx) if kind == "lstm" else hx[:, None]),
                        lengths=[T])
        general = (general[0][0] if batch_first else general[0][:, 0],
                   tuple(a[:, 0] for a in general[1]) if kind == "lstm" else general[1][:, 0])
    else:
        general = layer(x, hx, lengths=[T] * B)
    for result in (lean, got):
        np.testing.assert_array_equal(result[0], general[0])
        states = result[1] if kind == "lstm" else (result[1],)
        expected = general[1] if kind == "lstm" else (general[1],)
        for a, b in zip(states, expected):
            assert a.dtype == np.dtype(dtype)
            np.testing.assert_array_equal(a, b)
    if with_hx:
        for a, b in zip(keep, np.atleast_1d(*(hx if kind == "lstm" else (hx,)))):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kind", ["gru", "lstm"])
@pytest.mark.parametrize("layout", ["fortran", "sliced", "read_only"])
def test_lean_path_takes_states_of_any_layout(kind, layout):
    """SequenceRunner copies hx (one memcpy when C-contiguous, numpy's copy
    otherwise): a state in another memory layout gives the bits of the
    contiguous one and is left as it was."""
    rng = np.random.default_rng(12)
    layer = make_layer(kind, 5, 6, num_layers=2, seed=4)
    x = rng.standard_normal((7, 3, 5)).astype(np.float32)
    state = [rng.standard_normal((2, 3, 6)).astype(np.float32)
             for _ in range(2 if kind == "lstm" else 1)]
    given = [in_layout(s, layout) for s in state]
    keep = [g.copy() for g in given]
    runner = layer._sequence_runner(layer._params)
    expect = runner.run(x, tuple(state) if kind == "lstm" else state[0])
    got = runner.run(x, tuple(given) if kind == "lstm" else given[0])
    assert expect is not None and got is not None
    np.testing.assert_array_equal(got[0], expect[0])
    for e, g in zip(expect[1] if kind == "lstm" else (expect[1],),
                    got[1] if kind == "lstm" else (got[1],)):
        np.testing.assert_array_equal(g, e)
    for g, k in zip(given, keep):
        np.testing.assert_array_equal(g, k)


def test_lean_path_declines_what_it_does_not_handle():
    layer = fastrnn.LSTM(5, 6, seed=0)
    runner = layer._sequence_runner(layer._params)
    x = np.zeros((4, 2, 5), np.float32)
    assert runner.run(x, None) is not None
    assert runner.run(x.astype(np.float64), None) is None          # dtype to convert
    assert runner.run(np.asfortranarray(x), None) is None          # memory order
    assert runner.run(x.tolist(), None) is None                     # not an array
    assert runner.run(np.zeros((4, 2, 3), np.float32), None) is None  # wrong size: the general
    assert runner.run(x, (np.zeros((1, 2, 6), np.float32), None)) is None   # path raises
    assert runner.run(x, np.zeros((1, 2, 6), np.float32)) is None   # LSTM needs (h, c)
    assert runner.run(np.zeros((4000, 64, 5), np.float32), None) is None  # large: parallel
    # a projection the general path would split (_plan.product_parts), however
    # little recurrent work the steps hold
    wide = fastrnn.GRU(4000, 8, seed=0)
    assert wide._sequence_runner(wide._params).run(np.zeros((50, 1, 4000), np.float32),
                                                   None) is None
    assert wide._sequence_runner(wide._params).run(np.zeros((40, 1, 4000), np.float32),
                                                   None) is not None
    with pytest.raises(ValueError, match="expected input of shape"):
        layer(np.zeros((4, 2, 3), np.float32))


@pytest.mark.parametrize("kind,H", [("lstm", 256), ("gru", 160), ("rnn_tanh", 300)])
def test_a_float64_batch_one_call_with_wide_weights_takes_the_lean_path(kind, H):
    """float64's batch-1 step products beyond AXPY_MAX are _rowdot.h's, not
    BLAS calls: nothing OpenBLAS could thread, so a short call takes the
    lean path (no BLAS hold), bit for bit as the general path; BPTT's
    batch-1 products are still gemv, held. One thread: at more, longer
    calls split their units. [failed before: the lean path declined, as if
    the steps called gemv]"""
    layer = make_layer(kind, 8, H, dtype="float64", seed=1)
    assert layer._gates * H * H > _forward.AXPY_LIMIT
    x = np.random.default_rng(H).standard_normal((6, 1, 8))
    before = fastrnn.get_num_threads()
    try:
        fastrnn.set_num_threads(1)
        lean = layer._sequence_runner(layer._params).run(x, None)
        assert lean is not None
        general = layer(x, lengths=[6])
        assert not _plan.forward_plan(layer, 6, 1, batch_first=False, train=True,
                                      has_lengths=False).hold_blas
        assert _plan.backward_plan(layer, 6, 1).hold_blas
        # under Keras' recurrent dropout the steps' products are gemm calls
        dropped = make_layer(kind, 8, H, dtype="float64", seed=1, recurrent_dropout=0.5)
        assert _plan.forward_plan(dropped, 6, 1, batch_first=False, train=True,
                                  has_lengths=False).hold_blas
        # (input dropout's products are _parallel.matmul's, which holds BLAS itself)
        dropped = make_layer(kind, 8, H, dtype="float64", seed=1, input_dropout=0.5)
        assert not _plan.forward_plan(dropped, 6, 1, batch_first=False, train=True,
                                      has_lengths=False).hold_blas
    finally:
        fastrnn.set_num_threads(before)
    np.testing.assert_array_equal(lean[0], general[0])
    for a, b in zip(*((r[1] if kind == "lstm" else (r[1],)) for r in (lean, general))):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("kind,D,H,T,B", [("gru", 64, 64, 100, 1), ("lstm", 200, 40, 60, 2),
                                          ("rnn_tanh", 300, 100, 40, 3)])
def test_projection_that_blas_could_thread_takes_the_held_path(kind, D, H, T, B, dtype,
                                                                close):
    """float64: an input projection beyond one-thread GEMM size is left to
    the general path, which holds BLAS at one thread (a product OpenBLAS
    threads can round differently, and results must not depend on what
    other threads do). float32 calls no BLAS (its weights are packed for the
    micro-kernel): the lean path takes the call, bit for bit as the general
    path (sent there by lengths covering every step). Either matches the
    reference."""
    layer = make_layer(kind, D, H, dtype=dtype, seed=5)
    rng = np.random.default_rng(D)
    x = rng.standard_normal((T, B, D)).astype(dtype)
    assert T * B * layer._gates * H * D > _forward.GEMM_ONE_THREAD   # OpenBLAS may thread it
    lean = layer._sequence_runner(layer._params).run(x, None)
    if dtype == "float64":
        assert lean is None
    else:
        general = layer(x, lengths=[T] * B)
        np.testing.assert_array_equal(lean[0], general[0])
        for a, b in zip(*((r[1] if kind == "lstm" else (r[1],)) for r in (lean, general))):
            np.testing.assert_array_equal(a, b)
    out, state = layer(x)
    zeros = np.zeros((1, B, H))
    ref_out, ref_h, ref_c = layer_forward(kind, layer.state_dict(), x, zeros,
                                          zeros if kind == "lstm" else None)
    close(out, ref_out, dtype)
    close(state[0] if kind == "lstm" else state, ref_h, dtype)


# (quantize refuses a learned initial state)
@pytest.mark.parametrize("quantized, learned", [(False, False), (False, True), (True, False)])
def test_a_missing_part_of_an_lstm_state_is_zeros(quantized, learned):
    """hx = (h_0, None) or (None, c_0), as the signatures allow: the missing
    part starts from zeros (also beside a learned initial state, which a
    call that passes hx does not use), on every entry that takes a state."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 2, 3)).astype(np.float32)
    h0, c0 = rng.standard_normal((2, 1, 2, 4)).astype(np.float32)
    zeros = np.zeros_like(h0)
    layer = fastrnn.LSTM(3, 4, learn_initial_state=learned, seed=1)
    cell = fastrnn.LSTMCell(3, 4, learn_initial_state=learned, seed=1)
    if learned:   # a learned state of ones: zeros differ from it
        for module, suffix in ((layer, "_l0"), (cell, "")):
            sd = module.state_dict()
            sd["initial_h" + suffix] = np.ones(4, np.float32)
            sd["initial_c" + suffix] = np.ones(4, np.float32)
            module.load_state_dict(sd)
    if quantized:
        layer, cell = fastrnn.quantize(layer), fastrnn.quantize(cell)
    calls = [lambda hx: layer(x, hx), lambda hx: layer(x, hx, lengths=[5, 3]),
             lambda hx: layer(x, hx, mask=np.ones((2, 5), bool)),
             lambda hx: cell(x[0], None if hx is None else (hx[0] if hx[0] is None else hx[0][0],
                                                            hx[1] if hx[1] is None else hx[1][0])),
             lambda hx: cell(x[0, 0], None if hx is None else
                             tuple(None if p is None else p[0, 0] for p in hx))]
    if not quantized:
        calls += [lambda hx: layer.forward_train(x, hx)[0],
                  lambda hx: cell.forward_train(x[0], None if hx is None else
                                                tuple(None if p is None else p[0] for p in hx))[0]]
    for call in calls:
        for given, full in (((h0, None), (h0, zeros)), ((None, c0), (zeros, c0))):
            got, want = _flat(call(given)), _flat(call(full))
            assert len(got) == len(want)
            for a, b in zip(got, want):
                np.testing.assert_array_equal(a, b, strict=True)
        if learned:   # the learned state is not what (h_0, None) starts from
            assert not all(np.array_equal(a, b) for a, b in
                           zip(_flat(call((h0, None))), _flat(call(None))))


def _flat(result):
    """A call's arrays in order, nested tuples flattened."""
    if isinstance(result, (tuple, list)):
        return [a for part in result for a in _flat(part)]
    return [np.asarray(result)]


def _padded(a, steps, T, batch_first):
    full = np.zeros(a.shape[:1] + (T,) + a.shape[2:] if batch_first else (T,) + a.shape[1:],
                    a.dtype)
    if batch_first:
        full[:, :steps] = a
    else:
        full[:steps] = a
    return full


@pytest.mark.parametrize("kind", ["RNN", "GRU", "LSTM"])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "float64", "int8", "bfloat16"])
def test_steps_past_every_length_do_not_run(kind, batch_first, bidirectional, dtype):
    """A call whose sequences all end before its last step runs only the
    steps up to the longest (as PyTorch's packed sequences): the same bits
    as the call on the input cut there, zeros past it; training too (the
    gradients of the cut call, zeros for the padding)."""
    rng = np.random.default_rng(0)
    T, steps, lengths = 9, 5, np.array([2, 5, 3])
    quantized = dtype in ("int8", "bfloat16")
    layer = getattr(fastrnn, kind)(4, 5, num_layers=2, bidirectional=bidirectional,
                                   batch_first=batch_first, seed=1,
                                   dtype="float32" if quantized else dtype)
    model = fastrnn.quantize(layer, dtype=dtype) if quantized else layer
    x = rng.standard_normal((3, T, 4) if batch_first else (T, 3, 4)).astype(
        np.float32 if quantized else dtype)
    cut = np.ascontiguousarray(x[:, :steps] if batch_first else x[:steps])
    flat = lambda s: np.concatenate([a.ravel() for a in (s if isinstance(s, tuple) else (s,))])
    out, state = model(x, lengths=lengths)
    out_cut, state_cut = model(cut, lengths=lengths)
    assert np.array_equal(out, _padded(out_cut, steps, T, batch_first))
    assert np.array_equal(flat(state), flat(state_cut))
    if quantized:
        return
    g = rng.standard_normal(out.shape).astype(dtype)
    (out, _), backprop = layer.forward_train(x, lengths=lengths)
    layer.zero_grad()
    dx, dstate = backprop(g)
    grads = {k: v.copy() for k, v in layer.grads.items()}
    (out_cut, _), backprop = layer.forward_train(cut, lengths=lengths)
    layer.zero_grad()
    dx_cut, dstate_cut = backprop(np.ascontiguousarray(g[:, :steps] if batch_first else
                                                       g[:steps]))
    assert np.array_equal(out, _padded(out_cut, steps, T, batch_first))
    assert np.array_equal(dx, _padded(dx_cut, steps, T, batch_first))
    assert np.array_equal(flat(dstate), flat(dstate_cut))
    assert all(np.array_equal(grads[k], layer.grads[k]) for k in grads)


@pytest.mark.parametrize("dtype", ["int8", "bfloat16"])
def test_a_quantized_layer_reads_no_padding(dtype):
    """NaN or inf in the padding of a shorter sequence is never read, as in
    float32 (the padding is zeroed before the kernels, which refuse a
    non-finite input). [failed before: refused as a non-finite input]"""
    rng = np.random.default_rng(0)
    layer = fastrnn.GRU(4, 5, seed=1)
    q = fastrnn.quantize(layer, dtype=dtype)
    x = rng.standard_normal((6, 3, 4)).astype(np.float32)
    lengths = np.array([2, 6, 3])
    expected = q(x, lengths=lengths)
    x[2:, 0] = np.nan
    x[3:, 2] = np.inf
    out, h = q(x, lengths=lengths)
    np.testing.assert_array_equal(out, expected[0])
    np.testing.assert_array_equal(h, expected[1])
    x[1, 1] = np.nan   # a valid step: refused, as before
    with pytest.raises(ValueError, match="non-finite"):
        q(x, lengths=lengths)
