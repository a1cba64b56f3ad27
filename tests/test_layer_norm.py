"""Layer-normalised LSTM and GRU (layer_norm=True): the NumPy oracle of
tests/reference_layernorm.py checked by finite differences, fastrnn checked
against the oracle (forward and BPTT, float32 and float64, layers and cells),
finite differences of every new parameter through the public forward_train,
files, pickling, streaming, errors, and a short training comparison."""
import pickle

import numpy as np
import pytest

import fastrnn
import reference_layernorm as ref
from option_cases import assert_close

CLASSES = {"lstm": fastrnn.LSTM, "gru": fastrnn.GRU}
CELLS = {"lstm": fastrnn.LSTMCell, "gru": fastrnn.GRUCell}
LN_NAMES = {"lstm": ("ln_ih_weight", "ln_ih_bias", "ln_hh_weight", "ln_hh_bias",
                     "ln_cell_weight", "ln_cell_bias"),
            "gru": ("ln_ih_weight", "ln_ih_bias", "ln_hh_weight", "ln_hh_bias")}

# float32 tolerance, relative to the values' scale (max(1, |reference|)). A
# layer norm multiplies the rounding errors of what it normalises by its 1/std,
# up to 1/sqrt(eps) = 316 when a row's values are nearly equal (a cell state
# of a sequence's first steps, a padding row): 316 x float32's 6e-8 ~ 2e-5.
# Measured over the 16 layer cases below at 8 seeds (0-7): outputs and states
# within 7.2e-6 of float64 (most within 1e-6), gradients within 2.9e-5. So
# 2e-5 for the forward and 1e-4 for the gradients (BPTT adds up ~T * B such
# terms): above what rounding gives, far below a wrong term's error (a gain or
# mean missing, a gate's derivative wrong: 1e-2 and more).
F32_FORWARD, F32_GRAD = 2e-5, 1e-4


def perturbed(module, rng, scale=0.4):
    """Load LN gains and biases away from 1 and 0 (the initial values would
    hide a gain or bias applied to the wrong values) and return the state dict."""
    state = {name: value + rng.normal(0, scale, value.shape) if name.startswith("ln_")
             else value for name, value in module.state_dict().items()}
    module.load_state_dict(state)
    return module.state_dict()


# --- the oracle itself, by finite differences -----------------------------------------

def _oracle_loss(kind, params, x, h0, c0, L, bi, lengths, weights):
    out, h_n, c_n, _ = ref.layer_forward(kind, params, x, h0, c0, L, bi, lengths)
    total = np.sum(out * weights[0]) + np.sum(h_n * weights[1])
    return total + (np.sum(c_n * weights[2]) if c_n is not None else 0.0)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_oracle_backward_matches_finite_differences(kind, bidirectional):
    rng = np.random.default_rng(3)
    T, B, D, H, L = 4, 2, 3, 3, 2
    dirs = 2 if bidirectional else 1
    layer = CLASSES[kind](D, H, num_layers=L, bidirectional=bidirectional, dtype="float64",
                          layer_norm=True, seed=1)
    params = perturbed(layer, rng)
    x = rng.normal(size=(T, B, D))
    h0 = rng.normal(size=(L * dirs, B, H))
    c0 = rng.normal(size=(L * dirs, B, H)) if kind == "lstm" else None
    lengths = np.array([4, 3])
    weights = (rng.normal(size=(T, B, dirs * H)), rng.normal(size=h0.shape),
               rng.normal(size=h0.shape))
    _, _, _, tape = ref.layer_forward(kind, params, x, h0, c0, L, bidirectional, lengths)
    dout = weights[0] * (np.arange(T)[:, None] < lengths[None, :])[..., None]
    dx, dh0, dc0, grads = ref.layer_backward(kind, params, tape, dout, weights[1],
                                             weights[2] if kind == "lstm" else None, L,
                                             bidirectional)
    eps = 1e-6

    def numeric(array, index):
        saved = array[index]
        array[index] = saved + eps
        up = _oracle_loss(kind, params, x, h0, c0, L, bidirectional, lengths, weights)
        array[index] = saved - eps
        down = _oracle_loss(kind, params, x, h0, c0, L, bidirectional, lengths, weights)
        array[index] = saved
        return (up - down) / (2 * eps)

    checks = [(params[name], grads[name]) for name in params]
    checks += [(x, dx), (h0, dh0)] + ([(c0, dc0)] if kind == "lstm" else [])
    for array, analytic in checks:
        for index in np.ndindex(array.shape):
            assert abs(numeric(array, index) - analytic[index]) < 1e-6


def test_oracle_layer_norm_values():
    """LN by hand: mean 0, variance 1 - eps-ish, then gain and bias."""
    v = np.array([1.0, 2.0, 4.0, 7.0])
    y, vhat, rstd = ref.layer_norm(v, np.full(4, 2.0), np.full(4, 0.5))
    mean, var = 3.5, np.mean((v - 3.5) ** 2)
    np.testing.assert_allclose(vhat, (v - mean) / np.sqrt(var + 1e-5))
    np.testing.assert_allclose(y, 2 * vhat + 0.5)
    assert rstd == pytest.approx(1 / np.sqrt(var + 1e-5))


# --- fastrnn against the oracle ----------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("num_layers,batch_first,with_lengths,bias",
                         [(1, False, False, True), (2, True, True, True),
                          (2, False, True, False), (1, True, False, True)])
def test_layer_matches_oracle(dtype, kind, bidirectional, num_layers, batch_first,
                              with_lengths, bias):
    rng = np.random.default_rng(5)
    T, B, D, H = 6, 3, 5, 7
    dirs = 2 if bidirectional else 1
    layer = CLASSES[kind](D, H, num_layers=num_layers, bidirectional=bidirectional,
                          batch_first=batch_first, bias=bias, dtype=dtype, layer_norm=True,
                          seed=2)
    params = perturbed(layer, rng)
    x = rng.normal(size=(T, B, D))
    h0 = rng.normal(size=(num_layers * dirs, B, H))
    c0 = rng.normal(size=h0.shape)
    lengths = np.array([6, 1, 4]) if with_lengths else None
    hx = (h0, c0) if kind == "lstm" else h0
    x_in = np.swapaxes(x, 0, 1) if batch_first else x
    (out, state), backprop = layer.forward_train(x_in, hx, lengths=lengths)
    want_out, want_h, want_c, tape = ref.layer_forward(
        kind, params, x, h0, c0 if kind == "lstm" else None, num_layers, bidirectional, lengths)
    got_out = np.swapaxes(out, 0, 1) if batch_first else out
    tol_f, tol_g = (1e-12, 1e-11) if dtype == "float64" else (F32_FORWARD, F32_GRAD)
    assert_close(got_out, want_out, tol_f)
    assert_close(state[0] if kind == "lstm" else state, want_h, tol_f)
    if kind == "lstm":
        assert_close(state[1], want_c, tol_f)
    # inference gives the training forward's numbers
    out_infer, _ = layer(x_in, hx, lengths=lengths)
    assert_close(out_infer, out, tol_f)

    dout = rng.normal(size=want_out.shape)
    if with_lengths:
        dout_ref = dout * (np.arange(T)[:, None] < lengths[None, :])[..., None]
    else:
        dout_ref = dout
    dh, dc = rng.normal(size=h0.shape), rng.normal(size=h0.shape)
    layer.zero_grad()
    dx, dhx = backprop(np.swapaxes(dout, 0, 1) if batch_first else dout,
                       (dh, dc) if kind == "lstm" else dh)
    want_dx, want_dh0, want_dc0, grads = ref.layer_backward(
        kind, params, tape, dout_ref, dh, dc if kind == "lstm" else None, num_layers,
        bidirectional)
    assert_close(np.swapaxes(dx, 0, 1) if batch_first else dx, want_dx, tol_g)
    assert_close(dhx[0] if kind == "lstm" else dhx, want_dh0, tol_g)
    if kind == "lstm":
        assert_close(dhx[1], want_dc0, tol_g)
    assert set(grads) == set(layer.grads)
    for name, grad in grads.items():
        assert_close(layer.grads[name], grad, tol_g)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_batch_rows_and_threads_agree(dtype, kind, monkeypatch):
    """Each row computes alone: one row at a time equals the batch, and the
    plan's parts (2 threads, directions and batch ranges) equal one thread,
    in training too: bit for bit in float32 (every product on the
    micro-kernel, every LN within its row), as the plain layers; float64
    (BLAS, reproducible at a given thread count only, as the plain layers)
    to rounding."""
    from fastrnn import _parallel, _plan
    rng = np.random.default_rng(9)
    T, B, D, H = 30, 16, 8, 33
    layer = CLASSES[kind](D, H, bidirectional=True, dtype=dtype, layer_norm=True, seed=3)
    perturbed(layer, rng)
    x = rng.normal(size=(T, B, D)).astype(dtype)
    lengths = rng.integers(1, T + 1, B)
    dout = rng.normal(size=(T, B, 2 * H))

    def train():
        layer.zero_grad()
        (out, _), backprop = layer.forward_train(x, lengths=lengths)
        dx, _ = backprop(dout)
        return [out, dx] + [g.copy() for g in layer.grads.values()]

    monkeypatch.setattr(_parallel, "_threads", 1)
    out1, _ = layer(x, lengths=lengths)
    trained1 = train()
    rows = np.concatenate([layer(x[:, b:b + 1], lengths=lengths[b:b + 1])[0]
                           for b in range(B)], axis=1)
    monkeypatch.setattr(_parallel, "_threads", 2)
    monkeypatch.setattr(_plan, "MIN_PARALLEL_WORK", 0)
    assert len(_plan.forward_plan(layer, T, B, batch_first=False, train=False,
                                  has_lengths=True).parts) == 2
    out2, _ = layer(x, lengths=lengths)
    trained2 = train()
    if dtype == "float32":
        np.testing.assert_array_equal(out2, out1)
        for a, b in zip(trained2, trained1):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(rows, out1)
    else:
        assert_close(out2, out1, 1e-12)
        for a, b in zip(trained2, trained1):
            assert_close(a, b, 1e-12)
        assert_close(rows, out1, 1e-12)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("batched", [True, False])
def test_cell_matches_oracle(dtype, kind, batched):
    rng = np.random.default_rng(11)
    B, D, H = 4, 3, 5
    cell = CELLS[kind](D, H, dtype=dtype, layer_norm=True, seed=4)
    params = perturbed(cell, rng)
    x = rng.normal(size=(B, D))
    h = rng.normal(size=(B, H))
    c = rng.normal(size=(B, H))
    p = ref._direction_params(kind, params, 0, 0, cell=True)
    want = [ref.step(kind, p, x[b], h[b], c[b] if kind == "lstm" else None) for b in range(B)]
    tol = 1e-12 if dtype == "float64" else F32_FORWARD
    rows = slice(None) if batched else 0
    args = (x[rows], (h[rows], c[rows]) if kind == "lstm" else h[rows])
    got = cell(*args)
    got_h = got[0] if kind == "lstm" else got
    want_h = np.array([w[0] for w in want])
    assert_close(got_h, want_h[rows], tol)
    if kind == "lstm":
        assert_close(got[1], np.array([w[1] for w in want])[rows], tol)
    # backward of one step against the oracle's
    result, backprop = cell.forward_train(*args)
    dh = rng.normal(size=(B, H))
    dc = rng.normal(size=(B, H))
    cell.zero_grad()
    dx, dstate = backprop((dh[rows], dc[rows]) if kind == "lstm" else dh[rows])
    grads = {s: np.zeros_like(v) for s, v in p.items()}
    back = [ref.step_back(kind, p, want[b][2], dh[b], dc[b] if kind == "lstm" else None, grads)
            for b in range(B if batched else 1)]
    tol_g = 1e-11 if dtype == "float64" else F32_GRAD
    assert_close(dx, np.array([b[0] for b in back])[rows], tol_g)
    assert_close(dstate[0] if kind == "lstm" else dstate, np.array([b[1] for b in back])[rows],
                 tol_g)
    names = dict(zip(("w_ih", "w_hh", "b_ih", "b_hh", "a_ih", "s_ih", "a_hh", "s_hh", "a_c",
                      "s_c"), ref.names(0, 0, cell=True)[0] + ref.names(0, 0, cell=True)[1]))
    for short, grad in grads.items():
        assert_close(cell.grads[names[short]], grad, tol_g)


# --- finite differences through the public API ------------------------------------------

@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_finite_differences_of_every_layer_norm_parameter(kind, bidirectional):
    """dL/dp from forward_train's backprop against central differences of the
    layer's own forward, for every element of every LN gain and bias."""
    rng = np.random.default_rng(13)
    T, B, D, H, L = 4, 3, 3, 4, 2
    dirs = 2 if bidirectional else 1
    layer = CLASSES[kind](D, H, num_layers=L, bidirectional=bidirectional, batch_first=True,
                          dtype="float64", layer_norm=True, seed=5)
    state = perturbed(layer, rng)
    x = rng.normal(size=(B, T, D))
    h0 = rng.normal(size=(L * dirs, B, H))
    hx = (h0, rng.normal(size=h0.shape)) if kind == "lstm" else h0
    lengths = [4, 2, 3]
    w_out, w_h = rng.normal(size=(B, T, dirs * H)), rng.normal(size=h0.shape)

    def loss():
        out, st = layer(x, hx, lengths=lengths)
        return np.sum(out * w_out) + np.sum((st[0] if kind == "lstm" else st) * w_h)

    layer.zero_grad()
    (_, _), backprop = layer.forward_train(x, hx, lengths=lengths)
    backprop(w_out, (w_h, None) if kind == "lstm" else w_h)
    grads = {name: g.copy() for name, g in layer.grads.items() if name.startswith("ln_")}
    assert len(grads) == L * dirs * len(LN_NAMES[kind])
    eps = 1e-6
    for name, grad in grads.items():
        assert np.abs(grad).max() > 0
        for j in range(grad.size):
            value = state[name].copy()
            value[j] += eps
            layer.load_state_dict({name: value}, strict=False)
            up = loss()
            value[j] -= 2 * eps
            layer.load_state_dict({name: value}, strict=False)
            down = loss()
            layer.load_state_dict({name: state[name]}, strict=False)
            assert abs((up - down) / (2 * eps) - grad[j]) < 1e-6, (name, j)


# --- parameters, files, pickling, streaming -------------------------------------------

@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_parameters_names_shapes_and_initial_values(kind):
    H, G = 5, 4 if kind == "lstm" else 3
    layer = CLASSES[kind](3, H, num_layers=2, bidirectional=True, layer_norm=True, seed=0)
    state = layer.state_dict()
    plain = CLASSES[kind](3, H, num_layers=2, bidirectional=True, seed=0).state_dict()
    # PyTorch's names first, unchanged; then the LN parameters
    assert list(state)[:len(plain)] == list(plain)
    for k in range(2):
        for sfx in (f"_l{k}", f"_l{k}_reverse"):
            for name in LN_NAMES[kind]:
                value = state[name + sfx]
                assert value.shape == ((H,) if "cell" in name else (G * H,))
                np.testing.assert_array_equal(value, 1.0 if name.endswith("weight") else 0.0)
    assert len(state) == len(plain) + 2 * 2 * len(LN_NAMES[kind])
    assert set(layer.grads) == set(state)
    assert layer.layer_norm is True and CLASSES[kind](3, H).layer_norm is False
    assert repr(layer).endswith("bidirectional=True, layer_norm=True)")
    cell = CELLS[kind](3, H, layer_norm=True)
    assert [n for n in cell.state_dict() if n.startswith("ln_")] == list(LN_NAMES[kind])
    assert repr(cell) == f"{type(cell).__name__}(3, 5, layer_norm=True)"


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_save_load_and_pickle(kind, suffix, tmp_path):
    rng = np.random.default_rng(17)
    layer = CLASSES[kind](4, 6, num_layers=2, bidirectional=True, batch_first=True,
                          dtype="float64", layer_norm=True, seed=6)
    perturbed(layer, rng)
    cell = CELLS[kind](4, 6, layer_norm=True, seed=7)
    perturbed(cell, rng)
    x = rng.normal(size=(2, 5, 4))
    model = fastrnn.Sequential([fastrnn.LSTM(4, 6, batch_first=True, layer_norm=True, seed=8),
                                fastrnn.LastStep(), fastrnn.Linear(6, 1, seed=9)])
    for module, arg in ((layer, x), (cell, x[:, 0]), (model, x.astype(np.float32))):
        path = tmp_path / f"{type(module).__name__}{suffix}"
        fastrnn.save(module, path)
        copies = [fastrnn.load(path), pickle.loads(pickle.dumps(module))]
        for copy in copies:
            assert repr(copy) == repr(module)
            for (name, a), (name2, b) in zip(module.state_dict().items(),
                                             copy.state_dict().items()):
                assert name == name2
                np.testing.assert_array_equal(a, b)
            got, want = copy(arg) if module is not model else copy.predict(arg), \
                module(arg) if module is not model else module.predict(arg)
            got = got[0] if isinstance(got, tuple) else got
            want = want[0] if isinstance(want, tuple) else want
            np.testing.assert_array_equal(got, want)


def test_a_file_whose_ln_parameter_has_the_wrong_shape_is_refused(tmp_path):
    layer = fastrnn.GRU(3, 4, layer_norm=True, seed=0)
    path = tmp_path / "gru.npz"
    layer.save(path)
    with np.load(path) as f:
        arrays = dict(f)
    name = next(n for n in arrays if "ln_hh_weight" in n)
    arrays[name] = np.ones(5, np.float32)
    np.savez(tmp_path / "bad.npz", **arrays)
    # 4 weights and biases of 3 * 4 * (3 + 4 + 2) values, 4 LN vectors of 12
    with pytest.raises(ValueError, match="calls for 8 arrays of 156 values, but the file "
                                         "holds 8 arrays of 149 values"):
        fastrnn.load(tmp_path / "bad.npz")


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_stream_frame_by_frame_equals_one_call(kind):
    rng = np.random.default_rng(19)
    layer = CLASSES[kind](3, 6, num_layers=2, layer_norm=True, seed=10)
    perturbed(layer, rng)
    x = rng.normal(size=(12, 2, 3)).astype(np.float32)
    stream = fastrnn.Stream(layer)
    outs = [stream.step(frame) for frame in x[:5]] + [stream(x[5:])]
    got = np.concatenate([o[None] if o.ndim == 2 else o for o in outs])
    want, _ = layer(x)
    assert_close(got, want, F32_FORWARD)


# --- errors ----------------------------------------------------------------------------

@pytest.mark.parametrize("cls", [fastrnn.LSTM, fastrnn.GRU, fastrnn.LSTMCell, fastrnn.GRUCell])
def test_errors_are_named(cls):
    name = cls.__name__
    with pytest.raises(TypeError, match=f"^{name}: layer_norm must be a bool, got str$"):
        cls(3, 4, layer_norm="yes")
    with pytest.raises(ValueError, match=f"^{name}: layer_norm=True runs the default gates.*"
                                         f"got clip=2.0"):
        cls(3, 4, layer_norm=True, clip=2.0)
    with pytest.raises(ValueError, match=f"^{name}: layer_norm=True .*got "
                                         f"recurrent_activation='hard_sigmoid'"):
        cls(3, 4, layer_norm=True, recurrent_activation="hard_sigmoid")
    with pytest.raises(ValueError, match=f"^{name}: layer_norm=True .*got zoneout=0.1"):
        cls(3, 4, layer_norm=True, zoneout=0.1)
    with pytest.raises(ValueError, match=f"^{name}: layer_norm=True .*got input_dropout=0.2, "
                                         f"recurrent_dropout=0.1"):
        cls(3, 4, layer_norm=True, input_dropout=0.2, recurrent_dropout=0.1)
    if "GRU" in name:
        with pytest.raises(ValueError, match=f"^{name}: layer_norm=True needs reset_after=True"):
            cls(3, 4, layer_norm=True, reset_after=False)
    else:
        with pytest.raises(ValueError, match="got peepholes=True"):
            cls(3, 4, layer_norm=True, peepholes=True)
    with pytest.raises(ValueError, match=f"to_torch: {name} has layer_norm=True"):
        fastrnn.to_torch(cls(3, 4, layer_norm=True))


def test_rnn_has_no_layer_norm_and_conversions_refuse_it(tmp_path):
    with pytest.raises(TypeError, match="layer_norm"):
        fastrnn.RNN(3, 4, layer_norm=True)
    for cls in (fastrnn.LSTM, fastrnn.GRU):
        with pytest.raises(ValueError, match=f"^to_onnx: {cls.__name__} has layer_norm=True; "
                                             f"ONNX's {cls.__name__} operator has no layer"):
            fastrnn.to_onnx(cls(3, 4, layer_norm=True), str(tmp_path / "x.onnx"))


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_mask_and_wrappers(kind):
    """Keras' masks run through lengths (fastrnn.masking): a mask of each
    row's first lengths[b] steps is the same call; Reversed and Stateful wrap
    a layer_norm layer as any other."""
    rng = np.random.default_rng(23)
    layer = CLASSES[kind](3, 5, batch_first=True, layer_norm=True, dtype="float64", seed=12)
    perturbed(layer, rng)
    x = rng.normal(size=(3, 6, 3))
    lengths = np.array([6, 2, 4])
    mask = np.arange(6)[None, :] < lengths[:, None]
    out_mask, _ = layer(x, mask=mask, zero_output_for_mask=True)
    out_len, _ = layer(x, lengths=lengths)
    np.testing.assert_array_equal(out_mask, out_len)
    stateful = fastrnn.Stateful(layer)
    stateful(x[:, :3])
    second, _ = stateful(x[:, 3:])
    whole, _ = layer(x)
    assert_close(second, whole[:, 3:], 1e-12)
    backwards, _ = fastrnn.Reversed(layer)(x)
    flipped, _ = layer(x[:, ::-1])
    assert_close(backwards, flipped[:, ::-1], 1e-12)


def test_wrong_state_is_refused_as_for_the_plain_layer():
    layer = fastrnn.LSTM(3, 4, layer_norm=True)
    with pytest.raises(ValueError, match=r"^LSTM: expected input of shape"):
        layer(np.zeros((5, 2, 7)))
    (_, _), backprop = layer.forward_train(np.zeros((5, 2, 3)))
    with pytest.raises(ValueError, match=r"LSTM.backprop: expected dout"):
        backprop(np.zeros((5, 2, 3)))


# --- what the paper says: LN trains faster -----------------------------------------------

def test_layer_norm_lstm_learns_the_adding_problem_faster():
    """The adding problem (fastrnn/examples/layer_norm.py has the full run):
    T = 30, the same seed, data and optimizer; after 3 epochs of 1600
    sequences the LN-LSTM's validation MSE is below half the plain LSTM's
    (measured at seeds 0, 1, 2: 0.023, 0.020, 0.024 against 0.181, 0.169,
    0.175, the plain one still at the mean's score ~0.17)."""
    from fastrnn.examples import layer_norm as example
    results = example.main(steps=30, hidden=16, epochs=3, n_train=1600, kinds=("LSTM",),
                           seeds=(0,), verbose=False)
    plain, normed = results[("LSTM", False, 0)][-1], results[("LSTM", True, 0)][-1]
    assert normed < 0.5 * plain


# --- with the training options that act outside the kernels ---------------------------

@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_learned_initial_state(kind):
    """learn_initial_state=True: a call without hx starts from the learned
    state, and its gradient is the sum over the batch of dh0."""
    rng = np.random.default_rng(29)
    T, B, D, H, L = 5, 3, 4, 6, 2
    layer = CLASSES[kind](D, H, num_layers=L, bidirectional=True, dtype="float64",
                          layer_norm=True, learn_initial_state=True, seed=13)
    perturbed(layer, rng)
    state = {n: (v + rng.normal(size=v.shape) if n.startswith("initial_") else v)
             for n, v in layer.state_dict().items()}
    layer.load_state_dict(state)
    h0 = np.stack([state[n] for n in state if n.startswith("initial_h")])[:, None].repeat(B, 1)
    c0 = (np.stack([state[n] for n in state if n.startswith("initial_c")])[:, None].repeat(B, 1)
          if kind == "lstm" else None)
    x = rng.normal(size=(T, B, D))
    lengths = np.array([5, 2, 4])
    (out, st), backprop = layer.forward_train(x, lengths=lengths)
    want_out, want_h, _, tape = ref.layer_forward(kind, state, x, h0, c0, L, True, lengths)
    assert_close(out, want_out, 1e-12)
    dout = rng.normal(size=out.shape) * (np.arange(T)[:, None] < lengths)[..., None]
    layer.zero_grad()
    backprop(dout)
    _, dh0, dc0, grads = ref.layer_backward(kind, state, tape, dout, np.zeros(h0.shape),
                                            np.zeros(h0.shape) if kind == "lstm" else None,
                                            L, True)
    for name, grad in grads.items():
        assert_close(layer.grads[name], grad, 1e-11)
    names_h = [n for n in state if n.startswith("initial_h")]
    for i, name in enumerate(names_h):
        assert_close(layer.grads[name], dh0[i].sum(axis=0), 1e-11)
        if kind == "lstm":
            assert_close(layer.grads[name.replace("initial_h", "initial_c")],
                         dc0[i].sum(axis=0), 1e-11)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_weight_dropout(kind, dtype):
    """DropConnect (weight_dropout) with layer norm: the training forward and
    its BPTT run on W_hh * mask (the masks drawn from a copy of the layer's
    generator, as the layer draws them), W_hh's gradient is the masked one;
    inference uses W_hh unchanged."""
    import copy
    from fastrnn._module import dropout_mask
    rng = np.random.default_rng(31)
    T, B, D, H, L, p = 5, 3, 4, 6, 2, 0.3
    layer = CLASSES[kind](D, H, num_layers=L, dtype=dtype, layer_norm=True,
                          weight_dropout=p, seed=14)
    state = perturbed(layer, rng)
    x = rng.normal(size=(T, B, D))
    h0 = rng.normal(size=(L, B, H))
    c0 = rng.normal(size=h0.shape)
    hx = (h0, c0) if kind == "lstm" else h0
    generator = copy.deepcopy(layer._rng)
    masks = [dropout_mask(generator, layer._weights(layer._params)[1][k].shape, p,
                          np.dtype(dtype)) for k in range(L)]
    masked = dict(state)
    for k in range(L):
        masked[f"weight_hh_l{k}"] = state[f"weight_hh_l{k}"] * masks[k]
    (out, _), backprop = layer.forward_train(x, hx)
    want_out, _, _, tape = ref.layer_forward(kind, masked, x, h0,
                                             c0 if kind == "lstm" else None, L)
    tol_f, tol_g = (1e-12, 1e-11) if dtype == "float64" else (F32_FORWARD, F32_GRAD)
    assert_close(out, want_out, tol_f)
    dout = rng.normal(size=out.shape)
    layer.zero_grad()
    backprop(dout)
    _, _, _, grads = ref.layer_backward(kind, masked, tape, dout, np.zeros(h0.shape),
                                        np.zeros(h0.shape) if kind == "lstm" else None, L)
    for name, grad in grads.items():
        if name.startswith("weight_hh"):
            grad = grad * masks[int(name[len("weight_hh_l"):])]
        assert_close(layer.grads[name], grad, tol_g)
    infer, _ = layer(x, hx)
    assert_close(infer, ref.layer_forward(kind, state, x, h0, c0 if kind == "lstm" else None,
                                          L)[0], tol_f)


_BUILD_RUN = """
import sys
import numpy as np
import fastrnn
rng = np.random.default_rng(0)
out = {}
for i, (kind, D, H, B, T) in enumerate([("LSTM", 5, 17, 2, 3), ("GRU", 3, 5, 3, 4),
                                        ("LSTM", 12, 33, 4, 9), ("GRU", 1, 7, 1, 5)]):
    layer = getattr(fastrnn, kind)(D, H, layer_norm=True, seed=i)
    x = rng.standard_normal((T, B, D)).astype(np.float32)
    (y, _), backprop = layer.forward_train(x)
    dx, _ = backprop(rng.standard_normal(y.shape).astype(np.float32))
    out.update({f"{i}y": y, f"{i}dx": dx, f"{i}inference": layer(x)[0]})
    out.update({f"{i}{name}": g for name, g in layer.grads.items()})
np.savez(sys.argv[1], **out)
"""


def test_the_avx512_and_avx2_builds_give_layer_norm_the_same_bits(tmp_path):
    """Layer norm's row sums are C loops that GCC fused in one build and not
    in the other: its results differed in the last bit between the AVX-512
    and AVX2 builds (rows of n values with n % 8 in 4..7), against the
    README's claim. The module is compiled without contraction now.
    [failed before: 52 of 80 random layer-norm layers differed]"""
    import os
    import subprocess
    import sys
    from fastrnn import _kernels
    if not (_kernels.cpu_supports("avx512") and _kernels.cpu_supports("avx2")):
        pytest.skip("needs a CPU that runs both builds")
    saved = {}
    for build in ("avx512", "avx2"):
        path = tmp_path / f"{build}.npz"
        subprocess.run([sys.executable, "-c", _BUILD_RUN, str(path)], check=True,
                       env={**os.environ, "FASTRNN_SIMD": build}, cwd=tmp_path)
        saved[build] = np.load(path)
    for name in saved["avx512"].files:
        np.testing.assert_array_equal(saved["avx512"][name], saved["avx2"][name], err_msg=name)
