"""The gate options through the converters: fastrnn layers exported with
to_onnx run under ONNX Runtime; hand-written ONNX nodes with activations,
activation_alpha/beta (per direction), clip, input_forget and P imported with
from_onnx match ONNX Runtime; Keras layers with non-default activations
imported with from_keras match Keras, and other activations are refused by
name. ONNX's own backend cases are in tests/test_import_complete.py."""
import os

import numpy as np
import pytest

import fastrnn
import reference_options as ro
from test_gate_options import make_layer, randomize_peepholes
from test_reference_options import (_oracle_on_node, _specs_in_node_order, onnx_node_model,
                                    random_params)



def _onnx():
    """The ONNX tests skip without onnx and onnxruntime (the Keras ones run)."""
    pytest.importorskip("onnxruntime")
    return pytest.importorskip("onnx")


# float32 against float32: the layer and ONNX Runtime round differently and
# use other tanh/sigmoid approximations (ORT's GRU a rational one). ORT is
# within 4.5e-7 of the float64 oracle on these nodes (tests/
# test_reference_options.py), the layer within 1e-5 of the output scale
# (tests/test_gate_options.py, measured 2e-7); the plain layers' ONNX tests
# take 3e-6, the options' wider activations (scaled_tanh 1.3, affine, elu)
# and two stacked nodes 5e-6.
ATOL = 5e-6


def run(model, feeds):
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


# --- to_onnx -> ONNX Runtime --------------------------------------------------------------
# ONNX Runtime reads activation_alpha/beta compactly (the k-th alpha to the
# k-th function that takes one); older versions' RNN op indexed them by
# direction: the bidirectional RNN case gives both directions functions with
# the same parameters, so that both readings agree.
EXPORTED = [
    ("rnn", dict(nonlinearity=("leaky_relu", 0.25), clip=1.5)),
    ("rnn", dict(nonlinearity=[("scaled_tanh", 1.25, 0.75), ("hard_sigmoid", 0.25, 0.5)])),
    ("rnn", dict(nonlinearity="linear")),
    ("gru", dict(activation="softsign", recurrent_activation="hard_sigmoid", clip=2.0)),
    ("gru", dict(activation=[("elu", 0.75), "softplus"],
                 recurrent_activation=["sigmoid", ("hard_sigmoid", 0.25, 0.5)])),
    ("gru_reset_before", dict(activation="relu", recurrent_activation="sigmoid", clip=1.0)),
    ("lstm", dict(peepholes=True)),
    ("lstm", dict(peepholes=True, input_forget=True, clip=1.25)),
    ("lstm", dict(activation=["softsign", ("leaky_relu", 0.25)],
                  recurrent_activation="hard_sigmoid",
                  cell_activation=[("thresholded_relu", 0.25), "linear"], peepholes=True)),
]


@pytest.mark.parametrize("kind, options", EXPORTED,
                         ids=[f"{k}-{sorted(o)}" for k, o in EXPORTED])
@pytest.mark.parametrize("num_layers, batch_first, with_lengths", [(1, False, False),
                                                                   (2, True, True)])
def test_to_onnx_runs_under_onnx_runtime(kind, options, num_layers, batch_first, with_lengths):
    _onnx()
    rng = np.random.default_rng(0)
    T, B, D, H = 6, 3, 4, 5
    layer = make_layer(kind, D, H, options, num_layers=num_layers, bidirectional=True,
                       batch_first=batch_first, seed=1)
    randomize_peepholes(layer, rng)
    x = rng.standard_normal((B, T, D) if batch_first else (T, B, D)).astype(np.float32)
    h0, c0 = (rng.standard_normal((2 * num_layers, B, H)).astype(np.float32) for _ in range(2))
    lengths = np.array([6, 2, 5], np.int32) if with_lengths else None
    model = fastrnn.to_onnx(layer, lengths=with_lengths)
    nodes = [n for n in model.graph.node if n.op_type in ("RNN", "GRU", "LSTM")]
    assert len(nodes) == num_layers
    if options.get("peepholes"):
        assert all(len(n.input) == 8 and n.input[7] for n in nodes)
    feeds = {"X": x, "initial_h": h0}
    if kind == "lstm":
        feeds["initial_c"] = c0
    if with_lengths:
        feeds["sequence_lens"] = lengths
    got = run(model, feeds)
    out, state = layer(x, (h0, c0) if kind == "lstm" else h0, lengths=lengths)
    np.testing.assert_allclose(got[0], out, rtol=0, atol=ATOL)
    for g, s in zip(got[1:], state if kind == "lstm" else (state,)):
        np.testing.assert_allclose(g, s, rtol=0, atol=ATOL)


def test_to_onnx_writes_peepholes_in_onnx_order():
    """fastrnn's peepholes are i, f, o; ONNX's P is i, o, f."""
    onnx = _onnx()
    layer = fastrnn.LSTM(2, 3, peepholes=True, seed=0)
    p = np.arange(9, dtype=np.float32)
    layer.load_state_dict({"weight_peephole_l0": p}, strict=False)
    model = fastrnn.to_onnx(layer)
    node = next(n for n in model.graph.node if n.op_type == "LSTM")
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    np.testing.assert_array_equal(inits[node.input[7]], [np.r_[0:3, 6:9, 3:6]])


@pytest.mark.parametrize("kind, options", [
    ("lstm", dict(activation=["softsign", ("leaky_relu", 0.25)], clip=1.5, input_forget=True,
                  cell_activation=("scaled_tanh", 1.5, 0.75), peepholes=True)),
    ("gru", dict(activation=("elu", 0.5), recurrent_activation=("hard_sigmoid", 0.25, 0.5))),
    ("rnn", dict(nonlinearity=[("affine", 0.75, 0.25), ("scaled_tanh", 1.5, 0.5)], clip=2.0)),
])
def test_from_onnx_of_to_onnx_gives_the_same_layer(kind, options):
    """Alphas, betas and clip exact in float32 (ONNX's attributes are
    float32): the imported layer is the exported one, bit for bit."""
    _onnx()
    rng = np.random.default_rng(2)
    layer = make_layer(kind, 3, 4, options, bidirectional=True, seed=3)
    randomize_peepholes(layer, rng)
    copy, = fastrnn.from_onnx(fastrnn.to_onnx(layer))
    assert repr(copy) == repr(layer)
    x = rng.standard_normal((5, 2, 3)).astype(np.float32)
    np.testing.assert_array_equal(copy(x, lengths=[5, 3])[0], layer(x, lengths=[5, 3])[0])


# --- hand-written nodes -> from_onnx, against ONNX Runtime ------------------------------------
def _run_imported(layer, kind, feeds, lengths):
    """The imported layer (or Reversed) on the node's feeds -> Y, Y_h (, Y_c)."""
    hx = (feeds["initial_h"], feeds["initial_c"]) if kind == "lstm" else feeds["initial_h"]
    out, state = layer(feeds["X"], hx, lengths=lengths)
    finals = list(state) if kind == "lstm" else [state]
    H = finals[0].shape[-1]
    y = out.reshape(out.shape[0], out.shape[1], -1, H).transpose(0, 2, 1, 3)
    return [y] + finals


IMPORTED = [
    ("lstm", "forward", dict(peepholes=True)),
    ("lstm", "reverse", dict(peepholes=True, input_forget=True, clip=0.75)),
    ("lstm", "bidirectional", dict(
        recurrent_activation=[("hard_sigmoid", 0.3, 0.45), "sigmoid"],
        activation=[("leaky_relu", 0.2), ("elu", 0.8)],
        cell_activation=[("scaled_tanh", 1.3, 0.6), "softsign"],
        peepholes=True, input_forget=True, clip=1.2)),
    ("lstm", "forward", dict(activation=("affine", 0.7, -0.2),
                             cell_activation=("thresholded_relu", 0.3),
                             recurrent_activation="softsign")),
    ("gru", "bidirectional", dict(activation=[("elu", 0.8), "softplus"],
                                  recurrent_activation=["sigmoid", "softsign"], clip=0.9)),
    ("gru", "reverse", dict(activation=("scaled_tanh", 1.3, 0.6), clip=0.7)),
    ("gru_reset_before", "bidirectional", dict(activation=["relu", "tanh"],
                                               recurrent_activation=[("affine", 0.3, 0.4),
                                                                     "sigmoid"])),
    ("rnn", "forward", dict(nonlinearity="softsign", clip=0.8)),
    ("rnn", "reverse", dict(nonlinearity=("thresholded_relu", 0.2))),
    ("rnn", "bidirectional", dict(nonlinearity=[("elu", 0.8), ("leaky_relu", 0.2)],
                                  clip=1.5)),
]


@pytest.mark.parametrize("case", IMPORTED, ids=lambda c: f"{c[0]}-{c[1]}-{sorted(c[2])}")
@pytest.mark.parametrize("with_lengths", [False, True])
def test_from_onnx_node_matches_onnx_runtime(case, with_lengths):
    _onnx()
    kind, direction, options = case
    rng = np.random.default_rng(4)
    T, B, D, H = 6, 3, 3, 4
    peep = options.get("peepholes", False)
    params = random_params(kind, D, H, bidirectional=True, peepholes=peep, seed=5, scale=0.8,
                           dtype=np.float32)
    dirs = 2 if direction == "bidirectional" else 1
    lengths = np.array([6, 2, 5]) if with_lengths else None
    node_options = options if direction != "reverse" else \
        {k: (v[1] if isinstance(v, list) else v) for k, v in options.items()}
    specs = _specs_in_node_order(kind, node_options, dirs)
    model = onnx_node_model(kind, params, H, direction, specs, options.get("clip"),
                            options.get("input_forget", False), peep, with_lengths)
    feeds = {"X": rng.standard_normal((T, B, D)).astype(np.float32),
             "initial_h": rng.standard_normal((dirs, B, H)).astype(np.float32)}
    if kind == "lstm":
        feeds["initial_c"] = rng.standard_normal((dirs, B, H)).astype(np.float32)
    ort_feeds = dict(feeds)
    if with_lengths:
        ort_feeds["sequence_lens"] = lengths.astype(np.int32)
    expected = run(model, ort_feeds)
    layer, = fastrnn.from_onnx(model)
    if direction == "reverse":
        assert isinstance(layer, fastrnn.Reversed)
    got = _run_imported(layer, kind, feeds, lengths)
    for g, e, name in zip(got, expected, ["Y", "Y_h", "Y_c"]):
        np.testing.assert_allclose(g, e, rtol=0, atol=ATOL, err_msg=name)
    # float64 import against the oracle on the same node
    layer64, = fastrnn.from_onnx(model, dtype="float64")
    got64 = _run_imported(layer64, kind, {k: v.astype(np.float64) for k, v in feeds.items()},
                          lengths)
    want = _oracle_on_node(kind, {k: v.astype(np.float64) for k, v in params.items()},
                           direction, feeds["X"], feeds["initial_h"], feeds.get("initial_c"),
                           lengths, _float32_specs(options))
    for g, w, name in zip(got64, want, ["Y", "Y_h", "Y_c"]):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-12, err_msg=name)


def _float32_specs(options):
    """The options as an ONNX node holds them: alpha, beta, clip in float32."""
    def f32(spec):
        if isinstance(spec, list):
            return [f32(s) for s in spec]
        if isinstance(spec, tuple):
            return (spec[0],) + tuple(float(np.float32(v)) for v in spec[1:])
        return spec
    out = {k: f32(v) for k, v in options.items()}
    if out.get("clip") is not None:
        out["clip"] = float(np.float32(out["clip"]))
    return out


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_from_onnx_takes_onnx_default_alphas(op):
    """Without activation_alpha/beta: HardSigmoid 0.2/0.5 (ONNX's, not
    fastrnn's 1/6), LeakyRelu 0.01, Elu 1.0, as ONNX Runtime reads them."""
    _onnx()
    kind = op.lower()
    rng = np.random.default_rng(6)
    H, D = 3, 2
    params = random_params(kind, D, H, seed=7, dtype=np.float32)
    names = ["HardSigmoid", "LeakyRelu", "Elu"][:3 if op == "LSTM" else 2]
    model = onnx_node_model(kind, params, H, "forward",
                            ro.specs_from_onnx_attributes(names))
    node = model.graph.node[0]
    for attr in list(node.attribute):
        if attr.name in ("activation_alpha", "activation_beta"):
            node.attribute.remove(attr)
    feeds = {"X": rng.standard_normal((5, 2, D)).astype(np.float32),
             "initial_h": rng.standard_normal((1, 2, H)).astype(np.float32)}
    if op == "LSTM":
        feeds["initial_c"] = rng.standard_normal((1, 2, H)).astype(np.float32)
    expected = run(model, feeds)
    layer, = fastrnn.from_onnx(model)
    got = _run_imported(layer, kind, feeds, None)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=0, atol=ATOL)


@pytest.mark.parametrize("attrs, extra, message", [
    ({"activations": ["Sigmoid", "Gelu", "Tanh"]}, (), r"activations.*Gelu"),
    ({"activations": ["Sigmoid", "Tanh"]}, (), r"activations"),
    ({"clip": -1.0}, (), r"clip"),
    ({"clip": 0.0}, (), r"clip"),
    ({"input_forget": 2}, (), r"input_forget=2"),
])
def test_from_onnx_still_refuses_bad_option_attributes(attrs, extra, message):
    _onnx()
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((1, 8, 3)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal((1, 8, 2)).astype(np.float32), "R")]
    node = helper.make_node("LSTM", ["X", "W", "R", *extra], ["Y"], hidden_size=2, **attrs)
    graph = helper.make_graph([node], "g",
                              [helper.make_tensor_value_info("X", TensorProto.FLOAT, [4, 1, 3])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(ValueError, match=f"from_onnx: LSTM node .*{message}"):
        fastrnn.from_onnx(model)


# --- Keras ---------------------------------------------------------------------------------------
def _keras():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return pytest.importorskip("keras")


KERAS = [
    ("SimpleRNN", dict(activation="relu")),
    ("SimpleRNN", dict(activation="softplus")),
    ("GRU", dict(activation="elu", recurrent_activation="hard_sigmoid")),
    ("GRU", dict(activation="linear", recurrent_activation="softsign", reset_after=False)),
    ("LSTM", dict(activation="softsign", recurrent_activation="hard_sigmoid")),
    ("LSTM", dict(activation="relu", recurrent_activation="sigmoid")),
]


@pytest.mark.parametrize("cls, kwargs", KERAS, ids=[f"{c}-{'-'.join(map(str, k.values()))}"
                                                    for c, k in KERAS])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_from_keras_imports_activations(cls, kwargs, bidirectional):
    keras = _keras()
    rng = np.random.default_rng(8)
    B, T, D, H = 3, 6, 4, 5
    layer = getattr(keras.layers, cls)(H, return_sequences=True, **kwargs)
    if bidirectional:
        layer = keras.layers.Bidirectional(layer)
    x = rng.standard_normal((B, T, D)).astype(np.float32)
    layer(x)
    for sub in ([layer.forward_layer, layer.backward_layer] if bidirectional else [layer]):
        sub.set_weights([w + rng.uniform(-0.3, 0.3, w.shape).astype(np.float32)
                         for w in sub.get_weights()])
    expected = np.asarray(layer(x))
    converted = fastrnn.from_keras(layer)
    out, _ = converted(x)
    # float32 both; the plain layers' Keras tests take 2e-6, relu and linear
    # candidates leave the (-1, 1) range of tanh: 5e-6
    np.testing.assert_allclose(out, expected, rtol=0, atol=5e-6)


@pytest.mark.parametrize("kwargs, message", [
    (dict(activation="gelu"), r"activation='gelu'"),
    (dict(recurrent_activation="silu"), r"recurrent_activation='silu'"),
    (dict(activation="selu"), r"activation='selu'"),
])
def test_from_keras_refuses_other_activations_by_name(kwargs, message):
    keras = _keras()
    layer = keras.layers.LSTM(3, **kwargs)
    layer(np.zeros((1, 2, 3), np.float32))
    with pytest.raises(ValueError, match=f"from_keras: LSTM {message}"):
        fastrnn.from_keras(layer)
