"""What the option tests share (test_initial_state.py, test_weight_dropout.py,
test_gate_options.py, test_layer_norm.py, conftest.py): tolerances, the cell kinds and layer shapes
they run, a scaled closeness check and a layer maker."""
import numpy as np

import fastrnn

# float64: the same float64 expressions in other orders, ~1e-16 per operation
# over a few dozen steps; float32: every product and sum rounded to float32,
# within 1e-5 of the scale over these few steps (as tests/test_gate_options.py
# measured for the same layers and sizes).
TOL = {np.float32: 1e-5, np.float64: 1e-12}

KINDS = ["rnn_tanh", "rnn_relu", "gru", "gru_reset_before", "lstm"]

STRUCTURES = [
    dict(T=5, B=3, D=2, H=3, num_layers=2, bidirectional=True, batch_first=True,
         use_lengths=True),
    dict(T=4, B=2, D=3, H=1),
    dict(T=6, B=4, D=3, H=7, bidirectional=True, use_lengths=True),
    dict(T=3, B=1, D=2, H=4, num_layers=3),
]


def assert_close(got, want, tol, what=""):
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    scale = max(1.0, float(np.abs(want).max(initial=0.0)))
    err = float(np.abs(got - want).max(initial=0.0))
    assert err <= tol * scale, f"{what}: max abs error {err:.3g} > {tol:g} x scale {scale:.3g}"


def make_layer(kind, D, H, **kw):
    if kind.startswith("rnn"):
        return fastrnn.RNN(D, H, nonlinearity=kind[4:], **kw)
    if kind.startswith("gru"):
        return fastrnn.GRU(D, H, reset_after=kind == "gru", **kw)
    return fastrnn.LSTM(D, H, **kw)
