"""Zoneout (Krueger et al. 2016) against a NumPy oracle written from its
equations: in training each unit of h (and of the LSTM's c) keeps its old
value where its mask is 1, h_t = m * h_{t-1} + (1 - m) * h~_t, the masks
drawn per step and row; in inference the expectation, with m = the rate.
The LSTM's h~_t = o * tanh(c~_t) reads the new cell before zoneout."""
import pickle

import numpy as np
import pytest

import fastrnn
from reference import cell_step, numeric_grad

KINDS = {"rnn_tanh": fastrnn.RNN, "gru": fastrnn.GRU, "lstm": fastrnn.LSTM}


def oracle(kind, params, x, masks_h, masks_c, num_layers, bidirectional, H):
    """Outputs of a zoned-out stack on time-major x (T, B, D): masks_h[k],
    masks_c[k] (T, B, dirs * H) per layer, or floats (inference's rates)."""
    T, B, _ = x.shape
    dirs = 2 if bidirectional else 1
    layer_in = x
    for k in range(num_layers):
        outs = np.zeros((T, B, dirs * H))
        for d in range(dirs):
            sfx = f"_l{k}" + ("_reverse" if d else "")
            w = [params[n + sfx] for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
            h, c = np.zeros((B, H)), np.zeros((B, H))
            for t in (range(T - 1, -1, -1) if d else range(T)):
                h_new, c_new = cell_step(kind, layer_in[t], h, c, *w)
                m_h = masks_h[k] if np.isscalar(masks_h[k]) else masks_h[k][t][:, d * H:(d + 1) * H]
                m_c = masks_c[k] if np.isscalar(masks_c[k]) else masks_c[k][t][:, d * H:(d + 1) * H]
                h = m_h * h + (1 - m_h) * h_new
                if kind == "lstm":
                    c = m_c * c + (1 - m_c) * c_new
                outs[t, :, d * H:(d + 1) * H] = h
        layer_in = outs
    return layer_in


def _masks(backprop, num_layers, T, B):
    """The masks a training forward drew (its tape), (T, B, dirs * H) each."""
    layers = backprop._tape.layers
    shape = (T, B, -1)
    return ([s.zone_h.reshape(shape) if s.zone_h is not None else 0.0 for s in layers],
            [s.zone_c.reshape(shape) if s.zone_c is not None else 0.0 for s in layers])


CASES = [("rnn_tanh", 0.3, 1, False), ("gru", 0.4, 2, False), ("lstm", 0.25, 1, True),
         ("lstm", (0.5, 0.2), 2, False), ("lstm", (0.0, 0.3), 1, False),
         ("gru", 0.2, 1, True)]


@pytest.mark.parametrize("kind, zoneout, num_layers, bidirectional", CASES)
def test_inference_is_the_expectation(kind, zoneout, num_layers, bidirectional):
    H = 3
    layer = KINDS[kind](4, H, num_layers=num_layers, bidirectional=bidirectional,
                        dtype="float64", seed=1, zoneout=zoneout)
    x = np.random.default_rng(2).standard_normal((7, 2, 4))
    rate_h, rate_c = zoneout if isinstance(zoneout, tuple) else (zoneout, zoneout)
    expected = oracle(kind, layer.state_dict(), x, [rate_h] * num_layers,
                      [rate_c] * num_layers, num_layers, bidirectional, H)
    np.testing.assert_allclose(layer(x)[0], expected, rtol=0, atol=1e-13)
    plain = KINDS[kind](4, H, num_layers=num_layers, bidirectional=bidirectional,
                        dtype="float64", seed=1)
    assert not np.allclose(plain(x)[0], expected)   # the zoneout acted


@pytest.mark.parametrize("kind, zoneout, num_layers, bidirectional", CASES)
def test_training_forward_and_gradients(kind, zoneout, num_layers, bidirectional):
    H, T, B = 3, 6, 2
    layer = KINDS[kind](4, H, num_layers=num_layers, bidirectional=bidirectional,
                        dtype="float64", seed=3, zoneout=zoneout)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((T, B, 4))
    dout = rng.standard_normal((T, B, (2 if bidirectional else 1) * H))
    (out, _), backprop = layer.forward_train(x)
    masks_h, masks_c = _masks(backprop, num_layers, T, B)
    assert any(np.any(m != 0) for m in masks_h + masks_c if not np.isscalar(m))   # some zoned out
    params = {k: v.copy() for k, v in layer.state_dict().items()}
    np.testing.assert_allclose(out, oracle(kind, params, x, masks_h, masks_c, num_layers,
                                           bidirectional, H), rtol=0, atol=1e-13)
    dx, _ = backprop(dout)

    def loss():
        return float((oracle(kind, params, x, masks_h, masks_c, num_layers, bidirectional, H)
                      * dout).sum())
    np.testing.assert_allclose(dx, numeric_grad(loss, x), rtol=0, atol=1e-8)
    for name, value in params.items():
        np.testing.assert_allclose(layer.grads[name], numeric_grad(loss, value), rtol=0,
                                   atol=1e-8, err_msg=name)


@pytest.mark.parametrize("kind, zoneout, num_layers, bidirectional",
                         [("lstm", 0.25, 1, True), ("lstm", (0.5, 0.2), 2, False),
                          ("gru", 0.4, 2, False), ("rnn_tanh", 0.3, 1, True)])
def test_float32_training_forward_and_gradients(kind, zoneout, num_layers, bidirectional):
    """The float32 kernels' own zoneout buffers (masks, held gradients)
    against the float64 oracle at the float32 weights and the drawn masks."""
    H, T, B = 5, 6, 3
    layer = KINDS[kind](4, H, num_layers=num_layers, bidirectional=bidirectional,
                        dtype="float32", seed=9, zoneout=zoneout)
    rng = np.random.default_rng(10)
    x = rng.standard_normal((T, B, 4)).astype(np.float32)
    dout = rng.standard_normal((T, B, (2 if bidirectional else 1) * H)).astype(np.float32)
    (out, _), backprop = layer.forward_train(x)
    masks_h, masks_c = _masks(backprop, num_layers, T, B)
    assert any(np.any(m != 0) for m in masks_h + masks_c if not np.isscalar(m))
    params = {k: v.astype(np.float64) for k, v in layer.state_dict().items()}
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(out, oracle(kind, params, x64, masks_h, masks_c, num_layers,
                                           bidirectional, H), rtol=0, atol=2e-6)
    dx, _ = backprop(dout)

    def loss():
        return float((oracle(kind, params, x64, masks_h, masks_c, num_layers, bidirectional, H)
                      * dout).sum())
    np.testing.assert_allclose(dx, numeric_grad(loss, x64), rtol=1e-4, atol=1e-5)
    for name, value in params.items():
        np.testing.assert_allclose(layer.grads[name], numeric_grad(loss, value), rtol=1e-4,
                                   atol=1e-5, err_msg=name)


def test_float32_matches_float64():
    x = np.random.default_rng(5).standard_normal((9, 3, 4))
    l64 = fastrnn.LSTM(4, 5, dtype="float64", seed=6, zoneout=(0.3, 0.1))
    l32 = fastrnn.LSTM(4, 5, dtype="float32", seed=6, zoneout=(0.3, 0.1))
    l32.load_state_dict(l64.state_dict())
    np.testing.assert_allclose(l32(x)[0], l64(x)[0], rtol=0, atol=2e-6)


def test_cell_zoneout_and_round_trips(tmp_path):
    cell = fastrnn.GRUCell(4, 3, seed=7, zoneout=0.5, dtype="float64")
    x, h = np.ones(4), np.full(3, 0.5)
    new = cell(x, h)
    plain = fastrnn.GRUCell(4, 3, seed=7, dtype="float64")
    np.testing.assert_allclose(new, 0.5 * h + 0.5 * plain(x, h), rtol=0, atol=1e-15)
    layer = fastrnn.LSTM(4, 3, seed=8, zoneout=(0.2, 0.1))
    assert "zoneout=[0.2, 0.1]" in repr(layer)
    xs = np.ones((5, 2, 4), np.float32)
    for path in (tmp_path / "z.npz", tmp_path / "z.safetensors"):
        fastrnn.save(layer, path)
        np.testing.assert_array_equal(fastrnn.load(path)(xs)[0], layer(xs)[0])
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(layer))(xs)[0], layer(xs)[0])


@pytest.mark.parametrize("cls, value, exc, message", [
    (fastrnn.GRU, 1.0, ValueError, r"GRU: zoneout must be in \[0, 1\), got 1.0"),
    (fastrnn.RNN, -0.1, ValueError, r"RNN: zoneout must be in \[0, 1\), got -0.1"),
    (fastrnn.LSTM, "0.1", TypeError, r"LSTM: zoneout must be a number in \[0, 1\), got str"),
    (fastrnn.GRU, (0.1, 0.2), ValueError, r"GRU: zoneout must be a probability in \[0, 1\), "
                                          r"got \(0.1, 0.2\)"),
    (fastrnn.LSTM, (0.1, 0.2, 0.3), ValueError, r"LSTM: zoneout must be a probability in "
                                                r"\[0, 1\) or a pair"),
])
def test_bad_zoneout(cls, value, exc, message):
    with pytest.raises(exc, match=message):
        cls(3, 4, zoneout=value)


def test_exports_refuse_zoneout():
    layer = fastrnn.GRU(3, 4, zoneout=0.1)
    pytest.importorskip("onnx")
    with pytest.raises(ValueError, match=r"to_onnx: GRU has zoneout=0.1; ONNX's GRU cannot"):
        fastrnn.to_onnx(layer)
    pytest.importorskip("torch")
    with pytest.raises(ValueError, match=r"to_torch: GRU has zoneout=0.1"):
        fastrnn.to_torch(layer)


def test_a_pair_of_equal_rates_is_the_rate():
    """zoneout=(p, p) is zoneout=p: (0, 0) is no zoneout, which the exports
    take (it was kept as [0.0, 0.0] and refused as an option in effect)."""
    assert repr(fastrnn.LSTM(3, 4, zoneout=(0.0, 0.0))) == repr(fastrnn.LSTM(3, 4))
    assert fastrnn.LSTM(3, 4, zoneout=(0.2, 0.2)).zoneout == 0.2
    assert fastrnn.LSTM(3, 4, zoneout=(0.2, 0.1)).zoneout == [0.2, 0.1]
    x = np.random.default_rng(0).standard_normal((5, 2, 3)).astype(np.float32)
    np.testing.assert_array_equal(fastrnn.LSTM(3, 4, zoneout=(0.3, 0.3), seed=0)(x)[0],
                                  fastrnn.LSTM(3, 4, zoneout=0.3, seed=0)(x)[0])
    pytest.importorskip("onnx")
    fastrnn.to_onnx(fastrnn.LSTM(3, 4, zoneout=(0.0, 0.0)))
    pytest.importorskip("torch")
    fastrnn.to_torch(fastrnn.LSTM(3, 4, zoneout=(0.0, 0.0)))


def test_stream_runs_zoneout_as_the_layer():
    layer = fastrnn.LSTM(4, 3, seed=11, zoneout=(0.3, 0.2), dtype="float64")
    x = np.random.default_rng(12).standard_normal((8, 4))
    stream = fastrnn.Stream(layer)
    chunks = np.concatenate([stream(x[:3]), stream(x[3:4]), stream(x[4:])])
    np.testing.assert_allclose(chunks, layer(x)[0], rtol=0, atol=1e-14)


@pytest.mark.parametrize("cls", [fastrnn.GRU, fastrnn.LSTM])
def test_lengths_and_batch_first(cls):
    """A row of a padded batch gets what it gets alone, over its own length."""
    layer = cls(4, 3, seed=9, zoneout=0.4, dtype="float64", batch_first=True,
                bidirectional=True, peepholes=True) if cls is fastrnn.LSTM else \
        cls(4, 3, seed=9, zoneout=0.4, dtype="float64", batch_first=True, bidirectional=True)
    x = np.random.default_rng(10).standard_normal((3, 6, 4))
    lengths = np.array([6, 2, 4])
    out = layer(x, lengths=lengths)[0]
    for b, n in enumerate(lengths):
        np.testing.assert_allclose(out[b, :n], layer(x[b:b + 1, :n])[0][0], rtol=0,
                                   atol=1e-14)
        assert not out[b, n:].any()
