"""Learned initial states (``learn_initial_state=True``) of the recurrent
layers and cells: forward and BPTT against the NumPy oracles
(tests/reference.py for the forward and the state's broadcast,
tests/reference_options.py for the analytic BPTT), finite differences of the
new parameters in float64, hx winning over them, masks, the optimizers and
Sequential.fit (a task the learned state solves better), save/load, pickling,
state_dict, Stream, repr, to_onnx and to_torch, and the argument's errors."""
import copy
import pickle

import numpy as np
import pytest

import fastrnn
import reference as ref
import reference_options as ro
from option_cases import KINDS, STRUCTURES, TOL, assert_close, make_layer
from reference import numeric_grad

def make_cell(kind, D, H, **kw):
    if kind.startswith("rnn"):
        return fastrnn.RNNCell(D, H, nonlinearity=kind[4:], **kw)
    if kind.startswith("gru"):
        return fastrnn.GRUCell(D, H, reset_after=kind == "gru", **kw)
    return fastrnn.LSTMCell(D, H, **kw)


def state_names(module):
    return [n for n in module.state_dict() if n.startswith("initial_")]


def randomize_states(module, rng, scale=0.9):
    """Non-zero learned states (they start at zero)."""
    sd = module.state_dict()
    names = state_names(module)
    module.load_state_dict({n: rng.uniform(-scale, scale, sd[n].shape) for n in names},
                           strict=False)
    return names


def setup(kind, dtype, T, B, D, H, num_layers=1, bidirectional=False, batch_first=False,
          use_lengths=False, seed=0):
    rng = np.random.default_rng(seed)
    layer = make_layer(kind, D, H, num_layers=num_layers, bidirectional=bidirectional,
                       batch_first=batch_first, dtype=np.dtype(dtype).name, seed=seed,
                       learn_initial_state=True)
    randomize_states(layer, rng)
    x = rng.standard_normal((T, B, D)).astype(dtype)
    lengths = None
    if use_lengths:
        lengths = rng.integers(1, T + 1, size=B)
        lengths[0] = T
    xin = x.transpose(1, 0, 2) if batch_first else x
    return layer, x, xin, lengths


def oracle_states(kind, params, B, L, bidi):
    h0 = ref.learned_state(params, B, L, bidi, "initial_h")
    c0 = ref.learned_state(params, B, L, bidi, "initial_c") if kind == "lstm" else None
    return h0, c0


def _cases():
    return [pytest.param(kind, s, id=f"{kind}-s{i}")
            for kind in KINDS for i, s in enumerate(STRUCTURES)]


# --- the parameters ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_parameters_named_shaped_zero_and_other_weights_unchanged(kind):
    plain = make_layer(kind, 3, 4, num_layers=2, bidirectional=True, seed=5)
    learned = make_layer(kind, 3, 4, num_layers=2, bidirectional=True, seed=5,
                         learn_initial_state=True)
    states = ["initial_h", "initial_c"] if kind == "lstm" else ["initial_h"]
    want = [f"{s}_l{k}{d}" for s in states for k in range(2) for d in ("", "_reverse")]
    assert sorted(state_names(learned)) == sorted(want)
    sd = learned.state_dict()
    for name in want:
        assert sd[name].shape == (4,) and sd[name].dtype == np.float32
        assert not sd[name].any(), f"{name} starts at zero"
        assert getattr(learned, name).shape == (4,)
        assert learned.grads[name].shape == (4,)
    # the states draw nothing from the seed: every other parameter is the plain layer's
    for name, value in plain.state_dict().items():
        np.testing.assert_array_equal(sd[name], value, err_msg=name)
    assert set(learned.state_dict()) == set(plain.state_dict()) | set(want)
    assert not any(n.startswith("initial_") for n in plain.state_dict())


@pytest.mark.parametrize("kind", KINDS)
def test_cell_parameters(kind):
    cell = make_cell(kind, 3, 4, learn_initial_state=True, seed=2)
    want = ["initial_h", "initial_c"] if kind == "lstm" else ["initial_h"]
    assert state_names(cell) == want
    assert all(cell.state_dict()[n].shape == (4,) and not cell.state_dict()[n].any()
               for n in want)


def test_zero_learned_state_is_the_plain_layer():
    """At zero (as built) the learned state is the zero state: bit-identical."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 6, 3)).astype(np.float32)
    for kw in (dict(), dict(num_layers=2, bidirectional=True)):
        plain = fastrnn.LSTM(3, 5, batch_first=True, seed=1, **kw)
        learned = fastrnn.LSTM(3, 5, batch_first=True, seed=1, learn_initial_state=True, **kw)
        out_p, (h_p, c_p) = plain(x)
        out_l, (h_l, c_l) = learned(x)
        np.testing.assert_array_equal(out_l, out_p)
        np.testing.assert_array_equal(h_l, h_p)
        np.testing.assert_array_equal(c_l, c_p)


# --- forward and BPTT against the oracles -----------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("kind, structure", _cases())
def test_forward_matches_the_oracle(kind, structure, dtype):
    layer, x, xin, lengths = setup(kind, dtype, **structure)
    L, bidi = structure.get("num_layers", 1), structure.get("bidirectional", False)
    params = layer.state_dict()
    h0, c0 = oracle_states(kind, params, x.shape[1], L, bidi)
    want_out, want_h, want_c = ref.layer_forward(kind, params, x, h0, c0, L, bidi, lengths)
    for run in ("call", "train"):
        if run == "call":
            out, state = layer(xin, lengths=lengths)
        else:
            (out, state), _ = layer.forward_train(xin, lengths=lengths)
        h_n, c_n = state if kind == "lstm" else (state, None)
        assert out.dtype == np.dtype(dtype)
        if structure.get("batch_first"):
            out = out.transpose(1, 0, 2)
        assert_close(out, want_out, TOL[dtype], f"{run} out")
        assert_close(h_n, want_h, TOL[dtype], f"{run} h_n")
        if kind == "lstm":
            assert_close(c_n, want_c, TOL[dtype], f"{run} c_n")
    # and the learned state matters: the zero state gives other outputs
    zero_out = ref.layer_forward(kind, params, x, np.zeros_like(h0),
                                 None if c0 is None else np.zeros_like(c0), L, bidi,
                                 lengths)[0]
    assert np.abs(zero_out - want_out).max() > 1e-3


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("kind", KINDS)
def test_unbatched_input_starts_from_the_learned_state(kind, dtype):
    layer, x, _, _ = setup(kind, dtype, T=4, B=1, D=2, H=3, num_layers=2, bidirectional=True)
    params = layer.state_dict()
    h0, c0 = oracle_states(kind, params, 1, 2, True)
    want_out, want_h, _ = ref.layer_forward(kind, params, x, h0, c0, 2, True)
    out, state = layer(x[:, 0])
    h_n = state[0] if kind == "lstm" else state
    assert_close(out, want_out[:, 0], TOL[dtype], "out")
    assert_close(h_n, want_h[:, 0], TOL[dtype], "h_n")


@pytest.mark.parametrize("kind", KINDS)
def test_small_calls_equal_calls_given_the_learned_state_as_hx(kind):
    """Small calls (the lean path of layers, the streaming path of cells) start
    from the learned state: bit-identical to passing it as hx, over changing
    batch sizes and unbatched input, and after the states change."""
    rng = np.random.default_rng(30)
    layer = make_layer(kind, 3, 4, num_layers=2, batch_first=True, seed=31,
                       learn_initial_state=True)
    cell = make_cell(kind, 3, 4, seed=32, learn_initial_state=True)
    for step in range(2):
        randomize_states(layer, rng)
        randomize_states(cell, rng)
        sd, csd = layer.state_dict(), cell.state_dict()
        for B in (2, 5, 2, None):
            x = rng.standard_normal((5, 3) if B is None else (B, 5, 3)).astype(np.float32)
            n = 1 if B is None else B
            h0 = ref.learned_state(sd, n, 2, False, "initial_h").astype(np.float32)
            c0 = ref.learned_state(sd, n, 2, False, "initial_c").astype(np.float32) \
                if kind == "lstm" else None
            if B is None:
                h0, c0 = h0[:, 0], (None if c0 is None else c0[:, 0])
            hx = (h0, c0) if kind == "lstm" else h0
            got, want = layer(x), layer(x, hx)
            np.testing.assert_array_equal(got[0], want[0])
            frame = x[..., 0, :]
            h = np.tile(csd["initial_h"], (n, 1)).astype(np.float32)
            c = np.tile(csd["initial_c"], (n, 1)).astype(np.float32) if kind == "lstm" \
                else None
            if B is None:
                h, c = h[0], (None if c is None else c[0])
            got_c = cell(frame)
            want_c = cell(frame, (h, c) if kind == "lstm" else h)
            np.testing.assert_array_equal(got_c[0] if kind == "lstm" else got_c,
                                          want_c[0] if kind == "lstm" else want_c)


def _oracle_kind(kind):
    """tests/reference_options.py's kind and options for a plain layer."""
    if kind.startswith("rnn"):
        return "rnn", dict(nonlinearity=kind[4:])
    return kind, {}


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("kind, structure", _cases())
def test_bptt_matches_the_oracle(kind, structure, dtype):
    layer, x, xin, lengths = setup(kind, dtype, seed=1, **structure)
    L, bidi = structure.get("num_layers", 1), structure.get("bidirectional", False)
    dirs = 2 if bidi else 1
    T, B, H = x.shape[0], x.shape[1], structure["H"]
    rng = np.random.default_rng(2)
    dout = rng.standard_normal((T, B, dirs * H)).astype(dtype)
    if lengths is not None:
        for b, n in enumerate(lengths):
            dout[n:, b] = 0
    dh_n = rng.standard_normal((L * dirs, B, H)).astype(dtype)
    dc_n = rng.standard_normal((L * dirs, B, H)).astype(dtype) if kind == "lstm" else None
    params = layer.state_dict()
    h0, c0 = oracle_states(kind, params, B, L, bidi)
    okind, options = _oracle_kind(kind)
    want_dx, want_dh0, want_dc0, want = ro.layer_backward(
        okind, params, x, h0, c0, L, bidi, lengths, dout=dout, dh_n=dh_n, dc_n=dc_n,
        **options)
    want.update(ref.learned_state_grads(want_dh0, L, bidi, "initial_h"))
    if kind == "lstm":
        want.update(ref.learned_state_grads(want_dc0, L, bidi, "initial_c"))

    layer.zero_grad()
    _, backprop = layer.forward_train(xin, lengths=lengths)
    dy = dout.transpose(1, 0, 2) if structure.get("batch_first") else dout
    dx, dhx = backprop(dy, (dh_n, dc_n) if kind == "lstm" else dh_n)
    if structure.get("batch_first"):
        dx = dx.transpose(1, 0, 2)
    tol = TOL[dtype]
    assert_close(dx, want_dx, tol, "dx")
    dh0, dc0 = dhx if kind == "lstm" else (dhx, None)
    assert_close(dh0, want_dh0, tol, "dh0")
    if kind == "lstm":
        assert_close(dc0, want_dc0, tol, "dc0")
    assert set(layer.grads) == set(params) == set(want)
    for name in params:
        assert layer.grads[name].dtype == np.dtype(dtype), name
        assert_close(layer.grads[name], want[name], tol, name)
    # the learned state's gradient is the sum over the batch of dh0 (dc0)
    for i, sfx in enumerate(ref._suffixes(L, bidi)):
        assert_close(layer.grads["initial_h" + sfx], dh0[i].sum(axis=0), tol, sfx)


@pytest.mark.parametrize("kind", KINDS)
def test_learned_state_gradients_match_finite_differences(kind):
    """Central differences of a float64 loss through forward_train, for every
    learned-state parameter, on a stacked bidirectional layer with lengths."""
    rng = np.random.default_rng(3)
    T, B, D, H, L = 4, 3, 2, 3, 2
    layer = make_layer(kind, D, H, num_layers=L, bidirectional=True, batch_first=True,
                       dtype="float64", seed=4, learn_initial_state=True)
    names = randomize_states(layer, rng)
    x = rng.standard_normal((B, T, D))
    lengths = np.array([4, 2, 3])
    w_out = rng.standard_normal((B, T, 2 * H))
    for b, n in enumerate(lengths):
        w_out[b, n:] = 0
    w_h, w_c = rng.standard_normal((2, 2 * L, B, H))

    def loss():
        (out, state), _ = layer.forward_train(x, lengths=lengths)
        h, c = state if kind == "lstm" else (state, None)
        total = (out * w_out).sum() + (h * w_h).sum()
        return float(total + ((c * w_c).sum() if kind == "lstm" else 0.0))

    layer.zero_grad()
    _, backprop = layer.forward_train(x, lengths=lengths)
    backprop(w_out, (w_h, w_c) if kind == "lstm" else w_h)
    grads = {n: layer.grads[n].copy() for n in names}
    for name in names:
        param = layer.state_dict()[name].copy()

        def perturbed():
            layer.load_state_dict({name: param}, strict=False)
            return loss()

        numeric = numeric_grad(perturbed, param)
        layer.load_state_dict({name: param}, strict=False)
        # central differences of a smooth float64 loss: ~1e-9
        np.testing.assert_allclose(grads[name], numeric, rtol=0, atol=1e-7, err_msg=name)
        assert np.abs(numeric).max() > 1e-3, f"{name}: the state acts on the loss"


# --- cells --------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("kind", KINDS)
def test_cell_forward_and_backward_match_the_oracle(kind, dtype):
    rng = np.random.default_rng(6)
    B, D, H = 3, 2, 4
    cell = make_cell(kind, D, H, dtype=np.dtype(dtype).name, seed=7, learn_initial_state=True)
    randomize_states(cell, rng)
    params = cell.state_dict()
    x = rng.standard_normal((B, D)).astype(dtype)
    h0 = ref.learned_state(params, B, None, name="initial_h")
    c0 = ref.learned_state(params, B, None, name="initial_c") if kind == "lstm" else None
    want_h, want_c = ref.cell_forward(kind, params, x, h0, c0)
    got = cell(x)
    h, c = got if kind == "lstm" else (got, None)
    assert_close(h, want_h, TOL[dtype], "h")
    if kind == "lstm":
        assert_close(c, want_c, TOL[dtype], "c")
    # unbatched: one frame from the learned state
    got1 = cell(x[0])
    assert_close(got1[0] if kind == "lstm" else got1, want_h[0], TOL[dtype], "h unbatched")

    dh = rng.standard_normal((B, H)).astype(dtype)
    dc = rng.standard_normal((B, H)).astype(dtype) if kind == "lstm" else None
    okind, options = _oracle_kind(kind)
    want_dx, want_dh, want_dc, want = ro.cell_backward(okind, params, x, h0, c0, dh, dc,
                                                       **options)
    want.update(ref.learned_state_grads(want_dh, None, name="initial_h"))
    if kind == "lstm":
        want.update(ref.learned_state_grads(want_dc, None, name="initial_c"))
    cell.zero_grad()
    _, backprop = cell.forward_train(x)
    dx, dhx = backprop((dh, dc) if kind == "lstm" else dh)
    assert_close(dx, want_dx, TOL[dtype], "dx")
    assert set(cell.grads) == set(want)
    for name in want:
        assert_close(cell.grads[name], want[name], TOL[dtype], name)


def test_cell_learned_state_gradient_matches_finite_differences():
    rng = np.random.default_rng(8)
    cell = fastrnn.LSTMCell(3, 4, dtype="float64", seed=9, learn_initial_state=True)
    names = randomize_states(cell, rng)
    x = rng.standard_normal((2, 3))
    w_h, w_c = rng.standard_normal((2, 2, 4))

    def loss():
        h, c = cell(x)
        return float((h * w_h).sum() + (c * w_c).sum())

    cell.zero_grad()
    _, backprop = cell.forward_train(x)
    backprop((w_h, w_c))
    for name in names:
        param = cell.state_dict()[name].copy()

        def perturbed():
            cell.load_state_dict({name: param}, strict=False)
            return loss()

        numeric = numeric_grad(perturbed, param)
        cell.load_state_dict({name: param}, strict=False)
        np.testing.assert_allclose(cell.grads[name], numeric, rtol=0, atol=1e-7,
                                   err_msg=name)
        assert np.abs(numeric).max() > 1e-3


# --- hx wins ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_hx_wins_and_the_parameters_get_no_gradient(kind):
    rng = np.random.default_rng(10)
    kw = dict(num_layers=2, bidirectional=True, batch_first=True, dtype="float64", seed=11)
    plain = make_layer(kind, 2, 3, **kw)
    layer = make_layer(kind, 2, 3, learn_initial_state=True, **kw)
    randomize_states(layer, rng)
    x = rng.standard_normal((3, 5, 2))
    h0 = rng.standard_normal((4, 3, 3))
    hx = (h0, rng.standard_normal((4, 3, 3))) if kind == "lstm" else h0
    out_p, state_p = plain(x, hx)
    out_l, state_l = layer(x, hx)
    np.testing.assert_array_equal(out_l, out_p)
    layer.zero_grad()
    plain.zero_grad()
    (out, _), backprop = layer.forward_train(x, hx)
    (_, _), backprop_p = plain.forward_train(x, hx)
    dout = rng.standard_normal(out.shape)
    dx, _ = backprop(dout)
    dx_p, _ = backprop_p(dout)
    np.testing.assert_array_equal(dx, dx_p)
    for name in state_names(layer):
        assert not layer.grads[name].any(), name
    for name in plain.grads:
        np.testing.assert_array_equal(layer.grads[name], plain.grads[name], err_msg=name)


def test_cell_hx_wins():
    rng = np.random.default_rng(12)
    cell = fastrnn.GRUCell(2, 3, seed=1, learn_initial_state=True)
    plain = fastrnn.GRUCell(2, 3, seed=1)
    randomize_states(cell, rng)
    x = rng.standard_normal((4, 2)).astype(np.float32)
    h = rng.standard_normal((4, 3)).astype(np.float32)
    np.testing.assert_array_equal(cell(x, h), plain(x, h))
    cell.zero_grad()
    _, backprop = cell.forward_train(x, h)
    backprop(np.ones((4, 3), np.float32))
    assert not cell.grads["initial_h"].any()


# --- masks, tbptt, wrappers ----------------------------------------------------------------
@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_mask_starts_from_the_learned_state(kind):
    rng = np.random.default_rng(13)
    B, T, D, H = 3, 5, 2, 3
    layer = make_layer(kind, D, H, bidirectional=True, batch_first=True, dtype="float64",
                       seed=14, learn_initial_state=True)
    randomize_states(layer, rng)
    x = rng.standard_normal((B, T, D))
    mask = np.array([[1, 1, 0, 1, 1], [0, 1, 1, 1, 0], [0, 0, 0, 0, 0]], bool)
    params = layer.state_dict()
    h0, c0 = oracle_states(kind, params, B, 1, True)
    want_out, want_h, _ = ref.masked_layer_forward(kind, params, x.transpose(1, 0, 2), h0, c0,
                                                   1, True, mask=mask)
    out, state = layer(x, mask=mask)
    h_n = state[0] if kind == "lstm" else state
    assert_close(out.transpose(1, 0, 2), want_out, 1e-12, "out")
    assert_close(h_n, want_h, 1e-12, "h_n")

    w_out = rng.standard_normal(out.shape)

    def loss():
        (o, _), _ = layer.forward_train(x, mask=mask)
        return float((o * w_out).sum())

    layer.zero_grad()
    _, backprop = layer.forward_train(x, mask=mask)
    _, dhx = backprop(w_out)
    dh0 = dhx[0] if kind == "lstm" else dhx
    for name in state_names(layer):
        param = layer.state_dict()[name].copy()

        def perturbed():
            layer.load_state_dict({name: param}, strict=False)
            return loss()

        numeric = numeric_grad(perturbed, param)
        layer.load_state_dict({name: param}, strict=False)
        np.testing.assert_allclose(layer.grads[name], numeric, rtol=0, atol=1e-7,
                                   err_msg=name)
    np.testing.assert_allclose(layer.grads["initial_h_l0"], dh0[0].sum(axis=0), rtol=0,
                               atol=1e-12)
    with pytest.raises(RuntimeError, match="already run"):
        backprop(w_out)


def test_masked_backprop_refuses_after_a_parameter_change():
    layer = fastrnn.GRU(2, 3, batch_first=True, seed=0, learn_initial_state=True)
    x = np.ones((2, 3, 2), np.float32)
    (out, _), backprop = layer.forward_train(x, mask=np.zeros((2, 3), bool))
    layer.load_state_dict({"initial_h_l0": np.ones(3)}, strict=False)
    with pytest.raises(RuntimeError, match=r"GRU\.backprop: the parameters changed"):
        backprop(np.ones_like(out))


def test_tbptt_starts_from_the_learned_state_and_trains_it():
    rng = np.random.default_rng(15)
    layer = fastrnn.LSTM(2, 3, batch_first=True, dtype="float64", seed=16,
                         learn_initial_state=True)
    randomize_states(layer, rng)
    x = rng.standard_normal((2, 6, 2))
    whole, _ = layer(x)
    chunks = []
    layer.zero_grad()
    for index, out, backprop in fastrnn.tbptt(layer, x, steps=4):
        chunks.append(out)
        backprop(np.ones_like(out))
    np.testing.assert_allclose(np.concatenate(chunks, axis=1), whole, rtol=0, atol=1e-14)
    # only the first chunk started from the learned state: its gradient is that
    # chunk's (the later chunk started from a given state)
    layer2 = copy.deepcopy(layer)
    layer2.zero_grad()
    (out, _), backprop = layer2.forward_train(x[:, :4])
    backprop(np.ones_like(out))
    np.testing.assert_allclose(layer.grads["initial_h_l0"], layer2.grads["initial_h_l0"],
                               rtol=0, atol=1e-14)
    assert np.abs(layer.grads["initial_h_l0"]).max() > 1e-3


def test_stateful_and_stream_start_from_the_learned_state():
    rng = np.random.default_rng(17)
    layer = fastrnn.GRU(2, 3, batch_first=True, seed=18, learn_initial_state=True)
    randomize_states(layer, rng)
    x = rng.standard_normal((2, 7, 2)).astype(np.float32)
    whole, h_whole = layer(x)
    zero_start, _ = layer(x, np.zeros((1, 2, 3), np.float32))
    assert np.abs(whole - zero_start).max() > 1e-3

    stream = fastrnn.Stream(layer)
    frames = np.stack([stream.step(x[:, t]) for t in range(7)], axis=1)
    np.testing.assert_allclose(frames, whole, rtol=0, atol=1e-6)
    stream.reset()
    np.testing.assert_allclose(stream(x[:, :3]), whole[:, :3], rtol=0, atol=1e-6)
    # one unbatched stream
    one = fastrnn.Stream(layer)
    np.testing.assert_allclose(np.stack([one.step(f) for f in x[1]]), whole[1], rtol=0,
                               atol=1e-6)

    stateful = fastrnn.Stateful(layer)
    out1, _ = stateful(x[:, :4])
    out2, _ = stateful(x[:, 4:])
    np.testing.assert_allclose(np.concatenate([out1, out2], axis=1), whole, rtol=0, atol=1e-6)
    stateful.reset_state()
    np.testing.assert_allclose(stateful(x[:, :4])[0], whole[:, :4], rtol=0, atol=1e-6)


def test_stream_of_a_sequential_starts_from_the_learned_state():
    rng = np.random.default_rng(19)
    lstm = fastrnn.LSTM(2, 4, batch_first=True, seed=20, learn_initial_state=True)
    randomize_states(lstm, rng)
    model = fastrnn.Sequential([lstm, fastrnn.Linear(4, 1, seed=21)])
    x = rng.standard_normal((3, 5, 2)).astype(np.float32)
    want = model.predict(x)
    stream = fastrnn.Stream(model)
    got = np.stack([stream.step(x[:, t]) for t in range(5)], axis=1)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


# --- training: optimizers and fit -----------------------------------------------------------
def test_an_optimizer_step_moves_the_learned_state():
    rng = np.random.default_rng(22)
    layer = fastrnn.RNN(2, 3, num_layers=2, seed=23, learn_initial_state=True)
    x = rng.standard_normal((4, 2, 2)).astype(np.float32)
    opt = fastrnn.optim.SGD([layer], lr=0.5)
    (out, _), backprop = layer.forward_train(x)
    backprop(np.ones_like(out))
    grads = {n: layer.grads[n].copy() for n in state_names(layer)}
    before = layer.state_dict()
    opt.step()
    after = layer.state_dict()
    for name, grad in grads.items():
        assert np.abs(grad).max() > 1e-3, name
        np.testing.assert_allclose(after[name], before[name] - 0.5 * grad, rtol=1e-6,
                                   atol=1e-7, err_msg=name)


def _first_steps_task():
    """Sequences of noise whose targets, on the first three steps only, are a
    constant (0.8) and afterwards the previous step's input: nothing in the
    input tells the first steps' constant, which a learned initial state can
    hold."""
    rng = np.random.default_rng(24)
    x = rng.uniform(-0.5, 0.5, (128, 8, 1)).astype(np.float32)
    y = np.empty_like(x)
    y[:, :3] = 0.8
    y[:, 3:] = x[:, 2:-1]
    return x, y


def _fit_first_steps(learn_initial_state, seed):
    x, y = _first_steps_task()
    model = fastrnn.Sequential([
        fastrnn.RNN(1, 8, batch_first=True, seed=seed, learn_initial_state=learn_initial_state),
        fastrnn.Linear(8, 1, seed=1)], seed=2)
    model.compile(loss="mse", optimizer=fastrnn.optim.Adam(lr=0.02))
    history = model.fit(x, y, epochs=30, batch_size=32, verbose=0)
    return model, history.history["loss"][-1]


@pytest.mark.parametrize("seed", [0, 3, 5])
def test_fit_learns_the_initial_state_and_beats_the_zero_state(seed):
    """Same seed, data and epochs: the final training loss with the learned
    state is well below the zero state's (measured: 5e-4 to 9e-4 against
    1.2e-3 to 2.8e-3 over these seeds)."""
    model, loss_learned = _fit_first_steps(True, seed)
    _, loss_zero = _fit_first_steps(False, seed)
    assert loss_learned < 0.6 * loss_zero, (loss_learned, loss_zero)
    assert np.abs(model.layers[0].initial_h_l0).max() > 0.1, "fit trained the state"


# --- save, load, pickle, state_dict, repr ---------------------------------------------------
def _trained_lstm():
    rng = np.random.default_rng(25)
    layer = fastrnn.LSTM(2, 3, num_layers=2, bidirectional=True, seed=26,
                         learn_initial_state=True)
    randomize_states(layer, rng)
    return layer, rng.standard_normal((4, 2, 2)).astype(np.float32)


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_save_and_load_round_trip_bit_identical(tmp_path, suffix):
    layer, x = _trained_lstm()
    path = tmp_path / f"layer{suffix}"
    fastrnn.save(layer, path)
    loaded = fastrnn.load(path)
    assert loaded.learn_initial_state is True
    assert repr(loaded) == repr(layer)
    for name, value in layer.state_dict().items():
        np.testing.assert_array_equal(loaded.state_dict()[name], value, err_msg=name)
    out, (h, c) = layer(x)
    out_l, (h_l, c_l) = loaded(x)
    np.testing.assert_array_equal(out_l, out)
    np.testing.assert_array_equal(h_l, h)

    cell = fastrnn.LSTMCell(2, 3, seed=1, learn_initial_state=True)
    randomize_states(cell, np.random.default_rng(0))
    fastrnn.save(cell, tmp_path / f"cell{suffix}")
    cell_l = fastrnn.load(tmp_path / f"cell{suffix}")
    for name, value in cell.state_dict().items():
        np.testing.assert_array_equal(cell_l.state_dict()[name], value, err_msg=name)


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_a_saved_model_resumes_training_identically(tmp_path, suffix):
    """The optimizer's state of the learned states is saved with the model."""
    x, y = _first_steps_task()
    x, y = x[:32], y[:32]

    def model():
        m = fastrnn.Sequential([
            fastrnn.LSTM(1, 4, batch_first=True, seed=0, learn_initial_state=True),
            fastrnn.Linear(4, 1, seed=1)], seed=2)
        m.compile(loss="mse", optimizer=fastrnn.optim.Adam(lr=0.01))
        return m

    first = model()
    first.fit(x, y, epochs=2, batch_size=8, verbose=0)
    first.save(tmp_path / f"m{suffix}")
    resumed = fastrnn.load(tmp_path / f"m{suffix}")
    resumed.fit(x, y, epochs=4, initial_epoch=2, batch_size=8, verbose=0)
    whole = model()
    whole.fit(x, y, epochs=4, batch_size=8, verbose=0)
    for name, value in whole.state_dict().items():
        np.testing.assert_array_equal(resumed.state_dict()[name], value, err_msg=name)
    assert any("initial_c_l0" in n for n in whole.state_dict())


def _patched_copy(path, new_path, old, new):
    """A copy of the model file at path whose configuration text has old
    replaced by new."""
    import zipfile
    with zipfile.ZipFile(path) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    config = str(np.load(path)["config"][()])
    patched = config.replace(old, new)
    assert patched != config
    with zipfile.ZipFile(new_path, "w") as zf:
        for name, data in members.items():
            if name != "config.npy":
                zf.writestr(name, data)
        with zf.open("config.npy", "w") as f:
            np.lib.format.write_array(f, np.array(patched))


def test_a_file_missing_the_states_is_refused(tmp_path):
    plain = fastrnn.LSTM(2, 3, num_layers=2, bidirectional=True, seed=26)
    fastrnn.save(plain, tmp_path / "plain.npz")
    # the configuration says learn_initial_state: weights of the plain layer do not fit it
    _patched_copy(tmp_path / "plain.npz", tmp_path / "bad.npz",
                  '"learn_initial_state": false', '"learn_initial_state": true')
    with pytest.raises(ValueError, match=r"calls for 24 arrays.*holds 16"):
        fastrnn.load(tmp_path / "bad.npz")


@pytest.mark.parametrize("old, new, message", [
    ('"weight_dropout": 0.5', '"weight_dropout": 2',
     r"GRU: weight_dropout must be in \[0, 1\), got 2"),
    ('"learn_initial_state": true', '"learn_initial_state": "yes"',
     r"GRU: learn_initial_state must be a bool, got str"),
])
def test_a_file_with_bad_option_values_is_refused(tmp_path, old, new, message):
    layer = fastrnn.GRU(2, 3, weight_dropout=0.5, learn_initial_state=True)
    fastrnn.save(layer, tmp_path / "g.npz")
    _patched_copy(tmp_path / "g.npz", tmp_path / "bad.npz", old, new)
    with pytest.raises(ValueError, match=r"not a valid fastrnn model file: layer 0 \(GRU\) "
                                         r"has a bad configuration: " + message):
        fastrnn.load(tmp_path / "bad.npz")


def test_pickle_and_deepcopy_round_trip_bit_identical():
    layer, x = _trained_lstm()
    for copy_of in (pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer)):
        assert repr(copy_of) == repr(layer)
        for name, value in layer.state_dict().items():
            np.testing.assert_array_equal(copy_of.state_dict()[name], value, err_msg=name)
        np.testing.assert_array_equal(copy_of(x)[0], layer(x)[0])
    cell = fastrnn.RNNCell(2, 3, seed=1, learn_initial_state=True)
    randomize_states(cell, np.random.default_rng(1))
    cell2 = pickle.loads(pickle.dumps(cell))
    np.testing.assert_array_equal(cell2.initial_h, cell.initial_h)


def test_state_dict_and_load_state_dict():
    layer, x = _trained_lstm()
    other = fastrnn.LSTM(2, 3, num_layers=2, bidirectional=True, seed=99,
                         learn_initial_state=True)
    other.load_state_dict(layer.state_dict())
    np.testing.assert_array_equal(other(x)[0], layer(x)[0])
    # a plain layer's state dict lacks the states: refused when strict
    plain_sd = fastrnn.LSTM(2, 3, num_layers=2, bidirectional=True, seed=0).state_dict()
    with pytest.raises(ValueError, match=r"LSTM: load_state_dict: missing keys \['initial_h_l0'"):
        other.load_state_dict(plain_sd)
    with pytest.raises(ValueError, match=r"LSTM: expected initial_h_l1 of shape \(3,\), got "
                                         r"\(2, 3\)"):
        other.load_state_dict({"initial_h_l1": np.zeros((2, 3))}, strict=False)
    other.initial_c_l1_reverse = np.full(3, 0.25)
    np.testing.assert_array_equal(other.state_dict()["initial_c_l1_reverse"], np.full(3, 0.25))


def test_repr():
    assert repr(fastrnn.GRU(2, 3, learn_initial_state=True)) == \
        "GRU(2, 3, learn_initial_state=True)"
    assert repr(fastrnn.LSTMCell(2, 3, learn_initial_state=True)) == \
        "LSTMCell(2, 3, learn_initial_state=True)"
    assert "learn_initial_state" not in repr(fastrnn.GRU(2, 3))
    assert repr(fastrnn.RNN(2, 3, num_layers=2, learn_initial_state=True, clip=2.0)) == \
        "RNN(2, 3, num_layers=2, clip=2.0, learn_initial_state=True)"


def test_docstrings_describe_it():
    for cls in (fastrnn.RNN, fastrnn.GRU, fastrnn.LSTM):
        assert "learn_initial_state : bool" in cls.__doc__
        assert "initial_h_l{k}" in cls.__doc__
    for cls in (fastrnn.RNNCell, fastrnn.GRUCell, fastrnn.LSTMCell):
        assert "learn_initial_state : bool" in cls.__doc__
        assert "weight_dropout" not in cls.__doc__


# --- converters -----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["rnn_tanh", "gru", "lstm"])
def test_to_torch_refuses_it(kind):
    pytest.importorskip("torch")
    layer = make_layer(kind, 2, 3, learn_initial_state=True)
    name = type(layer).__name__
    with pytest.raises(ValueError, match=rf"to_torch: {name} has learn_initial_state=True; "
                                         r"PyTorch has no such option"):
        fastrnn.to_torch(layer)
    with pytest.raises(ValueError, match=r"to_torch: LSTMCell has learn_initial_state=True"):
        fastrnn.to_torch(fastrnn.LSTMCell(2, 3, learn_initial_state=True))


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("kind", ["rnn_tanh", "gru", "gru_reset_before", "lstm"])
def test_to_onnx_writes_the_learned_state_as_a_constant(kind, batch_first):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    rng = np.random.default_rng(27)
    layer = make_layer(kind, 2, 3, num_layers=2, bidirectional=True, batch_first=batch_first,
                       seed=28, learn_initial_state=True)
    randomize_states(layer, rng)
    model = fastrnn.to_onnx(layer, lengths=True)
    session = ort.InferenceSession(model.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["X", "sequence_lens"]
    for B in (1, 4):   # the constant follows the batch size
        x = rng.standard_normal((B, 5, 2) if batch_first else (5, B, 2)).astype(np.float32)
        lengths = rng.integers(1, 6, size=B).astype(np.int32)
        got = session.run(None, {"X": x, "sequence_lens": lengths})
        out, state = layer(x, lengths=lengths)
        states = state if kind == "lstm" else (state,)
        # float32 in both, summed in other orders
        np.testing.assert_allclose(got[0], out, rtol=0, atol=1e-5)
        for g, s in zip(got[1:], states):
            np.testing.assert_allclose(g, s, rtol=0, atol=1e-5)


# --- errors -----------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [fastrnn.RNN, fastrnn.GRU, fastrnn.LSTM, fastrnn.RNNCell,
                                 fastrnn.GRUCell, fastrnn.LSTMCell])
@pytest.mark.parametrize("value", ["yes", 1, None, 0.0])
def test_learn_initial_state_must_be_a_bool(cls, value):
    with pytest.raises(TypeError, match=rf"{cls.__name__}: learn_initial_state must be a "
                                        rf"bool, got {type(value).__name__}"):
        cls(2, 3, learn_initial_state=value)


def test_learn_initial_state_is_keyword_only():
    with pytest.raises(TypeError):
        fastrnn.GRU(2, 3, 1, True, False, 0.0, False, "float32", None, True, "tanh",
                    "sigmoid", None, True)
    fastrnn.GRU(2, 3, learn_initial_state=np.bool_(True))   # numpy's bool is a bool
