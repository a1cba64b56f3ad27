"""The gate-options oracle (tests/reference_options.py) checked on its own:
its BPTT against central finite differences of its forward, its defaults
against tests/reference.py, its forward against ONNX Runtime (hand-written
ONNX nodes with activations, alpha/beta, clip, input_forget and P) and
against Keras layers with non-default activations. None of this uses
fastrnn's kernels."""
import os

import numpy as np
import pytest

import reference
import reference_options as ro

ALL_NAMES = list(ro.DEFAULTS)
# specs away from their defaults, one per function
SPECS = {"sigmoid": "sigmoid", "tanh": "tanh", "relu": "relu", "linear": "linear",
         "affine": ("affine", 0.7, -0.2), "leaky_relu": ("leaky_relu", 0.2),
         "thresholded_relu": ("thresholded_relu", 0.3), "scaled_tanh": ("scaled_tanh", 1.3, 0.6),
         "hard_sigmoid": ("hard_sigmoid", 0.3, 0.45), "elu": ("elu", 0.8),
         "softsign": "softsign", "softplus": "softplus"}


def random_params(kind, D, H, num_layers=1, bidirectional=False, peepholes=False, bias=True,
                  seed=0, scale=0.6, dtype=np.float64):
    """fastrnn-named parameters, uniform in (-scale, scale)."""
    rng = np.random.default_rng(seed)
    G = ro.GATES[kind]
    params = {}
    for k in range(num_layers):
        for d in range(2 if bidirectional else 1):
            sfx = f"_l{k}" + ("_reverse" if d else "")
            D_k = D if k == 0 else H * (2 if bidirectional else 1)
            params["weight_ih" + sfx] = rng.uniform(-scale, scale, (G * H, D_k))
            params["weight_hh" + sfx] = rng.uniform(-scale, scale, (G * H, H))
            if bias:
                params["bias_ih" + sfx] = rng.uniform(-scale, scale, G * H)
                params["bias_hh" + sfx] = rng.uniform(-scale, scale, G * H)
            if peepholes:
                params["weight_peephole" + sfx] = rng.uniform(-scale, scale, 3 * H)
    return {k: v.astype(dtype) for k, v in params.items()}


# --- the activation functions themselves ------------------------------------------------
@pytest.mark.parametrize("name", ALL_NAMES)
def test_activation_derivatives_match_finite_differences(name):
    a = np.linspace(-3.1, 2.9, 41)          # no grid point on a kink of any spec above
    spec = SPECS[name]
    _, analytic = ro.activate(spec, a)
    eps = 1e-6
    numeric = (ro.activate(spec, a + eps)[0] - ro.activate(spec, a - eps)[0]) / (2 * eps)
    np.testing.assert_allclose(analytic, numeric, rtol=0, atol=1e-8)


def test_activation_formulas_and_defaults():
    a = np.array([-2.0, -0.5, 0.0, 0.3, 1.0, 1.5])
    f = lambda spec: ro.activate(spec, a)[0]  # noqa: E731
    np.testing.assert_array_equal(f("linear"), a)
    np.testing.assert_array_equal(f("affine"), a)                        # alpha 1, beta 0
    np.testing.assert_allclose(f(("affine", 2.0, 1.0)), 2 * a + 1, rtol=1e-15)
    np.testing.assert_allclose(f("leaky_relu"), np.where(a >= 0, a, 0.01 * a), rtol=1e-15)
    # x > alpha, strictly: at x == alpha (1.0, the default) the output is 0
    np.testing.assert_array_equal(f("thresholded_relu"), [0, 0, 0, 0, 0, 1.5])
    np.testing.assert_array_equal(f(("thresholded_relu", 0.3)), [0, 0, 0, 0, 1.0, 1.5])
    np.testing.assert_allclose(f(("scaled_tanh", 2.0, 0.5)), 2 * np.tanh(0.5 * a), rtol=1e-15)
    np.testing.assert_allclose(f("hard_sigmoid"), np.clip(a / 6 + 0.5, 0, 1), rtol=1e-15)
    np.testing.assert_allclose(f("elu"), np.where(a >= 0, a, np.expm1(a)), rtol=1e-15)
    np.testing.assert_allclose(f("softsign"), a / (1 + np.abs(a)), rtol=1e-15)
    np.testing.assert_allclose(f("softplus"), np.log1p(np.exp(a)), rtol=1e-15)


def test_activation_formulas_match_keras():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    keras = pytest.importorskip("keras")
    a = np.linspace(-4, 4, 33)
    for name in ("sigmoid", "tanh", "relu", "linear", "hard_sigmoid", "softsign", "softplus",
                 "elu"):
        expected = np.asarray(keras.activations.get(name)(a))
        # Keras computes in float64 here; its sigmoid and softplus take other routes
        np.testing.assert_allclose(ro.activate(name, a)[0], expected, rtol=0, atol=1e-12,
                                   err_msg=name)


# --- the oracle at its defaults is tests/reference.py -----------------------------------
@pytest.mark.parametrize("kind", ["rnn", "gru", "gru_reset_before", "lstm"])
def test_defaults_reproduce_the_plain_reference(kind):
    rng = np.random.default_rng(1)
    T, B, D, H = 5, 3, 2, 3
    params = random_params(kind, D, H, num_layers=2, bidirectional=True, seed=2)
    x = rng.standard_normal((T, B, D))
    h0 = rng.standard_normal((4, B, H))
    c0 = rng.standard_normal((4, B, H)) if kind == "lstm" else None
    lengths = np.array([5, 2, 4])
    got = ro.layer_forward(kind, params, x, h0, c0, 2, True, lengths)
    plain = {"rnn": "rnn_tanh"}.get(kind, kind)
    want = reference.layer_forward(plain, params, x, h0, c0, 2, True, lengths)
    for g, w in zip(got, want):
        if w is not None:
            np.testing.assert_allclose(g, w, rtol=0, atol=1e-14)
    relu = ro.layer_forward("rnn", params, x, h0, None, 2, True, lengths,
                            nonlinearity="relu") if kind == "rnn" else None
    if relu is not None:
        want = reference.layer_forward("rnn_relu", params, x, h0, None, 2, True, lengths)
        np.testing.assert_allclose(relu[0], want[0], rtol=0, atol=1e-14)


# --- BPTT against finite differences --------------------------------------------------------
GRAD_CASES = [
    ("rnn", dict(nonlinearity=("elu", 0.7), clip=0.9)),
    ("rnn", dict(nonlinearity=["softsign", ("scaled_tanh", 1.2, 0.8)]), True),
    ("gru", dict(activation="softsign", recurrent_activation=("hard_sigmoid", 0.3, 0.45),
                 clip=0.8)),
    ("gru_reset_before", dict(activation=("leaky_relu", 0.2), recurrent_activation="sigmoid",
                              clip=1.1)),
    ("gru", dict(activation=["tanh", "softplus"], recurrent_activation=["sigmoid", "softsign"]),
     True),
    ("lstm", dict(peepholes=True)),
    ("lstm", dict(peepholes=True, input_forget=True, clip=0.7)),
    ("lstm", dict(activation="softsign", recurrent_activation=("hard_sigmoid", 0.25, 0.5),
                  cell_activation=("scaled_tanh", 1.5, 0.7), peepholes=True)),
    ("lstm", dict(activation=["elu", "tanh"], recurrent_activation="sigmoid",
                  cell_activation=["linear", ("affine", 0.6, 0.1)], input_forget=True,
                  peepholes=True, clip=1.3), True),
]


@pytest.mark.parametrize("case", GRAD_CASES, ids=lambda c: f"{c[0]}-{sorted(c[1])}")
def test_oracle_bptt_matches_finite_differences(case):
    kind, options = case[0], case[1]
    bidirectional = len(case) > 2
    rng = np.random.default_rng(3)
    T, B, D, H, L = 4, 2, 2, 3, 2
    dirs = 2 if bidirectional else 1
    params = random_params(kind, D, H, num_layers=L, bidirectional=bidirectional,
                           peepholes=options.get("peepholes", False), seed=4, scale=0.9)
    x = rng.standard_normal((T, B, D))
    h0 = rng.standard_normal((L * dirs, B, H))
    c0 = rng.standard_normal((L * dirs, B, H)) * 1.5 if kind == "lstm" else None
    lengths = np.array([4, 3])
    w_out = rng.standard_normal((T, B, dirs * H))
    w_h = rng.standard_normal(h0.shape)
    w_c = rng.standard_normal(h0.shape)

    def loss():
        out, h_n, c_n = ro.layer_forward(kind, params, x, h0, c0, L, bidirectional, lengths,
                                         **options)
        total = (out * w_out).sum() + (h_n * w_h).sum()
        return float(total + ((c_n * w_c).sum() if c_n is not None else 0.0))

    dx, dh0, dc0, grads = ro.layer_backward(kind, params, x, h0, c0, L, bidirectional, lengths,
                                            dout=w_out, dh_n=w_h,
                                            dc_n=w_c if kind == "lstm" else None, **options)
    if "clip" in options:   # the case clips: some pre-activation lies outside the bounds
        assert _some_clipped(kind, params, x, h0, c0, L, bidirectional, lengths, options)
    checks = [(dx, x, "x"), (dh0, h0, "h0")] + ([(dc0, c0, "c0")] if kind == "lstm" else [])
    checks += [(grads[name], params[name], name) for name in params]
    for analytic, array, what in checks:
        numeric = reference.numeric_grad(loss, array)
        # central differences of smooth float64 functions: ~1e-9 error
        np.testing.assert_allclose(analytic, numeric, rtol=0, atol=2e-7, err_msg=what)
    if options.get("input_forget"):
        for name in params:
            if name.startswith("weight_ih") or name.startswith("weight_hh") or \
                    name.startswith("bias"):
                assert not grads[name][H:2 * H].any(), f"{name}: forget rows must get no gradient"


def _some_clipped(kind, params, x, h0, c0, L, bidirectional, lengths, options):
    """Whether the clip changes the result (so that a case with clip tests it)."""
    unclipped = dict(options, clip=None)
    a = ro.layer_forward(kind, params, x, h0, c0, L, bidirectional, lengths, **options)[0]
    b = ro.layer_forward(kind, params, x, h0, c0, L, bidirectional, lengths, **unclipped)[0]
    return np.abs(a - b).max() > 1e-3


@pytest.mark.parametrize("kind, options", [
    ("lstm", dict(peepholes=True, input_forget=True, clip=0.8,
                  recurrent_activation=("hard_sigmoid", 0.3, 0.5))),
    ("gru", dict(activation="elu", clip=0.9)),
    ("gru_reset_before", dict(recurrent_activation="softsign")),
    ("rnn", dict(nonlinearity=("leaky_relu", 0.1))),
])
def test_oracle_cell_bptt_matches_finite_differences(kind, options):
    rng = np.random.default_rng(5)
    B, D, H = 3, 2, 3
    params = {k.replace("_l0", ""): v for k, v in
              random_params(kind, D, H, peepholes=options.get("peepholes", False),
                            seed=6, scale=0.9).items()}
    x = rng.standard_normal((B, D))
    h = rng.standard_normal((B, H))
    c = rng.standard_normal((B, H)) if kind == "lstm" else None
    w_h, w_c = rng.standard_normal((B, H)), rng.standard_normal((B, H))

    def loss():
        h_new, c_new = ro.cell_forward(kind, params, x, h, c, **options)
        return float((h_new * w_h).sum() + ((c_new * w_c).sum() if c_new is not None else 0))

    dx, dh, dc, grads = ro.cell_backward(kind, params, x, h, c, w_h,
                                         w_c if kind == "lstm" else None, **options)
    checks = [(dx, x), (dh, h)] + ([(dc, c)] if kind == "lstm" else [])
    checks += [(grads[n], params[n]) for n in params]
    for analytic, array in checks:
        np.testing.assert_allclose(analytic, reference.numeric_grad(loss, array), rtol=0,
                                   atol=2e-7)


# --- against ONNX Runtime ------------------------------------------------------------------
# ONNX Runtime (float32) against the oracle (float64 on the same float32 values)
ORT_ATOL = 2e-6
OP = {"rnn": "RNN", "gru": "GRU", "gru_reset_before": "GRU", "lstm": "LSTM"}


def _onnx():
    """onnx's TensorProto, helper and numpy_helper; the test skips without onnx."""
    onnx = pytest.importorskip("onnx")
    return onnx.TensorProto, onnx.helper, onnx.numpy_helper


def onnx_node_model(kind, params, H, direction, specs, clip=None, input_forget=False,
                    peepholes=False, lengths=False, dtype=np.float32, opset=14):
    """A single ONNX node with the oracle's parameters as initializers: inputs
    X, [sequence_lens,] initial_h (, initial_c); outputs Y, Y_h (, Y_c).
    specs: every direction's activations, in node order. ``direction``
    'reverse' takes the parameters named *_l0_reverse."""
    TensorProto, helper, numpy_helper = _onnx()
    op = OP[kind]
    bidirectional = direction == "bidirectional"
    if direction == "reverse":
        params = {k.replace("_l0_reverse", "_l0"): v for k, v in params.items()
                  if k.endswith("_reverse")}
    W, R, Bias, P = ro.to_onnx_weights(kind, params, 0, bidirectional)
    dirs = W.shape[0]
    elem = TensorProto.FLOAT if dtype == np.float32 else TensorProto.DOUBLE
    inits = [numpy_helper.from_array(a.astype(dtype), n) for a, n in ((W, "W"), (R, "R"),
                                                                      (Bias, "B"))]
    node_inputs = ["X", "W", "R", "B", "sequence_lens" if lengths else "", "initial_h"]
    inputs = [helper.make_tensor_value_info("X", elem, ["T", "N", W.shape[2]])]
    if lengths:
        inputs.append(helper.make_tensor_value_info("sequence_lens", TensorProto.INT32, ["N"]))
    inputs.append(helper.make_tensor_value_info("initial_h", elem, [dirs, "N", H]))
    outputs = ["Y", "Y_h"]
    if op == "LSTM":
        node_inputs.append("initial_c")
        inputs.append(helper.make_tensor_value_info("initial_c", elem, [dirs, "N", H]))
        outputs.append("Y_c")
        if peepholes:
            node_inputs.append("P")
            inits.append(numpy_helper.from_array(P.astype(dtype), "P"))
    names, alphas, betas = ro.onnx_activation_attributes(specs)
    attrs = {"hidden_size": H, "direction": direction, "activations": names}
    if alphas:
        attrs["activation_alpha"] = alphas
    if betas:
        attrs["activation_beta"] = betas
    if clip is not None:
        attrs["clip"] = clip
    if input_forget:
        attrs["input_forget"] = 1
    if op == "GRU":
        attrs["linear_before_reset"] = int(kind == "gru")
    node = helper.make_node(op, node_inputs, outputs, **attrs)
    graph = helper.make_graph([node], "g", inputs,
                              [helper.make_tensor_value_info(n, elem, None) for n in outputs],
                              initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def ort_run(model, feeds):
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _oracle_on_node(kind, params, direction, x, h0, c0, lengths, options):
    """The oracle's Y (T, dirs, B, H), Y_h, Y_c for a node's direction."""
    if direction == "reverse":
        # the reverse half of a bidirectional layer whose forward half is unused
        fwd = {k.replace("_reverse", ""): np.zeros_like(v) for k, v in params.items()}
        params = dict(params, **fwd)
        h0 = np.concatenate([np.zeros_like(h0), h0])
        c0 = None if c0 is None else np.concatenate([np.zeros_like(c0), c0])
        options = {k: ([v, v] if k not in ("clip", "input_forget", "peepholes")
                       and v is not None else v) for k, v in options.items()}
    dirs = 2 if direction != "forward" else 1
    out, h_n, c_n = ro.layer_forward(kind, params, x, h0, c0, 1, dirs == 2, lengths, **options)
    T, B, _ = out.shape
    H = h_n.shape[-1]
    y = out.reshape(T, B, dirs, H).transpose(0, 2, 1, 3)
    if direction == "reverse":
        return [y[:, 1:], h_n[1:], None if c_n is None else c_n[1:]]
    return [y, h_n, c_n]


def _specs_in_node_order(kind, options, dirs):
    return [s for d in range(dirs) for s in ro.gate_activations(kind, d, **options)]


# every activation in some gate, with alpha/beta, per-direction, clip, input_forget, P
ORT_CASES = [
    ("lstm", "forward", dict(peepholes=True)),
    ("lstm", "forward", dict(peepholes=True, input_forget=True)),
    ("lstm", "reverse", dict(peepholes=True, clip=0.6, input_forget=True)),
    ("lstm", "bidirectional", dict(
        recurrent_activation=[("hard_sigmoid", 0.3, 0.45), "sigmoid"],
        activation=[("leaky_relu", 0.2), ("elu", 0.8)],
        cell_activation=[("scaled_tanh", 1.3, 0.6), "softsign"],
        peepholes=True, clip=1.2)),
    ("lstm", "forward", dict(activation="softplus", recurrent_activation="sigmoid",
                             cell_activation=("thresholded_relu", 0.3))),
    ("lstm", "forward", dict(activation=("affine", 0.7, -0.2), cell_activation="relu",
                             recurrent_activation="softsign")),
    # clip not applied to c_t: h is linear in c_t, and c_t leaves (-clip, clip)
    ("lstm", "forward", dict(cell_activation="linear", clip=0.3)),
    ("gru", "forward", dict(activation="softsign", recurrent_activation=("hard_sigmoid",
                                                                         0.3, 0.45))),
    ("gru", "bidirectional", dict(activation=[("elu", 0.8), ("leaky_relu", 0.2)],
                                  recurrent_activation=["sigmoid", "softsign"], clip=0.9)),
    ("gru", "reverse", dict(activation=("scaled_tanh", 1.3, 0.6), clip=0.7)),
    ("gru_reset_before", "forward", dict(activation="relu",
                                         recurrent_activation=("affine", 0.3, 0.4), clip=1.0)),
    ("gru_reset_before", "bidirectional", dict(activation=["softplus", "linear"],
                                               recurrent_activation="sigmoid")),
    ("rnn", "forward", dict(nonlinearity="softsign", clip=0.8)),
    ("rnn", "reverse", dict(nonlinearity=("thresholded_relu", 0.2))),
    ("rnn", "bidirectional", dict(nonlinearity=[("scaled_tanh", 1.3, 0.6),
                                                ("hard_sigmoid", 0.3, 0.45)], clip=1.5)),
    ("rnn", "bidirectional", dict(nonlinearity=[("elu", 0.8), ("leaky_relu", 0.2)])),
]


@pytest.mark.parametrize("case", ORT_CASES, ids=lambda c: f"{c[0]}-{c[1]}-{sorted(c[2])}")
@pytest.mark.parametrize("with_lengths", [False, True])
def test_oracle_matches_onnx_runtime(case, with_lengths):
    kind, direction, options = case
    rng = np.random.default_rng(7)
    T, B, D, H = 5, 3, 3, 4
    peep = options.get("peepholes", False)
    params = random_params(kind, D, H, bidirectional=True, peepholes=peep, seed=8, scale=0.8,
                           dtype=np.float32)
    dirs = 2 if direction == "bidirectional" else 1
    x = rng.standard_normal((T, B, D)).astype(np.float32)
    h0 = rng.standard_normal((dirs, B, H)).astype(np.float32)
    c0 = rng.standard_normal((dirs, B, H)).astype(np.float32) if kind == "lstm" else None
    if options.get("cell_activation") == "linear":
        c0 = c0 * np.float32(8.0)                    # c_t far outside (-clip, clip)
    lengths = np.array([5, 2, 4]) if with_lengths else None
    specs = _specs_in_node_order(kind, options if direction != "reverse" else
                                 {k: (v[1] if isinstance(v, list) else v)
                                  for k, v in options.items()}, dirs)
    model = onnx_node_model(kind, params, H, direction, specs, options.get("clip"),
                            options.get("input_forget", False), peep, with_lengths)
    feeds = {"X": x, "initial_h": h0}
    if kind == "lstm":
        feeds["initial_c"] = c0
    if with_lengths:
        feeds["sequence_lens"] = lengths.astype(np.int32)
    got = ort_run(model, feeds)
    want = _oracle_on_node(kind, {k: v.astype(np.float64) for k, v in params.items()},
                           direction, x, h0, c0, lengths, options)
    # float32 (ORT, MLAS' tanh/sigmoid and the GRU's rational approximations)
    # against float64 on the same float32 inputs: a few float32 ulps per step;
    # measured at most 4.5e-7 over these cases
    for g, w, name in zip(got, want, ["Y", "Y_h", "Y_c"]):
        np.testing.assert_allclose(g, w, rtol=0, atol=ORT_ATOL, err_msg=name)
    if options.get("clip") is not None:              # the clip changes the result
        unclipped = _oracle_on_node(kind, {k: v.astype(np.float64) for k, v in params.items()},
                                    direction, x, h0, c0, lengths, dict(options, clip=None))
        assert np.abs(unclipped[0] - got[0]).max() > 1e-2
    if options.get("cell_activation") == "linear":
        # h_t = o_t * c_t with 0 < o_t < 1: |h_t| > clip only if c_t is not clipped
        assert np.abs(got[0]).max() > 3 * options["clip"]


def test_onnx_runtime_thresholded_relu_is_strict():
    """ONNX's text says ThresholdedRelu(x) = x if x >= alpha; ONNX Runtime
    computes x > alpha. A one-unit RNN whose pre-activation is exactly alpha
    gives 0, as the oracle does."""
    TensorProto, helper, numpy_helper = _onnx()
    alpha = 0.5
    inits = [numpy_helper.from_array(np.ones((1, 1, 1), np.float32), "W"),
             numpy_helper.from_array(np.zeros((1, 1, 1), np.float32), "R")]
    node = helper.make_node("RNN", ["X", "W", "R"], ["Y"], hidden_size=1,
                            activations=["ThresholdedRelu"], activation_alpha=[alpha])
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [3, 1, 1])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    x = np.array([alpha, 0.75, 0.25], np.float32).reshape(3, 1, 1)
    y, = ort_run(model, {"X": x})
    np.testing.assert_array_equal(y.ravel(), [0.0, 0.75, 0.0])
    np.testing.assert_array_equal(ro.activate(("thresholded_relu", alpha), x.ravel())[0],
                                  [0.0, 0.75, 0.0])


def test_onnx_runtime_reads_alpha_compactly_for_lstm():
    """activation_alpha holds one value per function that takes one: the
    LSTM below (f=LeakyRelu, g=Tanh, h=Elu) with alpha [0.2, 0.7] is the
    oracle's leaky_relu 0.2 and elu 0.7, not elu 'alpha[2]'."""
    rng = np.random.default_rng(9)
    kind, H, D = "lstm", 3, 2
    params = random_params(kind, D, H, seed=10, dtype=np.float32)
    options = dict(recurrent_activation=("leaky_relu", 0.2), activation="tanh",
                   cell_activation=("elu", 0.7))
    specs = ro.gate_activations(kind, 0, **options)
    assert ro.onnx_activation_attributes(specs) == (["LeakyRelu", "Tanh", "Elu"], [0.2, 0.7],
                                                    [])
    model = onnx_node_model(kind, params, H, "forward", specs)
    x = rng.standard_normal((4, 2, D)).astype(np.float32)
    h0, c0 = (rng.standard_normal((1, 2, H)).astype(np.float32) for _ in range(2))
    got = ort_run(model, {"X": x, "initial_h": h0, "initial_c": c0})
    want = _oracle_on_node(kind, {k: v.astype(np.float64) for k, v in params.items()},
                           "forward", x, h0, c0, None, options)
    np.testing.assert_allclose(got[0], want[0], rtol=0, atol=ORT_ATOL)


def test_onnx_runtime_reads_alpha_compactly_for_rnn():
    """The RNN op too (onnxruntime 1.32; older versions indexed
    activation_alpha by direction): [Tanh, LeakyRelu] with alpha [0.3, 0.2]
    is leaky_relu 0.3 in the reverse direction, not 0.2."""
    _, helper, _ = _onnx()
    rng = np.random.default_rng(14)
    params = random_params("rnn", 2, 3, bidirectional=True, seed=15, dtype=np.float32)
    model = onnx_node_model("rnn", params, 3, "bidirectional", ["tanh", "tanh"])
    node = model.graph.node[0]
    for attr in list(node.attribute):
        if attr.name == "activations":
            node.attribute.remove(attr)
    node.attribute.extend([helper.make_attribute("activations", ["Tanh", "LeakyRelu"]),
                           helper.make_attribute("activation_alpha", [0.3, 0.2])])
    x = rng.standard_normal((4, 2, 2)).astype(np.float32) * 3
    h0 = rng.standard_normal((2, 2, 3)).astype(np.float32)
    got, _ = ort_run(model, {"X": x, "initial_h": h0})
    p64 = {k: v.astype(np.float64) for k, v in params.items()}
    for alpha, matches in ((float(np.float32(0.3)), True), (float(np.float32(0.2)), False)):
        want = _oracle_on_node("rnn", p64, "bidirectional", x, h0, None, None,
                               dict(nonlinearity=["tanh", ("leaky_relu", alpha)]))[0]
        assert (np.abs(got - want).max() <= ORT_ATOL) == matches, alpha


def test_onnx_runtime_zero_defaults_differ_from_the_operators():
    """Without activation_alpha/beta ONNX Runtime takes 0 for ThresholdedRelu's
    alpha and Affine's and ScaledTanh's alpha and beta (rnn_helpers.cc),
    where ONNX's text points to the operators' defaults (ThresholdedRelu 1.0,
    Affine 1.0/0.0). The oracle's specs_from_onnx_attributes reads as ORT."""
    _, helper, _ = _onnx()
    rng = np.random.default_rng(16)
    names = ["ThresholdedRelu", "Affine", "ScaledTanh"]
    specs = ro.specs_from_onnx_attributes(names)
    assert specs == [("thresholded_relu", 0.0), ("affine", 0.0, 0.0), ("scaled_tanh", 0.0, 0.0)]
    params = random_params("lstm", 2, 3, seed=17, dtype=np.float32)
    model = onnx_node_model("lstm", params, 3, "forward", ["sigmoid", "tanh", "tanh"])
    node = model.graph.node[0]
    for attr in list(node.attribute):
        if attr.name == "activations":
            node.attribute.remove(attr)
    # f = ThresholdedRelu(0) = relu (strict), g = 0, h = 0: h_t = 0, c_t = f * c
    node.attribute.append(helper.make_attribute("activations", names))
    x = rng.standard_normal((3, 2, 2)).astype(np.float32)
    h0, c0 = (rng.standard_normal((1, 2, 3)).astype(np.float32) for _ in range(2))
    got = ort_run(model, {"X": x, "initial_h": h0, "initial_c": c0})
    options = dict(zip(["recurrent_activation", "activation", "cell_activation"], specs))
    want = _oracle_on_node("lstm", {k: v.astype(np.float64) for k, v in params.items()},
                           "forward", x, h0, c0, None, options)
    assert not want[0].any()
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=0, atol=ORT_ATOL)


def test_onnx_runtime_lstm_gru_default_alphas():
    """Without activation_alpha/beta, ONNX Runtime's LSTM/GRU take LeakyRelu
    0.01, HardSigmoid 0.2/0.5, Elu 1.0 (the ONNX operators' defaults): the
    oracle's specs_from_onnx_attributes reads a node so."""
    assert ro.specs_from_onnx_attributes(["HardSigmoid", "LeakyRelu", "Elu"]) == \
        [("hard_sigmoid", 0.2, 0.5), ("leaky_relu", 0.01), ("elu", 1.0)]
    rng = np.random.default_rng(11)
    kind, H, D = "lstm", 3, 2
    params = random_params(kind, D, H, seed=12, dtype=np.float32)
    _, helper, _ = _onnx()
    model = onnx_node_model(kind, params, H, "forward", ["sigmoid", "tanh", "tanh"])
    node = model.graph.node[0]
    del node.attribute[:]
    node.attribute.extend([helper.make_attribute("hidden_size", H),
                           helper.make_attribute("activations",
                                                 ["HardSigmoid", "LeakyRelu", "Elu"])])
    x = rng.standard_normal((4, 2, D)).astype(np.float32)
    h0, c0 = (rng.standard_normal((1, 2, H)).astype(np.float32) for _ in range(2))
    got = ort_run(model, {"X": x, "initial_h": h0, "initial_c": c0})
    specs = ro.specs_from_onnx_attributes(["HardSigmoid", "LeakyRelu", "Elu"])
    options = dict(zip(["recurrent_activation", "activation", "cell_activation"], specs))
    want = _oracle_on_node(kind, {k: v.astype(np.float64) for k, v in params.items()},
                           "forward", x, h0, c0, None, options)
    np.testing.assert_allclose(got[0], want[0], rtol=0, atol=ORT_ATOL)


# --- against Keras ---------------------------------------------------------------------------
def _keras():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return pytest.importorskip("keras")


def keras_params(layer, kind):
    """A built Keras SimpleRNN/GRU/LSTM's weights as fastrnn-named _l0 parameters."""
    weights = [np.asarray(w, np.float64) for w in layer.get_weights()]
    kernel, recurrent = weights[0], weights[1]
    bias = weights[2] if len(weights) > 2 else None
    H = recurrent.shape[0]
    order = [1, 0, 2] if kind.startswith("gru") else list(range(ro.GATES[kind]))

    def reorder(a):                                    # Keras GRU z, r, h -> r, z, n
        parts = np.split(a, len(order), axis=0)
        return np.concatenate([parts[j] for j in order], axis=0)

    params = {"weight_ih_l0": reorder(kernel.T), "weight_hh_l0": reorder(recurrent.T)}
    G = ro.GATES[kind]
    if bias is None:
        bias_ih, bias_hh = np.zeros(G * H), np.zeros(G * H)
    elif bias.ndim == 2:                               # GRU reset_after: input, recurrent
        bias_ih, bias_hh = bias[0], bias[1]
    else:
        bias_ih, bias_hh = bias, np.zeros(G * H)
    params["bias_ih_l0"], params["bias_hh_l0"] = reorder(bias_ih), reorder(bias_hh)
    return params


KERAS_CASES = [
    ("SimpleRNN", dict(activation="softsign"), "rnn"),
    ("SimpleRNN", dict(activation="elu"), "rnn"),
    ("GRU", dict(activation="softplus", recurrent_activation="hard_sigmoid"), "gru"),
    ("GRU", dict(activation="relu", recurrent_activation="softsign", reset_after=False),
     "gru_reset_before"),
    ("LSTM", dict(activation="softsign", recurrent_activation="hard_sigmoid"), "lstm"),
    ("LSTM", dict(activation="linear", recurrent_activation="sigmoid"), "lstm"),
]


@pytest.mark.parametrize("case", KERAS_CASES, ids=lambda c: f"{c[0]}-{sorted(c[1].items())}")
def test_oracle_matches_keras(case):
    keras = _keras()
    cls, kwargs, kind = case
    rng = np.random.default_rng(13)
    B, T, D, H = 2, 5, 3, 4
    layer = getattr(keras.layers, cls)(H, return_sequences=True, return_state=True, **kwargs)
    x = rng.standard_normal((B, T, D)).astype(np.float32)
    layer(x)
    layer.set_weights([w + rng.uniform(-0.4, 0.4, w.shape).astype(np.float32)
                       for w in layer.get_weights()])
    h0 = rng.standard_normal((B, H)).astype(np.float32)
    c0 = rng.standard_normal((B, H)).astype(np.float32)
    initial = [h0, c0] if cls == "LSTM" else [h0]
    result = [np.asarray(r) for r in layer(x, initial_state=initial)]
    options = {"nonlinearity": kwargs["activation"]} if kind == "rnn" else \
        {k: kwargs[k] for k in ("activation", "recurrent_activation")}
    # Keras' activation is both the candidate's and c_t's (cell_activation None)
    out, h_n, c_n = ro.layer_forward(kind, keras_params(layer, kind), x.transpose(1, 0, 2),
                                     h0[None], c0[None] if cls == "LSTM" else None, **options)
    # float32 Keras against float64 on the same inputs
    np.testing.assert_allclose(result[0], out.transpose(1, 0, 2), rtol=0, atol=3e-6)
    np.testing.assert_allclose(result[1], h_n[0], rtol=0, atol=3e-6)
    if cls == "LSTM":
        np.testing.assert_allclose(result[2], c_n[0], rtol=0, atol=3e-6)
