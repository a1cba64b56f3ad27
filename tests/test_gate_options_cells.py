"""The gate options on the cells (RNNCell, GRUCell, LSTMCell) against the
oracle of tests/reference_options.py: forward and backprop, float32 and
float64, batched and unbatched; peephole gradients by finite differences;
explicit defaults bit-identical to the plain cell; errors. (The cells take
the layers' keywords: activation specs, clip, input_forget, peepholes; a
cell has one direction, so no per-direction lists.)"""
import numpy as np
import pytest

import fastrnn
import reference_options as ro
from reference import numeric_grad
from test_gate_options import FORWARD_TOL, GRAD_TOL, assert_close


def make_cell(kind, D, H, options, **kw):
    if kind == "rnn":
        return fastrnn.RNNCell(D, H, **kw, **options)
    if kind in ("gru", "gru_reset_before"):
        return fastrnn.GRUCell(D, H, reset_after=kind == "gru", **kw, **options)
    return fastrnn.LSTMCell(D, H, **kw, **options)


def randomize_peepholes(cell, rng):
    if "weight_peephole" in cell.state_dict():
        p = cell.state_dict()["weight_peephole"]
        cell.load_state_dict({"weight_peephole": rng.uniform(-0.8, 0.8, p.shape)
                              .astype(p.dtype)}, strict=False)


CELL_CASES = [
    ("rnn", dict(nonlinearity=("elu", 0.7), clip=0.9)),
    ("rnn", dict(nonlinearity="softsign")),
    ("gru", dict(activation="softplus", recurrent_activation=("hard_sigmoid", 0.3, 0.45),
                 clip=0.8)),
    ("gru_reset_before", dict(activation=("leaky_relu", 0.2), recurrent_activation="softsign")),
    ("lstm", dict(peepholes=True)),
    ("lstm", dict(peepholes=True, input_forget=True, clip=0.7)),
    ("lstm", dict(activation="softsign", recurrent_activation="hard_sigmoid",
                  cell_activation=("scaled_tanh", 1.5, 0.7))),
    ("lstm", {}),                        # the plain cell: checks the harness itself
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("kind, options", CELL_CASES,
                         ids=[f"{k}-{sorted(o)}" for k, o in CELL_CASES])
def test_cell_matches_the_oracle(kind, options, batched, dtype):
    rng = np.random.default_rng(0)
    B, D, H = 3, 4, 3
    cell = make_cell(kind, D, H, options, dtype=np.dtype(dtype).name, seed=1)
    randomize_peepholes(cell, rng)
    x = rng.standard_normal((B, D)).astype(dtype)
    h = rng.standard_normal((B, H)).astype(dtype)
    c = rng.standard_normal((B, H)).astype(dtype) * 2 if kind == "lstm" else None
    dh = rng.standard_normal((B, H)).astype(dtype)
    dc = rng.standard_normal((B, H)).astype(dtype) if kind == "lstm" else None
    params = cell.state_dict()
    want_h, want_c = ro.cell_forward(kind, params, x, h, c, **options)
    want_dx, want_dh, want_dc, want_grads = ro.cell_backward(kind, params, x, h, c, dh, dc,
                                                             **options)
    pick = (lambda a: a) if batched else (lambda a: None if a is None else a[0])
    if not batched:
        want_h, want_c, want_dx, want_dh = pick(want_h), pick(want_c), pick(want_dx), \
            pick(want_dh)
        want_dc = pick(want_dc)
        # one sample: the parameter gradients are the first sample's
        want_grads = ro.cell_backward(kind, params, x[:1], h[:1],
                                      None if c is None else c[:1], dh[:1],
                                      None if dc is None else dc[:1], **options)[3]
    hx = (pick(h), pick(c)) if kind == "lstm" else pick(h)
    out = cell(pick(x), hx)
    h_new, c_new = out if kind == "lstm" else (out, None)
    assert h_new.dtype == np.dtype(dtype)
    assert_close(h_new, want_h, FORWARD_TOL[dtype], "h'")
    if kind == "lstm":
        assert_close(c_new, want_c, FORWARD_TOL[dtype], "c'")

    cell.zero_grad()
    _, backprop = cell.forward_train(pick(x), hx)
    dx, dhx = backprop((pick(dh), pick(dc)) if kind == "lstm" else pick(dh))
    assert_close(dx, want_dx, GRAD_TOL[dtype], "dx")
    got_dh, got_dc = dhx if kind == "lstm" else (dhx, None)
    assert_close(got_dh, want_dh, GRAD_TOL[dtype], "dh")
    if kind == "lstm":
        assert_close(got_dc, want_dc, GRAD_TOL[dtype], "dc")
    assert set(cell.grads) == set(params)
    for name in params:
        assert_close(cell.grads[name], want_grads[name], GRAD_TOL[dtype], name)


def test_lstm_cell_peephole_gradient_matches_finite_differences():
    rng = np.random.default_rng(2)
    cell = fastrnn.LSTMCell(3, 4, peepholes=True, input_forget=True, clip=0.9,
                            activation="softsign", dtype="float64", seed=3)
    randomize_peepholes(cell, rng)
    x = rng.standard_normal((2, 3))
    hx = (rng.standard_normal((2, 4)), rng.standard_normal((2, 4)) * 2)
    w_h, w_c = rng.standard_normal((2, 2, 4))

    def loss():
        h, c = cell(x, hx)
        return float((h * w_h).sum() + (c * w_c).sum())

    cell.zero_grad()
    _, backprop = cell.forward_train(x, hx)
    backprop((w_h, w_c))
    param = cell.state_dict()["weight_peephole"].copy()
    assert param.shape == (12,)

    def perturbed():
        cell.load_state_dict({"weight_peephole": param}, strict=False)
        return loss()

    numeric = numeric_grad(perturbed, param)
    # central differences of a smooth float64 loss: ~1e-9
    np.testing.assert_allclose(cell.grads["weight_peephole"], numeric, rtol=0, atol=1e-7)
    assert np.abs(numeric).max() > 1e-3


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_cell_explicit_defaults_are_bit_identical(dtype):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 2)).astype(dtype)
    h, c = (rng.standard_normal((3, 5)).astype(dtype) for _ in range(2))
    pairs = [
        (fastrnn.RNNCell(2, 5, dtype=dtype, seed=5),
         fastrnn.RNNCell(2, 5, nonlinearity="tanh", clip=None, dtype=dtype, seed=5), h),
        (fastrnn.GRUCell(2, 5, dtype=dtype, seed=5),
         fastrnn.GRUCell(2, 5, activation="tanh", recurrent_activation="sigmoid", clip=None,
                         dtype=dtype, seed=5), h),
        (fastrnn.LSTMCell(2, 5, dtype=dtype, seed=5),
         fastrnn.LSTMCell(2, 5, activation="tanh", recurrent_activation="sigmoid",
                          cell_activation=None, clip=None, input_forget=False, peepholes=False,
                          dtype=dtype, seed=5), (h, c)),
    ]
    for plain, explicit, hx in pairs:
        a, b = plain(x, hx), explicit(x, hx)
        for u, v in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
            np.testing.assert_array_equal(u, v)
        assert repr(plain) == repr(explicit)


@pytest.mark.parametrize("cls, kwargs, exc, message", [
    (fastrnn.RNNCell, dict(nonlinearity="gelu"), ValueError, r"RNNCell: nonlinearity.*'gelu'"),
    (fastrnn.GRUCell, dict(activation=("affine", 1.0, 0.0, 1.0)), ValueError,
     r"GRUCell: activation"),
    (fastrnn.LSTMCell, dict(recurrent_activation=("elu", float("nan"))), ValueError,
     r"LSTMCell: recurrent_activation"),
    (fastrnn.LSTMCell, dict(clip=0.0), ValueError, r"LSTMCell: clip"),
    (fastrnn.LSTMCell, dict(activation=["tanh", "relu"]), (TypeError, ValueError),
     r"LSTMCell: activation"),
    (fastrnn.GRUCell, dict(peepholes=True), (TypeError, ValueError), r"GRUCell.*peepholes"),
    (fastrnn.RNNCell, dict(input_forget=True), (TypeError, ValueError),
     r"RNNCell.*input_forget"),
])
def test_cell_option_errors_name_the_class_and_argument(cls, kwargs, exc, message):
    with pytest.raises(exc, match=message):
        cls(3, 4, **kwargs)


def test_cell_pickles_with_its_options():
    import pickle
    rng = np.random.default_rng(6)
    cell = fastrnn.LSTMCell(3, 4, peepholes=True, clip=1.5, cell_activation="softsign",
                            dtype="float64", seed=7)
    randomize_peepholes(cell, rng)
    copy = pickle.loads(pickle.dumps(cell))
    assert repr(copy) == repr(cell)
    x = rng.standard_normal((2, 3))
    h, c = rng.standard_normal((2, 2, 4))
    for u, v in zip(copy(x, (h, c)), cell(x, (h, c))):
        np.testing.assert_array_equal(u, v)
