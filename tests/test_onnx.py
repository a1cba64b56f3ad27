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


def test_to_onnx_refuses_non_layers_and_opsets_it_cannot_write():
    with pytest.raises(TypeError, match="to_onnx: expected a fastrnn RNN, GRU or LSTM"):
        fastrnn.to_onnx(fastrnn.GRUCell(3, 4))
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match=r"to_onnx: expected a fastrnn RNN, GRU or LSTM, got "
                                        r"torch\.nn\.modules\.rnn\.LSTM"):
        fastrnn.to_onnx(torch.nn.LSTM(3, 4))
    newest = onnx.defs.onnx_opset_version()
    for opset in (9, newest + 1):
        with pytest.raises(ValueError, match=rf"to_onnx: opset must be an int from 10 .* to "
                                             rf"{newest} .*, got {opset}"):
            fastrnn.to_onnx(fastrnn.LSTM(3, 4), opset=opset)
    with pytest.raises(TypeError, match="to_onnx: opset must be an int, got '17'"):
        fastrnn.to_onnx(fastrnn.LSTM(3, 4), opset="17")
    fastrnn.to_onnx(fastrnn.LSTM(3, 4), opset=10)   # the oldest it writes


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch_first", [False, True])
def test_from_onnx_round_trip(kind, bidirectional, bias, batch_first):
    layer = make_layer(kind, 4, 5, bidirectional=bidirectional, bias=bias,
                       batch_first=batch_first, seed=3)
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


def _with_constant(op, name, value, slot):
    """_node_model's node with input ``slot`` (4 sequence_lens, 5 initial_h,
    6 initial_c) the initializer ``name`` holding ``value``."""
    from onnx import numpy_helper
    extra = [""] * (slot - 2)      # after X, W, R
    extra[slot - 3] = name
    model = _node_model(op, extra_inputs=extra)
    model.graph.initializer.append(numpy_helper.from_array(value, name))
    return model


@pytest.mark.parametrize("op,slot,label,call", [
    ("GRU", 5, "initial_h", "hx"), ("LSTM", 6, "initial_c", "hx"),
    ("RNN", 4, "sequence_lens", "lengths")])
def test_from_onnx_refuses_a_state_or_lengths_fixed_in_the_model(op, slot, label, call):
    """A node's initial_h, initial_c or sequence_lens held in the model (an
    initializer, or computed from one) was ignored: the layer started from
    zeros (or ran every step), 0.25-2.1 off ONNX Runtime. The layer call
    takes them from the caller, so they are refused by name; zeros for a
    state, and values from a graph input (to_onnx's hx slices), import."""
    fixed = np.array([3], np.int32) if slot == 4 else np.full((1, 1, 2), 0.5, np.float32)
    with pytest.raises(ValueError, match=rf"input {label} \('fixed'\) is a constant of the "
                                         rf"model; fastrnn takes it from the caller \(the "
                                         rf"layer call's {call}\)"):
        fastrnn.from_onnx(_with_constant(op, "fixed", fixed, slot))
    if slot > 4:   # zeros: the layer's own start
        layer, = fastrnn.from_onnx(_with_constant(op, "zero", np.zeros((1, 1, 2), np.float32),
                                                  slot))
        plain, = fastrnn.from_onnx(_node_model(op))
        x = np.ones((4, 1, 3), np.float32)
        np.testing.assert_array_equal(layer(x)[0], plain(x)[0])
    # to_onnx's learned initial state: an initializer expanded to the batch
    learned = fastrnn.LSTM(3, 2, learn_initial_state=True, seed=0)
    state = learned.state_dict()
    state["initial_h_l0"] = np.full(2, 0.5, np.float32)      # (learned from zeros)
    learned.load_state_dict(state)
    with pytest.raises(ValueError, match=r"input initial_h \('initial_h_0'\) is computed in "
                                         r"the graph"):
        fastrnn.from_onnx(fastrnn.to_onnx(learned))


@pytest.mark.parametrize("value", [0.0, 0.5])
def test_from_onnx_takes_a_zero_state_made_by_a_constant_number(value):
    """A state from Constant(value_float=0) broadcast by an Expand (as some
    exporters write zeros) was refused as computed in the graph; zeros
    import (the layer's own start, ONNX Runtime's numbers when it is
    installed), any other number is still refused by name."""
    from onnx import TensorProto, helper, numpy_helper
    model = _node_model("GRU", extra_inputs=["", "", "h0"])
    model.graph.node.insert(0, helper.make_node("Constant", [], ["zero"], value_float=value))
    model.graph.node.insert(1, helper.make_node("Expand", ["zero", "shape"], ["h0"]))
    model.graph.initializer.append(numpy_helper.from_array(np.array([1, 1, 2]), "shape"))
    if value:
        with pytest.raises(ValueError, match=r"input initial_h \('h0'\) is computed in the "
                                             r"graph"):
            fastrnn.from_onnx(model)
        return
    layer, = fastrnn.from_onnx(model)
    plain, = fastrnn.from_onnx(_node_model("GRU"))
    x = np.random.default_rng(1).standard_normal((4, 1, 3)).astype(np.float32)
    np.testing.assert_array_equal(layer(x)[0], plain(x)[0])
    try:
        import onnxruntime
    except ImportError:
        return
    session = onnxruntime.InferenceSession(model.SerializeToString(),
                                           providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"X": x})
    np.testing.assert_allclose(layer(x)[0], y[:, 0], rtol=0, atol=2e-6)


@pytest.mark.parametrize("op,attrs,extra,message", [
    # clip, input_forget=1, any ONNX activation and P import (tests/test_gate_options*.py);
    # what is still refused:
    ("LSTM", {"clip": -3.0}, (), "clip"),
    ("LSTM", {"input_forget": 2}, (), "input_forget=2"),
    ("GRU", {"linear_before_reset": 2}, (), "linear_before_reset=2"),
    ("RNN", {"direction": "sideways"}, (), "direction='sideways'"),
    ("GRU", {"layout": 2}, (), "layout=2"),
    ("LSTM", {"activations": ["HardSigmoid", "Gelu", "Tanh"]}, (), "activations.*Gelu"),
    ("GRU", {"activations": ["Sigmoid", "Tanh", "Tanh"]}, (), "activations"),
    ("LSTM", {}, ("", "", "", "", "P"), "input P"),
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


# --- layout: the imported layers compute what the file computes ------------------------
def _chain(layers, x, h0, c0=None):
    """Run the imported layers one after the other, each on its rows of the
    stacked initial state; returns (output, stacked h_n[, stacked c_n])."""
    rows, h_n, c_n = 0, [], []
    for layer in layers:
        dirs = 2 if layer.bidirectional else 1
        hx = h0[rows:rows + dirs]
        if c0 is not None:
            x, (h, c) = layer(x, (hx, c0[rows:rows + dirs]))
            c_n.append(c)
        else:
            x, h = layer(x, hx)
        h_n.append(h)
        rows += dirs
    states = [np.concatenate(h_n)] + ([np.concatenate(c_n)] if c0 is not None else [])
    return [x] + states


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("num_layers", [1, 2])
def test_from_onnx_reproduces_the_file(kind, batch_first, bidirectional, num_layers, tmp_path):
    """from_onnx(to_onnx(layer)) read back from the file: the layers, chained
    on data laid out as the file takes it, give ONNX Runtime's outputs on that
    file and the original layer's."""
    rng = np.random.default_rng(7)
    layer = make_layer(kind, 3, 4, num_layers=num_layers, bidirectional=bidirectional,
                       batch_first=batch_first, seed=11)
    path = tmp_path / "layer.onnx"
    model = fastrnn.to_onnx(layer, path)
    layers = fastrnn.from_onnx(path)
    assert [l.batch_first for l in layers] == [batch_first] * num_layers
    T, B, dirs = 6, 2, 2 if bidirectional else 1
    x = rng.standard_normal((B, T, 3) if batch_first else (T, B, 3)).astype(np.float32)
    h0 = rng.standard_normal((num_layers * dirs, B, 4)).astype(np.float32)
    c0 = rng.standard_normal((num_layers * dirs, B, 4)).astype(np.float32)
    feeds = {"X": x, "initial_h": h0}
    if kind == "lstm":
        feeds["initial_c"] = c0
    expected = run(model, feeds)
    got = _chain(layers, x, h0, c0 if kind == "lstm" else None)
    out, state = layer(x, (h0, c0) if kind == "lstm" else h0)
    original = [out] + (list(state) if kind == "lstm" else [state])
    for g, e, o in zip(got, expected, original):
        np.testing.assert_allclose(g, e, rtol=0, atol=3e-6)
        np.testing.assert_array_equal(g, o)


@pytest.mark.parametrize("module_name", ["RNN", "GRU", "LSTM"])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_from_onnx_reproduces_pytorch_exports(module_name, batch_first, bidirectional):
    """A file written by PyTorch's exporter (Squeeze or Transpose+Reshape after
    each node, a Transpose before and after for batch_first) imports as
    layers that give ONNX Runtime's and PyTorch's outputs."""
    torch = pytest.importorskip("torch")
    import io
    import warnings
    torch.manual_seed(0)
    module = getattr(torch.nn, module_name)(3, 4, num_layers=2, batch_first=batch_first,
                                             bidirectional=bidirectional)
    x = np.random.default_rng(2).standard_normal((2, 5, 3) if batch_first else (5, 2, 3))
    x = x.astype(np.float32)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.from_numpy(x),), buffer, dynamo=False,
                          input_names=["X"], output_names=["Y", "Y_h"])
    model = onnx.load_model_from_string(buffer.getvalue())
    layers = fastrnn.from_onnx(model)
    assert [l.batch_first for l in layers] == [batch_first] * 2
    y = x
    for l in layers:
        y, _ = l(y)
    np.testing.assert_allclose(y, run(model, {"X": x})[0], rtol=0, atol=3e-6)
    with torch.no_grad():
        np.testing.assert_allclose(y, module(torch.from_numpy(x))[0].numpy(), rtol=0,
                                   atol=3e-6)


def _replace_node(model, old_op, old_perm, new_node):
    """The model with its (single) node of op ``old_op`` (and perm) replaced."""
    from onnx import helper
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for i, node in enumerate(copy.graph.node):
        perm = [list(a.ints) for a in node.attribute if a.name == "perm"]
        if node.op_type == old_op and (old_perm is None or perm == [old_perm]) \
                and list(node.output) == ["Y"]:
            copy.graph.node[i].CopyFrom(helper.make_node(new_node[0], list(node.input), ["Y"],
                                                         **new_node[1]))
            return copy
    raise AssertionError("node not found")


def test_from_onnx_refuses_a_layout_change():
    """A model that takes batch-first input and returns time-major output (or
    the reverse) is not one fastrnn layer: refused, naming the node."""
    batch_first = fastrnn.to_onnx(fastrnn.LSTM(3, 4, batch_first=True, seed=0))
    time_major_out = _replace_node(batch_first, "Transpose", [1, 0, 2], ("Identity", {}))
    with pytest.raises(ValueError, match=r"from_onnx: LSTM node 'Y0': output Y: the node "
                                         r"reads X batch-first .* but its output is used "
                                         r"time-major \(graph output 'Y'\)"):
        fastrnn.from_onnx(time_major_out)
    stacked = fastrnn.to_onnx(fastrnn.RNN(3, 4, num_layers=2, batch_first=True, seed=0))
    stacked_time_major_out = _replace_node(stacked, "Transpose", [1, 0, 2], ("Identity", {}))
    with pytest.raises(ValueError, match=r"from_onnx: RNN node 'Y1': output Y: the node reads "
                                         r"X batch-first \(in the chain of recurrent nodes "
                                         r"from RNN node 'Y0', which reads Transpose "
                                         r"perm=\[1, 0, 2\] of 'X'\) but its output is used "
                                         r"time-major"):
        fastrnn.from_onnx(stacked_time_major_out)
    time_major = fastrnn.to_onnx(fastrnn.GRU(3, 4, seed=0))
    batch_first_out = _replace_node(time_major, "Identity", None,
                                    ("Transpose", {"perm": [1, 0, 2]}))
    with pytest.raises(ValueError, match=r"from_onnx: GRU node 'Y0': output Y: the node "
                                         r"reads X time-major but its output is transposed "
                                         r"to batch-first \(graph output 'Y'\)"):
        fastrnn.from_onnx(batch_first_out)


def test_from_onnx_time_major_node_feeding_a_batch_first_one():
    """X -> LSTM -> Squeeze -> Transpose(1, 0, 2) -> LSTM -> Squeeze ->
    Transpose(1, 0, 2) -> Y: the first node is time-major, the second reads
    the first's output as batch-first data; chained, the layers give Y."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(8)
    weights = {"W0": (1, 16, 3), "R0": (1, 16, 4), "W1": (1, 16, 4), "R1": (1, 16, 4)}
    inits = [numpy_helper.from_array(rng.uniform(-1, 1, shape).astype(np.float32), name)
             for name, shape in weights.items()]
    inits.append(numpy_helper.from_array(np.array([1], np.int64), "axis"))
    nodes = [helper.make_node("LSTM", ["X", "W0", "R0"], ["y0"], name="first", hidden_size=4),
             helper.make_node("Squeeze", ["y0", "axis"], ["m0"]),
             helper.make_node("Transpose", ["m0"], ["x1"], perm=[1, 0, 2]),
             helper.make_node("LSTM", ["x1", "W1", "R1"], ["y1"], name="second", hidden_size=4),
             helper.make_node("Squeeze", ["y1", "axis"], ["m1"]),
             helper.make_node("Transpose", ["m1"], ["Y"], perm=[1, 0, 2])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [5, 2, 3])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    first, second = fastrnn.from_onnx(model)
    assert (first.batch_first, second.batch_first) == (False, True)
    x = rng.standard_normal((5, 2, 3)).astype(np.float32)
    np.testing.assert_allclose(second(first(x)[0])[0], run(model, {"X": x})[0], rtol=0,
                               atol=3e-6)


def test_from_onnx_batch_first_node_without_y():
    """A batch-first model that outputs only the final state (Y unused) gives a
    batch_first layer: fed the file's batch-first input, its h_n is Y_h."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(4)
    W = rng.uniform(-1, 1, (2, 12, 3)).astype(np.float32)
    R = rng.uniform(-1, 1, (2, 12, 4)).astype(np.float32)
    nodes = [helper.make_node("Transpose", ["X"], ["X_tm"], perm=[1, 0, 2]),
             helper.make_node("GRU", ["X_tm", "W", "R"], ["", "Y_h"], hidden_size=4,
                              direction="bidirectional", linear_before_reset=1)]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [2, 5, 3])],
        [helper.make_tensor_value_info("Y_h", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(W, "W"), numpy_helper.from_array(R, "R")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.standard_normal((2, 5, 3)).astype(np.float32)
    layer, = fastrnn.from_onnx(model)
    assert layer.batch_first
    np.testing.assert_allclose(layer(x)[1], run(model, {"X": x})[0], rtol=0, atol=3e-6)


# --- malformed nodes: ValueError / TypeError naming node, input or attribute -------------
def _malformed(W=None, R=None, B=None, inputs=("X", "W", "R"), **attrs):
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    tensors = {"W": rng.standard_normal((1, 8, 3)).astype(np.float32) if W is None else W,
               "R": rng.standard_normal((1, 8, 2)).astype(np.float32) if R is None else R,
               "B": B}
    inits = [value if isinstance(value, TensorProto) else numpy_helper.from_array(value, key)
             for key, value in tensors.items() if value is not None]
    attrs = {"hidden_size": 2, **attrs}
    node = helper.make_node("LSTM", list(inputs), ["Y"], name="bad", **attrs)
    graph = helper.make_graph([node], "g",
                              [helper.make_tensor_value_info("X", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                              initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _raw_tensor(name, dims, data_type, raw=b""):
    from onnx import TensorProto
    tensor = TensorProto(name=name, data_type=data_type, raw_data=raw)
    tensor.dims.extend(dims)
    return tensor


def _external_W():
    from onnx import TensorProto
    tensor = _raw_tensor("W", [1, 8, 3], TensorProto.FLOAT)
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value="../w.bin")
    return tensor


def _string_W():
    from onnx import TensorProto
    tensor = _raw_tensor("W", [1, 8, 3], TensorProto.STRING)
    tensor.ClearField("raw_data")
    tensor.string_data.extend([b"x"] * 24)
    return tensor


def _h_tensor():
    from onnx import numpy_helper
    return numpy_helper.from_array(np.array([2], np.int64), "h")


LSTM_BAD = r"from_onnx: LSTM node 'bad': "
F = np.float32


MALFORMED = {   # id: (model, error, message after "from_onnx: LSTM node 'bad': ")
    "missing_W": (lambda: _malformed(inputs=("X",)), ValueError,
                  r"input W: missing \(the node has 1 input\)"),
    "bidirectional_one_direction_W": (
        lambda: _malformed(direction="bidirectional", R=np.ones((2, 8, 2), F)), ValueError,
        r"input W: expected shape \(2, 4\*H, D\) = \(2, 8, D\) \(direction 'bidirectional', "
        r"hidden_size 2\), got \(1, 8, 3\)"),
    "scalar_W": (lambda: _malformed(W=np.float32(1.0)), ValueError,
                 r"input W: expected shape \(1, 4\*H, D\) = \(1, 8, D\) .*got \(\)"),
    "vector_B": (lambda: _malformed(B=np.ones(16, F), inputs=("X", "W", "R", "B")), ValueError,
                 r"input B: expected shape \(1, 8\*H\) = \(1, 16\) .*got \(16,\)"),
    "indivisible_gate_rows": (
        lambda: _malformed(W=np.ones((1, 7, 3), F)), ValueError,
        r"input W: expected shape \(1, 4\*H, D\) = \(1, 8, D\) .*got \(1, 7, 3\)"),
    "string_tensor": (
        lambda: _malformed(_string_W()), TypeError,
        r"input W: data type STRING: fastrnn imports real floating-point or integer weights"),
    "unknown_data_type": (lambda: _malformed(_raw_tensor("W", [1, 8, 3], 77, b"\0" * 96)),
                          ValueError, r"input W: unknown data type 77"),
    "hidden_size_list": (
        lambda: _malformed(hidden_size=[2, 2]), TypeError,
        r"attribute hidden_size: expected an int, got a list of ints \(\[2, 2\]\)"),
    "hidden_size_tensor": (lambda: _malformed(hidden_size=_h_tensor()), TypeError,
                           r"attribute hidden_size: expected an int, got a tensor"),
    "hidden_size_float": (lambda: _malformed(hidden_size=4.7), TypeError,
                          r"attribute hidden_size: expected an int, got a float \(4.7\)"),
    "hidden_size_string": (lambda: _malformed(hidden_size="4"), TypeError,
                           r"attribute hidden_size: expected an int, got a string \('4'\)"),
    "hidden_size_not_R": (
        lambda: _malformed(hidden_size=3), ValueError,
        r"input R: expected shape \(1, 4\*H, H\) = \(1, 12, 3\) \(direction 'forward', "
        r"hidden_size 3\), got \(1, 8, 2\)"),
    "external_data": (
        lambda: _malformed(_external_W()), ValueError,
        r"input W: initializer 'W' keeps its data outside the model \(external data\)"),
    "raw_data_short": (
        lambda: _malformed(_raw_tensor("W", [1, 8, 3], 1, b"\0" * 95)), ValueError,
        r"input W: initializer 'W' holds 95 bytes of data, expected 24 values \(1, 8, 3\) "
        r"of 4 bytes"),
    "infinite_R": (
        lambda: _malformed(R=np.full((1, 8, 2), np.inf, F)), ValueError,
        r"input R: non-finite values \(NaN or inf\) after conversion to float32"),
    "W_overflows_float32": (
        lambda: _malformed(W=np.full((1, 8, 3), 1e300)), ValueError,
        r"input W: non-finite values \(NaN or inf\) after conversion to float32"),
    "clip_not_positive": (lambda: _malformed(clip=0.0, input_forget=1), ValueError, r"clip"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_from_onnx_malformed_node(case):
    make, error, message = MALFORMED[case]
    with pytest.raises(error, match=LSTM_BAD + message):
        fastrnn.from_onnx(make())


@pytest.mark.parametrize("stored", ["float16", "bfloat16", "float64", "int8", "int32",
                                    "uint16", "int64"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_from_onnx_converts_real_initializers(stored, dtype):
    """Weights stored as any real floating or integer type load, converted."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(3)
    low = 0 if stored.startswith("uint") else -3
    W = rng.integers(low, 4, (1, 8, 3)).astype(np.float64)
    R = rng.integers(0, 4, (1, 8, 2)).astype(np.float64)
    if stored == "bfloat16":
        make = lambda a, name: helper.make_tensor(name, TensorProto.BFLOAT16, a.shape,
                                                  a.ravel().tolist())
    else:
        make = lambda a, name: numpy_helper.from_array(a.astype(stored), name)
    model = _malformed(make(W, "W"), make(R, "R"))
    layer, = fastrnn.from_onnx(model, dtype=dtype)
    assert layer.dtype == np.dtype(dtype)
    order = [0, 2, 3, 1]   # ONNX's i, o, f, c -> PyTorch's i, f, g, o
    blocks = lambda a: np.concatenate([a[0][2 * i:2 * i + 2] for i in order])
    np.testing.assert_array_equal(layer.weight_ih_l0, blocks(W))
    np.testing.assert_array_equal(layer.weight_hh_l0, blocks(R))


def test_from_onnx_argument_errors(tmp_path):
    with pytest.raises(TypeError, match=r"from_onnx: expected an onnx.ModelProto or a path "
                                        r"to an .onnx file, got int"):
        fastrnn.from_onnx(3)
    with pytest.raises(ValueError, match=r"from_onnx: dtype must be 'float32' or 'float64', "
                                         r"got 'float16'"):
        fastrnn.from_onnx(_malformed(), dtype="float16")
    with pytest.raises(ValueError, match=r"from_onnx: cannot read an ONNX model from '.*': "
                                         r"not a regular file"):
        fastrnn.from_onnx(tmp_path)
    with pytest.raises(ValueError, match=r"from_onnx: cannot read an ONNX model from "
                                         r"'a\\x00b': the path holds a NUL character"):
        fastrnn.from_onnx("a\0b")
    with pytest.raises(ValueError, match=r"from_onnx: got \d+ bytes holding a NUL byte, which a "
                                         r"path cannot hold; for a serialized model pass "
                                         r"io.BytesIO\(data\)"):
        fastrnn.from_onnx(fastrnn.to_onnx(fastrnn.GRU(3, 4)).SerializeToString())
    with pytest.raises(ValueError, match=r"from_onnx: cannot read an ONNX model from "
                                         r"'.*missing.onnx': No such file or directory"):
        fastrnn.from_onnx(tmp_path / "missing.onnx")
    import io    # a binary file object is read as a path is
    layer = fastrnn.GRU(3, 4, batch_first=True, seed=0)
    back, = fastrnn.from_onnx(io.BytesIO(fastrnn.to_onnx(layer).SerializeToString()))
    assert repr(back) == repr(layer)
    with pytest.raises(TypeError, match=r"from_onnx: expected a binary file object, got one "
                                        r"whose read\(\) returns str"):
        fastrnn.from_onnx(io.StringIO("text"))


def test_from_onnx_bounds_the_file_and_the_layers(tmp_path, monkeypatch):
    """A file over the size limit is not read; layers beyond the budget (here
    many nodes sharing one large weight) are not built."""
    from fastrnn import convert
    from onnx import TensorProto, helper, numpy_helper
    path = tmp_path / "model.onnx"
    fastrnn.to_onnx(fastrnn.LSTM(3, 4, seed=0), path)
    monkeypatch.setattr(convert, "_ONNX_MAX_FILE_BYTES", path.stat().st_size - 1)
    with pytest.raises(ValueError, match=r"from_onnx: cannot read an ONNX model from '.*': "
                                         rf"the file has {path.stat().st_size} bytes, more "
                                         r"than the limit"):
        fastrnn.from_onnx(path)
    monkeypatch.undo()
    rng = np.random.default_rng(0)
    H, D = 64, 256
    W = numpy_helper.from_array(rng.standard_normal((1, 4 * H, D)).astype(np.float32), "W")
    R = numpy_helper.from_array(rng.standard_normal((1, 4 * H, H)).astype(np.float32), "R")
    nodes = [helper.make_node("LSTM", ["X", "W", "R"], [f"Y{i}"], name=f"n{i}", hidden_size=H)
             for i in range(50)]
    graph = helper.make_graph(nodes, "g",
                              [helper.make_tensor_value_info("X", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("Y0", TensorProto.FLOAT, None)],
                              initializer=[W, R])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert len(fastrnn.from_onnx(model)) == 50          # 16 MiB of layers from a 330 KB model
    monkeypatch.setattr(convert, "_ONNX_LAYER_SLACK", 0)
    with pytest.raises(ValueError, match=r"from_onnx: the 50 recurrent nodes would build "
                                         r"layers of 16.\d MiB, more than the limit of "
                                         r"2.\d MiB \(8 times the model's size\)"):
        fastrnn.from_onnx(model)
