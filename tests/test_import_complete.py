"""Models fastrnn used to refuse by name, imported exactly: ONNX
direction="reverse" and layout=1 (with ONNX's own backend test cases), Keras
go_backwards, Bidirectional merge modes, stateful layers and masks."""
import warnings

import numpy as np
import pytest

import fastrnn
import reference as ref

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

KIND = {"RNN": "rnn_tanh", "GRU": "gru", "LSTM": "lstm"}
GATES = {"RNN": 1, "GRU": 3, "LSTM": 4}


def _ort_run(model, feeds):
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _reference_run(model, feeds):
    from onnx.reference import ReferenceEvaluator
    return ReferenceEvaluator(model).run(None, feeds)


def _onnx_node_model(op, direction, layout, T, B, D, H, rng, lengths=False, gru_lbr=1,
                     dtype=np.float32):
    """One hand-written recurrent node with weights as initializers, every
    optional input (B, sequence_lens, initial_h, initial_c) and every output."""
    dirs = 2 if direction == "bidirectional" else 1
    G = GATES[op]
    inits = [numpy_helper.from_array(rng.uniform(-0.7, 0.7, (dirs, G * H, D)).astype(dtype),
                                     "W"),
             numpy_helper.from_array(rng.uniform(-0.7, 0.7, (dirs, G * H, H)).astype(dtype),
                                     "R"),
             numpy_helper.from_array(rng.uniform(-0.5, 0.5, (dirs, 2 * G * H)).astype(dtype),
                                     "B")]
    elem = TensorProto.FLOAT if dtype == np.float32 else TensorProto.DOUBLE
    seq = [B, T] if layout else [T, B]
    state = [B, dirs, H] if layout else [dirs, B, H]
    inputs = [helper.make_tensor_value_info("X", elem, seq + [D])]
    node_inputs = ["X", "W", "R", "B", "sequence_lens" if lengths else "", "initial_h"]
    if lengths:
        inputs.append(helper.make_tensor_value_info("sequence_lens", TensorProto.INT32, [B]))
    inputs.append(helper.make_tensor_value_info("initial_h", elem, state))
    outputs = ["Y", "Y_h"]
    if op == "LSTM":
        node_inputs.append("initial_c")
        inputs.append(helper.make_tensor_value_info("initial_c", elem, state))
        outputs.append("Y_c")
    attrs = {"hidden_size": H, "direction": direction}
    if layout:
        attrs["layout"] = 1
    if op == "GRU":
        attrs["linear_before_reset"] = gru_lbr
    node = helper.make_node(op, node_inputs, outputs, **attrs)
    graph = helper.make_graph([node], "g", inputs,
                              [helper.make_tensor_value_info(n, elem, None) for n in outputs],
                              initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])


def _feeds(op, layout, T, B, D, H, dirs, rng, lengths=None, dtype=np.float32):
    seq = (B, T, D) if layout else (T, B, D)
    state = (B, dirs, H) if layout else (dirs, B, H)
    feeds = {"X": rng.standard_normal(seq).astype(dtype),
             "initial_h": rng.standard_normal(state).astype(dtype)}
    if op == "LSTM":
        feeds["initial_c"] = rng.standard_normal(state).astype(dtype)
    if lengths is not None:
        feeds["sequence_lens"] = np.asarray(lengths, np.int32)
    return feeds


def _run_imported(layer, op, layout, feeds, lengths):
    """Run the imported layer on the node's inputs; return Y, Y_h (, Y_c) in
    the node's layout."""
    states = [feeds["initial_h"]] + ([feeds["initial_c"]] if op == "LSTM" else [])
    if layout:   # (B, dirs, H) -> the layer's (dirs, B, H)
        states = [s.transpose(1, 0, 2) for s in states]
    hx = tuple(states) if op == "LSTM" else states[0]
    out, state = layer(feeds["X"], hx, lengths=lengths)
    finals = list(state) if op == "LSTM" else [state]
    H = finals[0].shape[-1]
    if layout:   # out (B, T, dirs * H) -> Y (B, T, dirs, H); states (B, dirs, H)
        y = out.reshape(out.shape[0], out.shape[1], -1, H)
        finals = [f.transpose(1, 0, 2) for f in finals]
    else:        # out (T, B, dirs * H) -> Y (T, dirs, B, H)
        y = out.reshape(out.shape[0], out.shape[1], -1, H).transpose(0, 2, 1, 3)
    return [y] + finals


# --- ONNX direction="reverse" ---------------------------------------------------------
@pytest.mark.parametrize("op", ["RNN", "GRU", "LSTM"])
@pytest.mark.parametrize("with_lengths", [False, True])
def test_onnx_reverse_node_matches_onnx_runtime(op, with_lengths):
    rng = np.random.default_rng(1)
    T, B, D, H = 6, 4, 3, 5
    lengths = [6, 2, 5, 1] if with_lengths else None
    model = _onnx_node_model(op, "reverse", 0, T, B, D, H, rng, lengths=with_lengths)
    feeds = _feeds(op, 0, T, B, D, H, 1, rng, lengths)
    expected = _ort_run(model, feeds)
    layer, = fastrnn.from_onnx(model)
    assert isinstance(layer, fastrnn.Reversed) and layer.keep_order
    got = _run_imported(layer, op, 0, feeds, lengths)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=0, atol=3e-6)


@pytest.mark.parametrize("op", ["RNN", "GRU", "LSTM"])
def test_reversed_layer_matches_the_numpy_reference(op):
    """float64 against tests/reference.py: the reverse direction of a
    bidirectional reference layer is what a Reversed layer computes (its
    weights as that direction's)."""
    rng = np.random.default_rng(2)
    T, B, D, H = 7, 3, 2, 3
    layer = getattr(fastrnn, op)(D, H, dtype="float64", seed=3)
    rev = fastrnn.Reversed(layer)
    x = rng.standard_normal((T, B, D))
    h0 = rng.standard_normal((1, B, H))
    c0 = rng.standard_normal((1, B, H))
    lengths = np.array([7, 3, 5])
    params = {k.replace("_l0", "_l0_reverse"): v for k, v in layer.state_dict().items()}
    params.update({k: np.zeros_like(v) for k, v in layer.state_dict().items()})
    zeros = np.zeros((1, B, H))
    hx = (h0, c0) if op == "LSTM" else h0
    out, state = rev(x, hx, lengths=lengths)
    r_out, r_h, r_c = ref.layer_forward(KIND[op], params, x, np.concatenate([zeros, h0]),
                                        np.concatenate([zeros, c0]) if op == "LSTM" else None,
                                        bidirectional=True, lengths=lengths)
    np.testing.assert_allclose(out, r_out[..., H:], rtol=0, atol=1e-12)
    h_n = state[0] if op == "LSTM" else state
    np.testing.assert_allclose(h_n, r_h[1:], rtol=0, atol=1e-12)
    if op == "LSTM":
        np.testing.assert_allclose(state[1], r_c[1:], rtol=0, atol=1e-12)


def test_reversed_trains_by_finite_differences():
    rng = np.random.default_rng(4)
    T, B, D, H = 5, 2, 2, 3
    layer = fastrnn.GRU(D, H, batch_first=True, dtype="float64", seed=5)
    rev = fastrnn.Reversed(layer)
    x = rng.standard_normal((B, T, D))
    lengths = np.array([5, 3])
    w = rng.standard_normal((B, T, H))

    def loss():
        return float((rev(x, lengths=lengths)[0] * w).sum())

    (out, _), backprop = rev.forward_train(x, lengths=lengths)
    layer.zero_grad()
    dx, _ = backprop(w)
    np.testing.assert_allclose(dx, ref.numeric_grad(loss, x), rtol=0, atol=1e-8)
    weight = layer.weight_hh_l0.copy()

    def loss_w():
        layer.load_state_dict({"weight_hh_l0": weight}, strict=False)
        return loss()

    grad = layer.grads["weight_hh_l0"].copy()
    numeric = ref.numeric_grad(loss_w, weight)
    np.testing.assert_allclose(grad, numeric, rtol=0, atol=1e-8)


# --- ONNX layout=1 --------------------------------------------------------------------
@pytest.mark.parametrize("op", ["RNN", "GRU", "LSTM"])
@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
def test_onnx_layout_1_matches_the_onnx_reference_evaluator(op, direction):
    """ORT refuses layout=1 ("Batchwise recurrent operations (layout == 1) are
    not supported"), so the oracle is onnx's reference evaluator; each case
    is also checked against ORT on the same node with layout 0."""
    rng = np.random.default_rng(6)
    T, B, D, H = 5, 3, 4, 2
    dirs = 2 if direction == "bidirectional" else 1
    lbr = 1 if op == "GRU" else 0
    model = _onnx_node_model(op, direction, 1, T, B, D, H, rng, gru_lbr=lbr)
    feeds = _feeds(op, 1, T, B, D, H, dirs, rng)
    expected = _reference_run(model, feeds)
    layer, = fastrnn.from_onnx(model)
    assert layer.batch_first
    got = _run_imported(layer, op, 1, feeds, None)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=0, atol=3e-6)
    # the same node time-major, under ONNX Runtime
    model0 = _onnx_node_model(op, direction, 0, T, B, D, H, np.random.default_rng(6),
                              gru_lbr=lbr)
    feeds0 = {k: (v.transpose(1, 0, 2) if k != "sequence_lens" else v)
              for k, v in feeds.items()}
    expected0 = _ort_run(model0, feeds0)
    np.testing.assert_allclose(got[0], expected0[0].transpose(2, 0, 1, 3), rtol=0, atol=3e-6)
    for g, e in zip(got[1:], expected0[1:]):
        np.testing.assert_allclose(g, e.transpose(1, 0, 2), rtol=0, atol=3e-6)


@pytest.mark.parametrize("op", ["RNN", "GRU", "LSTM"])
def test_onnx_runtime_on_layout_1_refuses_or_agrees(op):
    """Why the layout=1 cases above use the reference evaluator: ONNX Runtime
    (to 1.32 at least) refuses layout=1. A version that runs it must give
    fastrnn's results on the same node (so a new ONNX Runtime in CI is
    checked, not a failure)."""
    ort = pytest.importorskip("onnxruntime")
    rng = np.random.default_rng(7)
    T, B, D, H = 4, 3, 2, 2
    model = _onnx_node_model(op, "forward", 1, T, B, D, H, rng, gru_lbr=1 if op == "GRU" else 0)
    feeds = _feeds(op, 1, T, B, D, H, 1, rng)
    try:
        expected = _ort_run(model, feeds)
    except Exception as error:   # ORT raises its own exception types
        if "layout" not in str(error):
            raise
        pytest.skip(f"ONNX Runtime {ort.__version__} refuses layout=1")
    layer, = fastrnn.from_onnx(model)
    got = _run_imported(layer, op, 1, feeds, None)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=0, atol=3e-6)


# --- ONNX's own backend test cases ------------------------------------------------------
# Every RNN/GRU/LSTM case of the installed onnx.backend.test.case.node must import and
# match, except the ones listed here with the message that refuses them. None is left
# since the gate options (activations, clip, input_forget, P): test_lstm_with_peepholes
# (P and sequence_lens) imports too.
ONNX_CASES_REFUSED = {}
ONNX_CASES_KNOWN = (
    "test_simple_rnn_defaults", "test_simple_rnn_with_initial_bias", "test_rnn_seq_length",
    "test_simple_rnn_batchwise", "test_simple_rnn_reverse", "test_simple_rnn_bidirectional",
    "test_gru_defaults", "test_gru_with_initial_bias", "test_gru_seq_length",
    "test_gru_batchwise", "test_gru_reverse", "test_gru_bidirectional", "test_lstm_defaults",
    "test_lstm_with_initial_bias", "test_lstm_batchwise", "test_lstm_reverse",
    "test_lstm_bidirectional", "test_lstm_with_peepholes")


def _onnx_backend_cases():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from onnx.backend.test.case import node as cases
        found = [case for case in cases.collect_testcases(None)
                 if case.model.graph.node[0].op_type in ("RNN", "GRU", "LSTM")]
    return {case.name: case for case in found}


def _with_weights_as_initializers(case):
    """The case's model with its weight inputs (W, R, B, P) as initializers:
    fastrnn imports constant weights. Returns (model, the remaining feeds)."""
    model = onnx.ModelProto()
    model.CopyFrom(case.model)
    node = model.graph.node[0]
    inputs, _ = case.data_sets[0]
    values = dict(zip([i.name for i in model.graph.input], inputs))
    labels = ["X", "W", "R", "B", "sequence_lens", "initial_h", "initial_c", "P"]
    weights = {name for label, name in zip(labels, node.input) if label in "WRBP" and name}
    keep = [i for i in model.graph.input if i.name not in weights]
    del model.graph.input[:]
    model.graph.input.extend(keep)
    for name in sorted(weights):
        model.graph.initializer.append(numpy_helper.from_array(values[name], name))
    feeds = {label: values[name] for label, name in zip(labels, node.input)
             if name and name not in weights}
    return model, feeds


def _backend_case_names():
    """The installed onnx's cases (collected at import, so that every one
    is a test of its own), or the known names without onnx."""
    try:
        return sorted(_onnx_backend_cases())
    except Exception:   # noqa: BLE001 - collection must not fail; the tests then skip
        return sorted(ONNX_CASES_KNOWN)


def test_onnx_backend_cases_are_all_known():
    """Every RNN/GRU/LSTM case of the installed onnx is one this file knows:
    a case a newer onnx adds fails here until it is looked at (it still runs
    below); a known case the installed onnx lacks is only reported by a skip."""
    names = set(_onnx_backend_cases())
    assert names <= set(ONNX_CASES_KNOWN), f"new cases: {sorted(names - set(ONNX_CASES_KNOWN))}"
    assert set(ONNX_CASES_REFUSED) <= names


@pytest.mark.parametrize("name", [n for n in _backend_case_names()
                                  if n not in ONNX_CASES_REFUSED])
def test_onnx_backend_case_imports_and_matches(name):
    cases = _onnx_backend_cases()
    if name not in cases:
        pytest.skip(f"this onnx version has no case {name}")
    case = cases[name]
    model, feeds = _with_weights_as_initializers(case)
    node = model.graph.node[0]
    op = node.op_type
    layout = next((a.i for a in node.attribute if a.name == "layout"), 0)
    layer, = fastrnn.from_onnx(model, dtype="float64")
    states = [feeds[k] for k in ("initial_h", "initial_c") if k in feeds]
    x = feeds["X"]
    B = x.shape[0] if layout else x.shape[1]
    dirs = 2 if layer.bidirectional else 1
    if op == "LSTM" and len(states) == 1:
        states.append(np.zeros_like(states[0]))
    full = dict(feeds)
    full.setdefault("initial_h", np.zeros((B, dirs, layer.hidden_size) if layout
                                          else (dirs, B, layer.hidden_size)))
    if op == "LSTM":
        full.setdefault("initial_c", np.zeros_like(full["initial_h"]))
    got = _run_imported(layer, op, layout, full, feeds.get("sequence_lens"))
    named = dict(zip(["Y", "Y_h", "Y_c"], got))
    _, expected = case.data_sets[0]
    outputs = [o for o in node.output]
    graph_outputs = [o.name for o in case.model.graph.output]
    checked = 0
    for label, name in zip(["Y", "Y_h", "Y_c"], outputs):
        if name and name in graph_outputs:
            want = expected[graph_outputs.index(name)]
            np.testing.assert_allclose(named[label], want, rtol=0, atol=1e-6)
            checked += 1
    assert checked == len(expected)


@pytest.mark.parametrize("name", sorted(ONNX_CASES_REFUSED))
def test_onnx_backend_case_still_refused(name):
    """The cases listed in ONNX_CASES_REFUSED (none at present: the
    parameter set is empty and pytest skips this) are refused by name."""
    case = _onnx_backend_cases()[name]
    model, _ = _with_weights_as_initializers(case)
    with pytest.raises(ValueError, match=ONNX_CASES_REFUSED[name]):
        fastrnn.from_onnx(model)


def test_onnx_backend_peephole_case_uses_its_peepholes():
    """test_lstm_with_peepholes imports its P: the same node without P
    gives other outputs (so the match above is not by luck)."""
    case = _onnx_backend_cases().get("test_lstm_with_peepholes")
    if case is None:
        pytest.skip("this onnx version has no case test_lstm_with_peepholes")
    model, feeds = _with_weights_as_initializers(case)
    node = model.graph.node[0]
    P = next(i for i in model.graph.initializer if i.name == node.input[7])
    assert np.abs(numpy_helper.to_array(P)).max() > 0
    layer, = fastrnn.from_onnx(model, dtype="float64")
    assert any(n.startswith("weight_peephole") for n in layer.state_dict())
    del node.input[7]
    plain, = fastrnn.from_onnx(model, dtype="float64")
    x = feeds["X"]
    hx = (feeds["initial_h"], feeds["initial_c"])
    lengths = feeds.get("sequence_lens")
    assert np.abs(layer(x, hx, lengths=lengths)[0] - plain(x, hx, lengths=lengths)[0]).max() \
        > 1e-4


# --- Keras: go_backwards, merge modes, stateful ----------------------------------------
def _keras():
    import os
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return pytest.importorskip("keras")


def _run(model, x, **kw):
    """The output of what from_keras returned."""
    if isinstance(model, fastrnn.Sequential):
        return model(x, **kw)
    return model(x, **kw)[0]


def _keras_mask(B, T, rng):
    mask = rng.random((B, T)) > 0.3
    mask[0, :2] = False        # left padding
    mask[1] = False            # a row with no step
    return mask


@pytest.mark.parametrize("kind", ["SimpleRNN", "GRU", "LSTM"])
@pytest.mark.parametrize("return_sequences", [True, False])
@pytest.mark.parametrize("zero_output", [False, True])
def test_keras_go_backwards_imports_exactly(kind, return_sequences, zero_output):
    """Keras returns go_backwards sequences in the order it ran them
    (reversed); with a mask, the mask is reversed with the input."""
    keras = _keras()
    rng = np.random.default_rng(7)
    B, T, D, H = 4, 6, 3, 5
    layer = getattr(keras.layers, kind)(H, go_backwards=True,
                                        return_sequences=return_sequences)
    layer.zero_output_for_mask = zero_output
    x = rng.standard_normal((B, T, D)).astype(np.float32)
    mask = _keras_mask(B, T, rng)
    expected, expected_masked = np.asarray(layer(x)), np.asarray(layer(x, mask=mask))
    model = fastrnn.from_keras(layer)
    inner = model[0] if isinstance(model, fastrnn.Sequential) else model
    assert isinstance(inner, fastrnn.Reversed) and not inner.keep_order
    np.testing.assert_allclose(_run(model, x), expected, rtol=0, atol=2e-6)
    kw = {} if isinstance(model, fastrnn.Sequential) else {"zero_output_for_mask": zero_output}
    np.testing.assert_allclose(_run(model, x, mask=mask, **kw), expected_masked, rtol=0,
                               atol=2e-6)


@pytest.mark.parametrize("merge_mode", ["sum", "mul", "ave", None, "concat"])
@pytest.mark.parametrize("return_sequences", [True, False])
def test_keras_bidirectional_merge_modes_import_exactly(merge_mode, return_sequences):
    """merge_mode=None: Keras returns [forward, backward]; fastrnn stacks them
    on the axis before the features, y[..., 0, :] and y[..., 1, :]."""
    keras = _keras()
    rng = np.random.default_rng(8)
    B, T, D, H = 4, 5, 3, 2
    layer = keras.layers.Bidirectional(keras.layers.GRU(H, return_sequences=return_sequences),
                                       merge_mode=merge_mode)
    x = rng.standard_normal((B, T, D)).astype(np.float32)
    mask = _keras_mask(B, T, rng)
    with pytest.raises(ValueError, match="from_keras: GRU weights: the layer is not built"):
        fastrnn.from_keras(layer)
    layer(x)
    model = fastrnn.from_keras(layer)
    for kw in ({}, {"mask": mask}):
        expected = layer(x, **kw)
        if merge_mode is None:
            expected = np.stack([np.asarray(e) for e in expected], axis=-2)
        if isinstance(model, fastrnn.Sequential):
            got = model(x, **kw)
        else:   # a bidirectional layer returning sequences: Keras zeros masked steps
            got = model(x, zero_output_for_mask=True, **kw)[0]
        np.testing.assert_allclose(got, np.asarray(expected), rtol=0, atol=2e-6)


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("go_backwards", [False, True])
def test_keras_stateful_imports_exactly(bidirectional, go_backwards):
    """The state runs on from call to call as in Keras, and reset_state
    starts again from zeros."""
    keras = _keras()
    rng = np.random.default_rng(9)
    B, T, D, H = 3, 4, 2, 3
    if bidirectional and go_backwards:
        pytest.skip("a Bidirectional's forward layer does not run backwards")
    inner = keras.layers.LSTM(H, stateful=True, return_sequences=True,
                              go_backwards=go_backwards)
    layer = keras.layers.Bidirectional(inner) if bidirectional else inner
    inputs = keras.Input(batch_shape=(B, T, D))
    kmodel = keras.Model(inputs, layer(inputs))
    xs = [rng.standard_normal((B, T, D)).astype(np.float32) for _ in range(3)]
    expected = [np.asarray(kmodel(x)) for x in xs]
    model = fastrnn.from_keras(layer)
    assert isinstance(model, fastrnn.Stateful)
    # Keras' batch size, before any call: a batch of another size, which
    # would carry other rows' states, is refused (it was taken as the first)
    assert model.batch_size == B
    with pytest.raises(ValueError, match=rf"Stateful: expected a batch of {B} sequences"):
        model(np.concatenate(xs[:2]))
    for x, e in zip(xs, expected):
        np.testing.assert_allclose(model(x)[0], e, rtol=0, atol=3e-6)
    layer.reset_state()
    model.reset_state()
    np.testing.assert_allclose(model(xs[1])[0], np.asarray(kmodel(xs[1])), rtol=0, atol=3e-6)
    with pytest.raises(ValueError, match=r"Stateful: expected a batch of 3 sequences .*got 2"):
        model(xs[0][:2])


def test_stateful_carries_the_state_in_training_and_fit():
    """Stateful is the plain layer given the last call's final state as hx,
    in forward_train too; Sequential.fit keeps it across batches and
    Sequential.reset_state clears it."""
    rng = np.random.default_rng(10)
    lstm = fastrnn.LSTM(2, 3, batch_first=True, dtype="float64", seed=1)
    stateful = fastrnn.Stateful(lstm, batch_size=2)
    x1, x2 = rng.standard_normal((2, 2, 4, 2))
    stateful(x1)
    (out, state), backprop = stateful.forward_train(x2)
    expected, exp_state = lstm(x2, lstm(x1)[1])
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-14)
    np.testing.assert_allclose(stateful.state[0], exp_state[0], rtol=0, atol=1e-14)
    dx, _ = backprop(np.ones_like(out))
    assert dx.shape == x2.shape
    model = fastrnn.Sequential([stateful, fastrnn.LastStep(), fastrnn.Linear(3, 1,
                                                                               dtype="float64")])
    model.compile(loss="mse", optimizer="sgd")
    model.reset_state()
    assert stateful.state is None
    model.fit(rng.standard_normal((6, 4, 2)), rng.standard_normal((6, 1)), batch_size=2,
              shuffle=False, verbose=0)
    assert stateful.state is not None
    # (refused before the first step: fit knows the remainder)
    with pytest.raises(ValueError, match=r"a Stateful layer takes batches of exactly 2 "
                                         r"sequences, but x \(5 samples\) would give "
                                         r"batches of \[1\]"):
        model.fit(rng.standard_normal((5, 4, 2)), rng.standard_normal((5, 1)), batch_size=2,
                  shuffle=False, verbose=0)
    with pytest.raises(ValueError, match=r"Stateful: expected batched input"):
        stateful(x1[0])
    # a model of wrappers pickles with the carried state
    import pickle
    copy = pickle.loads(pickle.dumps(model))
    np.testing.assert_array_equal(copy[0].state[0], stateful.state[0])
    x3 = rng.standard_normal((2, 4, 2))
    np.testing.assert_array_equal(copy(x3), model(x3))


def test_wrapper_errors_name_the_argument():
    with pytest.raises(TypeError, match="Reversed: layer must be a fastrnn RNN, GRU or LSTM"):
        fastrnn.Reversed(fastrnn.Linear(2, 2))
    with pytest.raises(TypeError, match="Stateful: layer must be a fastrnn RNN"):
        fastrnn.Stateful("LSTM")
    with pytest.raises(TypeError, match="Reversed: keep_order must be"):
        fastrnn.Reversed(fastrnn.GRU(2, 2), keep_order="no")
    with pytest.raises(ValueError, match="Stateful: batch_size must be"):
        fastrnn.Stateful(fastrnn.GRU(2, 2), batch_size=0)
    rev = fastrnn.Reversed(fastrnn.GRU(2, 2))
    x = np.zeros((3, 2, 2), np.float32)
    with pytest.raises(ValueError, match=r"Reversed: expected lengths of shape \(2,\)"):
        rev(x, lengths=[3])
    with pytest.raises(ValueError, match=r"Reversed: expected mask of shape \(2, 3\)"):
        rev(x, mask=np.ones((3, 2), bool))
    (out, _), backprop = rev.forward_train(x)
    with pytest.raises(ValueError, match="Reversed.backprop: expected dout of the output's"):
        backprop(out[1:])
    with pytest.raises(ValueError, match="MergeDirections: mode must be"):
        fastrnn.MergeDirections("max")
    with pytest.raises(ValueError, match=r"MergeDirections: expected input whose last axis"):
        fastrnn.Sequential([fastrnn.MergeDirections("sum")])(np.zeros((2, 3)))


@pytest.mark.parametrize("mode", ["sum", "mul", "ave", None])
def test_merge_directions_gradient_by_finite_differences(mode):
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 3, 4))
    merge = fastrnn.MergeDirections(mode)
    y, backprop = merge._seq_train(x)
    w = rng.standard_normal(y.shape)
    numeric = ref.numeric_grad(lambda: float((merge._seq_infer(x) * w).sum()), x)
    np.testing.assert_allclose(backprop(w), numeric, rtol=0, atol=1e-8)


def test_stateful_takes_no_hx():
    """The carried state is the initial state: a positional second argument
    (an hx by habit) is refused rather than read as lengths."""
    stateful = fastrnn.Stateful(fastrnn.GRU(2, 3))
    x = np.zeros((4, 2, 2), np.float32)
    with pytest.raises(TypeError, match="positional argument"):
        stateful(x, np.zeros((1, 2, 3)))
    out, h_n = stateful(x, lengths=[4, 2])
    np.testing.assert_array_equal(stateful.state, h_n)
