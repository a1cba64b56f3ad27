"""ONNX export: ONNX Runtime computes what the layer computes (skipped
without onnx / onnxruntime)."""
import numpy as np
import pytest

import fastrnn
from test_forward import KINDS, make_layer

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def run(model, feeds):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("num_layers,bidirectional,batch_first,bias,with_lengths", [
    (1, False, False, True, False), (2, True, False, True, True), (2, False, True, False, True),
    (3, True, True, True, False)])
def test_onnx_runtime_matches_the_layer(kind, num_layers, bidirectional, batch_first, bias,
                                        with_lengths, tmp_path):
    rng = np.random.default_rng(0)
    layer = make_layer(kind, 4, 5, num_layers=num_layers, bidirectional=bidirectional,
                       batch_first=batch_first, bias=bias, seed=1)
    T, B = 7, 3
    dirs = 2 if bidirectional else 1
    x = rng.standard_normal((B, T, 4) if batch_first else (T, B, 4)).astype(np.float32)
    h0 = rng.standard_normal((num_layers * dirs, B, 5)).astype(np.float32)
    c0 = rng.standard_normal((num_layers * dirs, B, 5)).astype(np.float32)
    lengths = np.array([7, 2, 5], np.int32) if with_lengths else None
    model = fastrnn.to_onnx(layer, tmp_path / "layer.onnx", lengths=with_lengths)
    assert (tmp_path / "layer.onnx").exists()
    feeds = {"X": x, "initial_h": h0}
    if kind == "lstm":
        feeds["initial_c"] = c0
    if with_lengths:
        feeds["sequence_lens"] = lengths
    got = run(model, feeds)
    out, state = layer(x, (h0, c0) if kind == "lstm" else h0, lengths=lengths)
    np.testing.assert_allclose(got[0], out, rtol=0, atol=3e-6)
    for g, s in zip(got[1:], state if kind == "lstm" else (state,)):
        np.testing.assert_allclose(g, s, rtol=0, atol=3e-6)


def test_onnx_state_outputs_stream():
    """Y_h / Y_c fed back as the initial state continue the sequence."""
    rng = np.random.default_rng(1)
    layer = fastrnn.LSTM(3, 4, num_layers=2, seed=0)
    model = fastrnn.to_onnx(layer)
    x = rng.standard_normal((10, 2, 3)).astype(np.float32)
    zeros = np.zeros((2, 2, 4), np.float32)
    y1, h, c = run(model, {"X": x[:6], "initial_h": zeros, "initial_c": zeros})
    y2, _, _ = run(model, {"X": x[6:], "initial_h": h, "initial_c": c})
    np.testing.assert_allclose(np.concatenate([y1, y2]), layer(x)[0], rtol=0, atol=3e-6)


def test_to_onnx_refuses_non_layers():
    with pytest.raises(TypeError, match="to_onnx: expected a fastrnn RNN, GRU or LSTM"):
        fastrnn.to_onnx(fastrnn.GRUCell(3, 4))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_from_onnx_round_trip(kind, bidirectional, bias):
    layer = make_layer(kind, 4, 5, bidirectional=bidirectional, bias=bias, seed=3)
    back, = fastrnn.from_onnx(fastrnn.to_onnx(layer))
    assert repr(back) == repr(layer)
    for name, value in layer.state_dict().items():
        np.testing.assert_array_equal(back.state_dict()[name], value)


def test_from_onnx_stacked_model_gives_one_layer_per_node():
    layer = fastrnn.GRU(3, 4, num_layers=3, seed=0)
    layers = fastrnn.from_onnx(fastrnn.to_onnx(layer))
    assert [type(l).__name__ for l in layers] == ["GRU"] * 3
    x = np.random.default_rng(0).standard_normal((5, 2, 3)).astype(np.float32)
    y = x
    for l in layers:
        y, _ = l(y)
    np.testing.assert_allclose(y, layer(x)[0], rtol=0, atol=1e-6)


def _node_model(op, attrs=None, extra_inputs=(), initialized=True):
    from onnx import TensorProto, helper, numpy_helper
    G = {"RNN": 1, "GRU": 3, "LSTM": 4}[op]
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((1, G * 2, 3)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal((1, G * 2, 2)).astype(np.float32), "R")]
    if not initialized:
        inits = inits[1:]
    node = helper.make_node(op, ["X", "W", "R", *extra_inputs], ["Y"], hidden_size=2,
                            **(attrs or {}))
    graph = helper.make_graph([node], "g",
                              [helper.make_tensor_value_info("X", TensorProto.FLOAT, [4, 1, 3])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                              initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("op,attrs,extra,message", [
    ("LSTM", {"clip": 3.0}, (), "clip=3.0"),
    ("LSTM", {"input_forget": 1}, (), "input_forget=1"),
    ("GRU", {"linear_before_reset": 2}, (), "linear_before_reset=2"),
    ("RNN", {"direction": "reverse"}, (), "direction='reverse'"),
    ("LSTM", {"activations": ["HardSigmoid", "Tanh", "Tanh"]}, (), "activations="),
    ("LSTM", {}, ("", "", "", "", "P"), r"P \(peepholes\)"),
])
def test_from_onnx_refuses_unsupported_attributes(op, attrs, extra, message):
    with pytest.raises(ValueError, match=f"from_onnx: {op} node .*{message}"):
        fastrnn.from_onnx(_node_model(op, attrs, extra))


@pytest.mark.parametrize("linear_before_reset", [None, 0, 1])
@pytest.mark.parametrize("direction", ["forward", "bidirectional"])
def test_from_onnx_gru_node_matches_onnx_runtime(linear_before_reset, direction):
    """A GRU node written by hand (not by to_onnx): both reset forms (ONNX's
    default is 0, reset before), biases and sequence_lens."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(5)
    dirs, H, D, T, B = (2 if direction == "bidirectional" else 1), 4, 3, 6, 3
    W = rng.uniform(-0.8, 0.8, (dirs, 3 * H, D)).astype(np.float32)
    R = rng.uniform(-0.8, 0.8, (dirs, 3 * H, H)).astype(np.float32)
    Bias = rng.uniform(-0.5, 0.5, (dirs, 6 * H)).astype(np.float32)
    attrs = {"hidden_size": H, "direction": direction}
    if linear_before_reset is not None:
        attrs["linear_before_reset"] = linear_before_reset
    node = helper.make_node("GRU", ["X", "W", "R", "B", "sequence_lens", "initial_h"],
                            ["Y", "Y_h"], **attrs)
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [T, B, D]),
         helper.make_tensor_value_info("sequence_lens", TensorProto.INT32, [B]),
         helper.make_tensor_value_info("initial_h", TensorProto.FLOAT, [dirs, B, H])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("Y_h", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(W, "W"), numpy_helper.from_array(R, "R"),
                     numpy_helper.from_array(Bias, "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.standard_normal((T, B, D)).astype(np.float32)
    lengths = np.array([6, 2, 4], np.int32)
    h0 = rng.standard_normal((dirs, B, H)).astype(np.float32)
    y, y_h = run(model, {"X": x, "sequence_lens": lengths, "initial_h": h0})
    layer, = fastrnn.from_onnx(model)
    assert layer.reset_after == (linear_before_reset == 1)
    out, h_n = layer(x, h0, lengths=lengths)
    # ONNX's Y is (T, dirs, B, H)
    np.testing.assert_allclose(out, y.transpose(0, 2, 1, 3).reshape(T, B, dirs * H),
                               rtol=0, atol=3e-6)
    np.testing.assert_allclose(h_n, y_h, rtol=0, atol=3e-6)


def test_from_onnx_bad_models():
    with pytest.raises(ValueError, match="not an initializer"):
        fastrnn.from_onnx(_node_model("RNN", initialized=False))
    from onnx import helper
    empty = helper.make_model(helper.make_graph([], "g", [], []))
    with pytest.raises(ValueError, match="no RNN, GRU or LSTM node"):
        fastrnn.from_onnx(empty)
    with pytest.raises(ValueError, match="cannot read an ONNX model"):
        fastrnn.from_onnx(__file__)


def test_from_onnx_refuses_ops_it_would_drop():
    """An op that computes (here a Relu after the LSTM) is named, not
    silently left out; other_ops='ignore' imports the recurrent node anyway."""
    from onnx import helper
    model = _node_model("LSTM")
    model.graph.node.append(helper.make_node("Relu", ["Y"], ["Z"], name="head"))
    with pytest.raises(ValueError, match="from_onnx: unsupported op 'Relu' \\(node 'head'\\)"):
        fastrnn.from_onnx(model)
    layer, = fastrnn.from_onnx(model, other_ops="ignore")
    assert isinstance(layer, fastrnn.LSTM)
    with pytest.raises(ValueError, match="other_ops must be 'raise' or 'ignore', got 'drop'"):
        fastrnn.from_onnx(model, other_ops="drop")
