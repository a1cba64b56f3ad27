"""Keras' input and recurrent dropout (``input_dropout``, ``recurrent_dropout``)
against a NumPy oracle written from Keras' equations (its implementation 1,
which Keras uses whenever recurrent_dropout is set): one mask per sequence,
per gate block and per direction, 0 or 1 / (1 - p); gate block g reads
x * mask_x[g] and h_{t-1} * mask_h[g]; the GRU's carry z * h_{t-1} reads the
unmasked state; the reset-before GRU's candidate product reads
r * (h_{t-1} * mask_h[n]). Inference drops nothing."""
import pickle

import numpy as np
import pytest

import fastrnn
from reference import numeric_grad, sigmoid

KINDS = {"rnn_tanh": (fastrnn.RNN, {}), "gru": (fastrnn.GRU, {}),
         "gru_reset_before": (fastrnn.GRU, {"reset_after": False}),
         "lstm": (fastrnn.LSTM, {})}


def step(kind, x, h, c, w_ih, w_hh, b_ih, b_hh, mx, mh):
    """One step; mx (G, B, D), mh (G, B, H) the masks of each gate block."""
    G = len(mx)
    blocks_w, blocks_r = np.split(w_ih, G), np.split(w_hh, G)
    bi, bh = np.split(b_ih, G), np.split(b_hh, G)
    xg = [(x * mx[g]) @ blocks_w[g].T + bi[g] for g in range(G)]
    if kind == "gru_reset_before":
        r = sigmoid(xg[0] + (h * mh[0]) @ blocks_r[0].T + bh[0])
        z = sigmoid(xg[1] + (h * mh[1]) @ blocks_r[1].T + bh[1])
        n = np.tanh(xg[2] + (r * (h * mh[2])) @ blocks_r[2].T + bh[2])
        return (1 - z) * n + z * h, c
    hg = [(h * mh[g]) @ blocks_r[g].T + bh[g] for g in range(G)]
    if kind == "rnn_tanh":
        return np.tanh(xg[0] + hg[0]), c
    if kind == "gru":
        r, z = sigmoid(xg[0] + hg[0]), sigmoid(xg[1] + hg[1])
        n = np.tanh(xg[2] + r * hg[2])
        return (1 - z) * n + z * h, c
    i, f, g_, o = (xg[k] + hg[k] for k in range(4))
    c = sigmoid(f) * c + sigmoid(i) * np.tanh(g_)
    return sigmoid(o) * np.tanh(c), c


def oracle(kind, params, x, masks, num_layers, bidirectional, H):
    """Time-major x (T, B, D); masks[k] = (input (dirs, G, B, D), recurrent
    (dirs, G, B, H)) per layer, None for no mask."""
    T, B, _ = x.shape
    dirs = 2 if bidirectional else 1
    layer_in = x
    for k in range(num_layers):
        outs = np.zeros((T, B, dirs * H))
        for d in range(dirs):
            sfx = f"_l{k}" + ("_reverse" if d else "")
            w = [params[n + sfx] for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
            G = w[0].shape[0] // H
            mx, mh = masks[k]
            mx = np.ones((G, B, layer_in.shape[2])) if mx is None else mx[d]
            mh = np.ones((G, B, H)) if mh is None else mh[d]
            h, c = np.zeros((B, H)), np.zeros((B, H))
            for t in (range(T - 1, -1, -1) if d else range(T)):
                h, c = step(kind, layer_in[t], h, c, *w, mx, mh)
                outs[t, :, d * H:(d + 1) * H] = h
        layer_in = outs
    return layer_in


CASES = [("rnn_tanh", 0.3, 0.4, 1, False), ("gru", 0.0, 0.5, 2, False),
         ("gru_reset_before", 0.3, 0.3, 1, True), ("lstm", 0.25, 0.35, 2, True),
         ("lstm", 0.4, 0.0, 1, False)]


@pytest.mark.parametrize("kind, p_in, p_rec, num_layers, bidirectional", CASES)
def test_training_forward_and_gradients(kind, p_in, p_rec, num_layers, bidirectional):
    cls, extra = KINDS[kind]
    H, T, B = 3, 5, 3
    layer = cls(4, H, num_layers=num_layers, bidirectional=bidirectional, dtype="float64",
                seed=1, input_dropout=p_in, recurrent_dropout=p_rec, **extra)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((T, B, 4))
    dout = rng.standard_normal((T, B, (2 if bidirectional else 1) * H))
    (out, _), backprop = layer.forward_train(x)
    masks = [(s.input_drop, s.recurrent_drop) for s in backprop._tape.layers]
    drawn = [m for pair in masks for m in pair if m is not None]
    assert drawn and all(np.any(m == 0) for m in drawn)   # some units dropped
    for m, p in [(m, p) for pair in masks for m, p in zip(pair, (p_in, p_rec)) if m is not None]:
        assert set(np.unique(m)) <= {0.0, 1 / (1 - p)}
    params = {k: v.copy() for k, v in layer.state_dict().items()}
    np.testing.assert_allclose(out, oracle(kind, params, x, masks, num_layers, bidirectional, H),
                               rtol=0, atol=1e-13)
    dx, _ = backprop(dout)

    def loss():
        return float((oracle(kind, params, x, masks, num_layers, bidirectional, H)
                      * dout).sum())
    np.testing.assert_allclose(dx, numeric_grad(loss, x), rtol=0, atol=1e-8)
    for name, value in params.items():
        np.testing.assert_allclose(layer.grads[name], numeric_grad(loss, value), rtol=0,
                                   atol=1e-8, err_msg=name)


@pytest.mark.parametrize("kind", list(KINDS))
def test_inference_drops_nothing_and_float32_trains(kind):
    cls, extra = KINDS[kind]
    plain = cls(4, 5, seed=3, batch_first=True, **extra)
    dropped = cls(4, 5, seed=3, batch_first=True, input_dropout=0.3, recurrent_dropout=0.3,
                  **extra)
    x = np.random.default_rng(4).standard_normal((2, 6, 4)).astype(np.float32)
    np.testing.assert_array_equal(dropped(x)[0], plain(x)[0])
    lengths = np.array([6, 3])
    (out, _), backprop = dropped.forward_train(x, lengths=lengths)
    assert not out[1, 3:].any()
    dx, _ = backprop(np.ones_like(out))
    assert np.isfinite(dx).all() and not dx[1, 3:].any()
    assert all(np.isfinite(g).all() for g in dropped.grads.values())


def test_cells_and_round_trips(tmp_path):
    cell = fastrnn.LSTMCell(4, 3, seed=5, recurrent_dropout=0.5, dtype="float64")
    x = np.ones((2, 4))
    (h, c), backprop = cell.forward_train(x, (np.ones((2, 3)), np.ones((2, 3))))
    backprop((np.ones((2, 3)), None))
    layer = fastrnn.GRU(4, 3, seed=6, input_dropout=0.1, recurrent_dropout=0.2)
    assert "input_dropout=0.1, recurrent_dropout=0.2" in repr(layer)
    for path in (tmp_path / "d.npz", tmp_path / "d.safetensors"):
        fastrnn.save(layer, path)
        assert repr(fastrnn.load(path)) == repr(layer)
    assert repr(pickle.loads(pickle.dumps(layer))) == repr(layer)


@pytest.mark.parametrize("cls", [fastrnn.RNNCell, fastrnn.GRUCell, fastrnn.LSTMCell])
def test_a_cells_masks_are_fresh_at_every_step_as_its_docstring_says(cls):
    """A cell's forward_train is one step: its Keras dropouts draw new masks
    each time (the layers keep one per sequence), and its docstring says so
    (it once promised one mask per sequence)."""
    cell = cls(6, 40, seed=2, input_dropout=0.5, recurrent_dropout=0.5, dtype="float64")
    x, h = np.ones((1, 6)), np.ones((1, 40))
    hx = (h, h) if cls is fastrnn.LSTMCell else h
    first, second = (cell.forward_train(x, hx)[0] for _ in range(2))
    if cls is fastrnn.LSTMCell:
        first, second = first[0], second[0]
    assert not np.array_equal(first, second)
    doc = " ".join(cls.__doc__.split())
    assert "fresh masks at every ``forward_train``" in doc
    assert "one mask per sequence, gate block" not in doc


@pytest.mark.parametrize("name", ["input_dropout", "recurrent_dropout"])
@pytest.mark.parametrize("value, exc, message", [
    (1.0, ValueError, r"must be in \[0, 1\), got 1.0"),
    (-0.5, ValueError, r"must be in \[0, 1\), got -0.5"),
    ("0.2", TypeError, r"must be a float in \[0, 1\), got str")])
def test_bad_rates(name, value, exc, message):
    with pytest.raises(exc, match=f"LSTM: {name} {message}"):
        fastrnn.LSTM(3, 4, **{name: value})


@pytest.mark.parametrize("kind", list(KINDS))
def test_float32_training_matches_float64(kind):
    """float32 runs the masked per-gate products on the micro-kernel (W_hh
    packed per gate block), float64 through BLAS: the same masks (drawn alike
    from the same seed) give the same numbers to float32 rounding."""
    cls, extra = KINDS[kind]
    layers = [cls(4, 6, seed=7, bidirectional=True, dtype=dtype, input_dropout=0.2,
                  recurrent_dropout=0.3, **extra) for dtype in ("float32", "float64")]
    layers[0].load_state_dict(layers[1].state_dict())
    x = np.random.default_rng(8).standard_normal((7, 3, 4))
    results = []
    for layer in layers:
        (out, _), backprop = layer.forward_train(x)
        dx, _ = backprop(np.ones_like(out))
        results.append((out, dx, {k: v.copy() for k, v in layer.grads.items()}))
    (out32, dx32, g32), (out64, dx64, g64) = results
    # float32 rounding (~6e-8 relative) grown over 7 steps and two directions
    np.testing.assert_allclose(out32, out64, rtol=0, atol=2e-6)
    np.testing.assert_allclose(dx32, dx64, rtol=0, atol=2e-5)
    for name in g64:
        np.testing.assert_allclose(g32[name], g64[name], rtol=0, atol=5e-5, err_msg=name)
