"""LSTM with a projection (proj_size=P, PyTorch's h_t = W_hr (o_t * tanh(c_t))):
the NumPy oracle of tests/reference_projection.py checked against PyTorch and
by finite differences; fastrnn checked against the oracle (forward and every
gradient, float32 and float64, 1-3 layers, bidirectional, batch_first,
lengths, unbatched, with and without hx, one real-size case), by finite
differences of its own float64 gradients, against PyTorch (from_torch,
to_torch); parameters, errors, refused options, files, pickling, streaming,
masks, dropout, DropConnect, learned initial states, conversions that refuse
a projection, and thread counts."""
import copy
import pickle
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastrnn
import reference as plain_ref
import reference_projection as ref
from option_cases import assert_close

# float64: both sides compute the same float64 expressions in other orders,
# ~1e-16 per operation over a few dozen steps: 1e-12 of the scale for the
# forward and 1e-11 for the gradients (tests/test_layer_norm.py's bounds).
# float32: every product and sum rounded to float32; the forward within 1e-5
# of the scale as for the plain layers (tests/option_cases.TOL,
# tests/test_gate_options.py), the gradients within 1e-5 as
# test_gate_options.GRAD_TOL. Measured on CASES below: forward within 1e-7
# of the scale, gradients within 3e-7; on the real-size case (B = 32, T = 50,
# H = 128, P = 64) 1.7e-7 and 9.6e-7 (PyTorch's float32 LSTM against the
# oracle: the same). No layer norm here (whose 1/std amplifies rounding
# errors), so no need for test_layer_norm.py's wider float32 bounds.
FORWARD_TOL = {"float32": 1e-5, "float64": 1e-12}
GRAD_TOL = {"float32": 1e-5, "float64": 1e-11}
# PyTorch warns on every projected LSTM call that oneDNN does not run it
pytestmark = pytest.mark.filterwarnings(
    "ignore:LSTM with projections is not supported with oneDNN:UserWarning")


def make(D, H, P, dtype="float64", seed=0, **kw):
    return fastrnn.LSTM(D, H, dtype=dtype, seed=seed, proj_size=P, **kw)


def valid_steps(T, lengths, B):
    """(T, B, 1) 1.0 at each sequence's steps, 0.0 past its length."""
    if lengths is None:
        return np.ones((T, B, 1))
    return (np.arange(T)[:, None] < np.asarray(lengths)[None, :])[..., None].astype(float)


# --- the oracle itself: against PyTorch ---------------------------------------------------

def _torch_run(params, x, h0, c0, L, bidirectional, lengths, weights):
    """PyTorch's LSTM(proj_size) in float64 on the oracle's parameters: (out,
    h_n, c_n) and the gradients of sum(out * w_out) + sum(h_n * w_h) +
    sum(c_n * w_c) with respect to x, h0, c0 and each parameter."""
    torch = pytest.importorskip("torch")
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
    T, B, D = x.shape
    P, H = params["weight_hr_l0"].shape
    module = torch.nn.LSTM(D, H, num_layers=L, bidirectional=bidirectional, proj_size=P,
                           bias="bias_ih_l0" in params, dtype=torch.float64)
    module.load_state_dict({n: torch.from_numpy(v) for n, v in params.items()})
    tx, th0, tc0 = (torch.tensor(a, requires_grad=True) for a in (x, h0, c0))
    inp = tx
    if lengths is not None:
        inp = pack_padded_sequence(tx, torch.as_tensor(lengths), enforce_sorted=False)
    out, (h_n, c_n) = module(inp, (th0, tc0))
    if lengths is not None:
        out, _ = pad_packed_sequence(out, total_length=T)
    loss = ((out * torch.from_numpy(weights[0])).sum() + (h_n * torch.from_numpy(weights[1])).sum()
            + (c_n * torch.from_numpy(weights[2])).sum())
    loss.backward()
    grads = {n: p.grad.numpy().copy() for n, p in module.named_parameters()}
    return ([t.detach().numpy() for t in (out, h_n, c_n)],
            [t.grad.numpy() for t in (tx, th0, tc0)], grads)


@pytest.mark.parametrize("L,bidirectional,lengths,bias,P",
                         [(1, False, None, True, 3), (2, True, [3, 5, 1], True, 2),
                          (3, False, [5, 4, 2], False, 1), (3, True, None, True, 4)])
def test_oracle_matches_torch(L, bidirectional, lengths, bias, P):
    pytest.importorskip("torch")
    rng = np.random.default_rng(L * 4 + bidirectional * 2 + bias)
    T, B, D, H = 5, 3, 4, 5
    dirs = 2 if bidirectional else 1
    params = ref.init_params(rng, D, H, P, L, bidirectional, bias)
    x = rng.normal(size=(T, B, D))
    h0 = rng.normal(size=(L * dirs, B, P))
    c0 = rng.normal(size=(L * dirs, B, H))
    weights = (rng.normal(size=(T, B, dirs * P)), rng.normal(size=h0.shape),
               rng.normal(size=c0.shape))
    (t_out, t_h, t_c), (t_dx, t_dh0, t_dc0), t_grads = _torch_run(
        params, x, h0, c0, L, bidirectional, lengths, weights)
    out, h_n, c_n, tape = ref.layer_forward(params, x, h0, c0, L, bidirectional, lengths)
    assert_close(out, t_out, 1e-12, "out")
    assert_close(h_n, t_h, 1e-12, "h_n")
    assert_close(c_n, t_c, 1e-12, "c_n")
    dx, dh0, dc0, grads = ref.layer_backward(params, tape, weights[0], weights[1], weights[2])
    assert_close(dx, t_dx, 1e-12, "dx")
    assert_close(dh0, t_dh0, 1e-12, "dh0")
    assert_close(dc0, t_dc0, 1e-12, "dc0")
    assert list(grads) == list(t_grads) == list(params)   # PyTorch's names and order
    for name, grad in grads.items():
        assert_close(grad, t_grads[name], 1e-12, name)


def test_oracle_with_identity_projection_is_the_plain_lstm():
    """P = H and W_hr = I: the plain LSTM of tests/reference.py (another
    oracle, written separately)."""
    rng = np.random.default_rng(1)
    T, B, D, H, L = 5, 3, 2, 4, 2
    params = ref.init_params(rng, D, H, H, L, True)
    for name in params:
        if name.startswith("weight_hr"):
            params[name] = np.eye(H)
    plain = {n: v for n, v in params.items() if not n.startswith("weight_hr")}
    x = rng.normal(size=(T, B, D))
    h0, c0 = rng.normal(size=(2, 2 * L, B, H))
    lengths = np.array([5, 2, 4])
    out, h_n, c_n, _ = ref.layer_forward(params, x, h0, c0, L, True, lengths)
    want_out, want_h, want_c = plain_ref.layer_forward("lstm", plain, x, h0, c0, L, True, lengths)
    assert_close(out, want_out, 1e-14, "out")
    assert_close(h_n, want_h, 1e-14, "h_n")
    assert_close(c_n, want_c, 1e-14, "c_n")


# --- the oracle itself: its BPTT by finite differences of its forward ----------------------

@pytest.mark.parametrize("bidirectional", [False, True])
def test_oracle_backward_matches_finite_differences(bidirectional):
    rng = np.random.default_rng(3 + bidirectional)
    T, B, D, H, P, L = 4, 2, 2, 3, 2, 2
    dirs = 2 if bidirectional else 1
    params = ref.init_params(rng, D, H, P, L, bidirectional)
    x = rng.normal(size=(T, B, D))
    h0 = rng.normal(size=(L * dirs, B, P))
    c0 = rng.normal(size=(L * dirs, B, H))
    lengths = np.array([4, 3])
    weights = (rng.normal(size=(T, B, dirs * P)), rng.normal(size=h0.shape),
               rng.normal(size=c0.shape))

    def loss():
        out, h_n, c_n, _ = ref.layer_forward(params, x, h0, c0, L, bidirectional, lengths)
        return np.sum(out * weights[0]) + np.sum(h_n * weights[1]) + np.sum(c_n * weights[2])

    _, _, _, tape = ref.layer_forward(params, x, h0, c0, L, bidirectional, lengths)
    # dout past each length (which the forward zeroes) must not count
    dx, dh0, dc0, grads = ref.layer_backward(params, tape, weights[0], weights[1], weights[2])
    assert set(grads) == set(params)
    checks = [(params[name], grads[name], name) for name in params]
    checks += [(x, dx, "x"), (h0, dh0, "h0"), (c0, dc0, "c0")]
    for array, analytic, name in checks:
        numeric = plain_ref.numeric_grad(loss, array)
        # central differences of a smooth float64 loss: ~1e-9
        np.testing.assert_allclose(analytic, numeric, rtol=0, atol=1e-7, err_msg=name)
    assert not dx[3:, 1].any()                  # past sequence 1's length
    assert np.abs(grads["weight_hr_l1"]).max() > 1e-2


# --- fastrnn against the oracle ----------------------------------------------------------

CASES = [
    dict(T=5, B=3, D=4, H=6, P=3),
    dict(T=6, B=4, D=3, H=5, P=2, num_layers=2, bidirectional=True, batch_first=True,
         lengths=[3, 6, 1, 4]),                                   # unsorted, a length 1
    dict(T=4, B=2, D=5, H=7, P=4, num_layers=3, lengths=[2, 4], hx=False),
    dict(T=5, B=3, D=2, H=4, P=1, bidirectional=True, bias=False),
    dict(T=3, B=1, D=3, H=6, P=5, num_layers=3, bidirectional=True, batch_first=True,
         hx=False),
    dict(T=7, B=5, D=4, H=8, P=3, num_layers=2, bidirectional=True, lengths=[7, 2, 5, 1, 7]),
    dict(T=6, B=3, D=3, H=5, P=2, num_layers=2, batch_first=True, lengths=[6, 6, 6]),
]


def _case_id(case):
    return "-".join(f"{k}{v}" for k, v in case.items() if k in ("H", "P", "num_layers")) + \
        "".join(f"-{k}" for k in ("bidirectional", "batch_first", "lengths")
                if case.get(k)) + ("-nohx" if case.get("hx") is False else "") + \
        ("-nobias" if case.get("bias") is False else "")


def run_case(dtype, T, B, D, H, P, num_layers=1, bidirectional=False, batch_first=False,
             lengths=None, hx=True, bias=True, seed=0, dstate=True):
    """fastrnn's training forward and BPTT against the oracle's on the values
    the layer sees (its dtype's parameters, inputs and states)."""
    rng = np.random.default_rng(seed + 100)
    L, dirs = num_layers, 2 if bidirectional else 1
    layer = make(D, H, P, dtype, seed=seed, num_layers=L, bidirectional=bidirectional,
                 batch_first=batch_first, bias=bias)
    params = layer.state_dict()
    x = rng.normal(size=(T, B, D)).astype(dtype)
    h0 = rng.normal(size=(L * dirs, B, P)).astype(dtype)
    c0 = rng.normal(size=(L * dirs, B, H)).astype(dtype)
    state = (h0, c0) if hx else None
    x_in = np.ascontiguousarray(x.swapaxes(0, 1)) if batch_first else x
    (out, (h_n, c_n)), backprop = layer.forward_train(x_in, state, lengths=lengths)
    want_out, want_h, want_c, tape = ref.layer_forward(
        params, x, h0 if hx else None, c0 if hx else None, L, bidirectional, lengths)
    tol_f, tol_g = FORWARD_TOL[dtype], GRAD_TOL[dtype]
    assert out.dtype == h_n.dtype == c_n.dtype == np.dtype(dtype)
    got_out = out.swapaxes(0, 1) if batch_first else out
    assert_close(got_out, want_out, tol_f, "out")
    assert_close(h_n, want_h, tol_f, "h_n")
    assert_close(c_n, want_c, tol_f, "c_n")
    if lengths is not None:
        assert not (got_out * (1 - valid_steps(T, lengths, B))).any(), "padding not zero"
    # inference gives the training forward's numbers
    out_i, (h_i, c_i) = layer(x_in, state, lengths=lengths)
    assert_close(out_i, out, tol_f, "inference out")
    assert_close(h_i, h_n, tol_f, "inference h_n")
    assert_close(c_i, c_n, tol_f, "inference c_n")

    dout = rng.normal(size=want_out.shape).astype(dtype)  # padding's values ignored
    dh_n = rng.normal(size=want_h.shape).astype(dtype)
    dc_n = rng.normal(size=want_c.shape).astype(dtype)
    layer.zero_grad()
    dy = np.ascontiguousarray(dout.swapaxes(0, 1)) if batch_first else dout
    dx, (dh0, dc0) = backprop(dy, (dh_n, dc_n) if dstate else None)
    want_dx, want_dh0, want_dc0, grads = ref.layer_backward(
        params, tape, dout, dh_n if dstate else None, dc_n if dstate else None)
    assert_close(dx.swapaxes(0, 1) if batch_first else dx, want_dx, tol_g, "dx")
    assert_close(dh0, want_dh0, tol_g, "dh0")
    assert_close(dc0, want_dc0, tol_g, "dc0")
    assert set(layer.grads) == set(grads) == set(params)
    for name, grad in grads.items():
        assert_close(layer.grads[name], grad, tol_g, name)
        assert layer.grads[name].shape == params[name].shape
    return layer


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_layer_matches_oracle(dtype, case):
    run_case(dtype, **case)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_real_size_matches_oracle(dtype):
    """B = 32, T = 50, H = 128, P = 64, two bidirectional layers, lengths."""
    lengths = np.random.default_rng(7).integers(1, 51, 32)
    lengths[5] = 50
    run_case(dtype, T=50, B=32, D=40, H=128, P=64, num_layers=2, bidirectional=True,
             lengths=lengths, seed=7)


@st.composite
def _configurations(draw):
    H = draw(st.integers(2, 7))
    T, B = draw(st.integers(1, 6)), draw(st.integers(1, 4))
    lengths = draw(st.none() | st.lists(st.integers(1, T), min_size=B, max_size=B))
    return dict(dtype=draw(st.sampled_from(["float32", "float64"])), T=T, B=B,
                D=draw(st.integers(1, 4)), H=H, P=draw(st.integers(1, H - 1)),
                num_layers=draw(st.integers(1, 3)), bidirectional=draw(st.booleans()),
                batch_first=draw(st.booleans()), lengths=lengths, hx=draw(st.booleans()),
                bias=draw(st.booleans()), seed=draw(st.integers(0, 2**16)))


@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(_configurations())
def test_drawn_configurations_match_oracle(config):
    """hypothesis (derandomized, as tests/test_properties.py): sizes down to
    T = B = D = P = 1, H = 2, any stacking, layout, lengths, dtype."""
    run_case(**config)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_backprop_without_state_gradients(dtype):
    """dstate None, or a tuple with None parts, is zero there."""
    run_case(dtype, T=5, B=3, D=3, H=5, P=2, num_layers=2, bidirectional=True,
             lengths=[5, 2, 4], dstate=False)
    rng = np.random.default_rng(2)
    layer = make(3, 5, 2, dtype, num_layers=2, seed=3)
    params = layer.state_dict()
    x = rng.normal(size=(4, 2, 3)).astype(dtype)
    dout = rng.normal(size=(4, 2, 2)).astype(dtype)
    dh_n = rng.normal(size=(2, 2, 2)).astype(dtype)
    dc_n = rng.normal(size=(2, 2, 5)).astype(dtype)
    _, _, _, tape = ref.layer_forward(params, x, None, None, 2)
    for dstate, want_state in (((None, dc_n), (None, dc_n)), ((dh_n, None), (dh_n, None))):
        (_, _), backprop = layer.forward_train(x)
        layer.zero_grad()
        dx, (dh0, dc0) = backprop(dout, dstate)
        want_dx, want_dh0, want_dc0, grads = ref.layer_backward(params, tape, dout, *want_state)
        assert_close(dx, want_dx, GRAD_TOL[dtype], "dx")
        assert_close(dh0, want_dh0, GRAD_TOL[dtype], "dh0")
        assert_close(dc0, want_dc0, GRAD_TOL[dtype], "dc0")
        for name, grad in grads.items():
            assert_close(layer.grads[name], grad, GRAD_TOL[dtype], name)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("hx", [True, False])
def test_unbatched_matches_oracle(dtype, batch_first, hx):
    """x (T, D) -> out (T, dirs * P), h (L * dirs, P), c (L * dirs, H);
    batch_first does not apply to unbatched input (PyTorch's)."""
    rng = np.random.default_rng(4)
    T, D, H, P, L = 6, 3, 5, 2, 2
    layer = make(D, H, P, dtype, num_layers=L, bidirectional=True, batch_first=batch_first,
                 seed=5)
    params = layer.state_dict()
    x = rng.normal(size=(T, D)).astype(dtype)
    h0 = rng.normal(size=(2 * L, P)).astype(dtype)
    c0 = rng.normal(size=(2 * L, H)).astype(dtype)
    state = (h0, c0) if hx else None
    out, (h_n, c_n) = layer(x, state)
    assert out.shape == (T, 2 * P) and h_n.shape == (2 * L, P) and c_n.shape == (2 * L, H)
    want_out, want_h, want_c, tape = ref.layer_forward(
        params, x[:, None], h0[:, None] if hx else None, c0[:, None] if hx else None, L, True)
    tol_f, tol_g = FORWARD_TOL[dtype], GRAD_TOL[dtype]
    assert_close(out, want_out[:, 0], tol_f, "out")
    assert_close(h_n, want_h[:, 0], tol_f, "h_n")
    assert_close(c_n, want_c[:, 0], tol_f, "c_n")
    (out_t, (h_t, c_t)), backprop = layer.forward_train(x, state)
    assert_close(out_t, out, tol_f, "training out")
    dout = rng.normal(size=(T, 2 * P)).astype(dtype)
    dh_n = rng.normal(size=(2 * L, P)).astype(dtype)
    dc_n = rng.normal(size=(2 * L, H)).astype(dtype)
    layer.zero_grad()
    dx, (dh0, dc0) = backprop(dout, (dh_n, dc_n))
    assert dx.shape == (T, D) and dh0.shape == (2 * L, P) and dc0.shape == (2 * L, H)
    want_dx, want_dh0, want_dc0, grads = ref.layer_backward(params, tape, dout[:, None],
                                                            dh_n[:, None], dc_n[:, None])
    assert_close(dx, want_dx[:, 0], tol_g, "dx")
    assert_close(dh0, want_dh0[:, 0], tol_g, "dh0")
    assert_close(dc0, want_dc0[:, 0], tol_g, "dc0")
    for name, grad in grads.items():
        assert_close(layer.grads[name], grad, tol_g, name)


def test_padding_values_never_reach_outputs_or_gradients():
    layer = make(2, 4, 2, num_layers=2, bidirectional=True, seed=0)
    x = np.random.default_rng(2).normal(size=(5, 2, 2))
    x_nan = x.copy()
    x_nan[3:, 1] = np.nan                                   # padding of sequence 1
    dout = np.random.default_rng(3).normal(size=(5, 2, 4))
    results = []
    for inp in (x, x_nan):
        layer.zero_grad()
        (out, (h, c)), backprop = layer.forward_train(inp, lengths=[5, 3])
        dx, (dh0, dc0) = backprop(dout)
        results.append([out, h, c, np.nan_to_num(dx, nan=7.0), dh0, dc0]
                       + [g.copy() for g in layer.grads.values()])
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)
    assert not results[0][3][3:, 1].any()                    # no gradient into padding


def test_gradients_accumulate_until_zero_grad():
    layer = make(3, 5, 2, num_layers=2, bidirectional=True, seed=1)
    x = np.random.default_rng(4).normal(size=(4, 2, 3))
    dout = np.random.default_rng(5).normal(size=(4, 2, 4))
    layer.zero_grad()
    for _ in range(2):
        (_, _), backprop = layer.forward_train(x)
        backprop(dout)
    twice = {n: g.copy() for n, g in layer.grads.items()}
    layer.zero_grad()
    assert all(not g.any() for g in layer.grads.values())
    (_, _), backprop = layer.forward_train(x)
    backprop(dout)
    for name, grad in layer.grads.items():
        np.testing.assert_allclose(twice[name], 2 * grad, rtol=1e-13, atol=0, err_msg=name)


def test_empty_batch_has_the_projected_shapes():
    layer = make(3, 5, 2, "float32", num_layers=2, bidirectional=True)
    out, (h, c) = layer(np.zeros((4, 0, 3), np.float32))
    assert out.shape == (4, 0, 4) and h.shape == (4, 0, 2) and c.shape == (4, 0, 5)


def test_proj_size_zero_is_the_plain_lstm():
    rng = np.random.default_rng(6)
    kw = dict(num_layers=2, bidirectional=True, dtype="float64", seed=8)
    zero, plain = fastrnn.LSTM(3, 5, proj_size=0, **kw), fastrnn.LSTM(3, 5, **kw)
    assert list(zero.state_dict()) == list(plain.state_dict())
    for (name, a), b in zip(zero.state_dict().items(), plain.state_dict().values()):
        np.testing.assert_array_equal(a, b, err_msg=name)
    x = rng.normal(size=(4, 2, 3))
    (out, (h, c)), (out2, (h2, c2)) = zero(x, lengths=[4, 2]), plain(x, lengths=[4, 2])
    for a, b in ((out, out2), (h, h2), (c, c2)):
        np.testing.assert_array_equal(a, b)
    assert repr(zero) == repr(plain)


# --- parameters --------------------------------------------------------------------------

def test_parameters_names_shapes_order_and_initial_values():
    D, H, P, L = 3, 7, 4, 3
    layer = make(D, H, P, "float32", seed=11, num_layers=L, bidirectional=True)
    state = layer.state_dict()
    want = [n for k in range(L) for d in range(2) for n in ref.names(k, d).values()]
    assert list(state) == want                      # PyTorch's order
    for k in range(L):
        d_in = D if k == 0 else 2 * P
        for d in range(2):
            n = ref.names(k, d)
            assert state[n["w_ih"]].shape == (4 * H, d_in)
            assert state[n["w_hh"]].shape == (4 * H, P)
            assert state[n["b_ih"]].shape == state[n["b_hh"]].shape == (4 * H,)
            assert state[n["w_hr"]].shape == (P, H)
    bound = 1 / np.sqrt(H)
    for name, value in state.items():
        assert value.dtype == np.float32
        assert np.abs(value).max() <= bound, name
        assert np.abs(value).max() > 0.5 * bound, name     # drawn, not zero
    assert set(layer.grads) == set(state)
    for name, grad in layer.grads.items():
        assert grad.shape == state[name].shape and not grad.any()
    # seeded: the same parameters again, other ones for another seed
    again = make(D, H, P, "float32", seed=11, num_layers=L, bidirectional=True).state_dict()
    other = make(D, H, P, "float32", seed=12, num_layers=L, bidirectional=True).state_dict()
    for name in state:
        np.testing.assert_array_equal(again[name], state[name])
    assert not np.array_equal(other["weight_hr_l0"], state["weight_hr_l0"])
    nobias = make(D, H, P, bias=False)
    assert list(nobias.state_dict()) == ["weight_ih_l0", "weight_hh_l0", "weight_hr_l0"]


def test_repr_and_torch_state_dict_names():
    layer = make(3, 5, 2, "float32", num_layers=2, bidirectional=True)
    assert "proj_size=2" in repr(layer)
    torch = pytest.importorskip("torch")
    module = torch.nn.LSTM(3, 5, num_layers=2, bidirectional=True, proj_size=2)
    assert list(layer.state_dict()) == list(module.state_dict())
    for name, value in module.state_dict().items():
        assert layer.state_dict()[name].shape == tuple(value.shape), name
    layer.load_state_dict(module.state_dict())     # PyTorch's state_dict loads directly


# --- finite differences of fastrnn's own float64 gradients ----------------------------------

def _finite_difference_check(layer, loss, names, atol=1e-7):
    """Central differences of loss() by perturbing each entry of each named
    parameter through load_state_dict, against layer.grads (already filled)."""
    state = layer.state_dict()
    eps = 1e-6
    for name in names:
        grad = layer.grads[name].copy()
        numeric = np.zeros(grad.shape)
        for index in np.ndindex(grad.shape):
            value = state[name].copy()
            value[index] += eps
            layer.load_state_dict({name: value}, strict=False)
            up = loss()
            value[index] -= 2 * eps
            layer.load_state_dict({name: value}, strict=False)
            down = loss()
            numeric[index] = (up - down) / (2 * eps)
        layer.load_state_dict({name: state[name]}, strict=False)
        # central differences of a smooth float64 loss: ~1e-9
        np.testing.assert_allclose(grad, numeric, rtol=0, atol=atol, err_msg=name)
        assert np.abs(numeric).max() > 1e-3, f"{name}: acts on the loss"


@pytest.mark.parametrize("bidirectional", [False, True])
def test_finite_differences_of_every_parameter(bidirectional):
    """Every parameter (weight_hr above all) and x, h0, c0: forward_train's
    backprop against central differences of the layer's own forward."""
    rng = np.random.default_rng(13)
    T, B, D, H, P, L = 4, 3, 3, 4, 2, 2
    dirs = 2 if bidirectional else 1
    layer = make(D, H, P, num_layers=L, bidirectional=bidirectional, batch_first=True, seed=5)
    x = rng.normal(size=(B, T, D))
    h0 = rng.normal(size=(L * dirs, B, P))
    c0 = rng.normal(size=(L * dirs, B, H))
    lengths = [4, 2, 3]
    w_out = rng.normal(size=(B, T, dirs * P))
    w_h, w_c = rng.normal(size=h0.shape), rng.normal(size=c0.shape)

    def loss():
        out, (h_n, c_n) = layer(x, (h0, c0), lengths=lengths)
        return np.sum(out * w_out) + np.sum(h_n * w_h) + np.sum(c_n * w_c)

    layer.zero_grad()
    (_, _), backprop = layer.forward_train(x, (h0, c0), lengths=lengths)
    dx, (dh0, dc0) = backprop(w_out, (w_h, w_c))
    _finite_difference_check(layer, loss, list(layer.state_dict()))
    for array, analytic, name in ((x, dx, "x"), (h0, dh0, "h0"), (c0, dc0, "c0")):
        np.testing.assert_allclose(analytic, plain_ref.numeric_grad(loss, array), rtol=0,
                                   atol=1e-7, err_msg=name)


# --- learned initial states ---------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_learned_initial_state(dtype):
    """learn_initial_state=True: initial_h_l{k} (P,) and initial_c_l{k} (H,);
    a call without hx starts from them, their gradients are the sums over
    the batch of dh0 and dc0; finite differences of them (float64)."""
    rng = np.random.default_rng(29)
    T, B, D, H, P, L = 5, 3, 4, 6, 3, 2
    layer = make(D, H, P, dtype, num_layers=L, bidirectional=True, learn_initial_state=True,
                 seed=13)
    state = layer.state_dict()
    for k in range(L):
        for d in range(2):
            h_name, c_name = ref.state_names(k, d)
            assert state[h_name].shape == (P,) and state[c_name].shape == (H,)
            assert not state[h_name].any() and not state[c_name].any()   # zeros at first
            state[h_name] = rng.normal(size=P).astype(dtype)
            state[c_name] = rng.normal(size=H).astype(dtype)
    layer.load_state_dict(state)
    plain = make(D, H, P, dtype, num_layers=L, bidirectional=True, seed=13)
    for name, value in plain.state_dict().items():   # the same draws for the rest
        np.testing.assert_array_equal(state[name], value, err_msg=name)
    order = [ref.state_names(k, d) for k in range(L) for d in range(2)]
    h0 = np.stack([state[h] for h, _ in order])[:, None].repeat(B, 1)
    c0 = np.stack([state[c] for _, c in order])[:, None].repeat(B, 1)
    x = rng.normal(size=(T, B, D)).astype(dtype)
    lengths = np.array([5, 2, 4])
    tol_f, tol_g = FORWARD_TOL[dtype], GRAD_TOL[dtype]
    (out, (h_n, c_n)), backprop = layer.forward_train(x, lengths=lengths)
    want_out, want_h, want_c, tape = ref.layer_forward(state, x, h0, c0, L, True, lengths)
    assert_close(out, want_out, tol_f, "out")
    assert_close(h_n, want_h, tol_f, "h_n")
    assert_close(c_n, want_c, tol_f, "c_n")
    assert_close(layer(x, lengths=lengths)[0], want_out, tol_f, "inference")
    assert_close(layer(x)[0], ref.layer_forward(state, x, h0, c0, L, True)[0], tol_f,
                 "inference without lengths")
    dout = rng.normal(size=out.shape).astype(dtype)
    dh_n = rng.normal(size=h_n.shape).astype(dtype)
    layer.zero_grad()
    dx, (dh0, dc0) = backprop(dout, (dh_n, None))
    want_dx, want_dh0, want_dc0, grads = ref.layer_backward(state, tape, dout, dh_n, None)
    assert_close(dx, want_dx, tol_g, "dx")
    assert_close(dh0, want_dh0, tol_g, "dh0")
    assert_close(dc0, want_dc0, tol_g, "dc0")
    for name, grad in grads.items():
        assert_close(layer.grads[name], grad, tol_g, name)
    for i, (h_name, c_name) in enumerate(order):
        assert_close(layer.grads[h_name], want_dh0[i].sum(axis=0), tol_g, h_name)
        assert_close(layer.grads[c_name], want_dc0[i].sum(axis=0), tol_g, c_name)
    # with hx given, the learned states neither act nor get gradients
    zeros = (np.zeros((2 * L, B, P), dtype), np.zeros((2 * L, B, H), dtype))
    (out0, _), backprop0 = layer.forward_train(x, zeros, lengths=lengths)
    assert_close(out0, ref.layer_forward(state, x, None, None, L, True, lengths)[0], tol_f,
                 "hx given")
    layer.zero_grad()
    backprop0(dout)
    for h_name, c_name in order:
        assert not layer.grads[h_name].any() and not layer.grads[c_name].any()
    if dtype == "float64":
        def loss():
            o, (h, _) = layer(x, lengths=lengths)
            return np.sum(o * dout) + np.sum(h * dh_n)

        layer.zero_grad()
        (_, _), backprop = layer.forward_train(x, lengths=lengths)
        backprop(dout, (dh_n, None))
        _finite_difference_check(layer, loss, [n for pair in order for n in pair]
                                 + ["weight_hr_l0", "weight_hr_l1_reverse"])


# --- PyTorch: from_torch, to_torch -------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("batch_first,use_lengths", [(False, True), (True, False),
                                                     (True, True)])
def test_from_torch_matches_torch_forward_and_gradients(dtype, batch_first, use_lengths):
    torch = pytest.importorskip("torch")
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
    torch.manual_seed(0)
    rng = np.random.default_rng(31)
    T, B, D, H, P, L = 6, 4, 3, 7, 3, 2
    tdtype = {"float32": torch.float32, "float64": torch.float64}[dtype]
    module = torch.nn.LSTM(D, H, num_layers=L, bidirectional=True, batch_first=batch_first,
                           proj_size=P, dtype=tdtype)
    layer = fastrnn.from_torch(module)
    assert isinstance(layer, fastrnn.LSTM)
    assert layer.dtype == np.dtype(dtype)
    for name, value in module.state_dict().items():
        np.testing.assert_array_equal(layer.state_dict()[name], value.numpy(), err_msg=name)
    x = rng.normal(size=(B, T, D) if batch_first else (T, B, D)).astype(dtype)
    h0 = rng.normal(size=(2 * L, B, P)).astype(dtype)
    c0 = rng.normal(size=(2 * L, B, H)).astype(dtype)
    lengths = np.array([6, 3, 1, 5]) if use_lengths else None
    tx, th0, tc0 = (torch.tensor(a, requires_grad=True) for a in (x, h0, c0))
    inp = tx
    if use_lengths:
        inp = pack_padded_sequence(tx, torch.as_tensor(lengths), batch_first=batch_first,
                                   enforce_sorted=False)
    t_out, (t_h, t_c) = module(inp, (th0, tc0))
    if use_lengths:
        t_out, _ = pad_packed_sequence(t_out, batch_first=batch_first, total_length=T)
    w_out = rng.normal(size=tuple(t_out.shape)).astype(dtype)
    w_h = rng.normal(size=h0.shape).astype(dtype)
    w_c = rng.normal(size=c0.shape).astype(dtype)
    loss = ((t_out * torch.from_numpy(w_out)).sum() + (t_h * torch.from_numpy(w_h)).sum()
            + (t_c * torch.from_numpy(w_c)).sum())
    loss.backward()

    (out, (h_n, c_n)), backprop = layer.forward_train(x, (h0, c0), lengths=lengths)
    tol_f, tol_g = FORWARD_TOL[dtype], GRAD_TOL[dtype]
    assert_close(out, t_out.detach().numpy(), tol_f, "out")
    assert_close(h_n, t_h.detach().numpy(), tol_f, "h_n")
    assert_close(c_n, t_c.detach().numpy(), tol_f, "c_n")
    out_i, _ = layer(x, (h0, c0), lengths=lengths)
    assert_close(out_i, t_out.detach().numpy(), tol_f, "inference out")
    layer.zero_grad()
    dx, (dh0, dc0) = backprop(w_out, (w_h, w_c))
    assert_close(dx, tx.grad.numpy(), tol_g, "dx")
    assert_close(dh0, th0.grad.numpy(), tol_g, "dh0")
    assert_close(dc0, tc0.grad.numpy(), tol_g, "dc0")
    for name, p in module.named_parameters():
        assert_close(layer.grads[name], p.grad.numpy(), tol_g, name)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_to_torch_round_trip(dtype):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(37)
    layer = make(4, 6, 2, dtype, num_layers=3, bidirectional=True, batch_first=True,
                 bias=False, seed=9)
    module = fastrnn.to_torch(layer)
    assert isinstance(module, torch.nn.LSTM)
    assert (module.proj_size, module.hidden_size, module.num_layers, module.bidirectional,
            module.batch_first, module.bias) == (2, 6, 3, True, True, False)
    assert next(module.parameters()).dtype == {"float32": torch.float32,
                                                "float64": torch.float64}[dtype]
    assert list(module.state_dict()) == list(layer.state_dict())
    for name, value in module.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), layer.state_dict()[name], err_msg=name)
    x = rng.normal(size=(3, 5, 4)).astype(dtype)
    with torch.no_grad():
        t_out, (t_h, t_c) = module(torch.from_numpy(x))
    out, (h_n, c_n) = layer(x)
    assert_close(out, t_out.numpy(), FORWARD_TOL[dtype], "out")
    assert_close(h_n, t_h.numpy(), FORWARD_TOL[dtype], "h_n")
    assert_close(c_n, t_c.numpy(), FORWARD_TOL[dtype], "c_n")
    back = fastrnn.from_torch(module)
    assert repr(back) == repr(layer)
    for (name, a), (name2, b) in zip(back.state_dict().items(), layer.state_dict().items()):
        assert name == name2
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(back(x)[0], out)


def test_to_torch_refuses_training_options_of_a_projected_lstm():
    pytest.importorskip("torch")
    with pytest.raises(ValueError, match="learn_initial_state"):
        fastrnn.to_torch(make(3, 5, 2, learn_initial_state=True))


# --- errors and refused options -----------------------------------------------------------

@pytest.mark.parametrize("value", [-1, -5, 8, 9, 100])
def test_proj_size_out_of_range_is_refused(value):
    with pytest.raises(ValueError, match="proj_size"):
        fastrnn.LSTM(4, 8, proj_size=value)


@pytest.mark.parametrize("value", [2.0, 2.5, "3", None, True, False, [2]])
def test_proj_size_of_a_wrong_type_is_refused(value):
    with pytest.raises((TypeError, ValueError), match="proj_size"):
        fastrnn.LSTM(4, 8, proj_size=value)


def test_proj_size_accepts_numpy_integers_and_the_largest_value():
    # any integral value, as hidden_size (_validation.check_int: numbers.Integral)
    layer = fastrnn.LSTM(4, 8, proj_size=np.int64(3))
    assert layer.state_dict()["weight_hr_l0"].shape == (3, 8)
    assert fastrnn.LSTM(4, 8, proj_size=7).state_dict()["weight_hr_l0"].shape == (7, 8)
    assert fastrnn.LSTM(4, 1, proj_size=0).state_dict()["weight_hh_l0"].shape == (4, 1)


@pytest.mark.parametrize("option", [
    dict(activation="softsign"), dict(recurrent_activation="hard_sigmoid"),
    dict(cell_activation="softsign"), dict(clip=2.0), dict(input_forget=True),
    dict(peepholes=True), dict(zoneout=0.1), dict(zoneout=(0.1, 0.2)), dict(input_dropout=0.2),
    dict(recurrent_dropout=0.1), dict(layer_norm=True)], ids=lambda o: next(iter(o)))
def test_options_that_cannot_go_with_a_projection_are_refused(option):
    (name, _), = option.items()
    with pytest.raises(ValueError) as info:
        fastrnn.LSTM(3, 6, proj_size=2, **option)
    assert "proj_size" in str(info.value) and name in str(info.value), str(info.value)


def test_the_options_that_go_with_a_projection_are_accepted():
    layer = fastrnn.LSTM(3, 6, num_layers=2, bidirectional=True, batch_first=True, dropout=0.3,
                         proj_size=2, learn_initial_state=True, weight_dropout=0.2, seed=0)
    out, (h, c) = layer(np.zeros((2, 4, 3), np.float32))
    assert out.shape == (2, 4, 4) and h.shape == (4, 2, 2) and c.shape == (4, 2, 6)


@pytest.mark.parametrize("batched", [True, False])
def test_wrong_state_shapes_are_refused_by_name(batched):
    from fastrnn._validation import shape_str
    L, B, H, P = 2, 3, 5, 2
    layer = make(4, H, P, "float32", num_layers=L, bidirectional=True)
    x = np.zeros((6, B, 4) if batched else (6, 4), np.float32)
    h_shape = (2 * L, B, P) if batched else (2 * L, P)
    c_shape = (2 * L, B, H) if batched else (2 * L, H)
    good_h, good_c = np.zeros(h_shape), np.zeros(c_shape)
    bad_h = np.zeros(c_shape)              # h of the hidden size instead of P
    bad_c = np.zeros(h_shape)              # c of the projection size instead of H
    for hx, name, shape in (((bad_h, good_c), "h_0", h_shape), ((good_h, bad_c), "c_0", c_shape),
                            ((good_h[:1], good_c), "h_0", h_shape)):
        for call in (layer, layer.forward_train):
            with pytest.raises(ValueError, match=f"{name}.*{re.escape(shape_str(shape))}"):
                call(x, hx)
    out, (h, c) = layer(x, (good_h, good_c))
    assert h.shape == h_shape and c.shape == c_shape
    assert out.shape == x.shape[:-1] + (2 * P,)


def test_wrong_gradient_shapes_are_refused():
    layer = make(4, 5, 2, "float32", num_layers=2)
    (out, (h, c)), backprop = layer.forward_train(np.zeros((6, 3, 4), np.float32))
    assert out.shape == (6, 3, 2)
    with pytest.raises(ValueError):
        backprop(np.zeros((6, 3, 5)))               # dout of width H instead of P
    (_, _), backprop = layer.forward_train(np.zeros((6, 3, 4), np.float32))
    with pytest.raises(ValueError):
        backprop(np.zeros((6, 3, 2)), (np.zeros((2, 3, 5)), None))   # dh_n of width H


def test_second_layer_input_size_is_checked_on_load():
    layer = make(4, 5, 2, "float32", num_layers=2)
    state = layer.state_dict()
    state["weight_ih_l1"] = np.zeros((20, 5), np.float32)   # the plain LSTM's (4H, H)
    with pytest.raises(ValueError, match="weight_ih_l1"):
        layer.load_state_dict(state)


def test_to_onnx_and_quantize_refuse_a_projection(tmp_path):
    layer = make(3, 6, 2, "float32", num_layers=2, bidirectional=True)
    with pytest.raises(ValueError, match="proj_size"):
        fastrnn.to_onnx(layer, str(tmp_path / "x.onnx"))
    assert not (tmp_path / "x.onnx").exists()
    with pytest.raises(ValueError, match="proj_size"):
        fastrnn.quantize(layer)
    with pytest.raises(ValueError, match="proj_size"):
        fastrnn.quantize(layer, dtype="bfloat16")
    model = fastrnn.Sequential([fastrnn.LSTM(3, 6, batch_first=True, proj_size=2, seed=0),
                                fastrnn.LastStep(), fastrnn.Linear(2, 1, seed=1)])
    with pytest.raises(ValueError, match="proj_size"):
        fastrnn.quantize(model)


# --- files, pickling, copies --------------------------------------------------------------

def _assert_same_module(copy_, module, x, hx=None):
    assert repr(copy_) == repr(module)
    assert list(copy_.state_dict()) == list(module.state_dict())
    for (name, a), b in zip(module.state_dict().items(), copy_.state_dict().values()):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b, err_msg=name)
    got, (gh, gc) = copy_(x, hx)
    want, (wh, wc) = module(x, hx)
    for a, b in ((got, want), (gh, wh), (gc, wc)):
        np.testing.assert_array_equal(a, b)


def _modules():
    return [make(4, 6, 3, "float64", num_layers=2, bidirectional=True, batch_first=True,
                 seed=6),
            make(4, 5, 1, "float32", num_layers=3, bias=False, learn_initial_state=True,
                 weight_dropout=0.3, dropout=0.2, seed=7)]


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_save_and_load(suffix, tmp_path):
    rng = np.random.default_rng(17)
    for i, module in enumerate(_modules()):
        if any(n.startswith("initial_") for n in module.state_dict()):
            module.load_state_dict({n: rng.normal(size=v.shape) for n, v in
                                    module.state_dict().items() if n.startswith("initial_")},
                                   strict=False)
        x = rng.normal(size=(2, 5, 4) if i == 0 else (5, 2, 4)).astype(module.dtype)
        for path, save in ((tmp_path / f"m{i}{suffix}", module.save),
                           (tmp_path / f"f{i}{suffix}", lambda p: fastrnn.save(module, p))):
            save(path)
            loaded = fastrnn.load(path)
            _assert_same_module(loaded, module, x)
            # the random state travels: the same training forward (dropout masks)
            (a, _), _ = loaded.forward_train(x)
            (b, _), _ = copy.deepcopy(module).forward_train(x)
            np.testing.assert_array_equal(a, b)


def test_pickle_and_deepcopy():
    rng = np.random.default_rng(18)
    for i, module in enumerate(_modules()):
        x = rng.normal(size=(2, 5, 4) if i == 0 else (5, 2, 4)).astype(module.dtype)
        for copy_ in (pickle.loads(pickle.dumps(module)), copy.deepcopy(module)):
            _assert_same_module(copy_, module, x)
            (a, _), _ = copy_.forward_train(x)
            (b, _), _ = copy.deepcopy(module).forward_train(x)
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_sequential_model_with_a_projection(suffix, tmp_path):
    """A projected LSTM feeds P values a step to the next layer."""
    rng = np.random.default_rng(19)
    model = fastrnn.Sequential([fastrnn.LSTM(4, 6, batch_first=True, proj_size=2, seed=8),
                                fastrnn.LSTM(2, 5, batch_first=True, proj_size=3, seed=9),
                                fastrnn.LastStep(), fastrnn.Linear(3, 1, seed=10)])
    x = rng.normal(size=(3, 5, 4)).astype(np.float32)
    got = model.predict(x)
    assert got.shape == (3, 1)
    path = tmp_path / f"model{suffix}"
    fastrnn.save(model, path)
    np.testing.assert_array_equal(fastrnn.load(path).predict(x), got)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(model)).predict(x), got)


def test_a_sequential_model_with_a_projection_learns():
    """fit trains every parameter through the projection: a running sum
    (the mean of the first feature) learnt to well below the constant
    predictor's error."""
    from fastrnn import optim
    rng = np.random.default_rng(20)
    x = rng.uniform(-1, 1, size=(512, 8, 2)).astype(np.float32)
    y = x[:, :, :1].mean(axis=1) * 3
    model = fastrnn.Sequential([fastrnn.LSTM(2, 12, batch_first=True, proj_size=4, seed=11),
                                fastrnn.LastStep(), fastrnn.Linear(4, 1, seed=12)], seed=13)
    before = {n: v.copy() for n, v in model.layers[0].state_dict().items()}
    model.compile(loss="mse", optimizer=optim.Adam(lr=2e-2))
    history = model.fit(x, y, epochs=6, batch_size=32, verbose=0)
    trivial = float(np.mean((y - y.mean()) ** 2))
    assert history.history["loss"][-1] < 0.1 * trivial, (history.history["loss"], trivial)
    for name, value in model.layers[0].state_dict().items():
        assert np.abs(value - before[name]).max() > 1e-3, f"{name} did not change"


def test_a_masked_sequential_model_with_a_projection_trains():
    """Masking (Keras' masks) before a projected LSTM, trained by fit: the
    masked BPTT runs (the state gradients P and H wide) and the loss falls."""
    from fastrnn import optim
    rng = np.random.default_rng(21)
    x = rng.uniform(-1, 1, size=(128, 8, 2)).astype(np.float32)
    for b, n in enumerate(rng.integers(3, 9, 128)):
        x[b, n:] = 0.0                                   # right padding, masked
    y = x[:, :, :1].sum(axis=1)
    model = fastrnn.Sequential([fastrnn.Masking(0.0),
                                fastrnn.LSTM(2, 12, batch_first=True, proj_size=4, seed=11),
                                fastrnn.LastStep(), fastrnn.Linear(4, 1, seed=12)], seed=13)
    model.compile(loss="mse", optimizer=optim.Adam(lr=2e-2))
    history = model.fit(x, y, epochs=6, batch_size=32, verbose=0)
    # the plain LSTM(2, 8, 12 or 16) here: from ~1.3 to 0.07-0.32 in 6 epochs
    assert history.history["loss"][-1] < 0.5 * history.history["loss"][0], history.history


# --- streaming and wrappers --------------------------------------------------------------

@pytest.mark.parametrize("batch_first", [False, True])
def test_stream_chunks_equal_one_call(batch_first):
    rng = np.random.default_rng(0)
    T, B, H, P, L = 17, 3, 6, 2, 2
    layer = make(3, H, P, "float64", num_layers=L, batch_first=batch_first, seed=1)
    x = rng.normal(size=(B, T, 3) if batch_first else (T, B, 3))
    whole, (h_n, c_n) = layer(x)
    stream = fastrnn.Stream(layer)
    pieces, cuts = [], [0, 1, 4, 11, T]
    for t0, t1 in zip(cuts[:-1], cuts[1:]):
        pieces.append(stream(x[:, t0:t1] if batch_first else x[t0:t1]))
    got = np.concatenate(pieces, axis=1 if batch_first else 0)
    np.testing.assert_allclose(got, whole, rtol=0, atol=1e-13)
    h, c = stream.state[0]
    assert h.shape == (L, B, P) and c.shape == (L, B, H)
    np.testing.assert_allclose(h, h_n, rtol=0, atol=1e-13)
    np.testing.assert_allclose(c, c_n, rtol=0, atol=1e-13)


def test_stream_frames_equal_one_call_and_state_round_trips():
    rng = np.random.default_rng(1)
    layer = make(4, 6, 3, "float32", num_layers=2, learn_initial_state=True, seed=2)
    layer.load_state_dict({n: rng.normal(size=v.shape) for n, v in layer.state_dict().items()
                           if n.startswith("initial_")}, strict=False)
    x = rng.normal(size=(12, 4)).astype(np.float32)           # one unbatched stream
    whole, _ = layer(x)
    stream = fastrnn.Stream(layer)
    outs = [stream.step(frame) for frame in x[:5]]
    checkpoint = stream.state
    outs += [stream.step(frame) for frame in x[5:]]
    assert_close(np.array(outs), whole, FORWARD_TOL["float32"], "frames")
    stream.state = checkpoint
    again = [stream.step(frame) for frame in x[5:]]
    assert_close(np.array(again), whole[5:], FORWARD_TOL["float32"], "resumed")
    copy_ = pickle.loads(pickle.dumps(stream))
    stream.state = checkpoint
    copy_.state = checkpoint
    np.testing.assert_array_equal(copy_.step(x[5]), stream.step(x[5]))
    stream.reset()
    assert_close(stream.step(x[0]), whole[0], FORWARD_TOL["float32"], "reset")


def test_a_masked_model_streams():
    """Masking before a projected LSTM: a skipped step carries the state and
    repeats the last read output (P wide), across chunks as in one call."""
    x = np.random.default_rng(1).standard_normal((2, 7, 3)).astype(np.float32)
    x[0, 2:4] = 0.0
    x[1, :2] = 0.0
    model = fastrnn.Sequential([fastrnn.Masking(0.0), fastrnn.LSTM(3, 5, batch_first=True,
                                                                   proj_size=2, seed=3)])
    whole = model(x)
    assert whole.shape == (2, 7, 2)
    np.testing.assert_array_equal(whole[0, 2:4], whole[0, [1, 1]])   # repeated
    stream = fastrnn.Stream(model)
    chunks = np.concatenate([stream(x[:, :3]), stream(x[:, 3:])], axis=1)
    assert_close(chunks, whole, FORWARD_TOL["float32"], "chunks")
    stream.reset()
    assert_close(stream(x), whole, FORWARD_TOL["float32"], "after reset")


def test_stateful_and_reversed_wrappers():
    rng = np.random.default_rng(23)
    layer = make(3, 5, 2, "float64", num_layers=2, batch_first=True, seed=12)
    x = rng.normal(size=(3, 6, 3))
    stateful = fastrnn.Stateful(layer)
    stateful(x[:, :3])
    second, _ = stateful(x[:, 3:])
    whole, _ = layer(x)
    assert_close(second, whole[:, 3:], 1e-12, "stateful")
    backwards, _ = fastrnn.Reversed(layer)(x)
    flipped, _ = layer(x[:, ::-1])
    assert_close(backwards, flipped[:, ::-1], 1e-12, "reversed")


# --- masks --------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_right_padded_mask_is_lengths(dtype):
    """A mask of each row's first lengths[b] steps: with zero_output_for_mask,
    the oracle with those lengths, forward and gradients; without, the
    forward direction repeats its last read output and the reverse one
    (whose first read step comes after) shows zeros (Keras')."""
    rng = np.random.default_rng(41)
    T, B, D, H, P, L = 6, 4, 3, 5, 2, 2
    layer = make(D, H, P, dtype, num_layers=L, bidirectional=True, batch_first=True, seed=3)
    params = layer.state_dict()
    x = rng.normal(size=(T, B, D)).astype(dtype)
    h0 = rng.normal(size=(2 * L, B, P)).astype(dtype)
    c0 = rng.normal(size=(2 * L, B, H)).astype(dtype)
    lengths = np.array([6, 2, 4, 1])
    mask = np.arange(T)[None, :] < lengths[:, None]
    xb = np.ascontiguousarray(x.swapaxes(0, 1))
    want_out, want_h, want_c, tape = ref.layer_forward(params, x, h0, c0, L, True, lengths)
    tol_f, tol_g = FORWARD_TOL[dtype], GRAD_TOL[dtype]
    (out, (h_n, c_n)), backprop = layer.forward_train(xb, (h0, c0), mask=mask,
                                                      zero_output_for_mask=True)
    assert_close(out.swapaxes(0, 1), want_out, tol_f, "out")
    assert_close(h_n, want_h, tol_f, "h_n")
    assert_close(c_n, want_c, tol_f, "c_n")
    dout = rng.normal(size=out.shape).astype(dtype)
    dh_n = rng.normal(size=h_n.shape).astype(dtype)
    layer.zero_grad()
    dx, (dh0, dc0) = backprop(dout, (dh_n, None))
    want_dx, want_dh0, want_dc0, grads = ref.layer_backward(
        params, tape, dout.swapaxes(0, 1) * valid_steps(T, lengths, B), dh_n, None)
    assert_close(dx.swapaxes(0, 1), want_dx, tol_g, "dx")
    assert_close(dh0, want_dh0, tol_g, "dh0")
    assert_close(dc0, want_dc0, tol_g, "dc0")
    for name, grad in grads.items():
        assert_close(layer.grads[name], grad, tol_g, name)
    zeroed, (h_z, c_z) = layer(xb, (h0, c0), mask=mask, zero_output_for_mask=True)
    assert_close(zeroed.swapaxes(0, 1), want_out, tol_f, "inference out")
    assert_close(h_z, want_h, tol_f, "inference h_n")
    repeated, (h2, c2) = layer(xb, (h0, c0), mask=mask)
    np.testing.assert_array_equal(h2, h_z)
    np.testing.assert_array_equal(c2, c_z)
    for b, n in enumerate(lengths):
        np.testing.assert_array_equal(repeated[b, :n], zeroed[b, :n])
        np.testing.assert_array_equal(repeated[b, n:, :P],
                                      np.broadcast_to(zeroed[b, n - 1, :P], (T - n, P)))
        assert not repeated[b, n:, P:].any()


def test_mask_with_holes_matches_the_packed_oracle():
    """Left padding, holes, an empty row: the state carried over a skipped
    step, so each row equals the oracle over its read steps alone."""
    rng = np.random.default_rng(43)
    T, B, D, H, P, L = 6, 4, 3, 5, 2, 2
    layer = make(D, H, P, "float64", num_layers=L, bidirectional=True, batch_first=True, seed=4)
    params = layer.state_dict()
    x = rng.normal(size=(B, T, D))
    h0 = rng.normal(size=(2 * L, B, P))
    c0 = rng.normal(size=(2 * L, B, H))
    mask = np.array([np.arange(T) >= 2, np.arange(T) % 2 == 0, np.zeros(T, bool),
                     np.ones(T, bool)])
    out, (h_n, c_n) = layer(x, (h0, c0), mask=mask, zero_output_for_mask=True)
    for b in range(B):
        steps = np.flatnonzero(mask[b])
        if steps.size == 0:        # nothing read: the initial state, zero outputs
            np.testing.assert_array_equal(h_n[:, b], h0[:, b])
            np.testing.assert_array_equal(c_n[:, b], c0[:, b])
            assert not out[b].any()
            continue
        w_out, w_h, w_c, _ = ref.layer_forward(params, x[b, steps][:, None], h0[:, b:b + 1],
                                               c0[:, b:b + 1], L, True)
        want = np.zeros((T, 2 * P))
        want[steps] = w_out[:, 0]
        assert_close(out[b], want, 1e-12, f"out row {b}")
        assert_close(h_n[:, b], w_h[:, 0], 1e-12, f"h_n row {b}")
        assert_close(c_n[:, b], w_c[:, 0], 1e-12, f"c_n row {b}")


# --- dropout between layers, DropConnect --------------------------------------------------

def test_dropout_only_in_training_and_seeded():
    rng = np.random.default_rng(47)
    maker = lambda: make(3, 8, 3, "float64", num_layers=3, bidirectional=True,  # noqa: E731
                         dropout=0.5, seed=7)
    x = rng.normal(size=(5, 4, 3))
    a, b = maker(), maker()
    inference, (h_i, c_i) = a(x)
    want, want_h, want_c, _ = ref.layer_forward(a.state_dict(), x, None, None, 3, True)
    assert_close(inference, want, 1e-12, "inference")          # no dropout in inference
    assert_close(h_i, want_h, 1e-12, "h_n")
    (train_a, _), _ = a.forward_train(x)
    (train_b, _), _ = b.forward_train(x)
    np.testing.assert_array_equal(train_a, train_b)            # same seed, same masks
    assert np.abs(train_a - inference).max() > 1e-3            # masks act in training
    (train_a2, _), _ = a.forward_train(x)
    assert not np.array_equal(train_a2, train_a)               # new masks each forward
    np.testing.assert_array_equal(a(x)[0], inference)          # never in inference
    # one layer: nothing between layers to drop
    with pytest.warns(UserWarning, match="no effect with num_layers=1"):
        single = make(3, 8, 3, "float64", dropout=0.5, seed=7)
    (one, _), _ = single.forward_train(x)
    np.testing.assert_array_equal(one, single(x)[0])


def test_dropout_gradients_by_finite_differences():
    """The BPTT of a training forward with dropout uses that forward's masks:
    its gradients against central differences of forwards drawing the same
    masks (the layer's generator reset to the same state each time)."""
    rng = np.random.default_rng(53)
    T, B, D, H, P, L = 4, 2, 3, 4, 2, 3
    layer = make(D, H, P, "float64", num_layers=L, bidirectional=True, dropout=0.4, seed=3)
    x = rng.normal(size=(T, B, D))
    w_out = rng.normal(size=(T, B, 2 * P))
    seed = 1234

    def forward():
        layer._rng = np.random.default_rng(seed)      # the same dropout masks each time
        return layer.forward_train(x, lengths=[4, 3])

    def loss():
        (out, _), _ = forward()
        return float(np.sum(out * w_out))

    (out, _), backprop = forward()
    layer._rng = np.random.default_rng(seed + 1)
    (other, _), _ = layer.forward_train(x, lengths=[4, 3])
    assert not np.allclose(out, other)                 # dropout acts
    layer.zero_grad()
    dx, _ = backprop(w_out)
    np.testing.assert_allclose(dx, plain_ref.numeric_grad(loss, x), rtol=0, atol=1e-7)
    _finite_difference_check(layer, loss, ["weight_hr_l0", "weight_ih_l1_reverse",
                                           "weight_hr_l2_reverse", "weight_hh_l1"])


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_weight_dropout_matches_the_oracle_with_the_masked_weights(dtype):
    """DropConnect: the training forward and BPTT run on W_hh * mask (the
    masks drawn from a copy of the layer's generator, per layer one (dirs *
    4H, P) mask as tests/reference.dropconnect_masks draws them), W_hh's
    gradient masked; inference uses W_hh unchanged."""
    rng = np.random.default_rng(59)
    T, B, D, H, P, L, p = 5, 3, 4, 6, 3, 2, 0.4
    layer = make(D, H, P, dtype, num_layers=L, bidirectional=True, weight_dropout=p, seed=14)
    params = layer.state_dict()
    x = rng.normal(size=(T, B, D)).astype(dtype)
    h0 = rng.normal(size=(2 * L, B, P)).astype(dtype)
    c0 = rng.normal(size=(2 * L, B, H)).astype(dtype)
    lengths = np.array([5, 3, 4])
    masks = plain_ref.dropconnect_masks(copy.deepcopy(layer._rng), params, L, True, p)
    assert {n: m.shape for n, m in masks.items()} == {ref.names(k, d)["w_hh"]: (4 * H, P)
                                                      for k in range(L) for d in range(2)}
    masked = plain_ref.masked_weights(params, masks)
    tol_f, tol_g = FORWARD_TOL[dtype], GRAD_TOL[dtype]
    (out, (h_n, c_n)), backprop = layer.forward_train(x, (h0, c0), lengths=lengths)
    want_out, want_h, want_c, tape = ref.layer_forward(masked, x, h0, c0, L, True, lengths)
    assert_close(out, want_out, tol_f, "out")
    assert_close(h_n, want_h, tol_f, "h_n")
    assert_close(c_n, want_c, tol_f, "c_n")
    dout = rng.normal(size=out.shape).astype(dtype)
    layer.zero_grad()
    dx, (dh0, dc0) = backprop(dout)
    want_dx, want_dh0, want_dc0, grads = ref.layer_backward(masked, tape, dout)
    assert_close(dx, want_dx, tol_g, "dx")
    assert_close(dh0, want_dh0, tol_g, "dh0")
    assert_close(dc0, want_dc0, tol_g, "dc0")
    for name, grad in grads.items():
        if name in masks:
            grad = grad * masks[name]
        assert_close(layer.grads[name], grad, tol_g, name)
    for name, value in layer.state_dict().items():      # parameters untouched
        np.testing.assert_array_equal(value, params[name], err_msg=name)
    # inference: W_hh itself, bit-identical to the layer without DropConnect
    plain = make(D, H, P, dtype, num_layers=L, bidirectional=True, seed=14)
    for args in ((x, (h0, c0)), (x[:, :1], None)):
        np.testing.assert_array_equal(layer(*args)[0], plain(*args)[0])
    assert np.abs(out - plain(x, (h0, c0), lengths=lengths)[0]).max() > 1e-3


# --- tbptt, concurrent calls, repeatability ------------------------------------------------

def test_tbptt_carries_the_projected_state():
    rng = np.random.default_rng(67)
    layer = make(3, 5, 2, "float64", num_layers=2, batch_first=True, seed=5)
    x = rng.normal(size=(2, 13, 3))
    whole, _ = layer(x)
    chunks = list(fastrnn.tbptt(layer, x, steps=5))
    assert_close(np.concatenate([c[1] for c in chunks], axis=1), whole, 1e-12, "chunks")
    index, out, backprop = chunks[1]
    dout = rng.normal(size=out.shape)
    layer.zero_grad()
    dx, (dh0, dc0) = backprop(dout)
    assert dh0.shape == (2, 2, 2) and dc0.shape == (2, 2, 5)
    got = {k: g.copy() for k, g in layer.grads.items()}
    _, state = layer(x[:, :5])
    layer.zero_grad()
    (out2, _), backprop2 = layer.forward_train(x[index], state)
    dx2, _ = backprop2(dout)
    assert_close(out, out2, 1e-12, "out")
    assert_close(dx, dx2, 1e-12, "dx")
    for name, grad in layer.grads.items():
        assert_close(got[name], grad, 1e-12, name)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_concurrent_calls_equal_sequential_ones(dtype):
    from concurrent.futures import ThreadPoolExecutor
    rng = np.random.default_rng(71)
    layer = make(4, 16, 5, dtype, num_layers=2, bidirectional=True, seed=6)
    inputs = []
    for i in range(8):
        B = 1 + i % 4
        x = rng.normal(size=(7, B, 4)).astype(dtype)
        hx = (rng.normal(size=(4, B, 5)).astype(dtype), rng.normal(size=(4, B, 16)).astype(dtype))
        inputs.append((x, hx if i % 2 else None, rng.integers(1, 8, B) if i % 3 else None))
    want = [layer(*args) for args in inputs]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda args: layer(*args), inputs * 3))
    for i, (out, (h, c)) in enumerate(got):
        w_out, (w_h, w_c) = want[i % len(inputs)]
        np.testing.assert_array_equal(out, w_out)
        np.testing.assert_array_equal(h, w_h)
        np.testing.assert_array_equal(c, w_c)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_repeated_calls_give_the_same_bits(dtype):
    """At a given thread count, float64 too: the same call twice, the same bits."""
    rng = np.random.default_rng(73)
    layer = make(8, 64, 24, dtype, num_layers=2, bidirectional=True, seed=2)
    x = rng.normal(size=(30, 16, 8)).astype(dtype)
    lengths = rng.integers(1, 31, 16)
    dout = rng.normal(size=(30, 16, 48)).astype(dtype)
    runs = []
    for _ in range(2):
        layer.zero_grad()
        (out, _), backprop = layer.forward_train(x, lengths=lengths)
        dx, _ = backprop(dout)
        runs.append([out, dx, layer(x)[0]] + [g.copy() for g in layer.grads.values()])
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)


# --- threads ------------------------------------------------------------------------------

@pytest.fixture
def restore_threads():
    threads = fastrnn.get_num_threads()
    yield
    fastrnn.set_num_threads(threads)


def _thread_case(bidirectional):
    rng = np.random.default_rng(61)
    T, B, D, H, P = 30, 16, 8, 64, 24
    dirs = 2 if bidirectional else 1
    layer = make(D, H, P, "float32", num_layers=2, bidirectional=bidirectional, seed=3)
    x = rng.normal(size=(T, B, D)).astype(np.float32)
    lengths = rng.integers(1, T + 1, B)
    return layer, x, lengths, rng.normal(size=(T, B, dirs * P)).astype(np.float32)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_thread_counts_give_the_same_bits(bidirectional, restore_threads, monkeypatch):
    """float32 outputs bit-identical at 1, 2 and 3 threads (the plan's parts:
    directions and batch ranges; MIN_PARALLEL_WORK 0 so that even this small
    call is split), with and without lengths, and each row computed alone
    equal to the batch, as for the plain layers (tests/test_layer_norm.py's
    test_batch_rows_and_threads_agree)."""
    from fastrnn import _plan
    monkeypatch.setattr(_plan, "MIN_PARALLEL_WORK", 0)
    layer, x, lengths, _ = _thread_case(bidirectional)
    results = {}
    for threads in (1, 2, 3):
        fastrnn.set_num_threads(threads)
        out, (h, c) = layer(x, lengths=lengths)
        full, (h_f, c_f) = layer(x)
        results[threads] = [out, h, c, full, h_f, c_f, layer(x[:, :1])[0]]
    for threads in (2, 3):
        for what, a, b in zip(("out", "h_n", "c_n", "out (no lengths)", "h_n (no lengths)",
                               "c_n (no lengths)", "one row"), results[threads], results[1]):
            np.testing.assert_array_equal(a, b, err_msg=f"{what}, {threads} threads")
    fastrnn.set_num_threads(1)
    rows = np.concatenate([layer(x[:, b:b + 1], lengths=lengths[b:b + 1])[0]
                           for b in range(x.shape[1])], axis=1)
    np.testing.assert_array_equal(rows, results[1][0], err_msg="rows alone")
    dirs = 2 if bidirectional else 1
    want = ref.layer_forward(layer.state_dict(), x, None, None, 2, bidirectional, lengths)[0]
    assert_close(results[1][0], want, FORWARD_TOL["float32"], "against the oracle")
    assert want.shape[-1] == dirs * 24


@pytest.mark.parametrize("bidirectional", [False, True])
def test_thread_counts_give_the_same_training_bits(bidirectional, restore_threads,
                                                   monkeypatch):
    from fastrnn import _plan
    monkeypatch.setattr(_plan, "MIN_PARALLEL_WORK", 0)
    layer, x, lengths, dout = _thread_case(bidirectional)
    results = {}
    for threads in (1, 2, 3):
        fastrnn.set_num_threads(threads)
        layer.zero_grad()
        (out, (h, c)), backprop = layer.forward_train(x, lengths=lengths)
        dx, (dh0, dc0) = backprop(dout)
        results[threads] = dict(out=out, h_n=h, c_n=c, dx=dx, dh0=dh0, dc0=dc0,
                                **{n: g.copy() for n, g in layer.grads.items()})
    differ = {threads: [k for k, v in results[threads].items()
                        if not np.array_equal(v, results[1][k])] for threads in (2, 3)}
    assert differ == {2: [], 3: []}, f"differ from 1 thread's: {differ}"
