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


@pytest.mark.parametrize("kind", ["SimpleRNN", "GRU", "LSTM"])
def test_from_keras_keeps_dropout_and_recurrent_dropout(kind):
    """Keras' per-gate, per-sequence masks are input_dropout and
    recurrent_dropout (tests/test_recurrent_dropout.py); inference drops none."""
    x = np.random.default_rng(0).standard_normal((2, 5, 3)).astype(np.float32)
    layer = keras_layer(kind, dropout=0.2, recurrent_dropout=0.3)
    expected = np.asarray(layer(x))
    converted = fastrnn.from_keras(layer)
    assert (converted.input_dropout, converted.recurrent_dropout) == (0.2, 0.3)
    np.testing.assert_allclose(converted(x)[0], expected, rtol=0, atol=2e-6)


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
    cases = [(keras_layer("LSTM", activation="gelu"), "activation='gelu'"),
             (keras_layer("SimpleRNN", unroll=True), "unroll=True")]
    for layer, message in cases:
        layer(x)
        with pytest.raises(ValueError, match=f"from_keras: .*{message}"):
            fastrnn.from_keras(layer)
    with pytest.raises(TypeError, match="from_keras: expected a Keras SimpleRNN, GRU, LSTM, "
                                        "Bidirectional, Sequential or functional Model, got "
                                        "Dense"):
        fastrnn.from_keras(keras.layers.Dense(3))
    # a bad dtype names from_keras's argument (it named the layer built from it)
    layer = keras_layer("GRU")
    layer(x)
    with pytest.raises(ValueError, match="from_keras: dtype must be 'float32' or 'float64', got "
                                         "'float16'"):
        fastrnn.from_keras(layer, dtype="float16")


def test_from_keras_refuses_weights_and_outputs_it_would_drop():
    """Each of these once converted with no error and other numbers (or
    crashed): LoRA's update to a Dense or Embedding kernel was dropped (0.48
    and 0.21 off Keras), a quantized Embedding's int8 table read as floats
    (1.0 off; a quantized Dense raised IndexError), return_state's states
    dropped, a Bidirectional whose backward layer alone had dropout lost it
    (and one whose forward layer alone had it raised KeyError)."""
    L = keras.layers
    x = np.zeros((2, 3, 4), np.float32)
    ids = np.ones((2, 3), np.int64)
    dense = keras.Sequential([keras.Input((3, 4)), L.GRU(5, return_sequences=True), L.Dense(2)])
    dense(x)
    dense.layers[-1].enable_lora(2)
    with pytest.raises(ValueError, match="from_keras: Dense lora_enabled=True: fastrnn reads "
                                         "the base kernel only"):
        fastrnn.from_keras(dense)
    for layer in (L.Embedding(10, 4), L.Dense(4)):
        first = [keras.Input((3,), dtype="int32"), layer] if isinstance(layer, L.Embedding) \
            else [keras.Input((3, 4)), layer]
        model = keras.Sequential(first + [L.GRU(3)])
        model(ids if isinstance(layer, L.Embedding) else x)
        model.quantize("int8")
        with pytest.raises(ValueError, match=f"from_keras: {type(layer).__name__} "
                                             f"quantization_mode='int8'"):
            fastrnn.from_keras(model)
    for layer in (L.LSTM(5, return_state=True), L.Bidirectional(L.GRU(5, return_state=True))):
        layer(x)
        with pytest.raises(ValueError, match="return_state=True: the converted layer would "
                                             "return its output only"):
            fastrnn.from_keras(layer)
    for fwd, bwd in ((0.0, 0.2), (0.2, 0.0)):
        layer = L.Bidirectional(L.GRU(5, dropout=fwd),
                                backward_layer=L.GRU(5, dropout=bwd, go_backwards=True))
        layer(x)
        with pytest.raises(ValueError, match=f"backward_layer dropout={bwd!r}: differs from "
                                             f"the forward layer's {fwd!r}"):
            fastrnn.from_keras(layer)
    same = L.Bidirectional(L.GRU(5, dropout=0.2, recurrent_dropout=0.1, return_sequences=True),
                           backward_layer=L.GRU(5, dropout=0.2, recurrent_dropout=0.1,
                                                go_backwards=True, return_sequences=True))
    same(x)
    converted = fastrnn.from_keras(same)
    assert (converted.input_dropout, converted.recurrent_dropout) == (0.2, 0.1)


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


@pytest.mark.parametrize("head", ["embedding", "masking"])
def test_a_functional_chain_imports_as_its_sequential(head):
    """A functional keras.Model whose layers form one chain computes, once
    imported, what Keras computes (masks included), and imports as the
    keras.Sequential of the same layers does."""
    rng = np.random.default_rng(11)
    B, T, V = 4, 6, 9
    ids = rng.integers(1, V, (B, T))
    ids[0, :2] = 0
    ids[1, 4:] = 0
    ids[2, 3] = 0
    if head == "embedding":
        inputs = keras.Input((T,))
        x = keras.layers.Embedding(V, 4, mask_zero=True)(inputs)
        data = ids
    else:
        inputs = keras.Input((T, 4))
        x = keras.layers.Masking(0.0)(inputs)
        data = rng.standard_normal((B, T, 4)).astype(np.float32) * (ids != 0)[..., None]
    x = keras.layers.Bidirectional(keras.layers.GRU(3, return_sequences=True),
                                   merge_mode="sum")(x)
    x = keras.layers.LSTM(5, go_backwards=True)(x)
    x = keras.layers.Dropout(0.3)(x)
    kmodel = keras.Model(inputs, keras.layers.Dense(2, activation="tanh")(x))
    model = fastrnn.from_keras(kmodel)
    assert isinstance(model, fastrnn.Sequential)
    np.testing.assert_allclose(model(data), np.asarray(kmodel(data)), rtol=0, atol=3e-6)
    ksequential = keras.Sequential([keras.Input(inputs.shape[1:]), *kmodel.layers[1:]])
    assert repr(fastrnn.from_keras(ksequential)) == repr(model)
    again = fastrnn.from_keras(kmodel)     # its layers are in another model now too
    np.testing.assert_array_equal(again(data), model(data))


def test_a_functional_model_off_one_chain_is_refused_by_name():
    T = 5
    inputs = keras.Input((T, 3))
    a = keras.layers.GRU(4, return_sequences=True, name="a")(inputs)
    b = keras.layers.GRU(4, return_sequences=True, name="b")(inputs)
    out, _ = keras.layers.GRU(4, return_state=True, name="with_state")(inputs)
    dense = keras.layers.Dense(3, name="shared")
    cases = [
        (keras.Model(inputs, keras.layers.Add(name="add")([a, b])),
         r"from_keras: functional model '.*': Add layer 'add' is called with 2 input tensors; "
         r"fastrnn imports a chain of layers each called on the previous one's output alone"),
        (keras.Model(inputs, [a, b]),
         r"from_keras: functional model '.*' has 1 input and 2 outputs; fastrnn imports a "
         r"chain of layers from one input to one output"),
        (keras.Model(inputs, out),
         r"GRU layer 'with_state' gives 2 tensors \(return_state\?\); fastrnn imports layers "
         r"giving one"),
        (keras.Model(inputs, dense(dense(keras.layers.Dense(3)(inputs)))),
         r"Dense layer 'shared' is called more than once \(shared weights\)"),
        (keras.Model(inputs, keras.layers.Dropout(0.5, name="drop")(a, training=True)),
         r"Dropout layer 'drop' is called with keyword arguments \['training'\]"),
        # keras.ops on the chain (were "the layers [] are off the chain", or "called
        # with 1 input tensors" for t * 2.0)
        (keras.Model(inputs, keras.ops.flip(a, axis=1)),
         r"Flip operation '.*' \(keras.ops or an operator on a tensor\) is not a layer"),
        (keras.Model(inputs, a * 2.0),
         r"Multiply operation '.*' \(keras.ops or an operator on a tensor\) is not a layer"),
        (keras.Model(inputs, a[:, -1]),
         r"GetItem operation '.*' \(keras.ops or an operator on a tensor\) is not a layer"),
    ]
    for kmodel, message in cases:
        with pytest.raises(ValueError, match=message):
            fastrnn.from_keras(kmodel)
    with pytest.raises(TypeError, match=r"from_keras: Flatten layer 'flat': fastrnn imports "
                                        r"Keras Masking, Embedding"):
        fastrnn.from_keras(keras.Model(inputs, keras.layers.Flatten(name="flat")(a)))

    class Subclassed(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(TypeError, match=r"from_keras: expected a Keras .*, got Subclassed"):
        fastrnn.from_keras(Subclassed())


def test_from_keras_refuses_a_subclass_that_keeps_the_name():
    """A subclass named as Keras' layer may compute its own way (this one
    doubles its input): refused, as one of another name is, and so is an
    RNN layer whose cell is a subclass."""
    class GRU(keras.layers.GRU):
        def call(self, sequences, initial_state=None, mask=None, training=False):
            return super().call(2 * sequences, initial_state=initial_state, mask=mask,
                                training=training)

    layer = GRU(4, return_sequences=True)
    layer(np.zeros((1, 2, 3), np.float32))
    with pytest.raises(TypeError, match=r"from_keras: .*GRU subclasses Keras' GRU"):
        fastrnn.from_keras(layer)
    with pytest.raises(TypeError, match=r"from_keras: .*GRU subclasses Keras' GRU"):
        fastrnn.from_keras(keras.Sequential([keras.Input((2, 3)), layer]))

    class Cell(keras.layers.GRUCell):
        pass

    wrapped = keras.layers.GRU(4, return_sequences=True)
    wrapped.cell = Cell(4)
    with pytest.raises(TypeError, match=r"from_keras: .*Cell subclasses Keras' GRUCell"):
        fastrnn.from_keras(wrapped)


def _as_keras2(layer, **config):
    """``layer`` as a Keras 2 (tf_keras) layer of the same weights would
    present itself: its class from the tf_keras package, ``config`` added to
    its get_config() (without tf_keras installed)."""
    base = type(layer)

    class Keras2(base):
        def get_config(self):
            return {**base.get_config(self), **config}

    Keras2.__name__ = Keras2.__qualname__ = base.__name__
    Keras2.__module__ = "tf_keras.src.layers.rnn." + base.__name__.lower()
    layer.__class__ = Keras2
    return layer


def test_from_keras_reads_keras_2s_hard_sigmoid_and_refuses_time_major():
    """Keras 2's hard_sigmoid is clip(0.2 x + 0.5, 0, 1), not Keras 3's
    x / 6 (a tf_keras GRU was 0.2 off); its time_major=True layers read (T,
    B, D) and are refused by name (they converted as batch-major ones)."""
    layer = keras.layers.GRU(5, return_sequences=True, recurrent_activation="hard_sigmoid")
    layer(np.zeros((1, 2, 3), np.float32))
    converted = fastrnn.from_keras(_as_keras2(layer))
    assert converted.recurrent_activation == ["hard_sigmoid", 0.2, 0.5]
    keras3 = keras.layers.GRU(5, return_sequences=True, recurrent_activation="hard_sigmoid")
    keras3(np.zeros((1, 2, 3), np.float32))
    assert fastrnn.from_keras(keras3).recurrent_activation == "hard_sigmoid"
    lstm = keras.layers.LSTM(5, return_sequences=True)
    lstm(np.zeros((1, 2, 3), np.float32))
    with pytest.raises(ValueError, match="from_keras: LSTM time_major=True: "):
        fastrnn.from_keras(_as_keras2(lstm, time_major=True))


def test_from_keras_names_a_custom_layer_in_a_model_as_not_convertible():
    """A layer of another kind in a model keeps its message (the list of
    kinds fastrnn imports); a subclass of a kind it imports is refused as one."""
    class Scale(keras.layers.Layer):
        def call(self, x):
            return 2 * x

    model = keras.Sequential([keras.Input((4, 3)), keras.layers.GRU(5, return_sequences=True),
                              Scale(name="scale")])
    with pytest.raises(TypeError, match="from_keras: Scale layer 'scale': fastrnn imports Keras"):
        fastrnn.from_keras(model)

    class Dense(keras.layers.Dense):
        def call(self, x):
            return super().call(x) * 3

    inputs = keras.Input((4, 3))
    model = keras.Model(inputs, Dense(2)(keras.layers.GRU(5)(inputs)))
    with pytest.raises(TypeError, match=r"from_keras: .*Dense subclasses Keras' Dense"):
        fastrnn.from_keras(model)


def test_from_keras_says_where_keras_computes_in_another_precision():
    """A mixed-precision layer computes in float16 in Keras from float32
    weights; the converted one computes in float32 (5e-4 off here), which
    passed unsaid. A float64 layer converted to float32 likewise. Each is a
    warning naming the layer; a float64 conversion of it says nothing."""
    import warnings
    x = np.random.default_rng(0).standard_normal((2, 5, 3)).astype(np.float32)
    mixed = keras_layer("GRU", dtype="mixed_float16", name="mixed_gru")
    expected = np.asarray(mixed(x)).astype(np.float32)
    with pytest.warns(UserWarning, match=r"GRU 'mixed_gru' computes in float16 in Keras "
                                         r"\(dtype policy 'mixed_float16'\); the converted "
                                         r"layer computes in float32"):
        converted = fastrnn.from_keras(mixed)
    difference = np.abs(converted(x)[0] - expected).max()
    assert 1e-5 < difference < 5e-3
    wide = keras_layer("LSTM", dtype="float64", name="wide")
    wide(x.astype(np.float64))
    with pytest.warns(UserWarning, match=r"LSTM 'wide' computes in float64 .* pass "
                                         r"dtype='float64'"):
        fastrnn.from_keras(wide)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastrnn.from_keras(wide, dtype="float64")
        plain = keras_layer("GRU")
        plain(x)
        fastrnn.from_keras(plain)
    model = keras.Sequential([keras.Input((5, 3)), keras_layer("GRU", dtype="mixed_float16"),
                              keras.layers.Dense(2, dtype="mixed_float16", name="head")])
    with pytest.warns(UserWarning) as record:
        fastrnn.from_keras(model)
    messages = [str(w.message) for w in record]
    assert len(messages) == 2 and "Dense 'head' computes in float16" in messages[1]
    # a Bidirectional's own layers under a float32 wrapper
    bidirectional = keras.layers.Bidirectional(keras_layer("GRU", dtype="mixed_float16",
                                                           name="inner"))
    bidirectional(x)
    with pytest.warns(UserWarning, match=r"GRU 'forward_inner' computes in float16"):
        fastrnn.from_keras(bidirectional)
