"""fastrnn's gate options on the layers (RNN/GRU/LSTM): activation specs,
per-direction activations, clip, input_forget and peepholes, against the
NumPy oracle of tests/reference_options.py (forward outputs and final states,
BPTT's dx, dhx and every parameter gradient), finite differences of the
peephole parameters, and the options' semantics on their own (explicit
defaults are bit-identical to the plain layer, zero peepholes are none,
input_forget ignores the forget gate's weights)."""
import numpy as np
import pytest

import fastrnn
import reference_options as ro
from option_cases import assert_close
from reference import numeric_grad

# float64: both sides compute the same float64 expressions in other orders,
# ~1e-16 per operation over a few dozen steps.
# float32: the layer rounds every product and sum to float32 (2^-24 ~ 6e-8
# relative); over T <= 6 steps and 2 layers the forward error stays within
# 1e-5 of the output scale, as tests/conftest.py's assert_close takes for the
# plain layers. BPTT's gradients sum T * B float32 outer products that carry
# the forward's error backwards through the same steps; measured on the
# plain layers (the "lstm", {} case and the other kinds without options):
# 2e-7 (forward) and 3e-7 (gradients) of the scale in float32, 3e-16 and
# 7e-16 in float64. The bounds leave room for activations with larger
# derivatives (scaled_tanh, affine) and for the clip's kinks.
FORWARD_TOL = {np.float32: 1e-5, np.float64: 1e-12}
GRAD_TOL = {np.float32: 1e-5, np.float64: 1e-12}


def make_layer(kind, D, H, options, **kw):
    """A fastrnn layer of the oracle's kind with the options as keywords
    (none given when options is empty: the plain layer)."""
    options = dict(options)
    if kind == "rnn":
        return fastrnn.RNN(D, H, **kw, **options)
    if kind in ("gru", "gru_reset_before"):
        return fastrnn.GRU(D, H, reset_after=kind == "gru", **kw, **options)
    return fastrnn.LSTM(D, H, **kw, **options)


def randomize_peepholes(layer, rng, scale=0.8):
    """Non-zero peepholes (whatever the layer starts with)."""
    names = [n for n in layer.state_dict() if n.startswith("weight_peephole")]
    layer.load_state_dict({n: rng.uniform(-scale, scale, layer.state_dict()[n].shape)
                           .astype(layer.state_dict()[n].dtype) for n in names}, strict=False)
    return names


# (kind, options); per-direction lists only on bidirectional structures
OPTION_CASES = [
    ("rnn", dict(nonlinearity="softsign")),
    ("rnn", dict(nonlinearity=("leaky_relu", 0.2), clip=0.9)),
    ("rnn", dict(nonlinearity=[("elu", 0.7), ("scaled_tanh", 1.3, 0.6)])),
    ("gru", dict(activation="softplus", recurrent_activation=("hard_sigmoid", 0.3, 0.45),
                 clip=0.8)),
    ("gru", dict(activation=["relu", "linear"], recurrent_activation=["sigmoid", "softsign"])),
    ("gru_reset_before", dict(activation=("thresholded_relu", 0.2),
                              recurrent_activation="hard_sigmoid", clip=1.1)),
    ("lstm", dict(peepholes=True)),
    ("lstm", dict(input_forget=True)),
    ("lstm", dict(peepholes=True, input_forget=True, clip=0.7)),
    ("lstm", dict(activation="softsign", recurrent_activation="hard_sigmoid",
                  cell_activation=("scaled_tanh", 1.5, 0.7), peepholes=True)),
    ("lstm", dict(activation=["elu", ("affine", 0.7, -0.2)],
                  recurrent_activation=[("hard_sigmoid", 0.25, 0.5), "sigmoid"],
                  cell_activation=["linear", "softsign"], peepholes=True, clip=1.3)),
    ("lstm", {}),                        # the plain layer: checks the harness itself
]

STRUCTURES = [
    dict(T=5, B=3, D=2, H=3, num_layers=2, bidirectional=True, batch_first=True,
         use_lengths=True),
    dict(T=4, B=2, D=3, H=1),
    dict(T=6, B=4, D=3, H=7, bidirectional=True, use_lengths=True),
]


def _per_direction(options):
    return any(isinstance(v, list) for v in options.values())


def _cases():
    cases = []
    for kind, options in OPTION_CASES:
        for s, structure in enumerate(STRUCTURES):
            if _per_direction(options) and not structure.get("bidirectional"):
                continue
            cases.append(pytest.param(kind, options, structure,
                                      id=f"{kind}-{sorted(options)}-s{s}"))
    return cases


def _setup(kind, options, dtype, T, B, D, H, num_layers=1, bidirectional=False,
           batch_first=False, use_lengths=False, seed=0):
    rng = np.random.default_rng(seed)
    layer = make_layer(kind, D, H, options, num_layers=num_layers, bidirectional=bidirectional,
                       batch_first=batch_first, dtype=np.dtype(dtype).name, seed=seed)
    randomize_peepholes(layer, rng)
    dirs = 2 if bidirectional else 1
    x = rng.standard_normal((T, B, D)).astype(dtype)
    h0 = rng.standard_normal((num_layers * dirs, B, H)).astype(dtype)
    c0 = rng.standard_normal((num_layers * dirs, B, H)).astype(dtype) if kind == "lstm" \
        else None
    lengths = rng.integers(1, T + 1, size=B) if use_lengths else None
    if use_lengths:
        lengths[0] = T
    hx = (h0, c0) if kind == "lstm" else h0
    xin = x.transpose(1, 0, 2) if batch_first else x
    return layer, x, xin, h0, c0, hx, lengths


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("kind, options, structure", _cases())
def test_forward_matches_the_oracle(kind, options, structure, dtype):
    layer, x, xin, h0, c0, hx, lengths = _setup(kind, options, dtype, **structure)
    L, bidi = structure.get("num_layers", 1), structure.get("bidirectional", False)
    want_out, want_h, want_c = ro.layer_forward(kind, layer.state_dict(), x, h0, c0, L, bidi,
                                                lengths, **options)
    out, state = layer(xin, hx, lengths=lengths)
    h_n, c_n = state if kind == "lstm" else (state, None)
    assert out.dtype == np.dtype(dtype) and h_n.dtype == np.dtype(dtype)
    if structure.get("batch_first"):
        out = out.transpose(1, 0, 2)
    tol = FORWARD_TOL[dtype]
    assert_close(out, want_out, tol, "out")
    assert_close(h_n, want_h, tol, "h_n")
    if kind == "lstm":
        assert_close(c_n, want_c, tol, "c_n")


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("kind, options, structure", _cases())
def test_bptt_matches_the_oracle(kind, options, structure, dtype):
    layer, x, xin, h0, c0, hx, lengths = _setup(kind, options, dtype, seed=1, **structure)
    L, bidi = structure.get("num_layers", 1), structure.get("bidirectional", False)
    rng = np.random.default_rng(2)
    dirs = 2 if bidi else 1
    T, B, H = x.shape[0], x.shape[1], h0.shape[-1]
    dout = rng.standard_normal((T, B, dirs * H)).astype(dtype)
    if lengths is not None:              # padded steps' outputs are zeros: no gradient there
        for b, n in enumerate(lengths):
            dout[n:, b] = 0
    dh_n = rng.standard_normal(h0.shape).astype(dtype)
    dc_n = rng.standard_normal(h0.shape).astype(dtype) if kind == "lstm" else None
    params = layer.state_dict()
    want_dx, want_dh0, want_dc0, want_grads = ro.layer_backward(
        kind, params, x, h0, c0, L, bidi, lengths, dout=dout, dh_n=dh_n, dc_n=dc_n, **options)

    layer.zero_grad()
    _, backprop = layer.forward_train(xin, hx, lengths=lengths)
    dy = dout.transpose(1, 0, 2) if structure.get("batch_first") else dout
    dx, dhx = backprop(dy, (dh_n, dc_n) if kind == "lstm" else dh_n)
    if structure.get("batch_first"):
        dx = dx.transpose(1, 0, 2)
    tol = GRAD_TOL[dtype]
    assert_close(dx, want_dx, tol, "dx")
    dh0, dc0 = dhx if kind == "lstm" else (dhx, None)
    assert_close(dh0, want_dh0, tol, "dh0")
    if kind == "lstm":
        assert_close(dc0, want_dc0, tol, "dc0")
    assert set(layer.grads) == set(params)
    for name in params:
        assert layer.grads[name].dtype == np.dtype(dtype), name
        assert_close(layer.grads[name], want_grads[name], tol, name)
    if options.get("peepholes"):
        assert any(n.startswith("weight_peephole") for n in layer.grads)
    if options.get("input_forget"):      # the forget gate's rows (i, f, g, o) get nothing
        for name in params:
            if not name.startswith("weight_peephole"):
                assert not layer.grads[name][H:2 * H].any(), name


# --- finite differences through forward_train (float64) ---------------------------------
@pytest.mark.parametrize("options", [
    dict(peepholes=True),
    dict(peepholes=True, input_forget=True, clip=0.8),
    dict(peepholes=True, activation="softsign", recurrent_activation=("hard_sigmoid", 0.3, 0.5),
         cell_activation="elu"),
], ids=lambda o: "-".join(sorted(o)))
def test_peephole_gradients_match_finite_differences(options):
    rng = np.random.default_rng(3)
    T, B, D, H, L = 4, 2, 2, 3, 2
    layer = fastrnn.LSTM(D, H, num_layers=L, bidirectional=True, batch_first=True,
                         dtype="float64", seed=4, **options)
    names = randomize_peepholes(layer, rng)
    assert sorted(names) == sorted(f"weight_peephole_l{k}{s}" for k in range(L)
                                   for s in ("", "_reverse"))
    x = rng.standard_normal((B, T, D))
    hx = tuple(rng.standard_normal((2 * L, B, H)) for _ in range(2))
    lengths = np.array([4, 3])
    w_out = rng.standard_normal((B, T, 2 * H))
    w_out[1, 3:] = 0
    w_h, w_c = rng.standard_normal((2, 2 * L, B, H))

    def loss():
        (out, (h, c)), _ = layer.forward_train(x, hx, lengths=lengths)
        return float((out * w_out).sum() + (h * w_h).sum() + (c * w_c).sum())

    layer.zero_grad()
    _, backprop = layer.forward_train(x, hx, lengths=lengths)
    dx, (dh0, dc0) = backprop(w_out, (w_h, w_c))
    grads = {n: layer.grads[n].copy() for n in names}
    for name in names:
        param = layer.state_dict()[name].copy()
        assert param.shape == (3 * H,)

        def perturbed():
            layer.load_state_dict({name: param}, strict=False)
            return loss()

        numeric = numeric_grad(perturbed, param)
        layer.load_state_dict({name: param}, strict=False)
        # central differences of a smooth float64 loss: ~1e-9
        np.testing.assert_allclose(grads[name], numeric, rtol=0, atol=1e-7, err_msg=name)
        assert np.abs(numeric).max() > 1e-3, f"{name}: the peepholes act"
    np.testing.assert_allclose(dx, numeric_grad(loss, x), rtol=0, atol=1e-7)
    np.testing.assert_allclose(dc0, numeric_grad(loss, hx[1]), rtol=0, atol=1e-7)


# --- the options' semantics on their own ----------------------------------------------------
EXPLICIT_DEFAULTS = {
    "rnn": dict(nonlinearity="tanh", clip=None),
    "gru": dict(activation="tanh", recurrent_activation="sigmoid", clip=None),
    "gru_reset_before": dict(activation="tanh", recurrent_activation="sigmoid", clip=None),
    "lstm": dict(activation="tanh", recurrent_activation="sigmoid", cell_activation=None,
                 clip=None, input_forget=False, peepholes=False),
}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("kind", list(EXPLICIT_DEFAULTS))
def test_explicit_defaults_are_bit_identical_to_the_plain_layer(kind, dtype):
    rng = np.random.default_rng(5)
    T, B, D, H = 6, 3, 4, 5
    kw = dict(num_layers=2, bidirectional=True, dtype=dtype, seed=6)
    plain = make_layer(kind, D, H, {}, **kw)
    variants = [make_layer(kind, D, H, EXPLICIT_DEFAULTS[kind], **kw)]
    if kind == "lstm":   # cell_activation given as activation's own default
        variants.append(make_layer(kind, D, H, dict(cell_activation="tanh"), **kw))
    x = rng.standard_normal((T, B, D)).astype(dtype)
    lengths = np.array([6, 2, 5])
    dout = rng.standard_normal((T, B, 2 * H)).astype(dtype)
    (out, state), backprop = plain.forward_train(x, lengths=lengths)
    plain.zero_grad()
    dx, _ = backprop(dout)
    assert repr(variants[0]) == repr(plain)
    for layer in variants:
        assert set(layer.state_dict()) == set(plain.state_dict())
        for name, value in plain.state_dict().items():
            np.testing.assert_array_equal(layer.state_dict()[name], value)
        got, got_state = layer(x, lengths=lengths)
        np.testing.assert_array_equal(got, out)
        (got, _), backprop = layer.forward_train(x, lengths=lengths)
        np.testing.assert_array_equal(got, out)
        layer.zero_grad()
        np.testing.assert_array_equal(backprop(dout)[0], dx)
        for name in plain.grads:
            np.testing.assert_array_equal(layer.grads[name], plain.grads[name])


def test_zero_peepholes_are_the_plain_lstm():
    rng = np.random.default_rng(7)
    plain = fastrnn.LSTM(3, 4, bidirectional=True, dtype="float64", seed=8)
    peep = fastrnn.LSTM(3, 4, bidirectional=True, dtype="float64", seed=8, peepholes=True)
    peep.load_state_dict(plain.state_dict(), strict=False)
    peep.load_state_dict({n: np.zeros(12) for n in peep.state_dict()
                          if n.startswith("weight_peephole")}, strict=False)
    assert {n for n in peep.state_dict() if n.startswith("weight_peephole")} == \
        {"weight_peephole_l0", "weight_peephole_l0_reverse"}
    x = rng.standard_normal((5, 2, 3))
    np.testing.assert_allclose(peep(x)[0], plain(x)[0], rtol=0, atol=1e-14)
    # and non-zero peepholes change the result
    randomize_peepholes(peep, rng)
    assert np.abs(peep(x)[0] - plain(x)[0]).max() > 1e-3


def test_input_forget_ignores_the_forget_gate_weights():
    rng = np.random.default_rng(9)
    H = 4
    layer = fastrnn.LSTM(3, H, dtype="float64", seed=10, input_forget=True)
    x = rng.standard_normal((5, 2, 3))
    before = layer(x)[0]
    state = layer.state_dict()
    changed = {}
    for name, value in state.items():
        value = value.copy()
        value[H:2 * H] = rng.standard_normal(value[H:2 * H].shape) * 3
        changed[name] = value
    layer.load_state_dict(changed, strict=False)
    np.testing.assert_array_equal(layer(x)[0], before)


def test_clip_bounds_the_gate_inputs():
    """A linear RNN with clip c outputs exactly clamp(pre-activation, -c, c)."""
    rng = np.random.default_rng(11)
    layer = fastrnn.RNN(3, 4, nonlinearity="linear", clip=0.5, dtype="float64", seed=12)
    x = rng.standard_normal((1, 6, 3)) * 4
    out, _ = layer(x)
    p = layer.state_dict()
    pre = x[0] @ p["weight_ih_l0"].T + p["bias_ih_l0"] + p["bias_hh_l0"]
    assert np.abs(pre).max() > 1.0
    np.testing.assert_allclose(out[0], np.clip(pre, -0.5, 0.5), rtol=0, atol=1e-15)


def test_repr_shows_the_options_that_are_not_default():
    layer = fastrnn.LSTM(2, 3, bidirectional=True, activation="softsign",
                         recurrent_activation=("hard_sigmoid", 0.2, 0.5), clip=2.5,
                         input_forget=True, peepholes=True)
    text = repr(layer)
    for part in ("activation='softsign'", "recurrent_activation=", "'hard_sigmoid'",
                 "clip=2.5", "input_forget=True", "peepholes=True"):
        assert part in text, (part, text)
    plain = repr(fastrnn.LSTM(2, 3, bidirectional=True))
    for word in ("activation", "clip", "input_forget", "peepholes"):
        assert word not in plain
    text = repr(fastrnn.GRU(2, 3, bidirectional=True, activation=["relu", "tanh"]))
    assert "activation=" in text and "'relu'" in text, text
    assert "recurrent_activation" not in text
    assert "nonlinearity='elu'" in repr(fastrnn.RNN(2, 3, nonlinearity="elu"))


# --- errors ----------------------------------------------------------------------------------
@pytest.mark.parametrize("cls, kwargs, exc, message", [
    (fastrnn.RNN, dict(nonlinearity="gelu"), ValueError, r"RNN: nonlinearity.*'gelu'"),
    (fastrnn.GRU, dict(activation="swish"), ValueError, r"GRU: activation.*'swish'"),
    (fastrnn.LSTM, dict(recurrent_activation="Sigmoid "), ValueError,
     r"LSTM: recurrent_activation.*'Sigmoid '"),
    (fastrnn.LSTM, dict(cell_activation="gelu"), ValueError, r"LSTM: cell_activation.*'gelu'"),
    (fastrnn.LSTM, dict(activation=("affine",)), ValueError,
     r"LSTM: activation: a tuple \(name, alpha\[, beta\]\) has parameters; give 'affine' "
     r"alone as a name"),
    (fastrnn.LSTM, dict(activation=("affine", 1.0, 0.0, 2.0)), ValueError,
     r"LSTM: activation: 'affine' takes at most two parameters \(alpha, beta\), got 3"),
    (fastrnn.LSTM, dict(activation=("affine", 1.0, 0.0, 2.0), bidirectional=True), ValueError,
     r"LSTM: activation: 'affine' takes at most two parameters \(alpha, beta\), got 3"),
    (fastrnn.GRU, dict(recurrent_activation=("leaky_relu", float("nan"))), ValueError,
     r"GRU: recurrent_activation"),
    (fastrnn.RNN, dict(nonlinearity=("scaled_tanh", 1.0, float("inf"))), ValueError,
     r"RNN: nonlinearity"),
    # a wrong type: TypeError by the house style; ValueError accepted too
    (fastrnn.LSTM, dict(activation=("elu", "big")), (TypeError, ValueError),
     r"LSTM: activation"),
    (fastrnn.LSTM, dict(activation=3), (TypeError, ValueError), r"LSTM: activation"),
    (fastrnn.LSTM, dict(clip=0.0), ValueError, r"LSTM: clip"),
    (fastrnn.GRU, dict(clip=-1.0), ValueError, r"GRU: clip"),
    (fastrnn.RNN, dict(clip=float("nan")), ValueError, r"RNN: clip"),
    (fastrnn.LSTM, dict(clip=float("inf")), ValueError, r"LSTM: clip"),
    (fastrnn.LSTM, dict(clip="1.0"), TypeError, r"LSTM: clip"),
    (fastrnn.LSTM, dict(activation=["tanh", "relu"]), ValueError, r"LSTM: activation"),
    (fastrnn.RNN, dict(nonlinearity=["tanh", "relu"]), ValueError, r"RNN: nonlinearity"),
    (fastrnn.GRU, dict(recurrent_activation=["sigmoid", "tanh"]), ValueError,
     r"GRU: recurrent_activation"),
])
def test_bad_options_name_the_class_and_argument(cls, kwargs, exc, message):
    with pytest.raises(exc, match=message):
        cls(3, 4, **kwargs)


@pytest.mark.parametrize("cls", [fastrnn.RNN, fastrnn.GRU])
@pytest.mark.parametrize("option", ["peepholes", "input_forget"])
def test_lstm_only_options_are_refused_elsewhere(cls, option):
    with pytest.raises((TypeError, ValueError), match=f"{cls.__name__}.*{option}"):
        cls(3, 4, **{option: True})


@pytest.mark.parametrize("bad", [["tanh", "relu", "tanh"], ["tanh"], []])
def test_bidirectional_lists_need_exactly_two_specs(bad):
    with pytest.raises((TypeError, ValueError), match=r"LSTM: activation"):
        fastrnn.LSTM(3, 4, bidirectional=True, activation=bad)


# --- save/load and pickle ---------------------------------------------------------------------
SAVED = [
    ("rnn", dict(nonlinearity=[("elu", 0.7), "softsign"], clip=1.5)),
    ("gru_reset_before", dict(activation=("scaled_tanh", 1.3, 0.6),
                              recurrent_activation=["hard_sigmoid", "sigmoid"])),
    ("lstm", dict(activation="softsign", recurrent_activation=("hard_sigmoid", 0.25, 0.5),
                  cell_activation=["linear", "tanh"], clip=2.0, input_forget=True,
                  peepholes=True)),
]


def _roundtrip_check(original, copy, kind, rng):
    assert repr(copy) == repr(original)
    assert set(copy.state_dict()) == set(original.state_dict())
    for name, value in original.state_dict().items():
        np.testing.assert_array_equal(copy.state_dict()[name], value)
    x = rng.standard_normal((5, 2, 3)).astype(original.state_dict()["weight_ih_l0"].dtype)
    out, state = original(x, lengths=[5, 3])
    got, got_state = copy(x, lengths=[5, 3])
    np.testing.assert_array_equal(got, out)
    for a, b in zip(state if kind == "lstm" else (state,),
                    got_state if kind == "lstm" else (got_state,)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kind, options", SAVED, ids=[c[0] for c in SAVED])
@pytest.mark.parametrize("how", ["npz", "safetensors", "pickle"])
def test_save_load_and_pickle_keep_the_options(kind, options, how, tmp_path):
    import pickle
    rng = np.random.default_rng(13)
    layer = make_layer(kind, 3, 4, options, bidirectional=True, num_layers=2, dtype="float64",
                       seed=14)
    randomize_peepholes(layer, rng)
    if how == "pickle":
        copy = pickle.loads(pickle.dumps(layer))
    else:
        path = tmp_path / f"layer.{how}"
        fastrnn.save(layer, path)
        copy = fastrnn.load(path)
    assert type(copy) is type(layer)
    _roundtrip_check(layer, copy, kind, rng)


def test_a_saved_model_keeps_its_layers_options(tmp_path):
    rng = np.random.default_rng(15)
    lstm = fastrnn.LSTM(3, 4, batch_first=True, peepholes=True, clip=1.5,
                        activation=("leaky_relu", 0.1), dtype="float64", seed=16)
    randomize_peepholes(lstm, rng)
    model = fastrnn.Sequential([lstm, fastrnn.LastStep(), fastrnn.Linear(4, 2, dtype="float64")])
    x = rng.standard_normal((2, 5, 3))
    path = tmp_path / "model.npz"
    fastrnn.save(model, path)
    loaded = fastrnn.load(path)
    np.testing.assert_array_equal(loaded(x), model(x))
    assert repr(loaded[0]) == repr(lstm)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_an_activation_parameter_written_as_a_str_is_refused_as_a_parameter(bidirectional):
    """("leaky_relu", "0.1") was read as a list of two directions' specs:
    "needs 2 specs on a bidirectional layer" on a unidirectional layer, and
    "unknown activation '0.1'" on a bidirectional one. A number in a str is
    the parameter it looks like; two names are still two directions."""
    with pytest.raises(TypeError, match=r"RNN: nonlinearity: 'leaky_relu''s alpha must be a "
                                        r"number, got str '0.1'"):
        fastrnn.RNN(3, 4, nonlinearity=("leaky_relu", "0.1"), bidirectional=bidirectional)
    if bidirectional:
        layer = fastrnn.RNN(3, 4, nonlinearity=("tanh", "relu"), bidirectional=True)
        assert layer.nonlinearity == ["tanh", "relu"]
