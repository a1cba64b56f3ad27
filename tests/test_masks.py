"""Keras-style boolean masks on the recurrent layers: against a step-by-step
NumPy oracle (tests/reference.py), against Keras, and their gradients by
central finite differences."""
import numpy as np
import pytest

import fastrnn
import reference as ref

KINDS = {"RNN": "rnn_tanh", "GRU": "gru", "LSTM": "lstm"}


def _mask(B, T, rng):
    """Every pattern: right and left padding, holes, a row with no step,
    a full row."""
    mask = rng.random((B, T)) > 0.4
    patterns = [np.arange(T) >= 2,                  # left padding
                np.zeros(T, bool),                  # nothing to read
                np.arange(T) % 2 == 0,              # holes
                np.arange(T) < T - 2,               # right padding
                np.ones(T, bool)]
    for b, row in enumerate(patterns[:B]):
        mask[b] = row
    return mask


def _case(cls, num_layers, bidirectional, batch_first, dtype="float64", seed=0, T=6, B=5,
          D=3, H=4):
    rng = np.random.default_rng(seed)
    layer = getattr(fastrnn, cls)(D, H, num_layers=num_layers, bidirectional=bidirectional,
                                  batch_first=batch_first, dtype=dtype, seed=seed + 1)
    dirs = 2 if bidirectional else 1
    x = rng.standard_normal((T, B, D))
    h0 = rng.standard_normal((num_layers * dirs, B, H))
    c0 = rng.standard_normal((num_layers * dirs, B, H))
    return layer, x, h0, c0, _mask(B, T, rng)


@pytest.mark.parametrize("cls", ["RNN", "GRU", "LSTM"])
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("zero_output", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_mask_matches_the_reference(cls, num_layers, bidirectional, batch_first, zero_output,
                                    dtype, close):
    layer, x, h0, c0, mask = _case(cls, num_layers, bidirectional, batch_first, dtype)
    lstm = cls == "LSTM"
    hx = (h0, c0) if lstm else h0
    xin = x.swapaxes(0, 1) if batch_first else x
    out, state = layer(xin, hx, mask=mask, zero_output_for_mask=zero_output)
    x_seen = x.astype(dtype)      # the reference sees the values the layer sees
    r_out, r_h, r_c = ref.masked_layer_forward(KINDS[cls], layer.state_dict(), x_seen,
                                               h0.astype(dtype), c0.astype(dtype) if lstm
                                               else None, num_layers, bidirectional, mask,
                                               zero_output)
    close(out.swapaxes(0, 1) if batch_first else out, r_out, dtype)
    close(state[0] if lstm else state, r_h, dtype)
    if lstm:
        close(state[1], r_c, dtype)


def test_mask_of_all_true_is_the_plain_call_and_unbatched_works():
    layer, x, h0, c0, _ = _case("LSTM", 1, True, False)
    mask = np.ones(x.shape[1::-1], bool)
    out, (h, c) = layer(x, (h0, c0), mask=mask)
    out2, (h2, c2) = layer(x, (h0, c0))
    np.testing.assert_allclose(out, out2, rtol=0, atol=1e-14)
    np.testing.assert_allclose(h, h2, rtol=0, atol=1e-14)
    one, _ = layer(x[:, 0], mask=np.array([0, 1, 1, 0, 1, 1], bool))
    batch, _ = layer(x[:, :1], mask=np.array([[0, 1, 1, 0, 1, 1]], bool))
    np.testing.assert_allclose(one, batch[:, 0], rtol=0, atol=1e-14)


@pytest.mark.parametrize("cls", ["GRU", "LSTM"])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("zero_output", [False, True])
def test_mask_gradients_by_finite_differences(cls, bidirectional, zero_output):
    layer, x, h0, c0, mask = _case(cls, 2, bidirectional, True, T=5, B=4, D=2, H=3)
    x = np.ascontiguousarray(x.swapaxes(0, 1))
    lstm = cls == "LSTM"
    rng = np.random.default_rng(9)
    (out, state), backprop = layer.forward_train(x, (h0, c0) if lstm else h0, mask=mask,
                                                 zero_output_for_mask=zero_output)
    w = rng.standard_normal(out.shape)
    wh = rng.standard_normal(h0.shape)

    def loss():
        o, s = layer(x, (h0, c0) if lstm else h0, mask=mask,
                     zero_output_for_mask=zero_output)
        return float((o * w).sum() + ((s[0] if lstm else s) * wh).sum())

    layer.zero_grad()
    dx, dhx = backprop(w, (wh, None) if lstm else wh)
    np.testing.assert_allclose(dx, ref.numeric_grad(loss, x), rtol=0, atol=1e-7)
    np.testing.assert_allclose(dhx[0] if lstm else dhx, ref.numeric_grad(loss, h0), rtol=0,
                               atol=1e-7)
    assert not dx[~mask].any()              # a skipped step's input reaches nothing
    name = "weight_hh_l1_reverse" if bidirectional else "weight_hh_l1"
    weight = getattr(layer, name).copy()

    def loss_w():
        layer.load_state_dict({name: weight}, strict=False)
        return loss()

    grad = layer.grads[name].copy()
    np.testing.assert_allclose(grad, ref.numeric_grad(loss_w, weight), rtol=0, atol=1e-7)


def test_mask_errors_name_the_argument():
    layer, x, h0, c0, mask = _case("GRU", 1, False, False)
    with pytest.raises(ValueError, match=r"GRU: expected mask of shape \(5, 6\) \(batch, "
                                         r"steps\), got \(6, 5\)"):
        layer(x, mask=mask.T)
    with pytest.raises(TypeError, match="GRU: mask must be boolean .*got dtype float64"):
        layer(x, mask=mask.astype(float))
    with pytest.raises(TypeError, match="values other than 0 and 1"):
        layer(x, mask=mask.astype(int) * 2)
    with pytest.raises(ValueError, match="GRU: pass lengths or mask, not both"):
        layer(x, mask=mask, lengths=np.full(5, 6))
    with pytest.raises(TypeError, match="GRU: zero_output_for_mask must be"):
        layer(x, mask=mask, zero_output_for_mask="yes")
    with pytest.raises(ValueError, match=r"GRU: expected input of shape \(T, B, 3\)"):
        layer(x[..., :2], mask=mask)
    (out, _), backprop = layer.forward_train(x, mask=mask)
    with pytest.raises(ValueError, match=r"GRU.backprop: expected dout of the output's shape"):
        backprop(out[:-1])
    # integers 0/1 are taken as booleans
    np.testing.assert_array_equal(layer(x, mask=mask.astype(np.int8))[0], layer(x, mask=mask)[0])


# --- against Keras ----------------------------------------------------------------------
def _keras():
    keras = pytest.importorskip("keras")
    return keras


@pytest.mark.parametrize("kind", ["SimpleRNN", "GRU", "LSTM"])
@pytest.mark.parametrize("wrapper", [None, "Bidirectional"])
@pytest.mark.parametrize("return_sequences", [True, False])
def test_masked_keras_layers_import_exactly(kind, wrapper, return_sequences):
    """A Keras layer called with a mask of every pattern (left padding, holes,
    an empty row): from_keras's result with the same mask gives Keras'
    numbers, Bidirectional's forced zero outputs included."""
    keras = _keras()
    rng = np.random.default_rng(3)
    B, T, D, H = 5, 6, 3, 4
    layer = getattr(keras.layers, kind)(H, return_sequences=return_sequences)
    if wrapper:
        layer = keras.layers.Bidirectional(layer)
    x = rng.standard_normal((B, T, D)).astype(np.float32)
    mask = _mask(B, T, rng)
    expected = np.asarray(layer(x, mask=mask))
    model = fastrnn.from_keras(layer)
    if isinstance(model, fastrnn.Sequential):
        got = model(x, mask=mask)
    else:   # a bidirectional layer returning sequences: Keras zeros the masked steps
        got = model(x, mask=mask, zero_output_for_mask=wrapper is not None)[0]
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-6)
