"""Keras 3 import: the same outputs as the Keras layer (skipped without Keras)."""
import os

import numpy as np
import pytest

import fastrnn

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
keras = pytest.importorskip("keras")


def keras_layer(kind, **kw):
    return {"SimpleRNN": keras.layers.SimpleRNN, "GRU": keras.layers.GRU,
            "LSTM": keras.layers.LSTM}[kind](5, return_sequences=True, **kw)


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("kind", ["SimpleRNN", "GRU", "GRU-reset-before", "LSTM"])
def test_from_keras_gives_keras_outputs(kind, use_bias, bidirectional):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 7, 4)).astype(np.float32)
    if kind == "GRU-reset-before":
        layer = keras_layer("GRU", use_bias=use_bias, reset_after=False)
    else:
        layer = keras_layer(kind, use_bias=use_bias)
    if bidirectional:
        layer = keras.layers.Bidirectional(layer, merge_mode="concat")
    expected = np.asarray(layer(x))                      # builds it with random weights
    # non-zero biases, so that their placement is tested
    for sub in ([layer.forward_layer, layer.backward_layer] if bidirectional else [layer]):
        weights = sub.get_weights()
        sub.set_weights([w + rng.uniform(-0.3, 0.3, w.shape).astype(np.float32)
                         for w in weights])
    expected = np.asarray(layer(x))
    converted = fastrnn.from_keras(layer)
    assert converted.batch_first and converted.bidirectional == bidirectional
    if kind.startswith("GRU"):
        assert converted.reset_after == (kind == "GRU")
    out, _ = converted(x)
    np.testing.assert_allclose(out, expected, rtol=0, atol=2e-6)


def test_from_keras_refuses_what_it_cannot_represent():
    x = np.zeros((1, 2, 3), np.float32)
    cases = [(keras_layer("LSTM", activation="relu"), "activation='relu'"),
             (keras_layer("SimpleRNN", unroll=True), "unroll=True"),
             (keras_layer("LSTM", dropout=0.2), "dropout")]
    for layer, message in cases:
        layer(x)
        with pytest.raises(ValueError, match=f"from_keras: .*{message}"):
            fastrnn.from_keras(layer)
    with pytest.raises(TypeError, match="from_keras: expected a Keras SimpleRNN, GRU, LSTM, "
                                        "Bidirectional or Sequential, got Dense"):
        fastrnn.from_keras(keras.layers.Dense(3))


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("kind", ["SimpleRNN", "GRU", "LSTM"])
def test_return_sequences_false_gives_the_last_step(kind, bidirectional):
    x = np.random.default_rng(3).standard_normal((2, 6, 4)).astype(np.float32)
    layer = {"SimpleRNN": keras.layers.SimpleRNN, "GRU": keras.layers.GRU,
             "LSTM": keras.layers.LSTM}[kind](5, return_sequences=False)
    if bidirectional:
        layer = keras.layers.Bidirectional(layer)
    expected = np.asarray(layer(x))
    converted = fastrnn.from_keras(layer)
    assert isinstance(converted, fastrnn.Sequential)
    np.testing.assert_allclose(converted(x), expected, rtol=0, atol=2e-6)
