"""Bad input gets a clear Python exception naming the argument; odd but valid
input (other dtypes, memory orders, torch tensors, NaN) works; the caller's
arrays are never modified and the module never half-changes."""
import importlib.util
import os
import re
import time
import warnings

import numpy as np
import pytest

import fastrnn
from fastrnn import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell

LAYERS = [RNN, GRU, LSTM]
CELLS = [RNNCell, GRUCell, LSTMCell]
D, H, T, B = 3, 4, 5, 2


def has_c(cls):
    return cls in (LSTM, LSTMCell)


def make(cls, **kw):
    return cls(D, H, seed=0, **kw)


def state_shape(m, batch=B):
    """Shape of one state array of module m for a batched call."""
    if isinstance(m, tuple(CELLS)):
        return (batch, H)
    dirs = 2 if m.bidirectional else 1
    return (m.num_layers * dirs, batch, H)


def make_hx(m, batch=B, value=0.5):
    h = np.full(state_shape(m, batch), value)
    return (h, -h) if has_c(type(m)) else h


def call(m, x, hx=None, **kw):
    """Call m and return its results as a flat tuple of arrays."""
    res = m(x, hx, **kw)
    if isinstance(m, LSTM):
        return (res[0], *res[1])
    if isinstance(m, LSTMCell):
        return tuple(res)
    return res if isinstance(res, tuple) else (res,)


def x_for(m, batch=B, steps=T, seed=1):
    shape = (batch, D) if type(m) in CELLS else (steps, batch, D)
    return np.random.default_rng(seed).standard_normal(shape)


def assert_same_results(a, b):
    assert len(a) == len(b)
    for u, v in zip(a, b):
        assert u.dtype == v.dtype and u.shape == v.shape
        assert np.array_equal(u, v, equal_nan=True)


def assert_state_equal(sd1, sd2):
    assert list(sd1) == list(sd2)
    for k in sd1:
        assert np.array_equal(sd1[k], sd2[k]), k


# --- constructor -------------------------------------------------------------

@pytest.mark.parametrize("cls", LAYERS + CELLS)
@pytest.mark.parametrize("arg", ["input_size", "hidden_size"])
@pytest.mark.parametrize("value, exc, msg", [
    (0, ValueError, "must be >= 1, got 0"),
    (-3, ValueError, "must be >= 1, got -3"),
    (2.0, TypeError, "must be an int, got float"),
    ("2", TypeError, "must be an int, got str"),
    (True, TypeError, "must be an int, got bool"),
    (None, TypeError, "must be an int, got NoneType"),
])
def test_bad_size(cls, arg, value, exc, msg):
    kw = {"input_size": D, "hidden_size": H, arg: value}
    with pytest.raises(exc, match=f"{cls.__name__}: {arg} {msg}"):
        cls(**kw)


@pytest.mark.parametrize("cls", LAYERS)
@pytest.mark.parametrize("value, exc, msg", [
    (0, ValueError, "must be >= 1, got 0"),
    (1.0, TypeError, "must be an int, got float"),
    (np.True_, TypeError, "must be an int, got bool"),
])
def test_bad_num_layers(cls, value, exc, msg):
    with pytest.raises(exc, match=f"num_layers {msg}"):
        make(cls, num_layers=value)


@pytest.mark.parametrize("cls", LAYERS)
def test_layers_beyond_memory_are_refused_before_allocating(cls):
    """[failed before: ran for hours] Each layer's storages are allocated
    one by one, small enough for the system to grant each until the process
    is killed; and the storages' gradients were kept in a tuple grown by
    one each (quadratic: 32,000 layers took 65 s). Parameters and gradients
    beyond the machine's memory are now a MemoryError up front, naming the
    sizes."""
    import os
    if not hasattr(os, "sysconf"):
        pytest.skip("no sysconf: the check needs the machine's memory")
    with pytest.raises(MemoryError, match=rf"{cls.__name__}\(input_size=16, hidden_size=32, "
                                          rf"num_layers=1000000000\): its parameters and their "
                                          rf"gradients need [0-9.]+ TiB \(with [0-9.]+ TiB of "
                                          rf"objects for its layers\), more than this "
                                          rf"machine's [0-9.]+ [GT]iB of memory"):
        cls(16, 32, num_layers=10**9)
    # the layers' Python objects count: 10**7 layers of size 1 passed as 0.3
    # GiB of parameters, then grew to 57 GiB (killed by the system)
    with pytest.raises(MemoryError, match=rf"{cls.__name__}\(input_size=1, hidden_size=1, "
                                          rf"num_layers=100000000\): .* \(with [0-9.]+ GiB of "
                                          rf"objects for its layers\)"):
        cls(1, 1, num_layers=10**8)   # (600 GB of objects: refused on any machine)
    with pytest.raises(MemoryError, match=rf"{cls.__name__}\(input_size=16, hidden_size=2000000, "
                                          rf"bidirectional=True, dtype=float64\): its "
                                          rf"parameters and their gradients need [0-9.]+ TiB"):
        cls(16, 2 * 10**6, bidirectional=True, dtype="float64")
    with pytest.raises(MemoryError, match=rf"{cls.__name__}\(input_size=2000000000, "
                                          rf"hidden_size=100\): its parameters"):
        cls(2 * 10**9, 100)
    layer = cls(16, 8, num_layers=2000)   # what fits is built as before
    assert len(layer._trainable) == 2000 * 4


@pytest.mark.parametrize("cls", CELLS)
def test_cells_beyond_memory_are_refused_before_allocating(cls):
    import os
    if not hasattr(os, "sysconf"):
        pytest.skip("no sysconf: the check needs the machine's memory")
    with pytest.raises(MemoryError, match=rf"{cls.__name__}\(input_size=16, hidden_size=3000000\): "
                                          rf"its parameters and their gradients need"):
        cls(16, 3 * 10**6)


def test_linear_and_embedding_beyond_memory_are_refused_before_allocating():
    """Linear and Embedding had no parameter check: one beyond the machine's
    memory failed in numpy ("Unable to allocate ... float64", the initial
    draw's) or, near the bound, touched more than the machine has."""
    import os
    if not hasattr(os, "sysconf"):
        pytest.skip("no sysconf: the check needs the machine's memory")
    with pytest.raises(MemoryError, match=r"Linear\(in_features=1000000, out_features=1000000\): "
                                          r"its parameters and their gradients need"):
        fastrnn.Linear(10**6, 10**6)
    with pytest.raises(MemoryError, match=r"Embedding\(num_embeddings=1000000000, "
                                          r"embedding_dim=1000\): its parameters"):
        fastrnn.Embedding(10**9, 1000)


@pytest.mark.parametrize("make", [lambda: fastrnn.RNN(2**21, 8, seed=0),
                                  lambda: fastrnn.Linear(2**21, 8, seed=0),
                                  lambda: fastrnn.Embedding(2**21, 8, seed=0)])
def test_construction_holds_about_its_parameters_and_gradients(make):
    """The initial values were drawn in float64 whole, then cast: a float32
    layer's construction held three times its parameters' bytes beside its
    gradients (1 GiB of parameters: +3 GiB), so a layer the memory check
    admitted could exhaust the machine. They are drawn a chunk at a time
    now, the same values. [failed before: peak 4x the parameters]"""
    import tracemalloc
    tracemalloc.start()
    try:
        layer = make()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    params = sum(w.nbytes for w in layer.state_dict().values())
    assert peak < 2 * params + 16 * 2**20, (peak, params)


@pytest.mark.parametrize("cls", [RNN, RNNCell])
@pytest.mark.parametrize("value", ["gelu", "TANH ", ""])
def test_bad_nonlinearity(cls, value):
    # any activation spec is a nonlinearity now (tests/test_gate_options.py); the
    # message names the class, the argument and the value
    with pytest.raises(ValueError, match=f"{cls.__name__}: nonlinearity.*{value!r}"):
        make(cls, nonlinearity=value)


@pytest.mark.parametrize("cls", [RNN, RNNCell])
@pytest.mark.parametrize("value", [None, 1.0, {"relu": 1}])
def test_bad_nonlinearity_type(cls, value):
    with pytest.raises(TypeError, match=r"nonlinearity must be an activation name or a "
                                        r"tuple \(name, alpha\[, beta\]\)"):
        make(cls, nonlinearity=value)


@pytest.mark.parametrize("cls", LAYERS)
@pytest.mark.parametrize("value, exc", [
    (-0.1, ValueError), (1, ValueError), (1.0, ValueError), (2.5, ValueError),
    (float("nan"), ValueError), (float("inf"), ValueError),
    ("0.1", TypeError), (None, TypeError), (True, TypeError),
])
def test_bad_dropout(cls, value, exc):
    with pytest.raises(exc, match=r"dropout must be (a float )?in \[0, 1\)"):
        make(cls, num_layers=2, dropout=value)


@pytest.mark.parametrize("cls", LAYERS + CELLS)
@pytest.mark.parametrize("dtype", ["int32", "float16", "complex64", "int64", "bool", object,
                                   np.complex128, "i4,i4"])
def test_unsupported_dtype(cls, dtype):
    with pytest.raises(ValueError, match=r"dtype must be 'float32' or 'float64'"):
        make(cls, dtype=dtype)


@pytest.mark.parametrize("cls", LAYERS + CELLS)
@pytest.mark.parametrize("dtype", ["garbage", "float33", ""])
def test_garbage_dtype_string(cls, dtype):
    with pytest.raises(ValueError, match=r"dtype must be 'float32' or 'float64'"):
        make(cls, dtype=dtype)


@pytest.mark.parametrize("cls", LAYERS + CELLS)
@pytest.mark.parametrize("dtype, expected", [
    (None, np.float32), ("float32", np.float32), ("float64", np.float64),
    (np.float32, np.float32), ("f8", np.float64),
])
def test_supported_dtype_spellings(cls, dtype, expected):
    m = make(cls, dtype=dtype)
    assert m.dtype == np.dtype(expected) and m.dtype is not None
    assert call(m, x_for(m))[0].dtype == expected


@pytest.mark.parametrize("cls", LAYERS + CELLS)
@pytest.mark.parametrize("seed, exc, msg", [
    (-1, ValueError, "seed must be >= 0, got -1"),
    (1.5, TypeError, "seed must be None, an int or a numpy.random.Generator, got float"),
    ("1", TypeError, "seed must be None, an int .* got str"),
    (True, TypeError, "seed must be None, an int .* got bool"),
    ([1], TypeError, "seed must be None, an int .* got list"),
])
def test_bad_seed(cls, seed, exc, msg):
    with pytest.raises(exc, match=msg):
        cls(D, H, seed=seed)


@pytest.mark.parametrize("cls, arg", [(c, a) for c in LAYERS
                                      for a in ("batch_first", "bidirectional", "bias")]
                         + [(c, "bias") for c in CELLS]
                         + [(GRU, "reset_after"), (GRUCell, "reset_after")])
@pytest.mark.parametrize("value", [1, 0, "yes", None])
def test_non_bool_flag(cls, arg, value):
    with pytest.raises(TypeError, match=f"{arg} must be a bool, got {type(value).__name__}"):
        make(cls, **{arg: value})


@pytest.mark.parametrize("cls, kw, hidden", [
    (RNN, {}, 2**31), (RNN, {"bidirectional": True}, 2**30),
    (GRU, {}, 2**31 // 3 + 1), (LSTM, {}, 2**29), (LSTM, {"bidirectional": True}, 2**28),
    (RNNCell, {}, 2**31), (GRUCell, {}, 2**31 // 3 + 1), (LSTMCell, {}, 2**29),
    (LSTM, {}, 10**12),
])
def test_hidden_size_overflowing_blas_int(cls, kw, hidden):
    start = time.perf_counter()
    with pytest.raises(ValueError, match=f"hidden_size {hidden}.*too large"):
        cls(D, hidden, **kw)
    assert time.perf_counter() - start < 0.5  # refused before allocating anything


@pytest.mark.parametrize("cls", LAYERS + CELLS)
def test_input_size_overflowing_blas_int(cls):
    with pytest.raises(ValueError, match=f"input_size {2**31}.*too large"):
        cls(2**31, H)


# --- call: input --------------------------------------------------------------

@pytest.mark.parametrize("cls", LAYERS)
@pytest.mark.parametrize("batch_first, layout", [(False, "T, B"), (True, "B, T")])
@pytest.mark.parametrize("shape", [(D,), (T, B, 1, D), (T, B, D + 1), (T, D - 1), (T, B, 0)])
def test_layer_bad_input_shape(cls, batch_first, layout, shape):
    m = make(cls, batch_first=batch_first)
    got = "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"
    with pytest.raises(ValueError, match=rf"expected input of shape \({layout}, {D}\) or "
                                         rf"\(T, {D}\), got {re.escape(got)}"):
        m(np.zeros(shape))


@pytest.mark.parametrize("cls", CELLS)
@pytest.mark.parametrize("shape", [(B, 1, D), (D + 1,), (B, D - 1), (1, 1, 1, D), (0,)])
def test_cell_bad_input_shape(cls, shape):
    m = make(cls)
    with pytest.raises(ValueError, match=rf"expected input of shape \(B, {D}\) or \({D},\), "
                                         rf"got {re.escape(str(shape))}"):
        m(np.zeros(shape))


@pytest.mark.parametrize("cls", LAYERS + CELLS)
@pytest.mark.parametrize("input_size", [1, D])
@pytest.mark.parametrize("value", [np.float64(0.5), 0.5, np.array(0.5)])
def test_zero_dim_input(cls, input_size, value):
    with pytest.raises(ValueError, match=r"expected input of shape .*, got \(\)"):
        cls(input_size, H)(value)


BAD_DTYPE_INPUTS = [
    pytest.param(lambda s: np.zeros(s, np.complex64), "complex64", id="complex"),
    pytest.param(lambda s: np.zeros(s, object), "object", id="object"),
    pytest.param(lambda s: np.full(s, "a"), "<U1", id="str"),
    pytest.param(lambda s: np.zeros(s, bool), "bool", id="bool"),
    pytest.param(lambda s: np.zeros(s, "datetime64[s]"), r"datetime64\[s\]", id="datetime"),
]


@pytest.mark.parametrize("cls", LAYERS + CELLS)
@pytest.mark.parametrize("build, dtype_name", BAD_DTYPE_INPUTS)
def test_non_real_input_dtype(cls, build, dtype_name):
    m = make(cls)
    with pytest.raises(TypeError, match=f"input must have a real numeric dtype, got {dtype_name}"):
        m(build(x_for(m).shape))


@pytest.mark.parametrize("cls", LAYERS + CELLS)
@pytest.mark.parametrize("value", [None, "abc", {"a": 1}])
def test_non_array_input(cls, value):
    with pytest.raises(TypeError, match="input must (be array-like|have a real numeric dtype)"
                                        "|expected input as an array, got None"):
        make(cls)(value)


@pytest.mark.parametrize("cls", LAYERS + CELLS)
def test_ragged_input(cls):
    ragged = [[0.0] * D, [0.0] * (D - 1)]
    if cls in LAYERS:
        ragged = [ragged, ragged]
    with pytest.raises(TypeError, match="input must be array-like, got list that numpy cannot"):
        make(cls)(ragged)


@pytest.mark.parametrize("cls", LAYERS)
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("shape", [(0, B, D), (0, D)])
def test_zero_time_steps(cls, batch_first, shape):
    m = make(cls, batch_first=batch_first)
    if batch_first and len(shape) == 3:
        shape = (B, 0, D)
    with pytest.raises(ValueError, match="expected at least one time step"):
        m(np.zeros(shape))


@pytest.mark.parametrize("cls", LAYERS)
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("with_state", [False, True])
def test_layer_empty_batch(cls, batch_first, bidirectional, dtype, with_state):
    m = make(cls, num_layers=2, batch_first=batch_first, bidirectional=bidirectional, dtype=dtype)
    x = np.zeros((0, T, D) if batch_first else (T, 0, D))
    kw = {"hx": make_hx(m, 0), "lengths": np.zeros(0, np.int64)} if with_state else {}
    res = call(m, x, **kw)
    dirs = 2 if bidirectional else 1
    assert res[0].shape == ((0, T, dirs * H) if batch_first else (T, 0, dirs * H))
    assert len(res) == (3 if cls is LSTM else 2)
    for state in res[1:]:
        assert state.shape == (2 * dirs, 0, H)
    assert all(r.dtype == np.dtype(dtype) for r in res)


@pytest.mark.parametrize("cls", CELLS)
@pytest.mark.parametrize("with_state", [False, True])
def test_cell_empty_batch(cls, with_state):
    m = make(cls, dtype="float64")
    res = call(m, np.zeros((0, D)), make_hx(m, 0) if with_state else None)
    assert len(res) == (2 if cls is LSTMCell else 1)
    assert all(r.shape == (0, H) and r.dtype == np.float64 for r in res)


# --- call: hx ----------------------------------------------------------------

@pytest.mark.parametrize("cls, bad", [(RNN, "h"), (GRU, "h"), (LSTM, "h"), (LSTM, "c")])
@pytest.mark.parametrize("shape", [(1, B, H + 1), (2, B, H), (1, B + 1, H), (B, H), (1, 1, B, H)])
def test_layer_wrong_hx_shape(cls, bad, shape):
    m = make(cls)
    h, c = np.zeros((1, B, H)), np.zeros((1, B, H))
    if bad == "h":
        h = np.zeros(shape)
    else:
        c = np.zeros(shape)
    name = {"h": "h_0" if cls is LSTM else "hx", "c": "c_0"}[bad]
    with pytest.raises(ValueError, match=rf"expected {name} of shape \(1, {B}, {H}\)"):
        m(x_for(m), (h, c) if cls is LSTM else h)


@pytest.mark.parametrize("cls", LAYERS)
def test_layer_unbatched_wants_unbatched_hx(cls):
    m = make(cls)
    with pytest.raises(ValueError, match=rf"of shape \(1, {H}\), got \(1, 1, {H}\)"):
        h = np.zeros((1, 1, H))
        m(np.zeros((T, D)), (h, h) if cls is LSTM else h)


@pytest.mark.parametrize("cls", CELLS)
@pytest.mark.parametrize("batched", [True, False])
def test_cell_wrong_hx_shape(cls, batched):
    m = make(cls)
    x = np.zeros((B, D)) if batched else np.zeros(D)
    good = np.zeros((B, H) if batched else H)
    bad = np.zeros((B, H + 1) if batched else (1, H))
    expected = rf"\({B}, {H}\)" if batched else rf"\({H},\)"
    with pytest.raises(ValueError, match=rf"expected (hx|h) of shape {expected}"):
        m(x, (bad, good) if cls is LSTMCell else bad)
    if cls is LSTMCell:
        with pytest.raises(ValueError, match=rf"expected c of shape {expected}"):
            m(x, (good, bad))


@pytest.mark.parametrize("cls", [LSTM, LSTMCell])
@pytest.mark.parametrize("hx", [
    pytest.param(lambda s: np.zeros(s), id="array"),
    pytest.param(lambda s: (np.zeros(s),) * 3, id="3-tuple"),
    pytest.param(lambda s: (np.zeros(s),), id="1-tuple"),
    pytest.param(lambda s: np.zeros((2, *s)), id="stacked-array"),
])
def test_lstm_hx_structure(cls, hx):
    m = make(cls)
    with pytest.raises(TypeError, match=r"hx must be a tuple \((h_0, c_0|h, c)\) of arrays"):
        m(x_for(m), hx(state_shape(m)))


@pytest.mark.parametrize("cls", [RNN, GRU, RNNCell, GRUCell])
@pytest.mark.parametrize("container", [tuple, list])
def test_non_lstm_hx_structure(cls, container):
    m = make(cls)
    h = np.zeros(state_shape(m))
    with pytest.raises(TypeError, match=f"hx must be one array of shape .*got a {container.__name__}"):
        m(x_for(m), container([h, h]))


@pytest.mark.parametrize("cls", LAYERS + CELLS)
def test_non_real_hx(cls):
    m = make(cls)
    h = np.zeros(state_shape(m), np.complex128)
    name = {LSTM: "h_0", LSTMCell: "h"}.get(cls, "hx")
    with pytest.raises(TypeError, match=f"{name} must have a real numeric dtype, got complex128"):
        m(x_for(m), (h, h.real) if has_c(cls) else h)


# --- call: lengths -------------------------------------------------------------

@pytest.mark.parametrize("cls", LAYERS)
@pytest.mark.parametrize("lengths, exc, msg", [
    ([T], ValueError, rf"expected lengths of shape \({B},\), got \(1,\)"),
    ([T] * (B + 1), ValueError, rf"expected lengths of shape \({B},\), got \({B + 1},\)"),
    (T, ValueError, rf"expected lengths of shape \({B},\), got \(\)"),
    ([[T] * B], ValueError, rf"expected lengths of shape \({B},\), got \(1, {B}\)"),
    ([0, T], ValueError, rf"lengths must lie in \[1, {T}\]"),
    ([T + 1, T], ValueError, rf"lengths must lie in \[1, {T}\]"),
    ([-1, T], ValueError, rf"lengths must lie in \[1, {T}\]"),
    ([2.0, 3.0], TypeError, "lengths must be integers, got dtype float64"),
    (np.array([2, 3], np.float32), TypeError, "lengths must be integers, got dtype float32"),
    ([True, True], TypeError, "lengths must have a real numeric dtype, got bool"),
    (["2", "3"], TypeError, "lengths must have a real numeric dtype"),
])
def test_bad_lengths(cls, lengths, exc, msg):
    m = make(cls)
    with pytest.raises(exc, match=msg):
        m(x_for(m), lengths=lengths)


@pytest.mark.parametrize("cls", LAYERS)
def test_lengths_with_unbatched_input(cls):
    with pytest.raises(ValueError, match="lengths needs batched input"):
        make(cls)(np.zeros((T, D)), lengths=[T])


# --- load_state_dict -------------------------------------------------------------

def _bad_last(sd, value):
    """Every value changed, the last one replaced by `value`: a loader that
    copied before validating everything would leave the module changed."""
    new = {k: v + 1 for k, v in sd.items()}
    new[list(sd)[-1]] = value(sd[list(sd)[-1]])
    return new


BAD_STATE_DICTS = [
    pytest.param(lambda sd: dict(list(sd.items())[1:]), ValueError,
                 r"missing keys \['weight_ih(_l0)?'\], unexpected keys \[\]", id="missing"),
    pytest.param(lambda sd: {**sd, "weight_ih_l9": sd[next(iter(sd))]}, ValueError,
                 r"missing keys \[\], unexpected keys \['weight_ih_l9'\]", id="unexpected"),
    pytest.param(lambda sd: _bad_last(sd, lambda v: v[:-1]), ValueError,
                 r"expected bias_hh(_l0)? of shape \(\d+,\), got \(\d+,\)", id="short"),
    pytest.param(lambda sd: _bad_last(sd, lambda v: v[None]), ValueError,
                 r"expected bias_hh(_l0)? of shape \(\d+,\), got \(1, \d+\)", id="extra-dim"),
    pytest.param(lambda sd: {**sd, "weight_ih" + ("_l0" if "weight_ih_l0" in sd else ""):
                             np.zeros((1, 1))}, ValueError,
                 r"expected weight_ih(_l0)? of shape \(\d+, 3\), got \(1, 1\)", id="2d-shape"),
    pytest.param(lambda sd: _bad_last(sd, lambda v: np.where(np.arange(v.size) == 1, np.nan, v)),
                 ValueError, r"bias_hh(_l0)? has non-finite values", id="nan"),
    pytest.param(lambda sd: _bad_last(sd, lambda v: np.full_like(v, -np.inf)),
                 ValueError, r"bias_hh(_l0)? has non-finite values", id="inf"),
    pytest.param(lambda sd: _bad_last(sd, lambda v: np.full(v.shape, 1e300)),
                 ValueError, r"bias_hh(_l0)? has non-finite values .*after conversion", id="overflow"),
    pytest.param(lambda sd: _bad_last(sd, lambda v: v.astype(np.complex64)),
                 TypeError, r"state_dict\['bias_hh(_l0)?'\] must have a real numeric dtype, "
                            r"got complex64", id="complex"),
    pytest.param(lambda sd: _bad_last(sd, lambda v: np.zeros(v.shape, np.uint16)),
                 TypeError, r"state_dict\['bias_hh(_l0)?'\] holds a quantized model's bfloat16 "
                            r"bit patterns \(uint16\), not the weights' values", id="bfloat16"),
    pytest.param(lambda sd: {**_bad_last(sd, lambda v: np.ones(v.shape, np.int8)),
                             list(sd)[-1] + "_scale": np.ones(1, np.float32)},
                 TypeError, r"holds a quantized model's int8 weights \(with their scales\)",
                 id="int8-with-scale"),
    pytest.param(lambda sd: _bad_last(sd, lambda v: v.astype(object)),
                 TypeError, r"state_dict\['bias_hh(_l0)?'\] must have a real numeric dtype", id="object"),
    pytest.param(lambda sd: _bad_last(sd, lambda v: None),
                 TypeError, r"expected state_dict\['bias_hh(_l0)?'\] as an array, got None",
                 id="None"),
    pytest.param(lambda sd: list(sd.items()), TypeError,
                 "load_state_dict expects a mapping of name to array, got list", id="list"),
    pytest.param(lambda sd: None, TypeError,
                 "load_state_dict expects a mapping of name to array, got NoneType", id="none"),
]


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@pytest.mark.parametrize("cls", LAYERS + CELLS)
@pytest.mark.parametrize("bad, exc, msg", BAD_STATE_DICTS)
def test_bad_load_state_dict_leaves_module_unchanged(cls, bad, exc, msg):
    m = make(cls, dtype="float32")
    x = x_for(m)
    before, out_before = m.state_dict(), call(m, x)
    with pytest.raises(exc, match=msg):
        m.load_state_dict(bad(m.state_dict()))
    assert_state_equal(m.state_dict(), before)
    assert_same_results(call(m, x), out_before)


@pytest.mark.parametrize("cls", LAYERS + CELLS)
def test_load_state_dict_non_strict_partial(cls):
    m = make(cls)
    x = x_for(m)
    before, out_before = m.state_dict(), call(m, x)
    first, *rest = list(before)
    new = np.full_like(before[first], 0.25)
    result = m.load_state_dict({first: new, "not_a_parameter": np.zeros(3)}, strict=False)
    assert result == (rest, ["not_a_parameter"])
    assert result.missing_keys == rest and result.unexpected_keys == ["not_a_parameter"]
    after = m.state_dict()
    assert np.array_equal(after[first], new)
    assert all(np.array_equal(after[k], before[k]) for k in rest)
    assert not np.array_equal(call(m, x)[0], out_before[0])
    with pytest.raises(ValueError, match=r"missing keys"):  # strict is the default
        m.load_state_dict({first: new})


@pytest.mark.parametrize("cls", LAYERS + CELLS)
def test_load_state_dict_round_trip_and_copies(cls):
    m, other = make(cls), cls(D, H, seed=7)
    sd = other.state_dict()
    assert m.load_state_dict(sd) == ([], [])
    assert_same_results(call(m, x_for(m)), call(other, x_for(m)))
    next(iter(sd.values()))[...] = 99.0  # the loaded arrays are copies, not aliases
    assert_state_equal(m.state_dict(), other.state_dict())
    m.state_dict()[next(iter(sd))][...] = 99.0  # state_dict returns copies too
    assert_state_equal(m.state_dict(), other.state_dict())


# --- attribute protection ----------------------------------------------------------

def first_weight(m):
    return "weight_ih" if type(m) in CELLS else "weight_ih_l0"


@pytest.mark.parametrize("cls", LAYERS + CELLS)
def test_parameters_are_read_only(cls):
    m = make(cls)
    before = m.state_dict()
    for name in before:
        with pytest.raises(ValueError, match="read-only"):
            getattr(m, name)[...] = 1.0
        with pytest.raises(ValueError, match="read-only"):
            getattr(m, name).reshape(-1)[0] = 1.0
    assert_state_equal(m.state_dict(), before)


@pytest.mark.parametrize("cls", LAYERS + CELLS)
def test_parameters_cannot_be_made_writeable(cls):
    m = make(cls)
    for name in m.state_dict():
        with pytest.raises(ValueError, match="WRITEABLE"):
            getattr(m, name).flags.writeable = True


CONFIG = ["input_size", "hidden_size", "bias", "dtype"]
LAYER_CONFIG = CONFIG + ["num_layers", "batch_first", "bidirectional", "dropout"]


@pytest.mark.parametrize("cls, attr", [(c, a) for c in LAYERS for a in LAYER_CONFIG]
                         + [(c, a) for c in CELLS for a in CONFIG]
                         + [(RNN, "nonlinearity"), (RNNCell, "nonlinearity")])
def test_config_is_read_only(cls, attr):
    m = make(cls)
    old = getattr(m, attr)
    with pytest.raises(AttributeError, match=f"{cls.__name__}: {attr} is fixed at construction"):
        setattr(m, attr, 3)
    assert getattr(m, attr) == old


@pytest.mark.parametrize("cls", LAYERS + CELLS)
@pytest.mark.parametrize("kind", ["weight_ih", "weight_hh", "bias_ih", "bias_hh"])
def test_parameter_assignment(cls, kind):
    m = make(cls)
    name = kind if cls in CELLS else kind + "_l0"
    x, hx = x_for(m), make_hx(m)
    before, out_before = m.state_dict(), call(m, x, hx)
    shape = before[name].shape
    with pytest.raises(ValueError, match=rf"expected {name} of shape"):
        setattr(m, name, np.zeros(shape[:-1] + (shape[-1] + 1,)))
    with pytest.raises(ValueError, match=rf"{name} has non-finite values"):
        setattr(m, name, np.full(shape, np.nan))
    with pytest.raises(TypeError, match=rf"state_dict\['{name}'\] must have a real numeric dtype"):
        setattr(m, name, "abc")
    assert_state_equal(m.state_dict(), before)
    assert_same_results(call(m, x, hx), out_before)

    new = np.full(shape, 0.3)
    setattr(m, name, new)
    assert np.array_equal(getattr(m, name), new.astype(m.dtype))
    assert not getattr(m, name).flags.writeable
    assert not np.shares_memory(getattr(m, name), new)
    new[...] = 0.0  # the module keeps its own copy
    assert np.array_equal(getattr(m, name), np.full(shape, 0.3, m.dtype))
    assert not np.array_equal(call(m, x, hx)[0], out_before[0])


# --- the caller's arrays are never modified ------------------------------------------

@pytest.mark.parametrize("cls", LAYERS + CELLS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("read_only", [False, True])
def test_user_arrays_untouched(cls, dtype, read_only):
    kw = {} if cls in CELLS else {"num_layers": 3, "bidirectional": True}
    m = make(cls, dtype=dtype, **kw)
    x = x_for(m).astype(dtype)
    hx = make_hx(m)
    hx = tuple(a.astype(dtype) for a in hx) if isinstance(hx, tuple) else hx.astype(dtype)
    lengths = np.array([T, 2]) if cls in LAYERS else None
    arrays = [x, *(hx if isinstance(hx, tuple) else (hx,))] + ([lengths] if cls in LAYERS else [])
    copies = [a.copy() for a in arrays]
    for a in arrays:
        a.setflags(write=not read_only)
    res = call(m, x, hx, **({"lengths": lengths} if cls in LAYERS else {}))
    for a, c in zip(arrays, copies):
        assert np.array_equal(a, c)
    for r in res:
        assert r.flags.writeable
        assert not any(np.shares_memory(r, a) for a in arrays)


# --- NaN and inf -----------------------------------------------------------------

def _sigmoid(a):
    return 1.0 / (1.0 + np.exp(-a))


def reference(m, x, kind):
    """A float64 NumPy forward of a one-layer unidirectional layer, x (T, B, D)."""
    p = {k.removesuffix("_l0"): v.astype(np.float64) for k, v in m.state_dict().items()}
    h = np.zeros((x.shape[1], H))
    c = np.zeros_like(h)
    outs = []
    with np.errstate(all="ignore"):
        for x_t in x:
            gi = x_t @ p["weight_ih"].T + p["bias_ih"]
            gh = h @ p["weight_hh"].T + p["bias_hh"]
            if kind == "tanh":
                h = np.tanh(gi + gh)
            elif kind == "relu":
                h = np.maximum(gi + gh, 0.0)
            elif kind == "gru":
                (ir, iz, i_n), (hr, hz, hn) = np.split(gi, 3, -1), np.split(gh, 3, -1)
                r, z = _sigmoid(ir + hr), _sigmoid(iz + hz)
                h = (1 - z) * np.tanh(i_n + r * hn) + z * h
            else:
                i, f, g, o = np.split(gi + gh, 4, -1)
                c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(g)
                h = _sigmoid(o) * np.tanh(c)
            outs.append(h)
    return np.stack(outs)


KINDS = {"tanh": lambda **kw: RNN(D, H, **kw), "relu": lambda **kw: RNN(D, H, nonlinearity="relu", **kw),
         "gru": lambda **kw: GRU(D, H, **kw), "lstm": lambda **kw: LSTM(D, H, **kw)}


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("dtype, tol", [("float32", 1e-5), ("float64", 1e-12)])
@pytest.mark.parametrize("batch", [1, 3])
def test_nan_and_inf_inputs_propagate_like_numpy(kind, dtype, tol, batch):
    m = KINDS[kind](dtype=dtype, seed=0)
    x = np.random.default_rng(2).standard_normal((6, batch, D)).astype(dtype)
    x[2, 0, 1] = np.nan
    if batch > 1:
        x[1, 1, 0] = np.inf
        x[3, 2, 2] = -np.inf
    out = call(m, x)[0]
    ref = reference(m, x, kind)
    assert np.isnan(out[2:, 0]).all() and not np.isnan(out[:2]).any()
    np.testing.assert_allclose(out, ref, rtol=tol, atol=tol)  # NaN and inf at the same places
    assert np.array_equal(call(m, x)[1][0], out[-1], equal_nan=True)  # h_n


@pytest.mark.parametrize("cls", [RNN, RNNCell])
def test_relu_keeps_nan(cls):
    m = make(cls, nonlinearity="relu")
    x = x_for(m)
    x[..., 0] = np.nan
    assert np.isnan(call(m, x)[0]).all()


@pytest.mark.parametrize("cls", CELLS)
def test_cell_nan_input_and_state(cls):
    m = make(cls)
    x = x_for(m, batch=3)
    x[0, 1] = np.nan
    h = np.zeros((3, H))
    h[2, 0] = np.nan
    res = call(m, x, (h, np.zeros_like(h)) if cls is LSTMCell else h)
    assert np.isnan(res[0][0]).all() and np.isnan(res[0][2]).all()
    assert np.isfinite(res[0][1]).all()


# --- odd but valid arrays are converted, not rejected ------------------------------------

def _strided(a):
    big = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
    big[..., ::2] = a
    return big[..., ::2]


CONVERSIONS = [
    pytest.param(lambda a: a.astype(np.float16), id="float16"),
    pytest.param(lambda a: a.astype(np.float32), id="float32"),
    pytest.param(lambda a: a.astype(np.longdouble), id="longdouble"),
    pytest.param(lambda a: a.astype(">f8"), id="big-endian"),
    pytest.param(lambda a: np.round(a * 4).astype(np.int64), id="int64"),
    pytest.param(lambda a: np.round(a * 4).astype(np.int8), id="int8"),
    pytest.param(lambda a: np.abs(np.round(a * 4)).astype(np.uint8), id="uint8"),
    pytest.param(lambda a: np.asfortranarray(a), id="fortran"),
    pytest.param(_strided, id="strided"),
    pytest.param(lambda a: a[::-1].copy()[::-1], id="negative-stride"),
    pytest.param(lambda a: a.tolist(), id="list"),
]


def _as_reference(a, dtype):
    """What the converted array must equal: a float64 C-contiguous copy, then the layer dtype."""
    return np.ascontiguousarray(np.asarray(a), dtype=np.float64).astype(dtype)


@pytest.mark.parametrize("cls", LAYERS + CELLS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("convert", CONVERSIONS)
def test_any_real_array_is_converted(cls, dtype, convert):
    kw = {} if cls in CELLS else {"num_layers": 2, "bidirectional": True}
    m = make(cls, dtype=dtype, **kw)
    x = convert(x_for(m))
    hx = make_hx(m, value=0.0)
    if isinstance(hx, tuple):
        hx = tuple(convert(a + 0.5 * i) for i, a in enumerate(hx))
    else:  # (a list would be read as a list of states)
        hx = np.asarray(convert(hx + 0.5))
    ref_hx = tuple(_as_reference(a, dtype) for a in hx) if isinstance(hx, tuple) \
        else _as_reference(hx, dtype)
    extra = {"lengths": np.array([T, 3])} if cls in LAYERS else {}
    got = call(m, x, hx, **extra)
    want = call(m, _as_reference(x, dtype), ref_hx, **extra)
    assert_same_results(got, want)


@pytest.mark.parametrize("cls", LAYERS)
@pytest.mark.parametrize("lengths", [
    pytest.param(np.array([T, 3], np.int32), id="int32"),
    pytest.param(np.array([T, 3], np.uint8), id="uint8"),
    pytest.param(np.array([T, 3], np.uint64), id="uint64"),
    pytest.param(np.array([T, 3], ">i8"), id="big-endian"),
    pytest.param(np.array([T, 0, 3, 0])[::2], id="strided"),
    pytest.param((T, 3), id="tuple"),
    pytest.param(np.array([[T, 3]]).T[:, 0], id="transposed"),
])
def test_any_integer_lengths_are_converted(cls, lengths):
    m = make(cls, bidirectional=True)
    x = x_for(m)
    assert_same_results(call(m, x, lengths=lengths), call(m, x, lengths=np.array([T, 3])))


@pytest.mark.parametrize("cls", LAYERS + CELLS)
@pytest.mark.parametrize("convert", CONVERSIONS)
def test_load_state_dict_converts(cls, convert):
    m, other = make(cls, dtype="float64"), cls(D, H, seed=5, dtype="float64")
    sd = {k: convert(v) for k, v in other.state_dict().items()}
    m.load_state_dict(sd)
    assert_state_equal(m.state_dict(), {k: _as_reference(v, np.float64) for k, v in sd.items()})


# --- torch tensors ------------------------------------------------------------------

@pytest.mark.parametrize("cls", LAYERS + CELLS)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_torch_tensors_as_input_hx_lengths(cls, requires_grad):
    torch = pytest.importorskip("torch")
    kw = {} if cls in CELLS else {"num_layers": 2, "bidirectional": True}
    m = make(cls, **kw)
    x = x_for(m).astype(np.float32)
    hx = make_hx(m)
    hx = tuple(a.astype(np.float32) for a in hx) if isinstance(hx, tuple) else hx.astype(np.float32)

    def tensor(a):
        return torch.tensor(a, requires_grad=requires_grad)

    t_hx = tuple(map(tensor, hx)) if isinstance(hx, tuple) else tensor(hx)
    extra_np, extra_t = {}, {}
    if cls in LAYERS:
        extra_np, extra_t = {"lengths": np.array([T, 2])}, {"lengths": torch.tensor([T, 2])}
    assert_same_results(call(m, tensor(x), t_hx, **extra_t), call(m, x, hx, **extra_np))


@pytest.mark.parametrize("cls", LAYERS)
@pytest.mark.parametrize("tdtype", ["float16", "bfloat16", "float64", "int32"])
def test_torch_dtypes_and_layouts(cls, tdtype):
    torch = pytest.importorskip("torch")
    m = make(cls)
    t = torch.randn(B, T, D).to(getattr(torch, tdtype)).transpose(0, 1)  # non-contiguous
    ref = t.double().numpy().astype(np.float32)
    assert_same_results(call(m, t), call(m, ref))


@pytest.mark.parametrize("cls", LAYERS + CELLS)
def test_torch_bad_tensors(cls):
    torch = pytest.importorskip("torch")
    m = make(cls)
    shape = x_for(m).shape
    with pytest.raises(TypeError, match="input must have a real numeric dtype, got complex64"):
        m(torch.zeros(shape, dtype=torch.complex64))
    with pytest.raises(TypeError, match="input must have a real numeric dtype, got bool"):
        m(torch.zeros(shape, dtype=torch.bool))
    with pytest.raises(ValueError, match="expected input of shape"):
        m(torch.zeros(shape[:-1] + (D + 1,)))
    if cls in LAYERS:
        with pytest.raises(TypeError, match="lengths must be integers, got dtype float32"):
            m(torch.zeros(shape), lengths=torch.tensor([1.0, 2.0]))


@pytest.mark.parametrize("cls", LAYERS + CELLS)
def test_torch_state_dict_loads(cls):
    torch = pytest.importorskip("torch")
    kw = {} if cls in CELLS else {"num_layers": 2, "bidirectional": True}
    torch.manual_seed(0)
    peer = getattr(torch.nn, cls.__name__)(D, H, **kw)
    m = make(cls, **kw)
    params = dict(peer.named_parameters())  # requires_grad=True tensors
    assert all(p.requires_grad for p in params.values())
    m.load_state_dict(params)
    assert_state_equal(m.state_dict(), {k: v.detach().numpy() for k, v in params.items()})
    m2 = make(cls, **kw)
    m2.load_state_dict(peer.state_dict())
    assert_state_equal(m2.state_dict(), m.state_dict())
    with pytest.raises(ValueError, match="non-finite"):
        m.load_state_dict({k: v * float("nan") for k, v in peer.state_dict().items()})
    assert_state_equal(m.state_dict(), m2.state_dict())


@pytest.mark.parametrize("cls", [RNN, GRU, LSTM])
def test_a_layer_backprop_without_dout_says_so(cls):
    """[failed before] It said 'dout must have a real numeric dtype, got
    object', where a loss reading only the final state had passed None."""
    layer = cls(3, 4, seed=0)
    (out, state), backprop = layer.forward_train(np.zeros((5, 2, 3), np.float32))
    with pytest.raises(TypeError, match=r"^.*\.backprop: expected dout, the gradient of the "
                                        r"output, as an array, got None; pass zeros"):
        backprop(None, state)


def test_none_as_an_array_is_named_as_none():
    with pytest.raises(TypeError, match=r"^LSTM: expected input as an array, got None$"):
        LSTM(3, 4)(None)


def test_files_are_named_by_a_path_not_given_as_file_objects(tmp_path):
    """A file object (or None, or an int) reached os.fspath's bare message,
    which named neither the function nor the argument; to_onnx took an int
    as a file descriptor (OSError, or a write into whatever it was)."""
    import io
    layer = make(LSTM)
    calls = {"fastrnn.save": lambda p: fastrnn.save(layer, p),
             "fastrnn.load": fastrnn.load,
             "Sequential.save": lambda p: fastrnn.Sequential([layer]).save(p),
             "Sequential.load": fastrnn.Sequential.load,
             "fastrnn.load_state_dict_file": fastrnn.load_state_dict_file}
    for owner, call in calls.items():
        for bad in (io.BytesIO(), None, 3):
            with pytest.raises(TypeError, match=rf"^{re.escape(owner)}: path must be a file's "
                                                rf"name \(str, bytes or os.PathLike\), got "
                                                rf"{type(bad).__name__}$"):
                call(bad)
    pytest.importorskip("onnx")
    with pytest.raises(TypeError, match=r"^to_onnx: path must be a file's name .*got int$"):
        fastrnn.to_onnx(layer, 3)
    with pytest.raises(TypeError, match=r"^to_onnx: lengths must be a bool, got str$"):
        fastrnn.to_onnx(layer, lengths="no")   # any truthy value added sequence_lens


def test_sequential_load_state_dict_reports_what_it_skipped():
    """As a layer's (and PyTorch's): (missing_keys, unexpected_keys); it
    returned None, so strict=False never told what was skipped."""
    model = fastrnn.Sequential([fastrnn.Linear(2, 2, seed=0), fastrnn.Tanh(),
                                fastrnn.Linear(2, 1, seed=1)])
    result = model.load_state_dict({"0.weight": np.ones((2, 2)), "7.weight": np.ones(1)},
                                   strict=False)
    assert result == (["0.bias", "2.weight", "2.bias"], ["7.weight"])
    assert result.missing_keys == ["0.bias", "2.weight", "2.bias"]
    assert model.load_state_dict(model.state_dict()) == ([], [])


def test_torch_tensors_without_values_are_refused_by_name():
    """A meta tensor raised torch's NotImplementedError and a quantized one a
    RuntimeError, neither naming the entry."""
    torch = pytest.importorskip("torch")
    layer = make(LSTM)
    state = {k: torch.from_numpy(v) for k, v in layer.state_dict().items()}
    shape = tuple(state["weight_ih_l0"].shape)
    with pytest.raises(TypeError, match=r"^LSTM: state_dict\['weight_ih_l0'\] is a torch tensor "
                                        r"on the meta device"):
        layer.load_state_dict(dict(state, weight_ih_l0=torch.empty(shape, device="meta")))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # torch deprecates making quantized tensors
        q = torch.quantize_per_tensor(torch.zeros(shape), 0.1, 0, torch.qint8)
    with pytest.raises(TypeError, match=r"^LSTM: state_dict\['weight_ih_l0'\] is a quantized "
                                        r"torch tensor \(torch.qint8\)"):
        layer.load_state_dict(dict(state, weight_ih_l0=q))


def _compiled_linear():
    model = fastrnn.Sequential([fastrnn.Linear(2, 2, seed=0)])
    model.compile("mse", "sgd")
    return model


WRONG_TYPES = {   # a wrong type is a TypeError (these were ValueErrors, or accepted)
    "StepLR step_size float": (lambda: fastrnn.optim.StepLR(
        fastrnn.optim.SGD(fastrnn.Linear(2, 2)), 2.0), r"StepLR: step_size must be a positive "
                                                        r"int, got float 2.0"),
    "StepLR step_size bool": (lambda: fastrnn.optim.StepLR(
        fastrnn.optim.SGD(fastrnn.Linear(2, 2)), True), r"StepLR: step_size .*got bool"),
    "HuberLoss delta str": (lambda: fastrnn.HuberLoss(delta="1"),
                            r"HuberLoss: delta must be a positive number, got str '1'"),
    "compile loss int": (lambda: fastrnn.Sequential([fastrnn.Linear(2, 2)]).compile(loss=3),
                         r"loss must be a fastrnn loss or one of .*, got int$"),
    "compile loss class": (lambda: fastrnn.Sequential([fastrnn.Linear(2, 2)]).compile(
        loss=fastrnn.MSELoss), r"got type \(the class MSELoss: pass MSELoss\(\) or a name\)"),
    "compile optimizer class": (lambda: fastrnn.Sequential([fastrnn.Linear(2, 2)]).compile(
        "mse", optimizer=fastrnn.optim.Adam), r"optimizer must be .*got type \(the class Adam: "
                                              r"pass Adam\(\) or a name\)"),
    "fit verbose str": (lambda: _compiled_linear().fit(np.ones((4, 2)), np.ones((4, 2)),
                                                       verbose="x"),
                        r"Sequential.fit: verbose must be 0, 1 or 2, got str 'x'"),
    "fit validation_split str": (lambda: _compiled_linear().fit(
        np.ones((4, 2)), np.ones((4, 2)), validation_split="0.2", verbose=0),
        r"Sequential.fit: validation_split must be a float in \[0, 1\), got str '0.2'"),
    "evaluate return_dict str": (lambda: _compiled_linear().evaluate(
        np.ones((4, 2)), np.ones((4, 2)), return_dict="no"),   # a dict came back
        r"Sequential.evaluate: return_dict must be a bool, got str"),
    "ReLU of bools": (lambda: fastrnn.ReLU()(np.array([True, False])),   # int64 came back
                      r"ReLU: input must have a real numeric dtype, got bool"),
    "Dropout of strings": (lambda: fastrnn.Dropout(0.5)(np.array(["a"])),
                           r"Dropout: input must have a real numeric dtype"),
    "metric of strings": (lambda: fastrnn.metrics.MeanAbsoluteError().update_state(
        np.array(["1", "2"]), np.ones(2)),   # numpy's UFuncTypeError
        r"MeanAbsoluteError.update_state: y_true must hold numbers \(or bools\), got dtype "
        r"<U1"),
    "accuracy of string labels": (lambda: fastrnn.metrics.SparseCategoricalAccuracy()
                                  .update_state(np.array(["1", "0"]), np.eye(2)),  # gave 0.0
                                  r"y_true must hold numbers"),
    "from_keras of a fastrnn layer": (lambda: fastrnn.from_keras(fastrnn.LSTM(2, 3)),
                                      r"from_keras: expected a Keras .*got fastrnn.layers.LSTM "
                                      r"\(not a Keras object\)$"),
}


@pytest.mark.parametrize("case", WRONG_TYPES)
def test_a_wrong_type_is_a_type_error_naming_the_argument(case):
    call, message = WRONG_TYPES[case]
    with pytest.raises(TypeError, match=message):
        call()


def test_a_learning_rate_set_by_hand_is_checked():
    """optimizer.lr = NaN was taken (learning_rate's setter checked) and
    the next step turned every weight to NaN."""
    opt = fastrnn.optim.Adam(fastrnn.Linear(2, 2), lr=0.1)
    for bad in (float("nan"), -1.0, float("inf")):
        with pytest.raises(ValueError, match=r"Adam: lr must"):
            opt.lr = bad
    assert opt.lr == 0.1
    opt.lr = 0.5
    assert opt.get_config()["lr"] == opt.learning_rate == 0.5


@pytest.mark.parametrize("cls", LAYERS)
def test_an_np_matrix_state_works_as_its_array(cls):
    """np.matrix stays 2-D through reshape: an unbatched call's hx reached
    the kernel as a 2-D buffer (Cython's "Buffer has wrong number of
    dimensions")."""
    x = np.random.default_rng(0).standard_normal((T, D)).astype(np.float32)
    h = np.random.default_rng(1).standard_normal((1, H)).astype(np.float32)
    m = make(cls)
    hx = (h, h) if has_c(cls) else h
    mx = (np.asmatrix(h), np.asmatrix(h)) if has_c(cls) else np.asmatrix(h)
    np.testing.assert_array_equal(m(x, mx)[0], m(x, hx)[0])
    np.testing.assert_array_equal(m(np.asmatrix(x))[0], m(x)[0])


def test_a_streamed_frame_of_no_axes_is_told_the_models_size():
    """The message said "(D,) or (B, D)" with a literal D."""
    for model in (make(LSTM), fastrnn.Sequential([make(GRU, batch_first=True)])):
        with pytest.raises(ValueError, match=rf"^Stream: expected a frame of shape \({D},\) or "
                                             rf"\(B, {D}\), got \(\)$"):
            fastrnn.Stream(model).step(np.float32(1.0))


def test_from_onnx_of_an_empty_file_says_so(tmp_path):
    """protobuf parses no bytes as an empty model: "has no RNN, GRU or LSTM
    node" hid that the file was empty."""
    pytest.importorskip("onnx")
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=r"^from_onnx: the model is empty \(no graph, no "
                                         r"opset\): an empty file, or not an ONNX model$"):
        fastrnn.from_onnx(str(path))


def test_a_masked_array_is_refused_rather_than_its_mask_dropped():
    """np.asarray drops a masked array's mask: the hidden fill values would
    count in a loss or a fit (3.3e11 for an MSE whose masked part was 0)."""
    y = np.ma.masked_array([1.0, 1e6], mask=[False, True])
    with pytest.raises(TypeError, match=r"^MSELoss: target is a numpy masked array, whose "
                                        r"mask fastrnn does not read; pass its .filled"):
        fastrnn.MSELoss()(np.ones(2), y)
    with pytest.raises(TypeError, match=r"^LSTM: input is a numpy masked array"):
        make(LSTM)(np.ma.masked_array(np.ones((T, D), np.float32)))
    # [failed before] in a list, the masks went without a word
    row = np.ma.masked_array(np.ones(D, np.float32), mask=[True] + [False] * (D - 1))
    with pytest.raises(TypeError, match=r"^LSTM: input holds a numpy masked array, whose mask"):
        make(LSTM)([row] * T)
    with pytest.raises(TypeError, match=r"^MSELoss: pred holds a numpy masked array"):
        fastrnn.MSELoss()([y, y], np.ones((2, 2)))


def test_a_list_of_tensors_that_require_grad_converts_as_one_does():
    """[failed before] One torch tensor that requires grad is taken (its
    values, detached); a list of them raised torch's own RuntimeError ("Can't
    call numpy() on Tensor that requires grad"), which named no argument."""
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).standard_normal((T, D)).astype(np.float32)
    rows = [torch.tensor(row, requires_grad=True) for row in x]
    layer = make(LSTM)
    np.testing.assert_array_equal(layer(rows)[0], layer(x)[0])
    np.testing.assert_array_equal(layer([rows[:2], rows[2:4]])[0],
                                  layer(x[:4].reshape(2, 2, D))[0])
    target = torch.zeros(D, requires_grad=True)
    assert fastrnn.MSELoss()(x[:2], [target, target]) == fastrnn.MSELoss()(x[:2], np.zeros((2, D)))


def test_a_sequentials_load_state_dict_names_the_layer_of_a_bad_value():
    """[failed before] A bad value under '1.weight_hh_l0' was reported as the
    GRU's 'weight_hh_l0': with two GRUs, which one? The message now says
    the layer and its keys' prefix; nothing loads."""
    model = fastrnn.Sequential([GRU(3, 4, batch_first=True, seed=0),
                                GRU(4, 4, batch_first=True, seed=1)])
    state = model.state_dict()
    before = {k: v.copy() for k, v in state.items()}
    for value, error, text in ((np.zeros((12, 2)), ValueError,
                                r"expected weight_hh_l0 of shape \(12, 4\), got \(12, 2\)"),
                               (np.full((12, 4), np.nan), ValueError, r"non-finite values"),
                               (np.zeros((12, 4), complex), TypeError, r"real numeric dtype")):
        with pytest.raises(error, match=r"^Sequential: layer 1 \(GRU, keys '1\.\*'\): GRU: .*"
                                        + text):
            model.load_state_dict(dict(state, **{"0.bias_ih_l0": np.ones(12),
                                                 "1.weight_hh_l0": value}))
        for k, v in model.state_dict().items():
            np.testing.assert_array_equal(v, before[k])


def test_bfloat16_and_bool_values_are_taken_where_numbers_are():
    """[failed before] ml_dtypes' bfloat16 arrays were taken by layers,
    losses and fit, but refused by the metrics and fastrnn.dask.predict; bool
    sample weights by the metrics, but refused by fit. Each now gives the
    numbers of the same values as float32 (weights 0 and 1)."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng(0)
    x = rng.random((4, 5, 3)).astype(np.float32)
    half = x.astype(ml_dtypes.bfloat16)
    metric = fastrnn.metrics.MeanSquaredError()
    metric.update_state(x, half)
    want = fastrnn.metrics.MeanSquaredError()
    want.update_state(x, half.astype(np.float32))
    assert metric.result() == want.result()
    model = fastrnn.Sequential([GRU(3, 4, batch_first=True, seed=0), fastrnn.LastStep(),
                                fastrnn.Linear(4, 1, seed=1)], seed=2)
    if importlib.util.find_spec("dask") is not None:
        import dask
        import dask.array as da

        from fastrnn.dask import predict
        with dask.config.set(scheduler="synchronous"):
            got = predict(model, da.from_array(half, chunks=2)).compute()
        np.testing.assert_array_equal(got, model.predict(half.astype(np.float32)))
    y = rng.random((4, 1)).astype(np.float32)
    histories = []
    for weights in (np.array([True, False, True, True]), np.array([1.0, 0.0, 1.0, 1.0])):
        model.compile("mse", fastrnn.optim.SGD(lr=0.0))
        histories.append(model.fit(x, y, sample_weight=weights, verbose=0).history)
    assert histories[0] == histories[1]


def test_a_layers_save_names_itself(tmp_path):
    for obj in (make(GRU), fastrnn.Linear(2, 2), fastrnn.Tanh(),
                fastrnn.Reversed(make(GRU))):
        with pytest.raises(TypeError, match=rf"^{type(obj).__name__}.save: path must be a "
                                            rf"file's name"):
            obj.save(3)
    make(GRU).save(os.fsencode(tmp_path / "g.npz"))   # bytes name a file too
    assert (tmp_path / "g.npz").exists()


def test_a_schedule_whose_formula_overflows_says_so_and_changes_nothing():
    """[failed before] ExponentialLR(gamma=1e200) overflowed at epoch 2, and
    the message blamed a rate "something else changed"."""
    opt = fastrnn.optim.SGD(fastrnn.Linear(2, 1, seed=0), lr=1.0)
    schedule = fastrnn.optim.ExponentialLR(opt, gamma=1e200)
    schedule.step()
    with pytest.raises(ValueError, match=r"^ExponentialLR: epoch 2's learning rate comes out inf "
                                         r"from the current 1e\+200: the schedule's formula "
                                         r"\(\{'gamma': 1e\+200\}\) overflows; nothing was "
                                         r"changed$"):
        schedule.step()
    assert opt.lr == 1e200 and schedule.epoch == 1


def test_a_schedule_that_would_set_a_negative_rate_says_so_and_changes_nothing():
    """CosineAnnealingLR's chainable step from a rate lowered by hand, in
    its rising half, came out negative (-0.0054: gradient ascent; PyTorch's
    form sets it); the lr check then blamed an lr the user never set, and
    the schedule's epoch had moved on."""
    opt = fastrnn.optim.SGD(fastrnn.Linear(2, 1, seed=0), lr=0.1)
    schedule = fastrnn.optim.CosineAnnealingLR(opt, T_max=4, eta_min=0.01)
    for _ in range(6):
        schedule.step()
    opt.lr = 0.001
    with pytest.raises(ValueError, match=r"^CosineAnnealingLR: epoch 7's learning rate comes "
                                         r"out -0.00536\d* from the current 0.001"):
        schedule.step()
    assert schedule.epoch == 6 and opt.lr == 0.001


def test_ints_of_thousands_of_digits_are_described_in_messages():
    # str() of an int of over 4300 digits raises a ValueError of its own
    # ("Exceeds the limit (4300 digits)"), which replaced these messages
    from fastrnn._validation import int_str
    assert int_str(10**40 - 1) == "9" * 40
    assert int_str(10**40) == "an int of about 41 digits"
    assert int_str(-10**5000 - 1) == "a negative int of about 5001 digits"
    with pytest.raises(ValueError, match="GRU: hidden_size an int of about 5001 digits is too "
                                         "large"):
        fastrnn.GRU(3, 10**5000)
    with pytest.raises(ValueError, match="LSTM: input_size an int of about 5001 digits is too "
                                         "large"):
        fastrnn.LSTM(10**5000, 3)
    with pytest.raises(ValueError, match="tbptt: steps must be >= 1, got -12345$"):
        fastrnn.tbptt(fastrnn.GRU(3, 4), np.zeros((4, 1, 3), np.float32), -12345)


def test_a_quantized_model_is_held_to_its_reduced_weights_bytes(monkeypatch, tmp_path):
    """The memory check counted a quantized layer as float32 parameters with
    float32 gradients (8 bytes a weight): a quantized file or quantize()
    whose int8 weights fit was refused. Filled at once (quantize, a file),
    it needs its int8 (or bfloat16) weights only; built directly it still
    draws float32 weights first, and is checked as a float layer."""
    import os
    if not hasattr(os, "sysconf"):
        pytest.skip("no sysconf: the check needs the machine's memory")
    lstm = fastrnn.LSTM(1, 1000, seed=0)          # 16 MB of float32 weights
    fastrnn.quantize(lstm).save(tmp_path / "int8.npz")
    fastrnn.quantize(lstm, dtype="bfloat16").save(tmp_path / "bf16.npz")
    page = os.sysconf("SC_PAGE_SIZE")
    real = os.sysconf

    def machine_of(nbytes):
        return lambda name: nbytes // page if name == "SC_PHYS_PAGES" else real(name)

    monkeypatch.setattr(os, "sysconf", machine_of(12 << 20))
    with pytest.raises(MemoryError, match=r"LSTM\(input_size=1, hidden_size=1000\): its "
                                          r"parameters and their gradients need"):
        fastrnn.LSTM(1, 1000)
    with pytest.raises(MemoryError, match=r"QuantizedLSTM\(input_size=1, hidden_size=1000\): "
                                          r"its parameters and their gradients need"):
        fastrnn.quantized.QuantizedLSTM(1, 1000)
    x = np.ones((3, 2, 1), np.float32)
    for dtype in ("int8", "bfloat16"):
        q = fastrnn.quantize(lstm, dtype=dtype)
        loaded = fastrnn.load(tmp_path / f"{dtype.replace('float', 'f')[:4]}.npz")
        np.testing.assert_array_equal(loaded(x)[0], q(x)[0])
    monkeypatch.setattr(os, "sysconf", machine_of(3 << 20))
    with pytest.raises(MemoryError, match=r"QuantizedLSTM\(input_size=1, hidden_size=1000\): "
                                          r"its reduced weights need 3.8"):
        fastrnn.load(tmp_path / "int8.npz")


def test_a_batch_past_blas_int_is_refused_before_the_input_is_copied():
    """A broadcast view of 2**31 + 1 rows (4 bytes of memory) was converted
    to a contiguous array before its batch size was checked: numpy's
    "Unable to allocate 48 GiB", or 8 GiB and 73 s before the ValueError.
    Now refused first, allocating nothing of that size."""
    import tracemalloc
    tracemalloc.start()
    try:
        for call, x in (
                (fastrnn.GRU(3, 4, batch_first=True), np.broadcast_to(np.float32(1),
                                                                      (2**31 + 1, 2, 3))),
                (fastrnn.LSTM(3, 4), np.broadcast_to(np.float32(1), (2, 2**31 + 1, 3))),
                (fastrnn.GRUCell(3, 4), np.broadcast_to(np.float32(1), (2**31 + 1, 3))),
                # a Reversed flipped (copied) it before its layer refused it
                (fastrnn.Reversed(fastrnn.GRU(3, 4)),
                 np.broadcast_to(np.float32(1), (2, 2**31 + 1, 3))),
                (fastrnn.Reversed(fastrnn.GRU(3, 4)).forward_train,
                 np.broadcast_to(np.float32(1), (2, 2**31 + 1, 3)))):
            with pytest.raises(ValueError, match=r"batch size 2147483649 does not fit a 32-bit "
                                                 r"BLAS int"):
                call(x)
        assert tracemalloc.get_traced_memory()[1] < 64 << 20
    finally:
        tracemalloc.stop()
