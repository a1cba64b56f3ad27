"""DropConnect on the recurrent weights (``weight_dropout=p``, AWD-LSTM):
the masks reproduced from the layer's random generator and the training
forward and BPTT checked against the NumPy oracles run with W_hh * mask;
W_hh's gradient masked; inference untouched (before and after training
forwards, so the masked weights never reach the real parameters' packed
cache); fit, save/load and pickling keep the masks' stream; errors."""
import copy
import pickle

import numpy as np
import pytest

import fastrnn
import reference as ref
import reference_options as ro
from option_cases import KINDS, TOL, assert_close, make_layer

# option_cases' shapes, H = 5 where they have H = 1 (a mask over one weight)
STRUCTURES = [
    dict(T=5, B=3, D=2, H=3, num_layers=2, bidirectional=True, batch_first=True,
         use_lengths=True),
    dict(T=4, B=2, D=3, H=5),
    dict(T=6, B=4, D=3, H=7, bidirectional=True, use_lengths=True),
    dict(T=3, B=1, D=2, H=4, num_layers=3),
]


def _oracle_kind(kind):
    if kind.startswith("rnn"):
        return "rnn", dict(nonlinearity=kind[4:])
    return kind, {}


def setup(kind, dtype, p, T, B, D, H, num_layers=1, bidirectional=False, batch_first=False,
          use_lengths=False, seed=0):
    rng = np.random.default_rng(seed + 100)
    layer = make_layer(kind, D, H, num_layers=num_layers, bidirectional=bidirectional,
                       batch_first=batch_first, dtype=np.dtype(dtype).name, seed=seed,
                       weight_dropout=p)
    dirs = 2 if bidirectional else 1
    x = rng.standard_normal((T, B, D)).astype(dtype)
    h0 = rng.standard_normal((num_layers * dirs, B, H)).astype(dtype)
    c0 = rng.standard_normal((num_layers * dirs, B, H)).astype(dtype) if kind == "lstm" \
        else None
    lengths = None
    if use_lengths:
        lengths = rng.integers(1, T + 1, size=B)
        lengths[0] = T
    xin = x.transpose(1, 0, 2) if batch_first else x
    return layer, x, xin, h0, c0, ((h0, c0) if kind == "lstm" else h0), lengths


def _cases():
    return [pytest.param(kind, s, id=f"{kind}-s{i}")
            for kind in KINDS for i, s in enumerate(STRUCTURES)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("kind, structure", _cases())
def test_training_forward_and_bptt_match_the_oracle_with_the_masked_weights(kind, structure,
                                                                           dtype):
    p = 0.4
    layer, x, xin, h0, c0, hx, lengths = setup(kind, dtype, p, **structure)
    L, bidi = structure.get("num_layers", 1), structure.get("bidirectional", False)
    dirs = 2 if bidi else 1
    T, B, H = x.shape[0], x.shape[1], structure["H"]
    params = layer.state_dict()
    # the masks this forward will draw: the layer's generator, copied
    masks = ref.dropconnect_masks(copy.deepcopy(layer._rng), params, L, bidi, p)
    assert set(masks) == {n for n in params if n.startswith("weight_hh")}
    masked = ref.masked_weights(params, masks)
    want_out, want_h, want_c = ref.layer_forward(kind, masked, x, h0, c0, L, bidi, lengths)

    rng = np.random.default_rng(3)
    dout = rng.standard_normal((T, B, dirs * H)).astype(dtype)
    if lengths is not None:
        for b, n in enumerate(lengths):
            dout[n:, b] = 0
    dh_n = rng.standard_normal(h0.shape).astype(dtype)
    dc_n = rng.standard_normal(h0.shape).astype(dtype) if kind == "lstm" else None
    okind, options = _oracle_kind(kind)
    want_dx, want_dh0, want_dc0, want = ro.layer_backward(
        okind, masked, x, h0, c0, L, bidi, lengths, dout=dout, dh_n=dh_n, dc_n=dc_n, **options)
    for name, mask in masks.items():   # d/dW of (W * mask) = mask
        want[name] = want[name] * mask

    layer.zero_grad()
    (out, state), backprop = layer.forward_train(xin, hx, lengths=lengths)
    h_n, c_n = state if kind == "lstm" else (state, None)
    if structure.get("batch_first"):
        out = out.transpose(1, 0, 2)
    tol = TOL[dtype]
    assert_close(out, want_out, tol, "out")
    assert_close(h_n, want_h, tol, "h_n")
    if kind == "lstm":
        assert_close(c_n, want_c, tol, "c_n")
    dy = dout.transpose(1, 0, 2) if structure.get("batch_first") else dout
    dx, dhx = backprop(dy, (dh_n, dc_n) if kind == "lstm" else dh_n)
    if structure.get("batch_first"):
        dx = dx.transpose(1, 0, 2)
    assert_close(dx, want_dx, tol, "dx")
    assert_close(dhx[0] if kind == "lstm" else dhx, want_dh0, tol, "dh0")
    if kind == "lstm":
        assert_close(dhx[1], want_dc0, tol, "dc0")
    for name in params:
        assert_close(layer.grads[name], want[name], tol, name)
    # W_hh's gradient is zero exactly where its mask dropped the weight
    for name, mask in masks.items():
        grad = layer.grads[name]
        assert not grad[mask == 0].any(), name
        assert (mask == 0).any() and (mask != 0).any(), name
    # the parameters themselves are unchanged by the training forward
    for name, value in layer.state_dict().items():
        np.testing.assert_array_equal(value, params[name], err_msg=name)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("kind", KINDS)
def test_inference_is_unaffected(kind, dtype):
    """Calls use W_hh itself: bit-identical to the layer without DropConnect,
    before and after training forwards (whose masked weights are packed for
    their own forward only)."""
    rng = np.random.default_rng(4)
    kw = dict(num_layers=2, bidirectional=True, batch_first=True, dtype=dtype, seed=5)
    plain = make_layer(kind, 3, 6, **kw)
    layer = make_layer(kind, 3, 6, weight_dropout=0.5, **kw)
    x = rng.standard_normal((4, 7, 3)).astype(dtype)
    small = x[:1, :3]                       # the lean path of small calls too
    want, want_small = plain(x)[0], plain(small)[0]
    np.testing.assert_array_equal(layer(x)[0], want)
    np.testing.assert_array_equal(layer(small)[0], want_small)
    (out_train, _), backprop = layer.forward_train(x)
    assert np.abs(out_train - want).max() > 1e-3, "training drops weights"
    np.testing.assert_array_equal(layer(x)[0], want)
    np.testing.assert_array_equal(layer(small)[0], want_small)
    backprop(np.ones_like(out_train))
    np.testing.assert_array_equal(layer(x)[0], want)
    # training with between-layer dropout off: plain's training forward is its call
    np.testing.assert_array_equal(plain.forward_train(x)[0][0], want)


def test_each_forward_draws_new_masks_and_a_seed_repeats_them():
    x = np.random.default_rng(6).standard_normal((5, 2, 3)).astype(np.float32)
    a = fastrnn.LSTM(3, 4, seed=7, weight_dropout=0.3)
    b = fastrnn.LSTM(3, 4, seed=7, weight_dropout=0.3)
    first_a, first_b = a.forward_train(x)[0][0], b.forward_train(x)[0][0]
    np.testing.assert_array_equal(first_a, first_b)
    second_a = a.forward_train(x)[0][0]
    assert np.abs(second_a - first_a).max() > 1e-4


def test_masks_come_before_between_layer_dropout_from_the_same_generator():
    """The DropConnect masks of every layer are drawn first, then the
    between-layer dropout masks (as without DropConnect) from what follows."""
    rng = np.random.default_rng(8)
    p, q = 0.3, 0.25
    layer = fastrnn.GRU(2, 3, num_layers=2, dropout=q, dtype="float64", seed=9,
                        weight_dropout=p)
    x = rng.standard_normal((4, 2, 2))
    params = layer.state_dict()
    gen = copy.deepcopy(layer._rng)
    masks = ref.dropconnect_masks(gen, params, 2, False, p)
    masked = ref.masked_weights(params, masks)
    between = ref.bernoulli_mask(gen, (4 * 2, 3), q).reshape(4, 2, 3)
    zeros = np.zeros((1, 2, 3))
    l0 = {n: v for n, v in masked.items() if n.endswith("_l0")}
    l1 = {n.replace("_l1", "_l0"): v for n, v in masked.items() if n.endswith("_l1")}
    mid, _, _ = ref.layer_forward("gru", l0, x, zeros)
    want, _, _ = ref.layer_forward("gru", l1, mid * between, zeros)
    (out, _), _ = layer.forward_train(x)
    assert_close(out, want, 1e-12, "out")


def test_masked_gradient_is_zero_where_dropped_and_p_zero_is_the_plain_layer():
    rng = np.random.default_rng(10)
    x = rng.standard_normal((6, 3, 2)).astype(np.float32)
    layer = fastrnn.LSTM(2, 5, bidirectional=True, seed=11, weight_dropout=0.6)
    gen = copy.deepcopy(layer._rng)
    layer.zero_grad()
    (out, _), backprop = layer.forward_train(x)
    backprop(np.ones_like(out))
    masks = ref.dropconnect_masks(gen, layer.state_dict(), 1, True, 0.6)
    for name, mask in masks.items():
        dropped = mask == 0
        assert dropped.mean() > 0.3
        assert not layer.grads[name][dropped].any()
        assert np.count_nonzero(layer.grads[name][~dropped]) > 0.9 * (~dropped).sum()
    # weight_dropout=0 is the plain layer, in training too
    plain = fastrnn.LSTM(2, 5, bidirectional=True, seed=11)
    zero = fastrnn.LSTM(2, 5, bidirectional=True, seed=11, weight_dropout=0.0)
    (o1, _), b1 = plain.forward_train(x)
    (o2, _), b2 = zero.forward_train(x)
    np.testing.assert_array_equal(o1, o2)
    b1(np.ones_like(o1))
    b2(np.ones_like(o2))
    for name in plain.grads:
        np.testing.assert_array_equal(plain.grads[name], zero.grads[name])


def test_backprop_refuses_after_a_parameter_change():
    layer = fastrnn.GRU(2, 3, seed=0, weight_dropout=0.5)
    (out, _), backprop = layer.forward_train(np.ones((3, 2, 2), np.float32))
    opt = fastrnn.optim.SGD([layer], lr=0.1)
    layer.grads["weight_hh_l0"][...] = 1
    opt.step()
    with pytest.raises(RuntimeError, match=r"GRU\.backprop: the parameters changed"):
        backprop(np.ones_like(out))


def test_masks_reach_the_mask_argument_and_tbptt():
    rng = np.random.default_rng(12)
    layer = fastrnn.RNN(2, 3, batch_first=True, dtype="float64", seed=13, weight_dropout=0.5)
    x = rng.standard_normal((2, 4, 2))
    mask = np.array([[1, 1, 1, 1], [1, 1, 1, 0]], bool)
    gen = copy.deepcopy(layer._rng)
    masked = ref.masked_weights(layer.state_dict(),
                                ref.dropconnect_masks(gen, layer.state_dict(), 1, False, 0.5))
    (out, _), backprop = layer.forward_train(x, mask=mask)
    want, _, _ = ref.masked_layer_forward("rnn_tanh", masked, x.transpose(1, 0, 2),
                                          np.zeros((1, 2, 3)), mask=mask)
    assert_close(out.transpose(1, 0, 2), want, 1e-12, "masked out")
    # tbptt: one draw per chunk's forward
    gen = copy.deepcopy(layer._rng)
    params = layer.state_dict()
    state = np.zeros((1, 2, 3))
    for index, out, backprop in fastrnn.tbptt(layer, x, steps=2):
        m = ref.masked_weights(params, ref.dropconnect_masks(gen, params, 1, False, 0.5))
        want, state, _ = ref.layer_forward("rnn_tanh", m, x[index].transpose(1, 0, 2), state)
        assert_close(out.transpose(1, 0, 2), want, 1e-12, "chunk")


def test_fit_trains_with_it_and_a_saved_model_resumes_identically(tmp_path):
    """fit draws masks from the layer's generator, which the model file keeps:
    a saved and loaded model goes on with the same masks as one never saved."""
    rng = np.random.default_rng(14)
    x = rng.standard_normal((32, 6, 2)).astype(np.float32)
    y = x.sum(axis=1)

    def model():
        m = fastrnn.Sequential([
            fastrnn.LSTM(2, 8, batch_first=True, seed=0, weight_dropout=0.3),
            fastrnn.LastStep(), fastrnn.Linear(8, 1, seed=1)], seed=2)
        m.compile(loss="mse", optimizer=fastrnn.optim.Adam(lr=0.01))
        return m

    for suffix in (".npz", ".safetensors"):
        first = model()
        history = first.fit(x, y[:, :1], epochs=2, batch_size=8, verbose=0)
        first.save(tmp_path / f"m{suffix}")
        resumed = fastrnn.load(tmp_path / f"m{suffix}")
        assert resumed.layers[0].weight_dropout == 0.3
        resumed.fit(x, y[:, :1], epochs=4, initial_epoch=2, batch_size=8, verbose=0)
        whole = model()
        whole_history = whole.fit(x, y[:, :1], epochs=4, batch_size=8, verbose=0)
        for name, value in whole.state_dict().items():
            np.testing.assert_array_equal(resumed.state_dict()[name], value, err_msg=name)
        assert whole_history.history["loss"][-1] < history.history["loss"][0]


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_save_load_and_pickle_round_trips_bit_identical(tmp_path, suffix):
    rng = np.random.default_rng(15)
    layer = fastrnn.GRU(2, 3, num_layers=2, bidirectional=True, seed=16, weight_dropout=0.2,
                        learn_initial_state=True)
    x = rng.standard_normal((5, 2, 2)).astype(np.float32)
    layer.forward_train(x)   # moves the generator on
    fastrnn.save(layer, tmp_path / f"g{suffix}")
    copies = [fastrnn.load(tmp_path / f"g{suffix}"), pickle.loads(pickle.dumps(layer)),
              copy.deepcopy(layer)]
    (want, _), _ = layer.forward_train(x)   # after the copies: the same next masks
    for other in copies:
        assert repr(other) == repr(layer)
        for name, value in layer.state_dict().items():
            np.testing.assert_array_equal(other.state_dict()[name], value, err_msg=name)
        np.testing.assert_array_equal(other(x)[0], layer(x)[0])
        np.testing.assert_array_equal(other.forward_train(x)[0][0], want)


def test_repr_docs_and_converters():
    layer = fastrnn.LSTM(2, 3, weight_dropout=0.5)
    assert repr(layer) == "LSTM(2, 3, weight_dropout=0.5)"
    assert repr(fastrnn.GRU(2, 3, weight_dropout=0.25, learn_initial_state=True)) == \
        "GRU(2, 3, learn_initial_state=True, weight_dropout=0.25)"
    assert "weight_dropout" not in repr(fastrnn.GRU(2, 3, weight_dropout=0))
    for cls in (fastrnn.RNN, fastrnn.GRU, fastrnn.LSTM):
        assert "weight_dropout : float in [0, 1)" in cls.__doc__
    pytest.importorskip("torch")
    with pytest.raises(ValueError, match=r"to_torch: LSTM has weight_dropout=0\.5; PyTorch has "
                                         r"no such option"):
        fastrnn.to_torch(layer)


def test_to_onnx_writes_the_inference_graph():
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    layer = fastrnn.GRU(2, 3, bidirectional=True, seed=17, weight_dropout=0.5)
    plain = fastrnn.GRU(2, 3, bidirectional=True, seed=17)
    x = np.random.default_rng(18).standard_normal((4, 2, 2)).astype(np.float32)
    session = ort.InferenceSession(fastrnn.to_onnx(layer).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    got = session.run(None, {"X": x, "initial_h": np.zeros((2, 2, 3), np.float32)})
    np.testing.assert_allclose(got[0], plain(x)[0], rtol=0, atol=1e-5)


# --- errors -----------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [fastrnn.RNN, fastrnn.GRU, fastrnn.LSTM])
@pytest.mark.parametrize("value, error, message", [
    (1.0, ValueError, r"weight_dropout must be in \[0, 1\), got 1\.0"),
    (-0.1, ValueError, r"weight_dropout must be in \[0, 1\), got -0\.1"),
    (float("nan"), ValueError, r"weight_dropout must be in \[0, 1\), got nan"),
    ("x", TypeError, r"weight_dropout must be a float in \[0, 1\), got str 'x'"),
    (True, TypeError, r"weight_dropout must be a float in \[0, 1\), got bool True"),
    (None, TypeError, r"weight_dropout must be a float in \[0, 1\), got NoneType None"),
])
def test_bad_weight_dropout(cls, value, error, message):
    with pytest.raises(error, match=rf"{cls.__name__}: {message}"):
        cls(2, 3, weight_dropout=value)


def test_cells_have_no_weight_dropout():
    """A cell's forward is one step: a mask shared by the steps of a sequence
    is the layers' (documented decision), so the cells do not take it."""
    for cls in (fastrnn.RNNCell, fastrnn.GRUCell, fastrnn.LSTMCell):
        with pytest.raises(TypeError, match="weight_dropout"):
            cls(2, 3, weight_dropout=0.5)


# --- with the other options: zoneout, a learned initial state ------------------------------
@pytest.mark.parametrize("kind", ["rnn_tanh", "gru", "lstm"])
def test_with_zoneout_and_a_learned_state_gradients_match_finite_differences(kind):
    """DropConnect, zoneout (both drawing from the layer's generator) and a
    learned initial state together: with the generator reset before each
    training forward every forward draws the same masks, so the loss is a
    smooth function of the parameters, and BPTT's gradients (W_hh's masked,
    the learned state's summed over the batch) match central differences."""
    rng = np.random.default_rng(40)
    T, B, D, H, L = 4, 3, 2, 3, 2
    layer = make_layer(kind, D, H, num_layers=L, bidirectional=True, batch_first=True,
                       dtype="float64", seed=41, weight_dropout=0.4, zoneout=0.3,
                       learn_initial_state=True)
    sd = layer.state_dict()
    layer.load_state_dict({n: rng.uniform(-0.9, 0.9, sd[n].shape) for n in sd
                           if n.startswith("initial_")}, strict=False)
    x = rng.standard_normal((B, T, D))
    lengths = np.array([4, 2, 3])
    w_out = rng.standard_normal((B, T, 2 * H))
    for b, n in enumerate(lengths):
        w_out[b, n:] = 0
    start = copy.deepcopy(layer._rng)

    def forward():
        layer._rng = copy.deepcopy(start)
        return layer.forward_train(x, lengths=lengths)

    def loss():
        (out, _), _ = forward()
        return float((out * w_out).sum())

    masks = ref.dropconnect_masks(copy.deepcopy(start), layer.state_dict(), L, True, 0.4)
    layer.zero_grad()
    _, backprop = forward()
    backprop(w_out)
    names = ["weight_hh_l0", "weight_hh_l1_reverse", "initial_h_l0", "initial_h_l1_reverse"]
    names += ["initial_c_l1"] if kind == "lstm" else []
    for name in names:
        param = layer.state_dict()[name].copy()

        def perturbed():
            layer.load_state_dict({name: param}, strict=False)
            return loss()

        numeric = ref.numeric_grad(perturbed, param)
        layer.load_state_dict({name: param}, strict=False)
        np.testing.assert_allclose(layer.grads[name], numeric, rtol=0, atol=1e-7,
                                   err_msg=name)
        assert np.abs(numeric).max() > 1e-3, name
        if name in masks:   # a dropped weight does not act on the loss
            assert not numeric[masks[name] == 0].any(), name


def test_with_zoneout_inference_starts_from_the_learned_state():
    rng = np.random.default_rng(42)
    layer = fastrnn.LSTM(2, 3, batch_first=True, dtype="float64", seed=43, zoneout=(0.3, 0.1),
                         weight_dropout=0.5, learn_initial_state=True)
    layer.load_state_dict({"initial_h_l0": rng.uniform(-1, 1, 3),
                           "initial_c_l0": rng.uniform(-1, 1, 3)}, strict=False)
    x = rng.standard_normal((2, 5, 2))
    h0 = np.tile(layer.initial_h_l0, (1, 2, 1))
    c0 = np.tile(layer.initial_c_l0, (1, 2, 1))
    np.testing.assert_array_equal(layer(x)[0], layer(x, (h0, c0))[0])
    assert np.abs(layer(x)[0] - layer(x, (0 * h0, 0 * c0))[0]).max() > 1e-3
