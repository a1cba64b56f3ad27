"""BPTT gradients against central finite differences (float64)."""
import numpy as np
import pytest

import fastrnn
from fastrnn import _validation
from reference import numeric_grad
from test_forward import KINDS, make_cell, make_layer

TOL = 1e-7  # relative to the largest gradient; central differences give ~1e-9


def assert_grad(analytic, numeric, what):
    scale = max(1.0, np.abs(numeric).max())
    err = np.abs(analytic - numeric).max()
    assert err <= TOL * scale, f"{what}: max error {err:.3g} (scale {scale:.3g})"


def layer_loss_setup(layer, kind, x, hx, lengths, seed):
    """A random linear loss of out and of the final state, and its gradients."""
    rng = np.random.default_rng(seed)
    (out, state), _ = layer.forward_train(x, hx, lengths=lengths)
    w_out = rng.standard_normal(out.shape)
    states = state if kind == "lstm" else (state,)
    w_state = [rng.standard_normal(s.shape) for s in states]
    dropout_seed = int(rng.integers(1 << 30))

    def forward():
        layer._rng = np.random.default_rng(dropout_seed)  # the same dropout masks each time
        return layer.forward_train(x, hx, lengths=lengths)

    def loss():
        (out, state), _ = forward()
        states = state if kind == "lstm" else (state,)
        return float((out * w_out).sum() + sum((s * w).sum() for s, w in zip(states, w_state)))

    def analytic():
        layer.zero_grad()
        _, backprop = forward()
        dstate = tuple(w_state) if kind == "lstm" else w_state[0]
        return backprop(w_out, dstate)

    return loss, analytic


def check_layer_grads(kind, T, B, D, H, num_layers=1, bidirectional=False, batch_first=False,
                      bias=True, use_lengths=False, unbatched=False, dropout=0.0, seed=0,
                      after_build=None):
    rng = np.random.default_rng(seed)
    layer = make_layer(kind, D, H, num_layers=num_layers, bidirectional=bidirectional,
                       batch_first=batch_first, bias=bias, dropout=dropout, dtype="float64",
                       seed=seed)
    if after_build is not None:
        after_build()
    dirs = 2 if bidirectional else 1
    x = rng.standard_normal((B, T, D) if batch_first else (T, B, D))
    hshape = (num_layers * dirs, B, H)
    hx = tuple(rng.standard_normal(hshape) for _ in range(2 if kind == "lstm" else 1))
    if unbatched:
        x = x[:, 0]
        hx = tuple(h[:, 0] for h in hx)
    hx = hx if kind == "lstm" else hx[0]
    lengths = rng.integers(1, T + 1, size=B) if use_lengths else None
    loss, analytic = layer_loss_setup(layer, kind, x, hx, lengths, seed)

    dx, dhx = analytic()
    for name, param in layer.state_dict().items():
        numeric = numeric_grad(parameter_loss(layer, name, param, loss), param)
        layer.load_state_dict({name: param}, strict=False)
        assert_grad(layer.grads[name], numeric, name)
    assert_grad(dx, numeric_grad(loss, x), "input")
    for name, h, dh in zip(("h0", "c0"), hx if kind == "lstm" else (hx,),
                           dhx if kind == "lstm" else (dhx,)):
        assert_grad(dh, numeric_grad(loss, h), name)


def parameter_loss(module, name, param, loss):
    """The loss as a function of one parameter: numeric_grad perturbs
    ``param`` (a copy) in place, and each evaluation loads it."""
    def perturbed_loss():
        module.load_state_dict({name: param}, strict=False)
        return loss()
    return perturbed_loss


CASES = [
    dict(T=1, B=1, D=1, H=1),
    dict(T=4, B=2, D=3, H=3),
    dict(T=5, B=3, D=2, H=3, num_layers=2, bidirectional=True, use_lengths=True),
    dict(T=5, B=3, D=2, H=3, num_layers=2, bidirectional=True, use_lengths=True,
         batch_first=True),
    dict(T=4, B=1, D=3, H=2, bidirectional=True, unbatched=True),
    dict(T=3, B=2, D=3, H=2, bias=False, num_layers=2),
    dict(T=4, B=3, D=2, H=3, num_layers=3, dropout=0.4),
    dict(T=6, B=1, D=2, H=4, use_lengths=True),
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_layer_gradients_match_finite_differences(kind, case):
    check_layer_grads(kind, **case)


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_on_the_huge_batch_first_route(kind, monkeypatch):
    """The time-major detour for huge batch-first inputs gives the same gradients."""
    check_layer_grads(kind, T=4, B=3, D=2, H=2, num_layers=2, bidirectional=True,
                      batch_first=True, use_lengths=True,
                      after_build=lambda: monkeypatch.setattr(_validation, "BLAS_INT_MAX", 8))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batched", [True, False])
def test_cell_gradients_match_finite_differences(kind, batched):
    rng = np.random.default_rng(4)
    cell = make_cell(kind, 3, 4, dtype="float64", seed=1)
    shape = (2,) if batched else ()
    x = rng.standard_normal(shape + (3,))
    states = [rng.standard_normal(shape + (4,)) for _ in range(2 if kind == "lstm" else 1)]
    weights = [rng.standard_normal(shape + (4,)) for _ in states]
    hx = tuple(states) if kind == "lstm" else states[0]

    def loss():
        out = cell(x, hx)
        outs = out if kind == "lstm" else (out,)
        return float(sum((o * w).sum() for o, w in zip(outs, weights)))

    cell.zero_grad()
    _, backprop = cell.forward_train(x, hx)
    dx, dhx = backprop(tuple(weights) if kind == "lstm" else weights[0])
    for name, param in cell.state_dict().items():
        numeric = numeric_grad(parameter_loss(cell, name, param, loss), param)
        cell.load_state_dict({name: param}, strict=False)
        assert_grad(cell.grads[name], numeric, name)
    assert_grad(dx, numeric_grad(loss, x), "input")
    for s, ds in zip(states, dhx if kind == "lstm" else (dhx,)):
        assert_grad(ds, numeric_grad(loss, s), "state")


def test_gradients_accumulate_and_zero_grad_clears():
    layer = fastrnn.GRU(3, 4, dtype="float64", seed=0)
    x = np.random.default_rng(0).standard_normal((5, 2, 3))
    (out, _), backprop = layer.forward_train(x)
    backprop(np.ones_like(out))
    once = {k: g.copy() for k, g in layer.grads.items()}
    (out, _), backprop = layer.forward_train(x)
    backprop(np.ones_like(out))
    for k, g in layer.grads.items():
        np.testing.assert_allclose(g, 2 * once[k], rtol=1e-13, atol=0)
    layer.zero_grad()
    assert all(not g.any() for g in layer.grads.values())


def test_forward_train_matches_inference_without_dropout():
    layer = fastrnn.LSTM(3, 5, num_layers=2, bidirectional=True, seed=0)
    x = np.random.default_rng(1).standard_normal((6, 4, 3))
    (out, (h, c)), _ = layer.forward_train(x, lengths=[6, 2, 4, 1])
    out2, (h2, c2) = layer(x, lengths=[6, 2, 4, 1])
    np.testing.assert_array_equal(out, out2)
    np.testing.assert_array_equal(h, h2)
    np.testing.assert_array_equal(c, c2)


def test_dropout_only_in_training_and_seeded():
    make = lambda: fastrnn.GRU(3, 8, num_layers=3, dropout=0.5, seed=7)  # noqa: E731
    x = np.random.default_rng(1).standard_normal((5, 4, 3))
    a, b = make(), make()
    inference, _ = a(x)
    (train_a, _), _ = a.forward_train(x)
    (train_b, _), _ = b.forward_train(x)
    np.testing.assert_array_equal(train_a, train_b)         # same seed, same masks
    assert not np.allclose(train_a, inference)              # masks act in training
    np.testing.assert_array_equal(a(x)[0], inference)       # never in inference


def test_padding_values_never_reach_gradients():
    layer = fastrnn.LSTM(2, 3, bidirectional=True, dtype="float64", seed=0)
    x = np.random.default_rng(2).standard_normal((5, 2, 2))
    x_nan = x.copy()
    x_nan[3:, 1] = np.nan                                   # padding of sequence 1
    results = []
    for inp in (x, x_nan):
        layer.zero_grad()
        (out, _), backprop = layer.forward_train(inp, lengths=[5, 3])
        dx, _ = backprop(np.ones_like(out))
        results.append((out, dx, {k: g.copy() for k, g in layer.grads.items()}))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1], results[1][1])
    assert not results[1][1][3:, 1].any()                   # padded input gets zero gradient
    for k in results[0][2]:
        np.testing.assert_array_equal(results[0][2][k], results[1][2][k])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch_first", [False, True])
def test_tbptt_carries_state_not_gradient(kind, batch_first):
    rng = np.random.default_rng(11)
    layer = make_layer(kind, 3, 4, num_layers=2, batch_first=batch_first, dtype="float64",
                       seed=5)
    x = rng.standard_normal((2, 23, 3) if batch_first else (23, 2, 3))
    full_out, _ = layer(x)
    chunks = list(fastrnn.tbptt(layer, x, steps=5))
    steps = [slice(0, 5), slice(5, 10), slice(10, 15), slice(15, 20), slice(20, 23)]
    # the index selects a chunk's steps from arrays laid out like x
    assert [c[0] for c in chunks] == [(slice(None), s) if batch_first else s for s in steps]
    for index, out, _ in chunks:
        assert out.shape[:2] == x[index].shape[:2]
    axis = 1 if batch_first else 0
    np.testing.assert_allclose(np.concatenate([c[1] for c in chunks], axis=axis), full_out,
                               rtol=0, atol=1e-14)
    # the gradient of a chunk is that of forward_train on the chunk alone, from
    # the carried state treated as a constant
    time, out, backprop = chunks[2]
    dout = rng.standard_normal(out.shape)
    layer.zero_grad()
    dx, _ = backprop(dout)
    got = {k: g.copy() for k, g in layer.grads.items()}
    prefix = x[:, :10] if batch_first else x[:10]
    _, state = layer(prefix)
    layer.zero_grad()
    (out2, _), backprop2 = layer.forward_train(x[time], state)
    dx2, _ = backprop2(dout)
    np.testing.assert_allclose(out, out2, rtol=0, atol=1e-14)
    np.testing.assert_allclose(dx, dx2, rtol=0, atol=1e-14)
    for k, g in layer.grads.items():
        np.testing.assert_allclose(got[k], g, rtol=0, atol=1e-14)


def test_tbptt_names_the_stream_it_was_given_when_its_width_is_wrong():
    # (the chunk's shape, (2, 2, 5), was named by the layer)
    with pytest.raises(ValueError, match=r"tbptt: expected x with 4 features \(the last "
                                         r"axis\), got \(5, 2, 5\)"):
        list(fastrnn.tbptt(fastrnn.LSTM(4, 8), np.ones((5, 2, 5), np.float32), steps=2))


def test_tbptt_checks_the_initial_state_at_the_call():
    """As its docstring says, the arguments are checked at the call: a
    wrong hx had been refused only when the first chunk was asked for."""
    x = np.zeros((2, 5, 2))
    gru = fastrnn.GRU(2, 3, batch_first=True, seed=1)
    with pytest.raises(ValueError, match=r"GRU: expected hx of shape \(1, 2, 3\)"):
        fastrnn.tbptt(gru, x, 2, hx=np.zeros((1, 7, 3)))
    lstm = fastrnn.LSTM(2, 3, seed=1)
    with pytest.raises(ValueError, match=r"LSTM: expected c_0 of shape \(1, 3\)"):
        fastrnn.tbptt(lstm, np.zeros((5, 2)), 2, hx=(np.zeros((1, 3)), np.zeros((2, 3))))
    good = fastrnn.tbptt(lstm, np.zeros((5, 2)), 2, hx=(np.zeros((1, 3)), None))
    assert len(list(good)) == 3


def test_tbptt_refuses_a_bidirectional_layer():
    layer = fastrnn.GRU(3, 4, bidirectional=True, seed=0)
    with pytest.raises(ValueError, match="tbptt: .* is bidirectional; its reverse direction"):
        next(fastrnn.tbptt(layer, np.zeros((6, 2, 3)), steps=2))
    with pytest.raises(ValueError, match=r"tbptt: x has no steps \(T = 0\)"):
        next(fastrnn.tbptt(fastrnn.GRU(3, 4, seed=0), np.zeros((0, 2, 3)), steps=2))


@pytest.mark.parametrize("kind", KINDS)
def test_backprop_bad_inputs(kind):
    layer = make_layer(kind, 3, 4, num_layers=2, seed=0)
    x = np.random.default_rng(0).standard_normal((5, 2, 3))
    (out, state), backprop = layer.forward_train(x)
    with pytest.raises(ValueError, match=r"expected dout of the output's shape \(5, 2, 4\), "
                                         r"got \(5, 2, 3\)"):
        backprop(np.ones((5, 2, 3)))
    with pytest.raises(TypeError, match="dout must have a real numeric dtype"):
        backprop(np.ones((5, 2, 4), complex))
    if kind == "lstm":
        with pytest.raises(TypeError, match=r"dstate must be a tuple \(dh_n, dc_n\)"):
            backprop(np.ones_like(out), np.ones((2, 2, 4)))
    else:
        with pytest.raises(TypeError, match="dstate must be one array"):
            backprop(np.ones_like(out), (np.ones((2, 2, 4)),))
    with pytest.raises(ValueError, match=r"expected dh_n of shape \(2, 2, 4\), got \(2, 4\)"):
        backprop(np.ones_like(out), (np.ones((2, 4)), None) if kind == "lstm" else np.ones((2, 4)))
    # a refused call does not use the backprop up; a successful one does
    dx, _ = backprop(np.ones_like(out))
    assert dx.shape == x.shape
    with pytest.raises(RuntimeError, match="already run"):
        backprop(np.ones_like(out))


def test_backprop_refuses_after_parameters_changed():
    layer = fastrnn.GRU(3, 4, seed=0)
    (out, _), backprop = layer.forward_train(np.ones((2, 1, 3)))
    layer.load_state_dict(fastrnn.GRU(3, 4, seed=1).state_dict())
    with pytest.raises(RuntimeError, match="parameters changed after forward_train"):
        backprop(np.ones_like(out))


@pytest.mark.parametrize("kind", KINDS)
def test_cell_backprop_bad_inputs(kind):
    cell = make_cell(kind, 3, 4, seed=0)
    _, backprop = cell.forward_train(np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"expected dh of shape \(2, 4\), got \(4,\)"):
        backprop((np.ones(4), None) if kind == "lstm" else np.ones(4))
    if kind == "lstm":
        with pytest.raises(TypeError, match=r"must be a tuple \(dh, dc\)"):
            backprop(np.ones((2, 4)))
    backprop((np.ones((2, 4)), None) if kind == "lstm" else np.ones((2, 4)))
    with pytest.raises(RuntimeError, match="already run"):
        backprop((np.ones((2, 4)), None) if kind == "lstm" else np.ones((2, 4)))


@pytest.mark.parametrize("kind", KINDS)
def test_changing_the_input_after_forward_train_does_not_change_gradients(kind):
    layer = make_layer(kind, 3, 4, dtype="float64", seed=0)
    x = np.random.default_rng(0).standard_normal((5, 2, 3))
    (out, _), backprop = layer.forward_train(x)
    layer.zero_grad()
    backprop(np.ones_like(out))
    expected = {k: g.copy() for k, g in layer.grads.items()}
    (out, _), backprop = layer.forward_train(x)
    x[...] = 0                                  # the caller reuses its buffer
    layer.zero_grad()
    backprop(np.ones_like(out))
    for k, g in layer.grads.items():
        np.testing.assert_array_equal(g, expected[k])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("wrap", [False, True])
def test_changing_the_lengths_after_forward_train_does_not_change_gradients(kind, wrap):
    """The tape keeps its own lengths: a caller refilling its int64 buffer
    (or a torch tensor sharing it) for the next batch before backprop, as
    gradient accumulation does, changes no gradient (it took the new
    lengths' valid steps, or, past T, read unwritten memory)."""
    torch = pytest.importorskip("torch") if wrap else None
    layer = make_layer(kind, 3, 4, seed=0)
    net = fastrnn.Reversed(layer) if wrap else layer
    x = np.random.default_rng(0).standard_normal((6, 3, 3)).astype(np.float32)
    dout = np.random.default_rng(1).standard_normal((6, 3, 4)).astype(np.float32)

    def run(values):
        lengths = torch.tensor([6, 4, 2]) if wrap else np.array([6, 4, 2], np.int64)
        (out, _), backprop = net.forward_train(x, lengths=lengths)
        for value in values:
            lengths[:] = value
        layer.zero_grad()
        dx = backprop(dout)[0]
        return dx, {k: g.copy() for k, g in layer.grads.items()}

    dx, grads = run([])
    for values in ([1], [7], [6, 1]):
        got_dx, got = run(values)
        np.testing.assert_array_equal(got_dx, dx)
        for k in grads:
            np.testing.assert_array_equal(got[k], grads[k], err_msg=k)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("H", [9, 75, 130])
def test_batch_one_backward_equals_the_batched_gemm_path(kind, H):
    """At batch 1, dh . W_hh is a vectorised loop in column blocks; at batch
    2 a BLAS gemm: the first sequence's gradients must agree."""
    layer = make_layer(kind, 6, H, dtype="float64", seed=4)
    rng = np.random.default_rng(H)
    x = rng.standard_normal((7, 2, 6))
    dout = rng.standard_normal((7, 2, H))
    results = []
    for batch in (x[:, :1], x):
        layer.zero_grad()
        (out, _), backprop = layer.forward_train(batch)
        dx, dstate = backprop(dout[:, :batch.shape[1]])
        dh0 = dstate[0] if kind == "lstm" else dstate
        results.append((dx[:, 0], dh0[:, 0]))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("options", [{}, {"clip": 50.0}])
def test_relu_passes_the_gradient_where_its_output_is_nan(dtype, options):
    """PyTorch's rule (threshold_backward: 0 where h' <= 0, else the
    gradient): a NaN pre-activation passes its gradient on, as it does in
    torch. fastrnn zeroed it (h' > 0 is False at NaN): the biases' gradients
    and dx of an RNN that met a NaN (or an overflow's inf - inf) were finite
    and different from PyTorch's. Here every pre-activation of the one step
    is NaN, so each bias gradient is the output gradient itself."""
    dout = np.array([[1.0, -2.0, 3.0]])
    x = np.array([[np.nan, 1.0]])
    cell = fastrnn.RNNCell(2, 3, nonlinearity="relu", dtype=dtype, seed=0, **options)
    h, backprop = cell.forward_train(x)
    assert np.isnan(h).all()
    backprop(dout)
    np.testing.assert_array_equal(cell.grads["bias_ih"], dout[0])
    np.testing.assert_array_equal(cell.grads["bias_hh"], dout[0])
    layer = fastrnn.RNN(2, 3, nonlinearity="relu", dtype=dtype, seed=0, **options)
    (out, _), backprop = layer.forward_train(x[None])
    backprop(dout[None])
    np.testing.assert_array_equal(layer.grads["bias_ih_l0"], dout[0])


def test_relu_module_passes_the_gradient_at_nan():
    relu = fastrnn.ReLU()
    _, backprop = relu._seq_train(np.array([[np.nan, 2.0, -1.0, 0.0]]))
    np.testing.assert_array_equal(backprop(np.ones((1, 4))), [[1.0, 1.0, 0.0, 0.0]])


@pytest.mark.parametrize("kind, options", [
    ("RNN", {}), ("GRU", {}), ("GRU", {"reset_after": False}), ("LSTM", {}),
    ("LSTM", {"bidirectional": True}), ("LSTM", {"peepholes": True}),
    ("LSTM", {"proj_size": 3}), ("Linear", {})])
def test_float32_gradient_sums_over_many_rows_keep_their_precision(kind, options):
    """The weight and bias gradients are sums over T * B rows. They ran as one
    float32 chain each (in the kernels, and numpy's along axis 0 in Python:
    Linear's bias, layer norm's and the peepholes' sums), whose error grew
    with the rows (at 4.2 M rows up to 7e-3 of the gradient; a bias
    gradient of 2**25 rows of 1 stopped at 2**24). Each chain now runs over
    a group of rows and the groups' totals are added: at most 4e-7 here
    (torch ~1e-7). [failed before: 1e-5 to 2.5e-5 at these 2**19 rows]"""
    rng = np.random.default_rng(0)
    T, B, H = 4, 2**17, 4
    x = rng.uniform(-1, 1, (T, B, H)).astype(np.float32)
    out = options.get("proj_size", H) * (2 if options.get("bidirectional") else 1)
    dy = (rng.uniform(0, 2, (T, B, out)) / (T * B)).astype(np.float32)
    grads, state = {}, None
    for dtype in ("float32", "float64"):   # float64 on float32's weights: the oracle
        if kind == "Linear":
            layer = fastrnn.Linear(H, H, dtype=dtype, seed=1)
        else:
            layer = getattr(fastrnn, kind)(H, H, dtype=dtype, seed=1, **options)
        if state is None:
            state = layer.state_dict()
        else:
            layer.load_state_dict({k: w.astype(np.float64) for k, w in state.items()})
        if kind == "Linear":   # (a Sequential's per-step Linear)
            _, backprop = layer._seq_train(x.astype(dtype))
        else:
            _, backprop = layer.forward_train(x.astype(dtype))
        backprop(dy.astype(dtype))
        grads[dtype] = layer.grads
    for name, exact in grads["float64"].items():
        error = np.abs(grads["float32"][name] - exact).max() / np.abs(exact).max()
        assert error < 2e-6, (name, error)


def test_column_sums_keep_their_precision_over_many_rows():
    """_parallel.column_sums and row_products, the sums over rows computed in
    Python (layer norm's and the peepholes' gradients, Linear's and a
    projection's): numpy's float32 sum along axis 0 is one chain a column
    (2**25 ones summed to 2**24). [numpy's sums: 2**24, and 6e-6 and 2e-4
    off]"""
    from fastrnn import _parallel
    ones = np.ones((2**25, 2), np.float32)
    assert _parallel.column_sums(ones).tolist() == [2**25, 2**25]
    rng = np.random.default_rng(0)
    a = rng.uniform(0, 1, (2**20, 3)).astype(np.float32)
    b = rng.uniform(0, 1, (2**20, 3)).astype(np.float32)
    exact = a.astype(np.float64).sum(axis=0)
    assert np.abs(_parallel.column_sums(a) - exact).max() / exact.max() < 1e-6
    exact = (a.astype(np.float64) * b).sum(axis=0)
    assert np.abs(_parallel.column_sums(a, b) - exact).max() / exact.max() < 1e-6
    exact = a.astype(np.float64).T @ b
    assert np.abs(_parallel.row_products(a, b) - exact).max() / exact.max() < 1e-6
