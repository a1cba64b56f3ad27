"""Property-based tests (hypothesis) of the public forward, backward and load
paths against the NumPy reference (tests/reference.py).

Every test draws its configuration (cell kind, sizes, stacking, direction,
layout, dtype, initial states, lengths) and the memory layout of the arrays
it passes; array values come from a NumPy generator seeded by a drawn
integer. The runs are derandomized (the same examples on every run, so CI is
reproducible) and bounded by ``max_examples``: the whole file takes under a
minute on two cores.
"""
import os
import pickle
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis import given

import fastrnn
from reference import cell_forward, layer_forward
from test_backward import TOL
from test_forward import KINDS, make_cell, make_layer


def budget(max_examples):
    """Seeded, bounded settings. The ``close`` fixture returns a pure function,
    so sharing it between examples is safe."""
    return settings(max_examples=max_examples, deadline=None, derandomize=True,
                    database=None, print_blob=True, report_multiple_bugs=False,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


DTYPES = ["float32", "float64"]
INT_DTYPES = ["int8", "int16", "int32", "int64", "uint8", "uint16"]
seeds = st.integers(0, 2**32 - 1)

# How an array reaches the library. Every layout holds the same values; the
# library must see exactly `values.astype(its dtype)` (or, for the
# converting layouts, the converted values).
#   c                  C-contiguous, the module's dtype: the fast paths (a cell's
#                      unbatched frame, a small layer call without lengths)
#   fortran            Fortran order
#   strided            every other element of a wider array (not contiguous)
#   reversed           negative strides
#   readonly           C-contiguous, not writeable: still the fast paths
#   unaligned          one byte past an aligned address
#   other_float        the other float dtype (converted)
#   int                an integer dtype (converted)
#   big_endian         '>f4' / '>f8' of the module's dtype (np.frombuffer)
#   big_endian_other   big-endian of the other float dtype (converted)
LAYOUTS = ["c", "fortran", "strided", "reversed", "readonly", "unaligned", "other_float",
           "int", "big_endian", "big_endian_other"]

# The forward tests take each layout as a parameter, big_endian twice: with
# the calls the fast paths take ("big_endian": a layer call without lengths,
# an unbatched cell frame; they once read big-endian bytes as native ones) and
# with those only the general path takes ("big_endian_general": a layer call
# with lengths, a batch of cell inputs). The other layouts draw either kind.
FORWARD_LAYOUTS = LAYOUTS + ["big_endian_general"]
CALLS = {"big_endian": "fast", "big_endian_general": "general"}


def arrange(values, layout, dtype, rng):
    """(given, seen): ``values`` (a float64 array) in ``layout`` as passed to a
    module of ``dtype``, and, in float64, the values the module must see."""
    dtype = np.dtype(dtype)
    other = np.dtype(np.float64 if dtype == np.float32 else np.float32)
    if layout == "int":
        int_dtype = np.dtype(rng.choice(INT_DTYPES))
        small = np.rint(1.5 * values)
        given = (np.abs(small) if int_dtype.kind == "u" else small).astype(int_dtype)
        return given, given.astype(dtype).astype(np.float64)
    if layout == "other_float":
        given = values.astype(other)
        return given, given.astype(dtype).astype(np.float64)
    if layout == "big_endian_other":
        swapped = other.newbyteorder(">")
        given = np.frombuffer(values.astype(swapped).tobytes(), swapped).reshape(values.shape)
        return given, values.astype(other).astype(dtype).astype(np.float64)
    native = np.ascontiguousarray(values, dtype)
    if layout == "c":
        given = native
    elif layout == "fortran":
        given = np.asfortranarray(native)
    elif layout == "strided":
        wide = np.zeros(native.shape[:-1] + (2 * native.shape[-1],), dtype)
        wide[..., 1::2] = native
        given = wide[..., 1::2]
    elif layout == "reversed":
        given = native[::-1].copy()[::-1]
    elif layout == "readonly":
        given = native.copy()
        given.flags.writeable = False
    elif layout == "unaligned":
        raw = np.zeros(native.nbytes + 1, np.uint8)
        raw[1:] = np.frombuffer(native.tobytes(), np.uint8)
        given = np.frombuffer(raw, dtype, offset=1).reshape(native.shape)
    elif layout == "big_endian":
        swapped = dtype.newbyteorder(">")
        given = np.frombuffer(native.astype(swapped).tobytes(), swapped).reshape(native.shape)
    else:
        raise ValueError(layout)
    assert np.array_equal(given, native)     # the layout keeps every value
    return given, native.astype(np.float64)


def states_of(kind, arrays):
    """The hx argument: one array, or (h, c) for LSTM; None if no arrays."""
    if arrays is None:
        return None
    return tuple(arrays) if kind == "lstm" else arrays[0]


def parts(kind, state):
    """A returned state as a tuple of arrays (h,) or (h, c)."""
    return tuple(state) if kind == "lstm" else (state,)


@st.composite
def layer_configs(draw, dtypes=DTYPES, max_size=7, max_batch=5, batched=None, lengths=None):
    """A layer and call configuration; ``batched`` / ``lengths`` force those
    choices when not None."""
    kind = draw(st.sampled_from(KINDS))
    cfg = dict(kind=kind, dtype=draw(st.sampled_from(dtypes)),
               T=draw(st.integers(1, max_size)), D=draw(st.integers(1, max_size)),
               H=draw(st.integers(1, max_size)), num_layers=draw(st.integers(1, 3)),
               bidirectional=draw(st.booleans()), batch_first=draw(st.booleans()),
               bias=draw(st.booleans()), use_hx=draw(st.booleans()), seed=draw(seeds))
    cfg["unbatched"] = (draw(st.integers(0, 3)) == 0) if batched is None else not batched
    cfg["B"] = 1 if cfg["unbatched"] else draw(st.integers(1, max_batch))
    if cfg["unbatched"]:
        cfg["use_lengths"] = False
    else:
        cfg["use_lengths"] = draw(st.booleans()) if lengths is None else lengths
    return cfg


def build_layer(cfg):
    return make_layer(cfg["kind"], cfg["D"], cfg["H"], num_layers=cfg["num_layers"],
                      bidirectional=cfg["bidirectional"], batch_first=cfg["batch_first"],
                      bias=cfg["bias"], dtype=cfg["dtype"], seed=cfg["seed"])


class LayerCall:
    """Time-major float64 values of one call (x (T, B, D), states (L * dirs,
    B, H), lengths) and their conversion to and from the layout of the call
    (batch-first, unbatched)."""

    def __init__(self, cfg, rng):
        self.cfg = cfg
        T, B, D, H = cfg["T"], cfg["B"], cfg["D"], cfg["H"]
        self.dirs = 2 if cfg["bidirectional"] else 1
        self.n_states = 2 if cfg["kind"] == "lstm" else 1
        state_shape = (cfg["num_layers"] * self.dirs, B, H)
        self.x = rng.standard_normal((T, B, D))
        self.states = [rng.standard_normal(state_shape) if cfg["use_hx"]
                       else np.zeros(state_shape) for _ in range(self.n_states)]
        self.lengths = rng.integers(1, T + 1, size=B) if cfg["use_lengths"] else None

    def seq_to_call(self, a):
        """(T, B, F) time-major -> the call's layout."""
        if self.cfg["unbatched"]:
            return a[:, 0]
        return a.transpose(1, 0, 2) if self.cfg["batch_first"] else a

    def seq_from_call(self, a):
        if self.cfg["unbatched"]:
            return a[:, None]
        return a.transpose(1, 0, 2) if self.cfg["batch_first"] else a

    def state_to_call(self, a):
        return a[:, 0] if self.cfg["unbatched"] else a

    def state_from_call(self, a):
        return a[:, None] if self.cfg["unbatched"] else a

    def lengths_arg(self, rng):
        """lengths as a list or as an integer array of a random dtype."""
        if self.lengths is None:
            return None
        if rng.integers(2):
            return [int(n) for n in self.lengths]
        return self.lengths.astype(rng.choice(["int32", "int64", "uint8", "int16"]))


def reference_layer(cfg, params, x, states, lengths):
    """The reference's out (T, B, dirs * H) and final states, time-major."""
    c0 = states[1] if cfg["kind"] == "lstm" else None
    out, h_n, c_n = layer_forward(cfg["kind"], params, x, states[0], c0, cfg["num_layers"],
                                  cfg["bidirectional"], lengths)
    return out, ((h_n, c_n) if cfg["kind"] == "lstm" else (h_n,))


# --- 1. forward equals the reference -----------------------------------------

@pytest.mark.parametrize("layout", FORWARD_LAYOUTS)
@given(data=st.data())
@budget(400)
def test_layer_forward_matches_reference(layout, data, close):
    calls = CALLS.get(layout)
    cfg = data.draw(layer_configs(lengths={"fast": False, "general": True}.get(calls),
                                  batched=True if calls == "general" else None), label="config")
    layout = layout.replace("_general", "")
    rng = np.random.default_rng(cfg["seed"])
    layer = build_layer(cfg)
    call = LayerCall(cfg, rng)
    dtype, kind = cfg["dtype"], cfg["kind"]
    x, seen_x = arrange(call.seq_to_call(call.x), layout, dtype, rng)
    hx, seen_states = None, [np.zeros_like(s) for s in call.states]
    if cfg["use_hx"]:
        arranged = [arrange(call.state_to_call(s), layout, dtype, rng) for s in call.states]
        hx = states_of(kind, [given for given, _ in arranged])
        seen_states = [call.state_from_call(seen) for _, seen in arranged]
    lengths = call.lengths_arg(rng)
    keep = [np.array(a, copy=True) for a in (x, *(parts(kind, hx) if hx is not None else ()))]
    ref_out, ref_states = reference_layer(cfg, layer.state_dict(),
                                          call.seq_from_call(seen_x), seen_states,
                                          call.lengths)
    out, state = layer(x, hx, lengths=lengths)
    assert out.dtype == np.dtype(dtype) and out.flags.c_contiguous
    close(out, call.seq_to_call(ref_out), dtype)
    if call.lengths is not None:                     # padded steps are exactly zero
        padded = np.arange(cfg["T"])[:, None] >= call.lengths[None, :]
        assert not call.seq_from_call(out)[padded].any()
    for got, ref in zip(parts(kind, state), ref_states):
        assert got.dtype == np.dtype(dtype)
        close(got, call.state_to_call(ref), dtype)
    for before, after in zip(keep, (x, *(parts(kind, hx) if hx is not None else ()))):
        np.testing.assert_array_equal(before, after)     # the caller's arrays untouched


@st.composite
def cell_configs(draw, batched=None):
    return dict(kind=draw(st.sampled_from(KINDS)), dtype=draw(st.sampled_from(DTYPES)),
                B=draw(st.integers(1, 5)), D=draw(st.integers(1, 7)), H=draw(st.integers(1, 7)),
                bias=draw(st.booleans()), use_hx=draw(st.booleans()),
                batched=draw(st.booleans()) if batched is None else batched, seed=draw(seeds))


def build_cell(cfg):
    return make_cell(cfg["kind"], cfg["D"], cfg["H"], bias=cfg["bias"], dtype=cfg["dtype"],
                     seed=cfg["seed"])


class CellCall:
    """Float64 values of one cell call, x (B, D) and states (B, H), and their
    conversion to the call's layout ((D,) and (H,) when unbatched)."""

    def __init__(self, cfg, rng):
        self.cfg = cfg
        B, D, H = (cfg["B"] if cfg["batched"] else 1), cfg["D"], cfg["H"]
        self.x = rng.standard_normal((B, D))
        self.states = [rng.standard_normal((B, H)) if cfg["use_hx"] else np.zeros((B, H))
                       for _ in range(2 if cfg["kind"] == "lstm" else 1)]

    def to_call(self, a):
        return a if self.cfg["batched"] else a[0]

    def from_call(self, a):
        return a if self.cfg["batched"] else a[None]


@pytest.mark.parametrize("layout", FORWARD_LAYOUTS)
@given(data=st.data())
@budget(300)
def test_cell_forward_matches_reference(layout, data, close):
    calls = CALLS.get(layout)
    cfg = data.draw(cell_configs(batched={"fast": False, "general": True}.get(calls)),
                    label="config")
    layout = layout.replace("_general", "")
    rng = np.random.default_rng(cfg["seed"])
    cell = build_cell(cfg)
    call = CellCall(cfg, rng)
    dtype, kind = cfg["dtype"], cfg["kind"]
    x, seen_x = arrange(call.to_call(call.x), layout, dtype, rng)
    hx, seen_states = None, call.states
    if cfg["use_hx"]:
        arranged = [arrange(call.to_call(s), layout, dtype, rng) for s in call.states]
        hx = states_of(kind, [given for given, _ in arranged])
        seen_states = [call.from_call(seen) for _, seen in arranged]
    keep = [np.array(a, copy=True) for a in (x, *(parts(kind, hx) if hx is not None else ()))]

    ref = cell_forward(kind, cell.state_dict(), call.from_call(seen_x), seen_states[0],
                       seen_states[1] if kind == "lstm" else None)
    result = cell(x, hx)
    for got, want in zip(parts(kind, result), ref):
        assert got.dtype == np.dtype(dtype)
        close(got, call.to_call(want), dtype)
    for before, after in zip(keep, (x, *(parts(kind, hx) if hx is not None else ()))):
        np.testing.assert_array_equal(before, after)     # the caller's arrays untouched


# --- 2. backward equals the gradients of the reference -----------------------
#
# The oracle of a gradient is the reference forward differentiated by central
# differences in float64 (test_backward's TOL), along random directions: for
# each parameter, the input and each initial state, <analytic gradient, v>
# must equal (L(p + eps v) - L(p - eps v)) / (2 eps), L a random linear loss
# of the outputs and final states. A float32 module's gradients must equal,
# within the float32 tolerance of the forward tests, those of its float64
# twin (the same float32 parameters and inputs), which are checked so.
#
# ReLU RNNs get biases here: without them an all-zero input and state (a layer
# below clipped to zero, a zero initial state) put a pre-activation exactly on
# the kink, where central differences average the two one-sided slopes and
# are no oracle.

EPS = 1e-6
DIRECTIONS = 2


def check_directional(what, analytic, loss, array, rng):
    """<analytic, v> against central differences of loss() along random v;
    ``array`` is perturbed in place and restored."""
    keep = array.copy()
    for _ in range(DIRECTIONS):
        v = rng.standard_normal(array.shape)
        array[...] = keep + EPS * v
        up = loss()
        array[...] = keep - EPS * v
        down = loss()
        array[...] = keep
        numeric = (up - down) / (2 * EPS)
        got = float((np.asarray(analytic, np.float64) * v).sum())
        scale = max(1.0, abs(numeric))
        assert abs(got - numeric) <= TOL * scale, (
            f"{what}: directional derivative {got!r}, central differences {numeric!r}")


def float64_twin(module, build, cfg):
    twin = build(dict(cfg, dtype="float64"))
    twin.load_state_dict(module.state_dict())
    return twin


def gradients_of(module, args, dstate, kw=None):
    """One forward_train and backprop from zeroed gradients: the results,
    the input and state gradients, and copies of the parameter gradients."""
    module.zero_grad()
    result, backprop = module.forward_train(*args, **(kw or {}))
    if isinstance(module, (fastrnn.RNN, fastrnn.GRU, fastrnn.LSTM)):
        dx, dhx = backprop(*dstate)
    else:
        dx, dhx = backprop(dstate)
    return result, dx, dhx, {name: g.copy() for name, g in module.grads.items()}


@given(cfg=layer_configs(max_size=6), layout=st.sampled_from(LAYOUTS))
@budget(700)
def test_layer_backward_matches_reference(cfg, layout, close):
    cfg = dict(cfg, bias=cfg["bias"] or cfg["kind"] == "rnn_relu")
    rng = np.random.default_rng(cfg["seed"])
    layer = build_layer(cfg)
    call = LayerCall(cfg, rng)
    kind, dtype = cfg["kind"], cfg["dtype"]
    x, seen_x = arrange(call.seq_to_call(call.x), layout, dtype, rng)
    hx, seen_hx = None, None
    states_ref = [np.zeros_like(s) for s in call.states]
    if cfg["use_hx"]:
        arranged = [arrange(call.state_to_call(s), layout, dtype, rng) for s in call.states]
        hx = states_of(kind, [given for given, _ in arranged])
        seen_hx = states_of(kind, [seen for _, seen in arranged])
        states_ref = [call.state_from_call(seen).copy() for _, seen in arranged]
    lengths = call.lengths_arg(rng)
    x_ref = call.seq_from_call(seen_x).copy()
    params = {name: value.astype(np.float64) for name, value in layer.state_dict().items()}
    ref_out, ref_states = reference_layer(cfg, params, x_ref, states_ref, call.lengths)

    # the loss weights: dout always, dstate (either part) or None
    dout, seen_dout = arrange(call.seq_to_call(rng.standard_normal(ref_out.shape)), layout,
                              dtype, rng)
    w_out = call.seq_from_call(seen_dout)
    dstate, seen_dstate, w_states = None, None, [np.zeros_like(s) for s in ref_states]
    if rng.integers(4):
        arranged = [arrange(call.state_to_call(rng.standard_normal(s.shape)), layout, dtype,
                            rng) for s in ref_states]
        if kind == "lstm" and rng.integers(3) == 0:
            arranged[rng.integers(2)] = (None, None)          # one part None: zeros
        dstate = states_of(kind, [given for given, _ in arranged])
        seen_dstate = states_of(kind, [seen for _, seen in arranged])
        w_states = [np.zeros_like(s) if seen is None else call.state_from_call(seen)
                    for s, (_, seen) in zip(ref_states, arranged)]

    def loss():
        out, states = reference_layer(cfg, params, x_ref, states_ref, call.lengths)
        return float((out * w_out).sum() + sum((s * w).sum() for s, w in zip(states, w_states)))

    (out, state), dx, dhx, grads = gradients_of(layer, (x, hx), (dout, dstate),
                                              dict(lengths=lengths))
    close(out, call.seq_to_call(ref_out), dtype)
    for got, ref in zip(parts(kind, state), ref_states):
        close(got, call.state_to_call(ref), dtype)
    assert dx.shape == np.shape(x) and dx.dtype == np.dtype(dtype)
    if dtype == "float32":
        twin = float64_twin(layer, build_layer, cfg)
        _, dx64, dhx64, grads64 = gradients_of(twin, (seen_x, seen_hx), (seen_dout, seen_dstate),
                                             dict(lengths=lengths))
        for name in grads:
            close(grads[name], grads64[name], dtype)
        close(dx, dx64, dtype)
        for got, want in zip(parts(kind, dhx), parts(kind, dhx64)):
            close(got, want, dtype)
        dx, dhx, grads = dx64, dhx64, grads64

    for name, value in params.items():
        check_directional(name, grads[name], loss, value, rng)
    check_directional("input", call.seq_from_call(dx), loss, x_ref, rng)
    for name, d, s in zip(("h_0", "c_0"), parts(kind, dhx), states_ref):
        check_directional(name, call.state_from_call(d), loss, s, rng)


@given(cfg=cell_configs(), layout=st.sampled_from(LAYOUTS))
@budget(500)
def test_cell_backward_matches_reference(cfg, layout, close):
    cfg = dict(cfg, bias=cfg["bias"] or cfg["kind"] == "rnn_relu")
    rng = np.random.default_rng(cfg["seed"])
    cell = build_cell(cfg)
    call = CellCall(cfg, rng)
    kind, dtype = cfg["kind"], cfg["dtype"]
    x, seen_x = arrange(call.to_call(call.x), layout, dtype, rng)
    x_ref = call.from_call(seen_x).copy()
    hx, seen_hx, states_ref = None, None, [s.copy() for s in call.states]
    if cfg["use_hx"]:
        arranged = [arrange(call.to_call(s), layout, dtype, rng) for s in call.states]
        hx = states_of(kind, [given for given, _ in arranged])
        seen_hx = states_of(kind, [seen for _, seen in arranged])
        states_ref = [call.from_call(seen).copy() for _, seen in arranged]
    params = {name: value.astype(np.float64) for name, value in cell.state_dict().items()}
    arranged = [arrange(call.to_call(rng.standard_normal(s.shape)), layout, dtype, rng)
                for s in states_ref]
    if kind == "lstm" and rng.integers(3) == 0:
        arranged[rng.integers(2)] = (None, None)              # one part None: zeros
    dstate = states_of(kind, [given for given, _ in arranged])
    seen_dstate = states_of(kind, [seen for _, seen in arranged])
    weights = [np.zeros_like(s) if seen is None else call.from_call(seen)
               for s, (_, seen) in zip(states_ref, arranged)]

    def reference():
        return cell_forward(kind, params, x_ref, states_ref[0],
                            states_ref[1] if kind == "lstm" else None)

    def loss():
        return float(sum((s * w).sum() for s, w in zip(reference(), weights)))

    state, dx, dhx, grads = gradients_of(cell, (x, hx), dstate)
    for got, ref in zip(parts(kind, state), reference()):
        close(got, call.to_call(ref), dtype)
    assert dx.shape == np.shape(x) and dx.dtype == np.dtype(dtype)
    if dtype == "float32":
        twin = float64_twin(cell, build_cell, cfg)
        _, dx64, dhx64, grads64 = gradients_of(twin, (seen_x, seen_hx), seen_dstate)
        for name in grads:
            close(grads[name], grads64[name], dtype)
        close(dx, dx64, dtype)
        for got, want in zip(parts(kind, dhx), parts(kind, dhx64)):
            close(got, want, dtype)
        dx, dhx, grads = dx64, dhx64, grads64

    for name, value in params.items():
        check_directional(name, grads[name], loss, value, rng)
    check_directional("input", call.from_call(dx), loss, x_ref, rng)
    for name, d, s in zip(("h", "c"), parts(kind, dhx), states_ref):
        check_directional(name, call.from_call(d), loss, s, rng)


# --- 3. save / load, pickle and state_dict round trips -----------------------

@st.composite
def sequential_models(draw):
    """A Sequential of 1 to 3 random recurrent layers (with Tanh, ReLU or
    Dropout between some), then optionally LastStep, then optionally Linear;
    and its input size."""
    in_size = D = draw(st.integers(1, 5))
    dtype = draw(st.sampled_from(DTYPES))     # one dtype per model (Sequential refuses a mix)
    layers = []
    for i in range(draw(st.integers(1, 3))):
        if i and draw(st.integers(0, 3)) == 0:
            layers.append(draw(st.sampled_from([fastrnn.Tanh(), fastrnn.ReLU(),
                                                fastrnn.Dropout(0.3, seed=i)])))
        kind, H = draw(st.sampled_from(KINDS)), draw(st.integers(1, 6))
        num_layers, bidirectional = draw(st.integers(1, 3)), draw(st.booleans())
        layers.append(make_layer(kind, in_size, H, num_layers=num_layers,
                                 bidirectional=bidirectional, batch_first=draw(st.booleans()),
                                 bias=draw(st.booleans()), dtype=dtype,
                                 dropout=0.25 if num_layers > 1 and draw(st.booleans()) else 0.0,
                                 seed=draw(seeds)))
        in_size = (2 if bidirectional else 1) * H
    if draw(st.booleans()):
        layers.append(fastrnn.LastStep(bidirectional=bidirectional))
    if draw(st.booleans()):
        layers.append(fastrnn.Linear(in_size, draw(st.integers(1, 4)), bias=draw(st.booleans()),
                                     dtype=dtype, seed=draw(seeds)))
    return fastrnn.Sequential(layers), D


def assert_same_state_dict(got, expected):
    assert list(got) == list(expected)
    for name in expected:
        assert got[name].dtype == expected[name].dtype, name
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


def assert_same_model(copy, model, x):
    assert type(copy) is type(model) and repr(copy) == repr(model)
    assert_same_state_dict(copy.state_dict(), model.state_dict())
    expected = model.predict(x)
    got = copy.predict(x)
    assert got.dtype == expected.dtype
    np.testing.assert_array_equal(got, expected)


@given(built=sequential_models(), N=st.integers(1, 4), T=st.integers(1, 6), seed=seeds)
@budget(300)
def test_sequential_save_load_and_pickle_round_trips(built, N, T, seed):
    model, D = built
    x = np.random.default_rng(seed).standard_normal((N, T, D))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.npz")
        model.save(path)
        assert_same_model(fastrnn.load(path), model, x)
    copy = pickle.loads(pickle.dumps(model))
    assert_same_model(copy, model, x)
    # the copy carries the random state too: the same dropout masks in training
    for a, b in zip(model.layers, copy.layers):
        if isinstance(a, (fastrnn.RNN, fastrnn.GRU, fastrnn.LSTM)):
            seq = np.random.default_rng(seed + 1).standard_normal((N, T, a.input_size))
            seq = seq if a.batch_first else seq.swapaxes(0, 1)
            (out_a, _), _ = a.forward_train(seq)
            (out_b, _), _ = b.forward_train(seq)
            np.testing.assert_array_equal(out_a, out_b)


@given(built=sequential_models(), other_seed=seeds, N=st.integers(1, 4), T=st.integers(1, 6),
       seed=seeds)
@budget(200)
def test_load_state_dict_of_state_dict_is_identity(built, other_seed, N, T, seed):
    model, D = built
    x = np.random.default_rng(seed).standard_normal((N, T, D))
    expected = model.predict(x)
    state = model.state_dict()
    model.load_state_dict(state)
    assert_same_state_dict(model.state_dict(), state)
    np.testing.assert_array_equal(model.predict(x), expected)
    for layer in model.layers:
        if not isinstance(layer, (fastrnn.Dropout, fastrnn.Tanh, fastrnn.ReLU,
                                  fastrnn.LastStep)):
            own = layer.state_dict()
            layer.load_state_dict(own)
            assert_same_state_dict(layer.state_dict(), own)
    np.testing.assert_array_equal(model.predict(x), expected)
    # the same architecture with other initial weights becomes the same model
    twin = pickle.loads(pickle.dumps(model))
    rng = np.random.default_rng(other_seed)
    twin.load_state_dict({k: rng.uniform(-1, 1, v.shape) for k, v in state.items()})
    twin.load_state_dict(state)
    assert_same_model(twin, model, x)


@given(cfg=cell_configs(), seed=seeds)
@budget(200)
def test_cell_pickle_and_state_dict_round_trips(cfg, seed):
    cell = build_cell(cfg)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((cfg["B"], cfg["D"])).astype(cfg["dtype"])
    expected = parts(cfg["kind"], cell(x))
    copy = pickle.loads(pickle.dumps(cell))
    assert repr(copy) == repr(cell)
    assert_same_state_dict(copy.state_dict(), cell.state_dict())
    state = cell.state_dict()
    cell.load_state_dict(state)
    assert_same_state_dict(cell.state_dict(), state)
    for module in (copy, cell):
        for got, want in zip(parts(cfg["kind"], module(x)), expected):
            np.testing.assert_array_equal(got, want)


# --- 4. invariances ----------------------------------------------------------

def layer_inputs(cfg, rng):
    """The call's values (LayerCall) and its x and hx, C-contiguous arrays of
    the layer's dtype."""
    call = LayerCall(cfg, rng)
    dtype = cfg["dtype"]
    x = np.ascontiguousarray(call.seq_to_call(call.x), dtype)
    hx = None
    if cfg["use_hx"]:
        hx = states_of(cfg["kind"], [np.ascontiguousarray(call.state_to_call(s), dtype)
                                     for s in call.states])
    return call, x, hx


@given(cfg=layer_configs(batched=True, max_batch=5))
@budget(600)
def test_a_row_alone_gives_the_same_as_in_its_batch(cfg, close):
    """Each sequence's results do not depend on the rest of the batch (within
    the reference tolerance: other batch sizes take other kernels)."""
    rng = np.random.default_rng(cfg["seed"])
    layer = build_layer(cfg)
    call, x, hx = layer_inputs(cfg, rng)
    kind, dtype = cfg["kind"], cfg["dtype"]
    lengths = call.lengths
    out, state = layer(x, hx, lengths=lengths)
    out_tm = call.seq_from_call(out)
    for b in range(cfg["B"]):
        row_x = x[b:b + 1] if cfg["batch_first"] else x[:, b:b + 1]
        row_hx = None if hx is None else states_of(kind, [s[:, b:b + 1]
                                                          for s in parts(kind, hx)])
        row_out, row_state = layer(row_x, row_hx,
                                   lengths=None if lengths is None else lengths[b:b + 1])
        close(call.seq_from_call(row_out)[:, 0], out_tm[:, b], dtype)
        for got, want in zip(parts(kind, row_state), parts(kind, state)):
            close(got[:, 0], want[:, b], dtype)


@given(cfg=cell_configs(batched=True))
@budget(400)
def test_a_cell_row_alone_gives_the_same_as_in_its_batch(cfg, close):
    rng = np.random.default_rng(cfg["seed"])
    cell = build_cell(cfg)
    call = CellCall(cfg, rng)
    kind, dtype = cfg["kind"], cfg["dtype"]
    x = call.x.astype(dtype)
    states = [s.astype(dtype) for s in call.states]
    whole = parts(kind, cell(x, states_of(kind, states)))
    for b in range(cfg["B"]):
        alone = parts(kind, cell(x[b:b + 1], states_of(kind, [s[b:b + 1] for s in states])))
        frame = parts(kind, cell(x[b], states_of(kind, [s[b] for s in states])))
        for got, got_frame, want in zip(alone, frame, whole):
            close(got[0], want[b], dtype)
            close(got_frame, want[b], dtype)         # unbatched frame (streaming path)


@given(cfg=layer_configs(batched=True, lengths=False))
@budget(600)
def test_lengths_of_every_step_and_training_give_the_plain_call(cfg):
    """lengths all equal to T and forward_train (no dropout) give the numbers
    of a call without lengths, bit for bit (the small-call path promises the
    general path's numbers)."""
    rng = np.random.default_rng(cfg["seed"])
    layer = build_layer(cfg)
    _, x, hx = layer_inputs(cfg, rng)
    kind, T, B = cfg["kind"], cfg["T"], cfg["B"]
    out, state = layer(x, hx)
    for lengths in ([T] * B, np.full(B, T, np.int32)):
        out_l, state_l = layer(x, hx, lengths=lengths)
        np.testing.assert_array_equal(out_l, out)
        for got, want in zip(parts(kind, state_l), parts(kind, state)):
            np.testing.assert_array_equal(got, want)
    (out_t, state_t), _ = layer.forward_train(x, hx)
    np.testing.assert_array_equal(out_t, out)
    for got, want in zip(parts(kind, state_t), parts(kind, state)):
        np.testing.assert_array_equal(got, want)


@given(cfg=layer_configs(batched=False))
@budget(600)
def test_unbatched_call_equals_a_batch_of_one(cfg):
    """An unbatched (T, D) call is a batched call with B = 1, bit for bit, in
    inference and in training (gradients too)."""
    rng = np.random.default_rng(cfg["seed"])
    layer = build_layer(cfg)
    _, x, hx = layer_inputs(cfg, rng)        # unbatched: x (T, D), states (L * dirs, H)
    kind = cfg["kind"]
    x_b = x[None] if cfg["batch_first"] else x[:, None]
    hx_b = None if hx is None else states_of(kind, [s[:, None] for s in parts(kind, hx)])

    def unbatch(a):
        return a[0] if cfg["batch_first"] else a[:, 0]

    out, state = layer(x, hx)
    out_b, state_b = layer(x_b, hx_b)
    np.testing.assert_array_equal(unbatch(out_b), out)
    for got, want in zip(parts(kind, state_b), parts(kind, state)):
        np.testing.assert_array_equal(got[:, 0], want)

    dout = rng.standard_normal(out.shape)
    results = []
    for inp, h, d in ((x, hx, dout), (x_b, hx_b, dout[None] if cfg["batch_first"]
                                      else dout[:, None])):
        layer.zero_grad()
        _, backprop = layer.forward_train(inp, h)
        dx, dhx = backprop(d)
        results.append((dx, parts(kind, dhx), {k: g.copy() for k, g in layer.grads.items()}))
    (dx, dhx, grads), (dx_b, dhx_b, grads_b) = results
    np.testing.assert_array_equal(unbatch(dx_b), dx)
    for got, want in zip(dhx_b, dhx):
        np.testing.assert_array_equal(got[:, 0], want)
    for name in grads:
        np.testing.assert_array_equal(grads_b[name], grads[name], err_msg=name)
